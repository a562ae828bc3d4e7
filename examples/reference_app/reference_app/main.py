"""The FastAPI application: ``uvicorn reference_app.main:app``.

Its lifespan (not the deprecated ``on_event`` hooks) creates missing tables when
``REFERENCE_APP_CREATE_TABLES`` is ``1`` (the default, so the SQLite default runs out of the
box; test suites that build the schema themselves set ``0``), adds the jobs, starts the
scheduler, and on the way out shuts the scheduler down and closes the engine's connections.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from reference_app.routers import router
from reference_app.scheduler import scheduler, setup_scheduler, shutdown_scheduler
from reference_app.session import create_tables, engine
from reference_app.settings import create_tables_on_startup


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the scheduler with the app and stop it with the app."""
    if create_tables_on_startup():
        await create_tables()
    setup_scheduler()
    # Guarded so that a harness (or a second app instance) that started it already is fine.
    if not scheduler.running:
        scheduler.start()
    try:
        yield
    finally:
        await shutdown_scheduler()
        await engine.dispose()


def create_app() -> FastAPI:
    """Build the application with its lifespan and routes."""
    app = FastAPI(
        title="pytest-fastsched reference app",
        summary="The pending -> processing -> completed | error scheduled-job pattern.",
        lifespan=lifespan,
    )
    app.include_router(router)
    return app


app = create_app()
"""The ASGI application."""

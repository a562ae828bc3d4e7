"""The FastAPI application: ``uvicorn reference_app_sync.main:app``.

Its lifespan (not the deprecated ``on_event`` hooks) creates missing tables when
``REFERENCE_APP_SYNC_CREATE_TABLES`` is ``1`` (the default, so the SQLite default runs out of
the box; test suites that build the schema themselves set ``0``), adds the jobs, starts the
scheduler's thread, and on the way out shuts the scheduler down, waiting for running jobs,
and closes the engine's connections. The blocking calls run on FastAPI's thread pool, never
on the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from reference_app_sync.database import create_tables, engine
from reference_app_sync.routers import router
from reference_app_sync.scheduler import scheduler, setup_scheduler, shutdown_scheduler
from reference_app_sync.settings import create_tables_on_startup


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the scheduler with the app and stop it with the app."""
    if create_tables_on_startup():
        await run_in_threadpool(create_tables)
    setup_scheduler()
    # Guarded so that a harness (or a second app instance) that started it already is fine.
    if not scheduler.running:
        scheduler.start()
    try:
        yield
    finally:
        # Waits for the jobs still running: in a thread, so the loop goes on serving meanwhile.
        await run_in_threadpool(shutdown_scheduler)
        await run_in_threadpool(engine.dispose)


def create_app() -> FastAPI:
    """Build the application with its lifespan and routes."""
    app = FastAPI(
        title="pytest-fastsched sync reference app",
        summary="The pending -> processing -> completed | error pattern, with sync SQLAlchemy.",
        lifespan=lifespan,
    )
    app.include_router(router)
    return app


app = create_app()
"""The ASGI application."""

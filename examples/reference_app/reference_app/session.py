"""The database engine, the session factory and the background-session context manager.

The engine is created at import from ``REFERENCE_APP_DATABASE_URL``; creating it opens no
connection. Every database access of the app goes through :data:`async_session_factory`, so a
test harness that re-binds that one factory (``async_session_factory.configure(bind=...)``)
covers the whole app, including :func:`create_tables`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session

from reference_app.models import metadata
from reference_app.settings import settings


def engine_options(url: str) -> dict[str, Any]:
    """Return the ``create_async_engine`` keyword arguments suited to the database at ``url``."""
    if make_url(url).get_driver_name() != "asyncpg":
        return {}
    # Transaction-mode poolers (PgBouncer, Supavisor) give each transaction to whichever server
    # connection is free, so a statement prepared on one server connection is missing, or its
    # name already taken, on the next. Both caches must be off: asyncpg's own
    # (statement_cache_size) and the SQLAlchemy dialect's (prepared_statement_cache_size).
    # Unique statement names stop "prepared statement ... already exists" collisions.
    # Note that `text(...).execution_options(prepared=False)` is not a SQLAlchemy option:
    # it is accepted silently and changes nothing.
    return {
        "pool_pre_ping": True,
        "connect_args": {
            "statement_cache_size": 0,
            "prepared_statement_cache_size": 0,
            "prepared_statement_name_func": _unique_statement_name,
        },
    }


def _unique_statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4()}__"


def _create_engine(url: str) -> AsyncEngine:
    return create_async_engine(url, **engine_options(url))


engine = _create_engine(settings.database_url)
"""The app's engine, created without connecting."""

async_session_factory = async_sessionmaker(engine, expire_on_commit=False)
"""Factory of every session the app opens, in requests and in jobs alike."""


@asynccontextmanager
async def get_background_session() -> AsyncIterator[AsyncSession]:
    """Open a session for one short unit of work: commit on success, roll back on error.

    The error is re-raised after the rollback. Jobs open one of these per step rather than one
    for a whole batch, so locks are held briefly and each step's outcome is committed on its own.
    """
    async with async_session_factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


async def create_tables() -> None:
    """Create the tables of :data:`~reference_app.models.metadata` that do not exist yet."""
    async with get_background_session() as session:
        await session.run_sync(_create_all)


def _create_all(session: Session) -> None:
    metadata.create_all(session.connection())

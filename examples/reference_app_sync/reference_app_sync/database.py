"""The database engine, ``SessionLocal``, the request dependency and the job sessions.

The tutorial shape: one sync engine created at import from ``REFERENCE_APP_SYNC_DATABASE_URL``
(creating it opens no connection) and ``SessionLocal = sessionmaker(...)`` bound to it. Every
database access of the app goes through :data:`SessionLocal`, so a test harness that
re-binds that one factory (``SessionLocal.configure(bind=...)``) covers the whole app,
including :func:`create_tables`.

Sessions are never shared between threads: a request gets its own from :func:`get_db`, and
each step of a job opens its own with :func:`background_session`, in the job's thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from reference_app_sync.models import metadata
from reference_app_sync.settings import settings


def engine_options(url: str) -> dict[str, Any]:
    """Return the ``create_engine`` keyword arguments suited to the database at ``url``."""
    driver = make_url(url).get_driver_name()
    if driver == "psycopg":
        # psycopg 3 prepares a statement on the server once it ran five times on a connection.
        # Behind a transaction-mode pooler (PgBouncer, Supavisor) the next transaction may run
        # on another server connection, where that statement does not exist: never prepare.
        return {"pool_pre_ping": True, "connect_args": {"prepare_threshold": None}}
    if driver == "pysqlite":
        # The pool hands a connection to whichever thread asks next (a request's, a job's);
        # SQLAlchemy 2 allows that already for files, say it for every SQLite URL.
        return {"connect_args": {"check_same_thread": False}}
    return {}


def build_engine(url: str) -> Engine:
    """Create the app's kind of engine for ``url`` (see :func:`engine_options`); no connection."""
    return create_engine(url, **engine_options(url))


engine = build_engine(settings.database_url)
"""The app's engine, created without connecting."""

SessionLocal = sessionmaker(bind=engine, autoflush=False, expire_on_commit=False)
"""Factory of every session the app opens, in requests and in jobs alike."""


def get_db() -> Iterator[Session]:
    """The FastAPI dependency: one session per request, closed after the response.

    Endpoints that write commit it themselves; what they leave uncommitted is rolled back.
    """
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


@contextmanager
def background_session() -> Iterator[Session]:
    """Open a session for one short unit of work: commit on success, roll back on error.

    The error is re-raised after the rollback. Jobs open one of these per step rather than one
    for a whole batch, so locks are held briefly and each step's outcome is committed on its
    own. It is ``SessionLocal.begin()``: a new session, in a transaction, closed at the end.
    """
    with SessionLocal.begin() as session:
        yield session


def create_tables() -> None:
    """Create the tables of :data:`~reference_app_sync.models.metadata` that do not exist yet."""
    with background_session() as session:
        metadata.create_all(session.connection())

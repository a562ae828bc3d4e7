"""The hooks pytest-fastsched calls: implement them in a ``conftest.py`` or a plugin."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection


@pytest.hookspec
def pytest_fastsched_create_schema(connection: Connection, dialect: str) -> None:
    """Finish the schema of a new test database: run any DDL, insert seed rows.

    Called once per test database (once per test session; per xdist worker on SQLite, once
    for the template the workers' PostgreSQL databases are copied from), after
    ``fastsched_alembic`` or ``fastsched_metadata`` built their schema, in a transaction that
    commits when every implementation has returned. ``connection`` is a synchronous
    ``sqlalchemy.engine.Connection`` (``connection.execute(text(...))``, no await);
    ``dialect`` is ``"sqlite"`` or ``"postgresql"``. Rows of tables listed in
    ``fastsched_seed_tables`` stay in place across tests under both isolation modes.
    """

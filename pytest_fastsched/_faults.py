"""Database faults behind ``fastsched_faults``: make chosen statements fail as the driver would.

``fastsched_faults.fail(pattern, nth=1, times=1, error="operational")`` makes the ``nth``
statement whose SQL matches ``pattern`` (a regular expression, searched case-insensitively),
and the ``times - 1`` matching statements after it, fail. The failure is the driver's own:

- ``"operational"``: PostgreSQL: asyncpg's ``QueryCanceledError`` ("canceling statement due
  to statement timeout", SQLSTATE 57014); SQLite: ``sqlite3.OperationalError`` ("database is
  locked");
- ``"serialization"``: PostgreSQL only: asyncpg's ``SerializationError`` ("could not
  serialize access due to concurrent update", SQLSTATE 40001);
- ``"disconnect"``: PostgreSQL: the connection is really closed just before the statement is
  sent, so asyncpg fails with its own error; SQLite: ``sqlite3.ProgrammingError`` ("Cannot
  operate on a closed database."). Either way SQLAlchemy sees a disconnect and invalidates the
  connection. Needs commit isolation: under rollback isolation it would kill the test
  connection itself.

The app's sync sessions fail the same way: under rollback isolation they run on the test
connection (asyncpg, aiosqlite), under commit isolation on the sync test engine, whose
statements fail with psycopg 3's ``QueryCanceled`` and ``SerializationFailure`` (the same
SQLSTATEs) on PostgreSQL and the same ``sqlite3`` errors on SQLite.

The error is raised from SQLAlchemy's ``do_execute`` dialect event, inside the statement's
execution, and goes through the driver adapter's own exception translation: the app gets
exactly the ``sqlalchemy.exc`` exception (``OperationalError`` on SQLite, ``DBAPIError`` on
asyncpg, whose adapter maps most server errors to its generic ``Error``) with the driver's
exception as ``orig`` and in the chain, and the session is left as a real failure leaves it.
The listeners are removed after the test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

if TYPE_CHECKING:
    from pytest_fastsched._clock import VirtualClock
    from pytest_fastsched._db import Database

ErrorKind = Literal["operational", "serialization", "disconnect"]
ERROR_KINDS = ("operational", "serialization", "disconnect")
_EVENTS = ("do_execute", "do_execute_no_params", "do_executemany")


class FaultError(ValueError):
    """A fault was declared in a way that cannot work; the message says why."""


@dataclasses.dataclass
class Fault:
    """One declared fault: which statements fail, how, and which ones did (``injected``)."""

    pattern: re.Pattern[str]
    nth: int
    times: int
    error: ErrorKind
    seen: int = 0
    injected: list[tuple[dt.datetime, str]] = dataclasses.field(default_factory=list)
    """The virtual instant and the SQL of each statement made to fail."""

    @property
    def fired(self) -> int:
        """How many statements this fault made fail."""
        return len(self.injected)

    def describe(self) -> str:
        """``fail('UPDATE items', nth=2, times=1, error='operational')``."""
        return (
            f"fail({self.pattern.pattern!r}, nth={self.nth}, times={self.times}, "
            f"error={self.error!r})"
        )

    def strikes(self, statement: str) -> bool:
        """Count ``statement`` if it matches; whether it is one of the statements to fail."""
        if not self.pattern.search(statement):
            return False
        self.seen += 1
        return self.nth <= self.seen < self.nth + self.times


class Faults:
    """The database faults of one test (the ``fastsched_faults`` fixture)."""

    def __init__(
        self,
        engine: AsyncEngine,
        dialect: str,
        isolation: str,
        now: Callable[[], dt.datetime],
        sync_engine: Engine | None = None,
    ) -> None:
        self.faults: list[Fault] = []
        self._engines = [engine.sync_engine] + ([] if sync_engine is None else [sync_engine])
        self._dialect = dialect
        self._isolation = isolation
        self._now = now
        self._listening = False

    def fail(
        self, pattern: str, *, nth: int = 1, times: int = 1, error: str = "operational"
    ) -> Fault:
        """Make the ``nth`` statement matching ``pattern`` fail, and ``times - 1`` after it.

        ``pattern`` is a regular expression searched in the SQL text as the driver gets it
        (case-insensitive; PostgreSQL parameters read ``$1``, SQLite's ``?``). ``error`` is
        ``"operational"``, ``"serialization"`` (PostgreSQL) or ``"disconnect"`` (commit
        isolation). Returns the :class:`Fault`, whose ``injected`` list fills as it fires.
        """
        __tracebackhide__ = True
        self._check(nth, times, error)
        fault = Fault(re.compile(pattern, re.IGNORECASE), nth, times, error)  # type: ignore[arg-type]
        self.faults.append(fault)
        if not self._listening:
            for engine in self._engines:
                for name in _EVENTS:
                    event.listen(engine, name, self._on_execute)
            self._listening = True
        return fault

    def _check(self, nth: int, times: int, error: str) -> None:
        __tracebackhide__ = True
        if error not in ERROR_KINDS:
            valid = ", ".join(map(repr, ERROR_KINDS))
            raise FaultError(f"fastsched_faults.fail(error={error!r}): use one of {valid}")
        for name, value in (("nth", nth), ("times", times)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FaultError(
                    f"fastsched_faults.fail({name}={value!r}): give an int of at least 1"
                )
        if error == "serialization" and self._dialect != "postgresql":
            raise FaultError(
                "fastsched_faults.fail(error='serialization') needs PostgreSQL: SQLite runs one "
                "writer at a time and never fails a transaction with a serialization error"
            )
        if error == "disconnect" and self._isolation != "commit":
            raise FaultError(
                "fastsched_faults.fail(error='disconnect') needs "
                "@pytest.mark.fastsched(isolation='commit'): under rollback isolation the "
                "dropped connection would be the test connection, and every later statement "
                "of the test would fail with it"
            )

    def _on_execute(self, cursor: Any, statement: str, *_: Any) -> bool:
        for fault in self.faults:
            if fault.strikes(statement):
                fault.injected.append((self._now(), statement))
                _raise(fault.error, cursor, self._dialect)
        return False  # not handled: the driver runs the statement

    def close(self) -> list[Fault]:
        """Remove the listeners; return the faults that never fired (to fail the test)."""
        if self._listening:
            for engine in self._engines:
                for name in _EVENTS:
                    event.remove(engine, name, self._on_execute)
            self._listening = False
        return [fault for fault in self.faults if not fault.fired]


def _raise(error: ErrorKind, cursor: Any, dialect: str) -> None:
    """Fail the statement on ``cursor`` as the driver fails it (or let the driver do it)."""
    if dialect == "postgresql":
        if not hasattr(cursor, "_adapt_connection"):  # psycopg 3: the sync test engine
            _raise_psycopg(error, cursor)
            return
        import asyncpg

        adapted = cursor._adapt_connection

        if error == "disconnect":
            adapted._connection.terminate()  # the driver then fails the statement itself
            return
        exceptions: dict[str, Exception] = {
            "operational": asyncpg.exceptions.QueryCanceledError(
                "canceling statement due to statement timeout"
            ),
            "serialization": asyncpg.exceptions.SerializationError(
                "could not serialize access due to concurrent update"
            ),
        }
        adapted._handle_exception(exceptions[error])
    import sqlite3

    if error == "disconnect":
        raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
    raise sqlite3.OperationalError("database is locked")


def _raise_psycopg(error: ErrorKind, cursor: Any) -> None:
    """As :func:`_raise`, on a psycopg 3 cursor of the sync test engine (commit isolation)."""
    import psycopg.errors

    if error == "disconnect":
        cursor.connection.close()  # psycopg then fails the statement itself
        return
    if error == "operational":
        raise psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
    raise psycopg.errors.SerializationFailure(
        "could not serialize access due to concurrent update"
    )


def never_fired_message(faults: list[Fault]) -> str:
    """The failure of a test whose declared faults never fired."""
    lines = [
        f"  {fault.describe()}: {fault.seen} matching statement{'s' if fault.seen != 1 else ''}"
        for fault in faults
    ]
    return (
        "fastsched_faults: declared faults never fired, so the test did not exercise the "
        "failure it declares:\n" + "\n".join(lines) + "\nCheck the pattern against the SQL "
        "the driver gets (PostgreSQL parameters read $1, SQLite's ?), and nth."
    )


def fail_never_fired(faults: list[Fault]) -> None:
    """Fail the test (from the fixture's teardown) when some faults never fired."""
    __tracebackhide__ = True
    if faults:
        pytest.fail(never_fired_message(faults), pytrace=False)


@contextlib.contextmanager
def for_test(database: Database, clock: VirtualClock | None) -> Iterator[Faults]:
    """The faults of one test (the body of ``fastsched_faults``), stamped with the virtual
    time when the test uses ``fastsched_clock``; a fault that never fired fails the test."""
    __tracebackhide__ = True
    now = real_now if clock is None else clock.now
    faults = Faults(
        database.engine, database.dialect, database.isolation, now, database.sync_engine
    )
    try:
        yield faults
    finally:
        never_fired = faults.close()
    fail_never_fired(never_fired)


def real_now() -> dt.datetime:
    """The wall clock, for tests without ``fastsched_clock``."""
    return dt.datetime.now(dt.timezone.utc)

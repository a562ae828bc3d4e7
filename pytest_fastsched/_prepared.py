"""The opt-in check that the app's named prepared statements survive no transaction.

A transaction-mode pooler (PgBouncer, Supavisor, RDS Proxy) gives each transaction to
whichever server connection is free. A named prepared statement lives in the server
connection, not in the client's: once its transaction is over, the client's next transaction
may land where the statement does not exist (``prepared statement "__asyncpg_stmt_5__" does
not exist``), and another client may land where its name is taken (``prepared statement
"__asyncpg_stmt_5__" already exists``). asyncpg and SQLAlchemy's asyncpg dialect cache
prepared statements by default, and asyncpg names them with a per-connection counter, so an
app that works on a direct connection fails behind such a pooler.

With ``fastsched_prepared_statements = check`` (or ``record``, or the marker argument
``prepared_statements=...``) on PostgreSQL, :class:`PreparedStatementMonitor` reads the named
prepared statements of the test's connections (``pg_prepared_statements``, over the simple
query protocol of ``COPY``, which prepares nothing) when each of their transactions begins,
and once more at the end of the test. Between two readings one transaction ran; a statement
the earlier reading already held and whose execution count grew was **reused** by that
transaction; a statement left behind whose name other connections also make (asyncpg's counter
names, or a name seen on two connections) has a **shared name**. Statements with unique names
that are never executed again (SQLAlchemy's ``prepared_statement_name_func`` with both caches
off, the documented set-up for these poolers) are left alone, even while the driver has not
yet closed them.

A transaction is what the app sees as one: under commit isolation a real transaction, under
rollback isolation an outermost savepoint of the test connection (each app "commit" releases
one). Execution counts (``generic_plans + custom_plans``) need PostgreSQL 14 or newer.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import csv
import dataclasses
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.util import await_only

from pytest_fastsched._records import RunRef, current_run

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

Reason = Literal["reused", "shared name"]
READ_STATEMENTS = (
    "SELECT name, generic_plans + custom_plans, statement FROM pg_prepared_statements"
)
MIN_SERVER_VERSION = 14
SHOWN = 10
"""The statements a report shows at most."""
SAVEPOINT_SQL = re.compile(r"\s*(SAVEPOINT|RELEASE SAVEPOINT|ROLLBACK TO SAVEPOINT)\s", re.I)
"""Under rollback isolation the plugin's savepoints stand in for the app's commits."""
COUNTER_NAME = re.compile(r"__asyncpg_stmt_[0-9a-f]+__\Z")
"""asyncpg's default statement names: a counter of each connection, the same on all of them."""

FIX = (
    "Fix it in the app's engine: turn both statement caches off and give statements unique "
    "names, as SQLAlchemy documents for PgBouncer:\n"
    "    create_async_engine(url, connect_args={\n"
    '        "statement_cache_size": 0,  # asyncpg\'s cache\n'
    '        "prepared_statement_cache_size": 0,  # the SQLAlchemy dialect\'s cache\n'
    '        "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",\n'
    "    })"
)


@dataclasses.dataclass(frozen=True)
class PreparedStatementLeak:
    """A named prepared statement that would break behind a transaction-mode pooler.

    ``reason`` is ``"reused"`` (a later transaction executed it again) or ``"shared name"``
    (it outlived its transaction under a name other connections make too); ``where`` names
    the transaction: a job run, or code outside job runs.
    """

    name: str
    statement: str
    reason: Reason
    where: str

    def describe(self) -> str:
        """What happened to the statement, in one line."""
        if self.reason == "reused":
            return f"reused by {self.where}: prepared in an earlier transaction"
        if COUNTER_NAME.match(self.name):
            return (
                f"left behind by {self.where}, named by asyncpg's per-connection counter: "
                "every connection of the app makes this name"
            )
        return f"left behind by {self.where}, under a name another connection made too"


def describe_run(run: RunRef | None) -> str:
    """``job 'x' (run of 2030-01-01T00:05:00+00:00, replica 1)``, or code outside job runs."""
    if run is None:
        return "code outside job runs (the test, a fixture or a request)"
    replica = f", replica {run.replica}" if run.replica else ""
    return f"job {run.job_id!r} (run of {run.scheduled.isoformat()}{replica})"


_plugin_statements: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fastsched_plugin_statements", default=False
)


@contextlib.contextmanager
def plugin_statements() -> Iterator[None]:
    """The statements run in this block are the plugin's (its helpers, the history), which the
    check leaves out: only the app's statements are reported."""
    token = _plugin_statements.set(True)
    try:
        yield
    finally:
        _plugin_statements.reset(token)


@dataclasses.dataclass
class _Reading:
    """The named statements of one server connection when one of its transactions began."""

    counts: dict[str, int]
    began_by: RunRef | None


class PreparedStatementMonitor:
    """Reads the named prepared statements of a test's connections while the test runs."""

    def __init__(self, target: AsyncEngine | AsyncConnection) -> None:
        # Commit isolation watches the engine, whose connections come and go; rollback
        # isolation watches its one test connection, where the app's transactions are savepoints.
        self._connection = target.sync_connection if isinstance(target, AsyncConnection) else None
        self._target: Engine | Connection = self._connection or target.sync_engine
        self._readings: dict[int, _Reading] = {}
        self._drivers: dict[int, tuple[Any, asyncio.Lock | None]] = {}
        """Each driver connection seen, by id, with the adapter's statement lock."""
        self._makers: dict[str, set[int]] = {}
        self._baseline: dict[int, set[str]] = {}
        self._statements: dict[str, str] = {}
        self._leaks: dict[tuple[str, Reason], PreparedStatementLeak] = {}
        self._ours: set[str] = set()
        """The SQL the plugin ran for the test (its helpers, the history): not the app's."""
        self.errors: list[str] = []
        """Why a reading failed (an old server, a broken connection), once each."""

    # -- the events of the engine

    @contextlib.contextmanager
    def watching(self) -> Iterator[PreparedStatementMonitor]:
        """Read at each transaction start while the block runs."""
        name, listener = (
            ("savepoint", self._on_savepoint)
            if self._connection is not None
            else ("begin", self._read_in_greenlet)
        )
        event.listen(self._target, name, listener)
        event.listen(self._target, "before_cursor_execute", self._note_ours)
        try:
            yield self
        finally:
            event.remove(self._target, "before_cursor_execute", self._note_ours)
            event.remove(self._target, name, listener)

    def _note_ours(self, _connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if _plugin_statements.get():
            self._ours.add(statement)

    def _on_savepoint(self, connection: Connection, _name: str | None) -> None:
        # The event comes before the savepoint is made: the savepoint open now, if any, is an
        # enclosing one, and this one is nested in the app's transaction.
        if not connection.in_nested_transaction():
            self._read_in_greenlet(connection)

    def _read_in_greenlet(self, connection: Connection) -> None:
        # Events run inside SQLAlchemy's greenlet, where await_only() may await the driver.
        driver = connection.connection.driver_connection
        # SQLAlchemy's adapter runs each statement under this lock: holding it, a reading waits
        # for another task's statement on the connection instead of colliding with it.
        mutex = getattr(connection.connection.dbapi_connection, "_execute_mutex", None)
        self._drivers[id(driver)] = (driver, mutex)
        with self._reading_errors():
            self._record(driver, await_only(_read(driver, mutex)))

    # -- readings

    async def read_all(self) -> None:
        """Read every idle connection seen so far: the end of each one's last transaction.

        Best effort: a connection that is busy, closed or in a failed transaction (the test
        failed on it) is skipped.
        """
        rollback = self._connection is not None
        if self._connection is not None and self._connection.in_nested_transaction():
            return  # a transaction of the app is open on the test connection
        for driver, mutex in list(self._drivers.values()):
            if driver.is_closed() or (driver.is_in_transaction() and not rollback):
                continue
            with contextlib.suppress(Exception):
                self._record(driver, await _read(driver, mutex))

    @contextlib.contextmanager
    def _reading_errors(self) -> Iterator[None]:
        try:
            yield
        except Exception as error:  # the check must never break the app's transaction
            message = f"{type(error).__name__}: {error}"
            if message not in self.errors:
                self.errors.append(message)

    def _record(self, driver: Any, rows: list[tuple[str, int, str]]) -> None:
        key = id(driver)
        earlier = self._readings.get(key)
        counts = {name: count for name, count, _ in rows}
        if earlier is None:
            self._baseline[key] = set(counts)
        for name, count, statement in rows:
            if self._connection is not None and SAVEPOINT_SQL.match(statement):
                continue
            if statement in self._ours:
                continue
            self._statements[name] = statement
            if earlier is not None and count > earlier.counts.get(name, count):
                self._leak(name, "reused", earlier.began_by)
            if name in self._baseline[key]:
                continue
            makers = self._makers.setdefault(name, set())
            makers.add(key)
            if COUNTER_NAME.match(name) or len(makers) > 1:
                self._leak(name, "shared name", earlier.began_by if earlier else None)
        self._readings[key] = _Reading(counts, current_run.get())

    def _leak(self, name: str, reason: Reason, run: RunRef | None) -> None:
        if (name, reason) not in self._leaks:
            statement = self._statements[name]
            self._leaks[name, reason] = PreparedStatementLeak(
                name, statement, reason, describe_run(run)
            )

    @property
    def leaks(self) -> list[PreparedStatementLeak]:
        """What was found so far, in the order it was found."""
        return list(self._leaks.values())


async def _read(driver: Any, mutex: asyncio.Lock | None = None) -> list[tuple[str, int, str]]:
    """The named prepared statements of ``driver``'s session: name, executions, SQL."""
    version = driver.get_server_version()
    if version.major < MIN_SERVER_VERSION:
        raise RuntimeError(
            f"the server is PostgreSQL {version.major}: the check reads execution counts "
            f"from pg_prepared_statements, which PostgreSQL {MIN_SERVER_VERSION} added"
        )
    chunks: list[bytes] = []

    async def collect(data: bytes) -> None:
        chunks.append(data)

    # COPY goes over the simple query protocol: reading prepares no statement of its own.
    async with mutex or contextlib.nullcontext():
        await driver.copy_from_query(READ_STATEMENTS, output=collect, format="csv")
    lines = b"".join(chunks).decode().splitlines(keepends=True)
    return [(name, int(count), statement) for name, count, statement in csv.reader(lines)]


def _shorten(statement: str) -> str:
    sql = " ".join(statement.split())
    return sql if len(sql) <= 100 else sql[:97] + "..."


def report(
    leaks: list[PreparedStatementLeak], errors: list[str], engine_options: str | None
) -> str:
    """The failure message of ``fastsched_prepared_statements = check``."""
    lines: list[str] = []
    by_name: dict[str, list[PreparedStatementLeak]] = {}
    for leak in leaks:
        by_name.setdefault(leak.name, []).append(leak)
    if by_name:
        count = f"{len(by_name)} named prepared statement{'s' if len(by_name) > 1 else ''}"
        lines.append(
            f"fastsched_db: {count} of the app would break behind a transaction-mode pooler "
            "(PgBouncer, Supavisor, RDS Proxy), which gives each transaction to any server "
            'connection: there a reused statement "does not exist" and a shared name '
            '"already exists".'
        )
        for name, found in list(by_name.items())[:SHOWN]:
            lines.append(f"  {name}  {_shorten(found[0].statement)}")
            lines += [f"      {leak.describe()}" for leak in found]
        if len(by_name) > SHOWN:
            lines.append(f"  ... and {len(by_name) - SHOWN} more")
        lines.append(FIX)
        if engine_options is None:
            lines.append(
                "The test engine was made with SQLAlchemy's and asyncpg's defaults, not the "
                "app's engine options: set fastsched_engine_options to the app's options (a "
                "dict, or a function of the database URL that returns one) to check the "
                "app's own settings."
            )
        else:
            lines.append(
                f"The test engine was made with fastsched_engine_options = {engine_options!r}."
            )
    for error in errors:
        lines.append(f"fastsched_db: could not read the prepared statements: {error}")
    return "\n".join(lines)

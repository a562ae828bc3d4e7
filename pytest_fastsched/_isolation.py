"""Isolation: what a test may do with the database, and how its writes are undone.

``rollback`` (the default): the test holds one connection inside an outer transaction; the
app's sessionmakers and engines join it with savepoints (each app "commit" releases a
savepoint, visible to the test; see :mod:`._rebind`), and one rollback undoes everything.
``commit``: sessions get connections of their own and commit for real, for work across
several connections; the tables are emptied after the test.

Guards turn the ways code can escape the isolation into errors that name the fix, each
message next to its guard: a second connection during a rollback test, two tasks sharing the
test connection at once, statements that cannot run in a transaction, the test connection
used from another event loop, a sync session used on the event loop's own thread (its calls
are made on the loop, which cannot wait for itself), and a database that rolled the test's
transaction back by itself (SQLite, when the disk is full). (Connections to other databases
are the seal's business: :mod:`._seal`.) Jobs often swallow exceptions, so every guard error
is also kept on the :class:`RunningTest`, and the plugin fails a test that passed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util import ThreadLocalRegistry

from pytest_fastsched import _options, _rebind
from pytest_fastsched._records import RunRef, current_run

_NON_TRANSACTIONAL = re.compile(
    r"""\s*(
        VACUUM\b
        | (CREATE\s+(UNIQUE\s+)?|DROP\s+)INDEX\s+CONCURRENTLY\b
        | REINDEX\b.*\bCONCURRENTLY\b
        | (CREATE|DROP|ALTER)\s+DATABASE\b
        | (CREATE|DROP)\s+TABLESPACE\b
        | ALTER\s+SYSTEM\b
    )""",
    re.IGNORECASE | re.VERBOSE | re.DOTALL,
)
_SAVEPOINT_END = ("RELEASE SAVEPOINT ", "ROLLBACK TO SAVEPOINT ")
# SQLite errors after which it may roll back the whole transaction by itself (SQLITE_FULL,
# SQLITE_IOERR, SQLITE_NOMEM): every savepoint of the test is gone with it.
_TRANSACTION_LOST = ("database or disk is full", "disk i/o error", "out of memory")
_SAVEPOINT_GONE = ("no such savepoint", "no transaction is active")


class DatabaseGuardError(Exception):
    """Code under test used the database in a way the test's isolation cannot cover."""


DatabaseGuardError.__module__ = "pytest_fastsched"  # shown by its public name


# -- messages --------------------------------------------------------------------------------


SECOND_CONNECTION = (
    "fastsched_db: a second connection to the test database was opened during a "
    "rollback-isolated test. Only the test connection is rolled back at the end: this "
    "connection's writes would really commit and leak into later tests. Open sessions "
    "through the app's sessionmaker (it is bound to the test connection), or mark the test "
    "@pytest.mark.fastsched(isolation='commit') for work that needs several connections."
)
OTHER_LOOP = (
    "fastsched_db: the test connection was used from another event loop than the one "
    "fastsched_db was set up on; database connections cannot move between loops. Run the "
    "test and its async fixtures on one loop: give them the same loop scope "
    "(asyncio_default_fixture_loop_scope = asyncio_default_test_loop_scope, or the same "
    "@pytest.mark.asyncio(loop_scope=...)), and do not run database code in an event "
    "loop of another thread."
)
SYNC_ON_LOOP = (
    "fastsched_db: a sync SQLAlchemy session or connection was used on the event loop's "
    "thread during a rollback-isolated test. Under rollback isolation the sync side runs on "
    "the test connection, whose calls are made on the event loop: the loop cannot wait for "
    "itself. Run the sync database work in a thread, as production should (a sync call on "
    "the loop blocks every other job and request): await asyncio.to_thread(...) or "
    "run_in_threadpool(...) in an async job, a sync def job (APScheduler runs it in a "
    "thread), or a FastAPI def route; or mark the test "
    "@pytest.mark.fastsched(isolation='commit'), which gives the sync side a connection of "
    "its own."
)


def _overlap_message(owner: _Holder, intruder: _Holder) -> str:
    both_jobs = owner.run is not None and intruder.run is not None
    what = "jobs" if both_jobs else "tasks"
    same_instant = ""
    if (
        owner.run is not None
        and intruder.run is not None
        and (owner.run.scheduled == intruder.run.scheduled)
    ):
        same_instant = (
            f" Both were due at {owner.run.scheduled.isoformat()}: jobs due at the same "
            "instant run at once."
        )
    return (
        f"fastsched_db: two {what} used the shared test connection at the same time: "
        f"{owner.describe()} still had a session transaction open when "
        f"{intruder.describe()} used the connection.{same_instant} Under rollback isolation "
        "every session shares one connection, so jobs that overlap (max_instances > 1, "
        "several replicas, jobs due together, asyncio.gather) cannot run at once. Mark the "
        "test @pytest.mark.fastsched(isolation='commit') to give each session its own "
        "connection, or let the jobs run one after another."
    )


@dataclasses.dataclass(frozen=True)
class _Holder:
    """What holds a savepoint of the test connection: a task, and the job run it is."""

    task: asyncio.Task[Any] | None
    run: RunRef | None
    thread: threading.Thread | None = None
    """The thread of a sync session (its calls run in short-lived tasks of their own)."""

    @classmethod
    def current(cls) -> _Holder:
        return cls(asyncio.current_task(), current_run.get(), _rebind.sync_thread.get())

    def describe(self) -> str:
        if self.run is not None:
            return f"job {self.run.job_id!r} (scheduled {self.run.scheduled.isoformat()})"
        if self.thread is not None:
            return f"a sync session in the thread {self.thread.name!r}"
        if self.task is None:
            return "code outside any task"
        coroutine = self.task.get_coro()
        name = getattr(coroutine, "__qualname__", type(coroutine).__name__)
        return f"task {self.task.get_name()!r} ({name})"


def _lost_transaction_message(cause: str, statement: str) -> str:
    words = " ".join(statement.split())[:80]
    return (
        f"fastsched_db: the database failed with {cause!r} (in {words!r}) and SQLite then "
        "rolled back the test's whole transaction by itself, with every savepoint in it: "
        "later statements fail with 'no such savepoint', and writes would really commit. "
        "Fix the cause (free disk space, or raise the database's size limit) and run the "
        "test again."
    )


def _non_transactional_message(statement: str) -> str:
    words = " ".join(statement.split()[:4])
    return (
        f"fastsched_db: {words!r} cannot run inside a transaction, and under rollback "
        "isolation every statement runs inside the test's outer transaction. Mark the test "
        "@pytest.mark.fastsched(isolation='commit') and run it on an AUTOCOMMIT connection "
        "(as in production), or leave it to the migrations."
    )


@dataclasses.dataclass
class RunningTest:
    """What the guards know about the running test."""

    isolation: _options.IsolationMode
    loop: asyncio.AbstractEventLoop
    connection: Connection | None
    savepoints: list[tuple[str, _Holder]] = dataclasses.field(default_factory=list)
    errors: list[DatabaseGuardError] = dataclasses.field(default_factory=list)
    lost: str | None = None
    """Why the database rolled the test's transaction back by itself, once it did."""
    suspect: str | None = None
    """An error after which the database may have rolled the transaction back."""

    def violation(self, message: str) -> DatabaseGuardError:
        """Record a guard error (jobs often swallow exceptions) and return it to raise."""
        error = DatabaseGuardError(message)
        self.errors.append(error)
        return error

    def check_loop(self) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not self.loop:
            raise self.violation(OTHER_LOOP)

    def check_statement(self, connection: Connection, statement: str) -> None:
        self.check_loop()
        if self.isolation != "rollback":
            return
        if connection is not self.connection and not self._shares_test_connection(connection):
            raise self.violation(SECOND_CONNECTION)
        if self.lost is not None:
            # Without its transaction the test connection would commit for real.
            raise self.violation(self.lost)
        head = statement.lstrip()[:64].upper()
        if head.startswith(_SAVEPOINT_END):
            self._end_savepoint(statement.split()[-1])
            return
        self._check_owner()
        if _NON_TRANSACTIONAL.match(statement):
            raise self.violation(_non_transactional_message(statement))
        if head.startswith("SAVEPOINT "):
            self.savepoints.append((statement.split()[-1], _Holder.current()))

    def check_error(self, context: ExceptionContext) -> None:
        """After a database error: has the database rolled the test's transaction back?

        Only the error's message says so. The cause is kept as a suspect; when a later
        savepoint turns out to be gone, the test fails with the cause, not the savepoint.
        """
        if self.isolation != "rollback" or context.is_disconnect:
            return
        connection = context.connection
        if connection is None or connection is not self.connection:
            return
        message = str(context.original_exception).lower()
        if any(cause in message for cause in _TRANSACTION_LOST):
            self.suspect = self.suspect or _lost_transaction_message(
                str(context.original_exception), context.statement or ""
            )
        elif self.suspect is not None and any(gone in message for gone in _SAVEPOINT_GONE):
            self.lost = self.suspect
            raise self.violation(self.lost) from context.original_exception

    def _shares_test_connection(self, connection: Connection) -> bool:
        """An app engine's connection joined to the test connection (see ``_rebind``)."""
        assert self.connection is not None
        own = self.connection.connection.dbapi_connection
        return bool(connection.connection.dbapi_connection is own)

    def _check_owner(self) -> None:
        if not self.savepoints:
            return
        owner = self.savepoints[-1][1]
        if owner.thread is not None:  # a sync session: its thread holds the savepoint
            current = _Holder.current()
            if owner.thread is not current.thread and owner.thread.is_alive():
                raise self.violation(_overlap_message(owner, current))
            return
        task = asyncio.current_task()
        if owner.task is not None and owner.task is not task and not owner.task.done():
            raise self.violation(_overlap_message(owner, _Holder.current()))

    def _end_savepoint(self, name: str) -> None:
        for index in range(len(self.savepoints) - 1, -1, -1):
            if self.savepoints[index][0] == name:
                del self.savepoints[index:]
                return


class _Guard:
    """Checks each statement of one engine against the isolation of the running test."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.state: RunningTest | None = None
        event.listen(engine.sync_engine, "before_cursor_execute", self._before_execute)
        event.listen(engine.sync_engine, "handle_error", self._on_error)

    def _on_error(self, context: ExceptionContext) -> None:
        if self.state is not None:
            self.state.check_error(context)

    def _before_execute(
        self,
        connection: Connection,
        _cursor: Any,
        statement: str,
        _parameters: Any,
        _context: Any,
        _executemany: bool,
    ) -> None:
        if self.state is not None:
            self.state.check_statement(connection, statement)


@dataclasses.dataclass
class Binding:
    """Where one test's database work goes: its engine, and its connection under rollback."""

    state: RunningTest
    engine: AsyncEngine
    connection: AsyncConnection | None


class Isolation:
    """The isolation of one process's tests: their guards, and what of the app is re-bound."""

    def __init__(
        self,
        sessionmakers: Sequence[_rebind.AnySessionmaker] = (),
        engines: Sequence[_rebind.AnyEngine] = (),
    ) -> None:
        self.sessionmakers = list(sessionmakers)
        self.engines = list(engines)
        """The app's engines pointed at the test database: ``fastsched_engine``, and the
        engines the sessionmakers were bound to."""
        self.scoped: list[Any] = []
        """The app's ``scoped_session`` objects: their sessions are forgotten around a test."""
        self.sync_engine: Callable[[], Engine] | None = None
        """The sync engine of the test database (commit isolation of the sync side)."""
        self.active: RunningTest | None = None
        self._guards: dict[AsyncEngine, _Guard] = {}

    @contextlib.asynccontextmanager
    async def isolate(
        self,
        engine: AsyncEngine,
        mode: _options.IsolationMode,
        empty_tables: Callable[[AsyncEngine], Awaitable[None]],
    ) -> AsyncIterator[Binding]:
        """Bind the app's sessionmaker to ``engine`` for one test of isolation ``mode``.

        ``empty_tables`` undoes a test of commit isolation.
        """
        loop = asyncio.get_running_loop()
        if mode == "rollback":
            opened = self._rollback(engine, loop)
        else:
            opened = self._commit(engine, loop, empty_tables)
        async with opened as binding:
            yield binding

    @contextlib.asynccontextmanager
    async def _rollback(
        self, engine: AsyncEngine, loop: asyncio.AbstractEventLoop
    ) -> AsyncIterator[Binding]:
        connection = await engine.connect()
        try:
            await connection.begin()
            state = RunningTest("rollback", loop, connection.sync_connection)
            with self._activate(engine, state, connection):
                yield Binding(state, engine, connection)
        finally:
            # Closing rolls the outer transaction back, and spares the pool its own reset.
            await connection.close()

    @contextlib.asynccontextmanager
    async def _commit(
        self,
        engine: AsyncEngine,
        loop: asyncio.AbstractEventLoop,
        empty_tables: Callable[[AsyncEngine], Awaitable[None]],
    ) -> AsyncIterator[Binding]:
        state = RunningTest("commit", loop, None)
        try:
            with self._activate(engine, state, None):
                yield Binding(state, engine, None)
        finally:
            await empty_tables(engine)

    @contextlib.contextmanager
    def _activate(
        self, engine: AsyncEngine, state: RunningTest, connection: AsyncConnection | None
    ) -> Iterator[None]:
        guard = self._guards.get(engine)
        if guard is None:
            guard = self._guards[engine] = _Guard(engine)
        sync = _rebind.SyncSide(
            loop=state.loop,
            refuse=lambda: state.violation(SYNC_ON_LOOP),
            engine=self.sync_engine,
            thread=threading.current_thread(),
        )
        self._remove_scoped()
        with _rebind.rebound(self.sessionmakers, self.engines, engine, connection, sync):
            guard.state = self.active = state
            try:
                yield
            finally:
                guard.state = self.active = None
                self._remove_scoped()

    def _remove_scoped(self) -> None:
        """Forget the sessions of the app's ``scoped_session`` objects, in every thread: a
        session bound for one test never serves the next (worker threads are reused)."""
        for scoped in self.scoped:
            if isinstance(scoped.registry, ThreadLocalRegistry):
                scoped.registry = ThreadLocalRegistry(scoped.session_factory)
            else:  # a scopefunc's registry: a dict of the sessions by scope
                scoped.registry.registry.clear()

    def close(self) -> None:
        """Forget the test engines (the end of the process)."""
        self._guards.clear()

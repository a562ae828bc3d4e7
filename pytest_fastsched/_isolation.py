"""Isolation: what a test may do with the database, and how its writes are undone.

``rollback`` (the default): the test holds one connection inside an outer transaction; the
app's own ``async_sessionmaker`` is re-configured in place to join it with savepoints (each
app "commit" releases a savepoint, visible to the test), and one rollback undoes everything.
``commit``: sessions get connections of their own and commit for real, for work across
several connections; the tables are emptied after the test.

Guards turn the ways code can escape the isolation into errors that name the fix, each
message next to its guard: a second connection during a rollback test, two tasks sharing the
test connection at once, statements that cannot run in a transaction, the test connection
used from another event loop, and the app's own engine reached instead of the re-bound
sessionmaker. Jobs often swallow exceptions, so every guard error is also kept on the
:class:`RunningTest`, and the plugin fails a test that passed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker

from pytest_fastsched import _options
from pytest_fastsched._options import describe, failure

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


def _app_engine_message(url: str) -> str:
    return (
        f"fastsched_db: the app used its own engine ({url}) during a rollback-isolated test, "
        "not the sessionmaker the plugin re-binds: its writes would really commit, to the "
        "app's configured database, and the test would not see them. Open sessions through "
        "the app's sessionmaker (fastsched_sessionmaker), or monkeypatch the engine with "
        "fastsched_db.engine in a test marked @pytest.mark.fastsched(isolation='commit')."
    )


def _overlap_message(owner: asyncio.Task[Any], intruder: asyncio.Task[Any] | None) -> str:
    return (
        f"fastsched_db: two tasks used the shared test connection at the same time: "
        f"{_describe_task(owner)} still had a session transaction open when "
        f"{_describe_task(intruder)} used the connection. Under rollback isolation every "
        "session shares one connection, so jobs that overlap (max_instances > 1, several "
        "replicas, asyncio.gather) cannot run at once. Mark the test "
        "@pytest.mark.fastsched(isolation='commit') to give each session its own connection, "
        "or let the jobs run one after another."
    )


def _describe_task(task: asyncio.Task[Any] | None) -> str:
    if task is None:
        return "code outside any task"
    coroutine = task.get_coro()
    name = getattr(coroutine, "__qualname__", type(coroutine).__name__)
    return f"task {task.get_name()!r} ({name})"


def _non_transactional_message(statement: str) -> str:
    words = " ".join(statement.split()[:4])
    return (
        f"fastsched_db: {words!r} cannot run inside a transaction, and under rollback "
        "isolation every statement runs inside the test's outer transaction. Mark the test "
        "@pytest.mark.fastsched(isolation='commit') and run it on an AUTOCOMMIT connection "
        "(as in production), or leave it to the migrations."
    )


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, its causes and contexts, and the members of exception groups, once each."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        link = pending.pop()
        if id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        pending.extend(getattr(link, "exceptions", ()))
        pending.extend(cause for cause in (link.__cause__, link.__context__) if cause)


@dataclasses.dataclass
class RunningTest:
    """What the guards know about the running test."""

    isolation: _options.IsolationMode
    loop: asyncio.AbstractEventLoop
    connection: Connection | None
    savepoints: list[tuple[str, asyncio.Task[Any] | None]] = dataclasses.field(
        default_factory=list
    )
    errors: list[DatabaseGuardError] = dataclasses.field(default_factory=list)

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
        if connection is not self.connection:
            raise self.violation(SECOND_CONNECTION)
        head = statement.lstrip()[:64].upper()
        if head.startswith(_SAVEPOINT_END):
            self._end_savepoint(statement.split()[-1])
            return
        self._check_owner()
        if _NON_TRANSACTIONAL.match(statement):
            raise self.violation(_non_transactional_message(statement))
        if head.startswith("SAVEPOINT "):
            self.savepoints.append((statement.split()[-1], asyncio.current_task()))

    def _check_owner(self) -> None:
        if not self.savepoints:
            return
        owner = self.savepoints[-1][1]
        task = asyncio.current_task()
        if owner is not None and owner is not task and not owner.done():
            raise self.violation(_overlap_message(owner, task))

    def _end_savepoint(self, name: str) -> None:
        names = [entry[0] for entry in self.savepoints]
        if name in names:
            del self.savepoints[names.index(name) :]


class _Guard:
    """Checks each statement of one engine against the isolation of the running test."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.state: RunningTest | None = None
        event.listen(engine.sync_engine, "before_cursor_execute", self._before_execute)

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
    """The isolation of one process's tests: their guards, and the app's sessionmaker."""

    def __init__(self, sessionmaker: async_sessionmaker[Any] | None) -> None:
        self.sessionmaker = sessionmaker
        self.active: RunningTest | None = None
        self._guards: dict[AsyncEngine, _Guard] = {}
        self._app_listeners: list[tuple[Engine, str, Callable[..., None]]] = []

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
            with self._activate(engine, state, bind=connection):
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
            with self._activate(engine, state, bind=engine):
                yield Binding(state, engine, None)
        finally:
            await empty_tables(engine)

    @contextlib.contextmanager
    def _activate(
        self, engine: AsyncEngine, state: RunningTest, bind: AsyncEngine | AsyncConnection
    ) -> Iterator[None]:
        maker = self.sessionmaker
        saved = dict(maker.kw) if maker is not None else {}
        if maker is not None:
            self._guard_app_engine(saved.get("bind"))
            options: dict[str, Any] = {"bind": bind}
            if state.isolation == "rollback":
                options["join_transaction_mode"] = "create_savepoint"
            maker.configure(**options)
        guard = self._guards.get(engine)
        if guard is None:
            guard = self._guards[engine] = _Guard(engine)
        guard.state = self.active = state
        try:
            yield
        finally:
            guard.state = self.active = None
            if maker is not None:
                maker.kw.clear()
                maker.kw.update(saved)

    def _guard_app_engine(self, bind: object) -> None:
        """Fail rollback tests that reach the engine the app's sessionmaker was bound to."""
        if not isinstance(bind, AsyncEngine):
            return
        engine = bind.sync_engine
        if any(guarded is engine for guarded, _, _ in self._app_listeners):
            return
        message = _app_engine_message(str(engine.url))

        def used(*_: Any) -> None:
            state = self.active
            if state is not None and state.isolation == "rollback":
                raise state.violation(message)

        for name in ("do_connect", "before_cursor_execute"):
            event.listen(engine, name, used)
            self._app_listeners.append((engine, name, used))

    def close(self) -> None:
        """Stop guarding the app's engines (the end of the process)."""
        for engine, name, listener in self._app_listeners:
            event.remove(engine, name, listener)
        self._app_listeners.clear()
        self._guards.clear()


def resolve_sessionmaker(path: str) -> async_sessionmaker[Any]:
    """The app's sessionmaker of the ``fastsched_sessionmaker`` setting, checked."""
    try:
        maker = _options.resolve(path, "fastsched_sessionmaker")
    except pytest.UsageError as error:
        raise failure(str(error)) from None
    return _check_sessionmaker(maker, path)


def _check_sessionmaker(maker: object, path: str) -> async_sessionmaker[Any]:
    if isinstance(maker, async_sessionmaker):
        return maker
    raise failure(
        f"fastsched_sessionmaker = {path!r} is {describe(maker)}, not an async_sessionmaker: "
        "point it at the app's sqlalchemy.ext.asyncio.async_sessionmaker (the factory its "
        "jobs open sessions with)."
    )

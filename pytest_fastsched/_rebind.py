"""The app's sessionmakers and engines, pointed at the test database for the length of a test.

- **Sessionmakers** (``fastsched_sessionmaker``, several allowed): re-configured in place, so
  every module that imported them is covered: bound to the test connection with
  ``join_transaction_mode="create_savepoint"`` under rollback isolation, to the test engine
  under commit isolation.
- **Engines** (``fastsched_engine``, and the engines those sessionmakers were bound to): an
  app engine takes on the test engine's pool, dialect and events, so ``engine.begin()``,
  ``engine.connect()``, a session or an ``async_sessionmaker(engine)`` made from it at any
  time reach the test database. Under rollback isolation its connections share the test
  connection, and each transaction they begin is a savepoint of it: a commit releases the
  savepoint, a rollback rolls back to it, and the test's rollback undoes them all. Its
  ``dispose()`` does nothing for the test: the pool it would close is the test's. The event
  listeners the app put on its own engine do not run on the test database (put those a test
  needs on ``fastsched_db.engine``).
- **Sync SQLAlchemy** (a ``sessionmaker``, a ``scoped_session``, an ``Engine``): under rollback
  isolation the sync side runs on the test connection itself, so that it sees what the test
  and the async sessions wrote and its writes are undone with theirs: a sync connection is a
  joined connection of the test engine, and each of its calls into the database is made on
  the test's event loop (handed over from the thread that makes it, and waited for there).
  Sync database work must therefore run off the loop's thread, in a thread-pool job,
  ``asyncio.to_thread``, ``run_in_threadpool`` or a FastAPI ``def`` route, as it should in
  production, where it would block every other job; on the loop's thread it fails with
  ``refuse()``. Under commit isolation the sync side gets a sync engine of its own on the
  test database (pysqlite, or psycopg 3 on PostgreSQL) and commits for real, from any thread.

Everything is put back as it was after the test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import greenlet
import pytest
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
)
from sqlalchemy.ext.asyncio import engine as asyncio_engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from pytest_fastsched import _options, _threads
from pytest_fastsched._options import describe, failure

AnySessionmaker = async_sessionmaker[Any] | sessionmaker[Any]
AnyEngine = AsyncEngine | Engine
_SAVEPOINT_NAMES = itertools.count(1)
sync_thread: contextvars.ContextVar[threading.Thread | None] = contextvars.ContextVar(
    "fastsched_sync_thread", default=None
)
"""The thread whose sync connection made the call running in this task (rollback isolation):
the guards know who holds a savepoint of the test connection."""
_WAIT_STEP = 0.05
"""Real seconds a thread waits for the loop at a time, between chances to be stopped."""


# -- what the settings name ----------------------------------------------------------------


def resolve_sessionmakers(paths: Sequence[str]) -> list[AnySessionmaker]:
    """The app's sessionmakers of ``fastsched_sessionmaker``, checked."""
    return [_check_sessionmaker(_resolve(path, "fastsched_sessionmaker"), path) for path in paths]


def resolve_engines(paths: Sequence[str]) -> list[AnyEngine]:
    """The app's engines of ``fastsched_engine``, checked."""
    return [_check_engine(_resolve(path, "fastsched_engine"), path) for path in paths]


def resolve_scoped(paths: Sequence[str]) -> list[scoped_session[Any]]:
    """The ``scoped_session`` objects among ``fastsched_sessionmaker``: their sessions are
    forgotten before and after each test."""
    found = (_resolve(path, "fastsched_sessionmaker") for path in paths)
    return [each for each in found if isinstance(each, scoped_session)]


def _resolve(path: str, option: str) -> Any:
    try:
        return _options.resolve(path, option)
    except pytest.UsageError as error:
        raise failure(str(error)) from None


def _check_sessionmaker(maker: object, path: str) -> AnySessionmaker:
    if isinstance(maker, (async_scoped_session, scoped_session)):
        maker = maker.session_factory
    if isinstance(maker, async_sessionmaker):
        return maker
    if isinstance(maker, sessionmaker) and issubclass(maker.class_, (AsyncSession, Session)):
        return maker
    raise failure(
        f"fastsched_sessionmaker = {path!r} is {describe(maker)}, not a sessionmaker: point "
        "it at the app's async_sessionmaker, sessionmaker or scoped_session (the factory its "
        "jobs and routes open sessions with)."
    )


def _check_engine(engine: object, path: str) -> AnyEngine:
    if isinstance(engine, (AsyncEngine, Engine)):
        return engine
    raise failure(
        f"fastsched_engine = {path!r} is {describe(engine)}, not an engine: point it at the "
        "app's sqlalchemy Engine or AsyncEngine (the one create_engine() or "
        "create_async_engine() made)."
    )


def is_sync(maker: AnySessionmaker) -> bool:
    """A sessionmaker of sync sessions (``sessionmaker()``, not of ``AsyncSession``)."""
    return isinstance(maker, sessionmaker) and not issubclass(maker.class_, AsyncSession)


def engines_of(makers: Sequence[AnySessionmaker]) -> list[AnyEngine]:
    """The engines ``makers`` are bound to: the app's sessions go there too."""
    return [
        maker.kw["bind"]
        for maker in makers
        if isinstance(maker.kw.get("bind"), (AsyncEngine, Engine))
    ]


# -- pointing them at the test database ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyncSide:
    """Where the app's sync SQLAlchemy goes for one test.

    Under rollback isolation, ``loop`` is the test's event loop, on which every call of a
    sync connection into the test connection is made, and ``refuse`` the error raised when
    one is made on that loop's own thread while it runs; ``thread``, the test's thread, runs
    the loop itself for a call made while the loop is idle (the body of a ``def`` test);
    ``dbapi``, the app's sync driver module, whose errors a failed call raises (on
    PostgreSQL the test connection's driver is asyncpg, the app's psycopg). Under commit
    isolation, ``engine`` is the sync engine of the test database.
    """

    loop: asyncio.AbstractEventLoop | None = None
    refuse: Callable[[], BaseException] | None = None
    engine: Callable[[], Engine] | None = None
    thread: threading.Thread | None = None
    dbapi: Any = None


def _app_dbapi(
    makers: Sequence[AnySessionmaker], engines: Sequence[AnyEngine], test_engine: AsyncEngine
) -> Any:
    """The sync driver module of the app, when its errors differ from the test connection's
    (PostgreSQL: the app's psycopg or psycopg2, the test connection's asyncpg); else ``None``.

    From the engines the sync sessionmakers were bound to and the sync engines; psycopg 3
    (the sync test engine's driver) for sessionmakers bound to nothing.
    """
    if test_engine.dialect.name != "postgresql":
        return None  # SQLite: pysqlite and aiosqlite raise sqlite3's errors alike
    binds = [maker.kw.get("bind") for maker in makers if is_sync(maker)]
    binds += [engine for engine in engines if isinstance(engine, Engine)]
    for bind in binds:
        dbapi = getattr(getattr(bind, "dialect", None), "dbapi", None)
        if dbapi is not None and hasattr(getattr(dbapi, "errors", None), "lookup"):
            return dbapi
    try:
        import psycopg
    except ImportError:
        return None
    return psycopg


def app_error(error: DBAPIError, dbapi: Any) -> BaseException:
    """``error`` (raised on the test connection) as the app's driver ``dbapi`` raises it.

    A SQLAlchemy ``DBAPIError`` of asyncpg's becomes the one SQLAlchemy raises for the same
    SQLSTATE from psycopg: ``OperationalError`` around ``psycopg.errors.QueryCanceled`` for a
    statement timeout, where asyncpg's is a bare ``DBAPIError``; the message keeps the
    server's, with its DETAIL and HINT lines as psycopg shows them.
    """
    orig = error.orig
    if dbapi is None or orig is None:
        return error
    cause = orig.__cause__ or orig  # asyncpg's own error, behind SQLAlchemy's adapter
    sqlstate = getattr(orig, "sqlstate", None) or getattr(cause, "sqlstate", None)
    if not sqlstate:
        return error
    message = str(cause.args[0]) if cause.args else str(cause)
    for label, part in (("DETAIL", "detail"), ("HINT", "hint")):
        value = getattr(cause, part, None)
        if value:
            message += f"\n{label}:  {value}"
    try:
        kind = dbapi.errors.lookup(sqlstate)
    except KeyError:
        kind = dbapi.DatabaseError
    translated: BaseException = DBAPIError.instance(
        error.statement,
        error.params,
        kind(message),
        dbapi.Error,
        connection_invalidated=error.connection_invalidated,
    )
    return translated


@contextlib.contextmanager
def rebound(
    makers: Sequence[AnySessionmaker],
    engines: Sequence[AnyEngine],
    test_engine: AsyncEngine,
    connection: AsyncConnection | None,
    sync: SyncSide = SyncSide(),
) -> Iterator[None]:
    """Point ``makers`` and ``engines`` at the test database while the block runs.

    ``connection`` is the test connection under rollback isolation, ``None`` under commit
    isolation; ``sync`` says where the sync ones go.
    """
    saved_makers = [(maker, dict(maker.kw)) for maker in makers]
    redirected: list[_Redirect] = []
    if connection is not None:
        sync = dataclasses.replace(sync, dbapi=_app_dbapi(makers, engines, test_engine))
    try:
        sync_engine: Engine | None = None
        if any(is_sync(maker) for maker in makers) or any(
            isinstance(engine, Engine) for engine in engines
        ):
            sync_engine = _sync_target(test_engine, connection, sync)
        for maker in makers:
            if is_sync(maker):
                maker.configure(bind=sync_engine)
            elif connection is None:
                maker.configure(bind=test_engine)
            else:
                maker.configure(bind=connection, join_transaction_mode="create_savepoint")
        joined = None if connection is None else connection.sync_connection
        seen: set[int] = {id(test_engine.sync_engine), id(sync_engine)}
        for engine in engines:
            if isinstance(engine, AsyncEngine):
                app, target, bridge = engine.sync_engine, test_engine.sync_engine, None
            else:
                assert sync_engine is not None
                app, target, bridge = engine, sync_engine, sync
            if id(app) not in seen:
                seen.add(id(app))
                on_test = joined if bridge is None or connection is not None else None
                redirected.append(_Redirect(app, target, on_test, bridge))
        yield
    finally:
        for redirect in reversed(redirected):
            redirect.restore()
        for maker, kw in saved_makers:
            maker.kw.clear()
            maker.kw.update(kw)


def _sync_target(
    test_engine: AsyncEngine, connection: AsyncConnection | None, sync: SyncSide
) -> Engine:
    """The engine the sync side uses: a joined view of the test engine under rollback, the
    sync test engine under commit isolation."""
    if connection is None:
        assert sync.engine is not None
        return sync.engine()
    view = Engine.__new__(Engine)
    _Redirect(view, test_engine.sync_engine, connection.sync_connection, sync)
    return view


class _Redirect:
    """One app engine with the test engine's state, its own put aside until the test ends."""

    def __init__(
        self,
        app: Engine,
        test: Engine,
        joined: Connection | None,
        bridge: SyncSide | None = None,
    ) -> None:
        self._app = app
        self._saved = dict(vars(app))
        state = {name: value for name, value in vars(test).items() if name != "dispatch"}
        vars(app).clear()
        vars(app).update(state)
        # Its own events, joined to the test engine's: the plugin's guards and recorders
        # see its statements, and listeners the app adds now leave with the test.
        vars(app)["dispatch"] = app.dispatch._join(test.dispatch)
        vars(app)["_has_events"] = True
        vars(app)["dispose"] = _no_dispose
        if joined is not None:
            borrowed: Any = _Borrowed(joined.connection)
            if bridge is None:
                vars(app)["connect"] = functools.partial(_JoinedConnection, app, borrowed)
            else:
                vars(app)["connect"] = functools.partial(_SyncJoined, bridge, app, borrowed)

    def restore(self) -> None:
        vars(self._app).clear()
        vars(self._app).update(self._saved)


def _no_dispose(close: bool = True) -> None:
    """An app's ``engine.dispose()`` during a test: the pool is the test's, left as it is."""


class _Borrowed:
    """The test connection's pooled connection, lent to a joined connection: closing it
    gives nothing back to the pool, the test connection keeps it."""

    def __init__(self, fairy: Any) -> None:
        object.__setattr__(self, "_fairy", fairy)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fairy, name)

    def close(self) -> None:
        """Nothing to give back: the connection is the test connection's."""

    def _close_special(self, transaction_reset: bool = False) -> None:
        """As :meth:`close`."""

    def detach(self) -> None:
        """A lent connection cannot leave the pool."""


class _JoinedConnection(Connection):
    """A connection of an app engine on the test connection (rollback isolation).

    Each transaction it begins is a savepoint of the test connection: committing releases
    it, rolling back rolls back to it. Savepoints get names of their own, so that they never
    meet the ``sa_savepoint_N`` names of the test connection's sessions.
    """

    _transaction_savepoint: str | None = None

    def _begin_impl(self, transaction: Any) -> None:
        self._allow_autobegin = False  # the SAVEPOINT statement must not begin anything
        try:
            self._transaction_savepoint = self._savepoint_impl()
        finally:
            self._allow_autobegin = True

    def _commit_impl(self) -> None:
        name, self._transaction_savepoint = self._transaction_savepoint, None
        if name is not None:
            self._release_savepoint_impl(name)

    def _rollback_impl(self) -> None:
        name, self._transaction_savepoint = self._transaction_savepoint, None
        if name is not None and self._still_open_and_dbapi_connection_is_valid:
            self._rollback_to_savepoint_impl(name)
            self._release_savepoint_impl(name)

    def _savepoint_impl(self, name: str | None = None) -> str:
        return super()._savepoint_impl(name or f"fastsched_sp_{next(_SAVEPOINT_NAMES)}")


def in_greenlet() -> bool:
    """Whether the caller runs in SQLAlchemy's asyncio greenlet (``greenlet_spawn``).

    ``sqlalchemy.util.concurrency.in_greenlet`` is missing from older SQLAlchemy 2.0 releases;
    the greenlet class is ``_AsyncIoGreenlet`` in every 2.0 release.
    """
    current = greenlet.getcurrent()
    return bool(getattr(current, "__sqlalchemy_greenlet_provider__", False)) or (
        type(current).__name__ == "_AsyncIoGreenlet"
    )


_THREAD = threading.local()
"""``open``: the sync connections of this thread with a transaction (a savepoint) open."""


def _open_here() -> dict[int, _SyncJoined]:
    found: dict[int, _SyncJoined] | None = getattr(_THREAD, "open", None)
    if found is None:
        found = _THREAD.open = {}
    return found


def end_open_transactions() -> None:
    """Roll back what a job thread's call left open, as production's pool does.

    A job that never closes its session (``db = SessionLocal()`` without ``close()``) leaves
    its transaction open; in production the connection goes back to the pool, rolled back,
    when the session is collected, and the next job gets another connection. Here every
    sync session shares the test connection, so the savepoint it left open is rolled back
    when the call ends (otherwise the next job would be reported as overlapping it).
    """
    connections = getattr(_THREAD, "open", None)
    while connections:
        _, connection = connections.popitem()
        with contextlib.suppress(Exception):  # the test's loop or connection is gone
            connection._rollback_impl()


_threads.AFTER_CALL.append(end_open_transactions)


def _result(call: concurrent.futures.Future[Any]) -> Any:
    while True:  # in short waits, so that the watchdog can stop a stuck job thread
        with contextlib.suppress(concurrent.futures.TimeoutError):
            return call.result(timeout=_WAIT_STEP)


class _SyncJoined(_JoinedConnection):
    """A sync connection on the test connection (rollback isolation): each call into the
    database is made on the test's event loop, in SQLAlchemy's greenlet there, and waited for
    by the thread that makes it."""

    def __init__(self, bridge: SyncSide, engine: Engine, fairy: Any) -> None:
        self._bridge = bridge
        super().__init__(engine, fairy)

    def _on_loop(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if in_greenlet():  # already there: a call made by another one
            return method(*args, **kwargs)
        loop, refuse = self._bridge.loop, self._bridge.refuse
        assert loop is not None
        assert refuse is not None
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise refuse()
        # The copied context carries the job run into the task that runs the call; the
        # module's greenlet_spawn, which the clock counts as I/O in flight.
        spawn = asyncio_engine.greenlet_spawn  # type: ignore[attr-defined]
        token = sync_thread.set(threading.current_thread())
        try:
            own = running is None and self._bridge.thread is threading.current_thread()
            if own and not loop.is_running():  # a def test's own session, between its calls
                return self._as_app(
                    lambda: loop.run_until_complete(spawn(method, *args, **kwargs))
                )
            call = asyncio.run_coroutine_threadsafe(spawn(method, *args, **kwargs), loop)
        finally:
            sync_thread.reset(token)
        return self._as_app(lambda: _result(call))

    def _as_app(self, call: Callable[[], Any]) -> Any:
        """``call()``, its database error raised as the app's driver raises it."""
        try:
            return call()
        except DBAPIError as error:
            translated = app_error(error, self._bridge.dbapi)
            if translated is error:
                raise
            raise translated from getattr(translated, "orig", None)

    def _execute_context(self, *args: Any, **kwargs: Any) -> Any:
        return self._on_loop(super()._execute_context, *args, **kwargs)

    def _begin_impl(self, transaction: Any) -> None:
        self._on_loop(super()._begin_impl, transaction)
        _open_here()[id(self)] = self

    def _commit_impl(self) -> None:
        _open_here().pop(id(self), None)
        self._on_loop(super()._commit_impl)

    def _rollback_impl(self) -> None:
        _open_here().pop(id(self), None)
        self._on_loop(super()._rollback_impl)

    def _savepoint_impl(self, name: str | None = None) -> str:
        saved: str = self._on_loop(super()._savepoint_impl, name)
        return saved

    def _release_savepoint_impl(self, name: str) -> None:
        self._on_loop(super()._release_savepoint_impl, name)

    def _rollback_to_savepoint_impl(self, name: str) -> None:
        self._on_loop(super()._rollback_to_savepoint_impl, name)

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

Everything is put back as it was after the test.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
)
from sqlalchemy.orm import sessionmaker

from pytest_fastsched import _options
from pytest_fastsched._options import describe, failure

AnySessionmaker = async_sessionmaker[Any] | sessionmaker[Any]
_SAVEPOINT_NAMES = itertools.count(1)


# -- what the settings name ----------------------------------------------------------------


def resolve_sessionmakers(paths: Sequence[str]) -> list[AnySessionmaker]:
    """The app's sessionmakers of ``fastsched_sessionmaker``, checked."""
    return [_check_sessionmaker(_resolve(path, "fastsched_sessionmaker"), path) for path in paths]


def resolve_engines(paths: Sequence[str]) -> list[AsyncEngine]:
    """The app's engines of ``fastsched_engine``, checked."""
    return [_check_engine(_resolve(path, "fastsched_engine"), path) for path in paths]


def _resolve(path: str, option: str) -> Any:
    try:
        return _options.resolve(path, option)
    except pytest.UsageError as error:
        raise failure(str(error)) from None


def _check_sessionmaker(maker: object, path: str) -> AnySessionmaker:
    if isinstance(maker, async_scoped_session):
        maker = maker.session_factory
    if isinstance(maker, async_sessionmaker):
        return maker
    if isinstance(maker, sessionmaker) and issubclass(maker.class_, AsyncSession):
        return maker
    raise failure(
        f"fastsched_sessionmaker = {path!r} is {describe(maker)}, not an async_sessionmaker: "
        "point it at the app's sqlalchemy.ext.asyncio.async_sessionmaker, or a "
        "sessionmaker(class_=AsyncSession) (the factory its jobs open sessions with)."
    )


def _check_engine(engine: object, path: str) -> AsyncEngine:
    if isinstance(engine, AsyncEngine):
        return engine
    raise failure(
        f"fastsched_engine = {path!r} is {describe(engine)}, not an AsyncEngine: point it at "
        "the app's sqlalchemy.ext.asyncio.AsyncEngine (the one create_async_engine() made)."
    )


def engines_of(makers: Sequence[AnySessionmaker]) -> list[AsyncEngine]:
    """The engines ``makers`` are bound to: the app's sessions go there too."""
    return [maker.kw["bind"] for maker in makers if isinstance(maker.kw.get("bind"), AsyncEngine)]


# -- pointing them at the test database ------------------------------------------------------


@contextlib.contextmanager
def rebound(
    makers: Sequence[AnySessionmaker],
    engines: Sequence[AsyncEngine],
    test_engine: AsyncEngine,
    connection: AsyncConnection | None,
) -> Iterator[None]:
    """Point ``makers`` and ``engines`` at the test database while the block runs.

    ``connection`` is the test connection under rollback isolation, ``None`` under commit
    isolation.
    """
    saved_makers = [(maker, dict(maker.kw)) for maker in makers]
    redirected: list[_Redirect] = []
    try:
        for maker in makers:
            if connection is None:
                maker.configure(bind=test_engine)
            else:
                maker.configure(bind=connection, join_transaction_mode="create_savepoint")
        joined = None if connection is None else connection.sync_connection
        seen: set[int] = {id(test_engine.sync_engine)}
        for engine in engines:
            if id(engine.sync_engine) not in seen:
                seen.add(id(engine.sync_engine))
                redirected.append(_Redirect(engine.sync_engine, test_engine.sync_engine, joined))
        yield
    finally:
        for redirect in reversed(redirected):
            redirect.restore()
        for maker, kw in saved_makers:
            maker.kw.clear()
            maker.kw.update(kw)


class _Redirect:
    """One app engine with the test engine's state, its own put aside until the test ends."""

    def __init__(self, app: Engine, test: Engine, joined: Connection | None) -> None:
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
            vars(app)["connect"] = functools.partial(_JoinedConnection, app, borrowed)

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

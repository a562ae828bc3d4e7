"""The test database of this process: where it lives, how it is made, emptied and dropped.

- ``sqlite``: a file in a private temporary directory (separate connections, as in ``commit``
  isolation, see the same data), removed at exit;
- ``postgresql`` or a PostgreSQL URL: a scratch database per process (per xdist worker), a
  copy of a template database that holds the schema, on the plugin's ephemeral server
  (:mod:`pytest_fastsched._postgres`) or on the given server, never in the named database.
  The xdist controller (:class:`Controller`) starts the one server of a run and hands it to
  the workers; scratch databases carry their creator, so a later run drops those of killed
  runs.

One test engine serves every event loop, its connections pooled per loop (asyncpg's cannot
move between loops), each loop's share ended when the loop shuts down (an asynchronous
generator parked in the loop is closed by ``loop.shutdown_asyncgens()``, which
``asyncio.Runner`` calls before closing the loop). On a PostgreSQL server reached over a unix
socket, the backends of those connections are kept for the next loop
(:mod:`pytest_fastsched._backends`).

What a test may do with the database, and what is undone after it, is
:mod:`pytest_fastsched._isolation`'s business; the object tests see is
:mod:`pytest_fastsched._db`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import MetaData, Table, event, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, NullPool
from sqlalchemy.util.queue import Empty

from pytest_fastsched import _backends, _dbclock, _options, _postgres, _schema
from pytest_fastsched._options import describe, failure

RUN_ID_INPUT = "fastsched_run_id"
SERVER_INPUT = "fastsched_postgres_directory"
ERROR_INPUT = "fastsched_database_error"
TEMPLATE_LOCK = 0x66617374  # an advisory lock id: the workers of a run build the template once
CONNECT_TIMEOUT = 10.0


# -- engines -----------------------------------------------------------------------------------


def create_engine(url: str, **options: Any) -> AsyncEngine:
    """An async engine for ``url``; on SQLite with the pysqlite savepoint workaround.

    sqlite3 (and so aiosqlite) does not emit BEGIN before SAVEPOINT or DDL, so a savepoint
    "commit" would really commit and a rollback would not undo it. The documented workaround
    turns the driver's own transaction handling off and emits BEGIN from an engine event.
    """
    engine = create_async_engine(url, **options)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
    return engine


SYNC_DRIVERS = {"sqlite": "sqlite+pysqlite", "postgresql": "postgresql+psycopg"}
"""The sync drivers of the sync test engine, by database."""


def create_sync_engine(url: str, clock: _dbclock.DatabaseClock | None = None) -> Engine:
    """A sync engine for the database of ``url`` (an async URL), with ``clock``; on SQLite
    with the pysqlite savepoint workaround, and its connections usable from any thread."""
    parsed = make_url(url)
    sync_url = parsed.set(drivername=SYNC_DRIVERS[parsed.get_backend_name()])
    options = clock.sync_engine_options() if clock is not None else {}
    if parsed.get_backend_name() == "sqlite":
        options["connect_args"] = {"check_same_thread": False}
    try:
        engine = sqlalchemy.create_engine(sync_url, **options)
    except ImportError as error:
        raise failure(
            "fastsched_db: the app's sync SQLAlchemy (commit isolation) needs a sync driver for "
            f"the test database, {sync_url.drivername}, which does not import ({error}). "
            "Install it: pip install 'psycopg[binary]'."
        ) from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sync_sqlite_connect)
        event.listen(engine, "begin", _sync_sqlite_begin)
    if clock is not None:
        clock.listen(engine)
    return engine


def _sync_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None


def _sync_sqlite_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN")


SQLITE_THREAD = "fastsched-sqlite-connection"
"""The name of the thread of each SQLite connection the plugin makes (aiosqlite runs one per
connection). The test engine's pooled connections serve every event loop, so their threads
stay alive from one test to the next, until the process ends."""


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # The connection's thread (aiosqlite 0.19 made the connection itself a thread).
    driver = dbapi_connection.driver_connection
    thread = getattr(driver, "_thread", driver)
    if isinstance(thread, threading.Thread):
        thread.name = SQLITE_THREAD
    cursor = dbapi_connection.cursor()
    # WAL: readers do not block the writer, for commit isolation's separate connections.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=OFF")
    cursor.close()
    dbapi_connection.isolation_level = None


def _sqlite_begin(connection: Connection) -> None:
    # Straight to aiosqlite (SQLAlchemy's AdaptedConnection.run_async): one call to the
    # driver's thread instead of three (cursor, execute, close).
    dbapi_connection = connection.connection.dbapi_connection
    dbapi_connection.run_async(lambda driver: driver.execute("BEGIN"))  # type: ignore[union-attr]


# -- one engine for every event loop -------------------------------------------------------

_HOME = "fastsched_loop_pool"
"""The key of ``record_info`` naming the loop's pool a checked-out connection goes back to."""
_LOOP_FREE_DRIVERS = frozenset({"aiosqlite"})
"""Drivers whose connections are bound to no event loop (aiosqlite runs a thread per
connection and answers each call on the caller's loop)."""


class _LoopQueue(AsyncAdaptedQueuePool):
    """The pooled connections of one event loop, made by (and belonging to) a ``LoopPool``."""

    def __init__(self, owner: LoopPool) -> None:
        super().__init__(
            owner._creator,
            pool_size=owner.size(),
            max_overflow=owner._max_overflow,
            timeout=owner.timeout(),
            use_lifo=owner._pool.use_lifo,
        )
        self.owner = owner
        self.loop = asyncio.get_running_loop()

    def _create_connection(self) -> ConnectionPoolEntry:
        return self.owner._connection_for_new_loop_slot()


class LoopPool(AsyncAdaptedQueuePool):
    """The test engine's pool: one engine and one dialect (initialized once) serve every event
    loop of the process, and each loop's connections are pooled apart.

    asyncpg connections belong to the loop that made them: a loop's idle connections are
    closed when it ends (:meth:`end_loop`), their server backends kept by the
    :class:`~pytest_fastsched._backends.BackendKeeper` where there is one. Connections of
    drivers bound to no loop (aiosqlite) pass to the next loop instead, so that a suite with a
    new loop per test (pytest-asyncio's default) does not connect again for each test. Pool
    options (``pool_size``, ``max_overflow``, ``pool_timeout``, ``pool_pre_ping``,
    ``pool_recycle``) apply per loop.
    """

    def __init__(self, creator: Any, **options: Any) -> None:
        super().__init__(creator, **options)
        self._loops: dict[asyncio.AbstractEventLoop, _LoopQueue] = {}
        self._free: list[ConnectionPoolEntry] = []
        """Idle connections of ended loops, for the next loop (loop-free drivers only)."""

    @property
    def _loop_free(self) -> bool:
        return getattr(self._dialect, "driver", None) in _LOOP_FREE_DRIVERS

    def _queue(self) -> _LoopQueue:
        loop = asyncio.get_running_loop()
        queue = self._loops.get(loop)
        if queue is None:
            self._reclaim_closed_loops()
            queue = self._loops[loop] = _LoopQueue(self)
        return queue

    def _do_get(self) -> ConnectionPoolEntry:
        queue = self._queue()
        record = queue._do_get()
        _record_info(record)[_HOME] = queue
        return record

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        home = _record_info(record).pop(_HOME, None)
        if isinstance(home, _LoopQueue) and self._loops.get(home.loop) is home:
            home._do_return_conn(record)
        elif self._loop_free:
            self._free.append(record)
        else:
            record.close()

    def _connection_for_new_loop_slot(self) -> ConnectionPoolEntry:
        if self._free:
            record = self._free.pop()
            _unbind_from_loop(record)
            return record
        return self._create_connection()

    def end_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """``loop`` ends: close its idle connections, or keep them for the next loop.

        Called outside SQLAlchemy's greenlet, where invalidating a connection closes it at
        once (asyncpg's ``terminate()``) instead of waiting for the server to end its backend
        (about 0.6 ms per test).
        """
        queue = self._loops.pop(loop, None)
        if queue is None:
            return
        if self._loop_free:
            self._free.extend(_drain(queue))
            return
        for record in _drain(queue):
            record.invalidate()

    def _reclaim_closed_loops(self) -> None:
        # Loops closed without loop.shutdown_asyncgens() never ended their share.
        for loop in [loop for loop in self._loops if loop.is_closed()]:
            queue = self._loops.pop(loop)
            if self._loop_free:
                self._free.extend(_drain(queue))

    def dispose(self) -> None:
        """Close the idle connections of the running loop and of ended loops."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and loop in self._loops:
            self._loops.pop(loop).dispose()
        while self._free:
            self._free.pop().close()


def _drain(queue: _LoopQueue) -> list[ConnectionPoolEntry]:
    """The idle connections of ``queue``, taken out of it."""
    records = []
    while True:
        try:
            records.append(queue._pool.get(False))
        except Empty:
            return records


def _unbind_from_loop(record: ConnectionPoolEntry) -> None:
    # SQLAlchemy's adapter serializes a connection's statements with an asyncio.Lock, which
    # binds itself to the loop of the first task that had to wait for it; the connection is
    # idle here, so a new lock is equivalent.
    adapter = record.dbapi_connection
    if hasattr(adapter, "_execute_mutex"):
        setattr(adapter, "_execute_mutex", asyncio.Lock())  # noqa: B010


def _record_info(record: ConnectionPoolEntry) -> dict[str, Any]:
    info = record.record_info
    assert info is not None, "a pool's own connection records always have one"
    return info


# -- where the test database lives ---------------------------------------------------------


class _SqliteLocation:
    """A database file in a private temporary directory of this process."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="pytest-fastsched-sqlite-"))
        self.url = f"sqlite+aiosqlite:///{self.directory / 'test.db'}"

    async def create(self, schema: _schema.Schema, clock: _dbclock.DatabaseClock | None) -> None:
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            await schema.build(engine)
            if clock is not None:
                await clock.install(engine)
        finally:
            await engine.dispose()

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class _PostgresLocation:
    """A scratch database of this process, cloned from the run's template database."""

    def __init__(self, admin_url: str, run_id: str, worker: str) -> None:
        self.admin_url = admin_url
        self.template = _template_name(run_id)
        self.name = f"fastsched_{run_id}_{worker}".lower()
        self.url = _with_database(admin_url, self.name)

    async def create(self, schema: _schema.Schema, clock: _dbclock.DatabaseClock | None) -> None:
        admin = _admin_engine(self.admin_url)
        try:
            connection = await _connect(admin)
            try:
                await connection.execute(text(f"SELECT pg_advisory_lock({TEMPLATE_LOCK})"))
                await _drop_stale_databases(connection)
                await self._create_template(connection, schema, clock)
                await connection.exec_driver_sql(
                    f"CREATE DATABASE {_quote(self.name)} TEMPLATE {_quote(self.template)}"
                )
                await _mark_owner(connection, self.name)
            finally:
                await connection.close()  # which releases the advisory lock
        finally:
            await admin.dispose()

    async def _create_template(
        self,
        admin: AsyncConnection,
        schema: _schema.Schema,
        clock: _dbclock.DatabaseClock | None,
    ) -> None:
        exists = await admin.scalar(
            text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": self.template}
        )
        if exists:
            return
        await admin.exec_driver_sql(f"CREATE DATABASE {_quote(self.template)}")
        await _mark_owner(admin, self.template)
        engine = create_engine(_with_database(self.admin_url, self.template), poolclass=NullPool)
        try:
            await schema.build(engine)
            if clock is not None:
                await clock.install(engine)
        except BaseException:
            await engine.dispose()
            await _drop_database(admin, self.template)
            raise
        await engine.dispose()

    def drop(self, *, template: bool) -> None:
        """Drop this process's database (and the run's template) from the server."""
        names = [self.name, self.template] if template else [self.name]
        _postgres._run_in_fresh_loop(_drop_databases(self.admin_url, names))


# Scratch databases carry their creator in a comment, so that a later run can drop the ones
# whose process was killed before it could drop them itself.
_OWNER_PREFIX = "pytest-fastsched scratch database of "


async def _mark_owner(admin: AsyncConnection, name: str) -> None:
    owner = f"{_OWNER_PREFIX}{socket.gethostname()}:{os.getpid()}"
    await admin.exec_driver_sql(f"COMMENT ON DATABASE {_quote(name)} IS '{owner}'")


async def _drop_stale_databases(admin: AsyncConnection) -> None:
    """Drop scratch databases left by killed runs: made on this host by a process now gone."""
    rows = await admin.execute(
        text(
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
            "WHERE datname LIKE 'fastsched\\_%'"
        )
    )
    for name, comment in rows.all():
        if _stale(str(comment or "")):
            await _drop_database(admin, name)


def _stale(comment: str) -> bool:
    if not comment.startswith(_OWNER_PREFIX):
        return False  # not ours, or made before scratch databases were marked
    host, _, pid = comment.removeprefix(_OWNER_PREFIX).rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not _postgres.pid_alive(int(pid))


def _template_name(run_id: str) -> str:
    return f"fastsched_{run_id}_template"


def _admin_engine(url: str) -> AsyncEngine:
    return create_engine(
        url,
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
        connect_args={"timeout": CONNECT_TIMEOUT},
    )


async def _drop_databases(admin_url: str, names: Sequence[str]) -> None:
    admin = _admin_engine(admin_url)
    try:
        async with admin.connect() as connection:
            for name in names:
                await _drop_database(connection, name)
    finally:
        await admin.dispose()


async def _drop_database(admin: AsyncConnection, name: str) -> None:
    await admin.exec_driver_sql(f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE)")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _with_database(url: str, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


def asyncpg_url(url: str) -> str:
    """``url`` with the asyncpg driver, the one async PostgreSQL driver the plugin ships."""
    return make_url(url).set(drivername="postgresql+asyncpg").render_as_string(False)


async def _connect(admin: AsyncEngine) -> AsyncConnection:
    try:
        return await admin.connect()
    except Exception as error:
        url = admin.url.render_as_string(hide_password=True)
        raise failure(
            f"fastsched_database = {url!r}: cannot connect to the server: "
            f"{type(error).__name__}: {error}. Start the server or fix the URL (host, port, "
            "user, password), or set fastsched_database = postgresql to let the plugin run a "
            "local server."
        ) from None


# -- the xdist controller ------------------------------------------------------------------


class Controller:
    """The xdist controller's share: one run id and one ephemeral server for all workers."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.run_id = secrets.token_hex(4)
        self.server: _postgres.EphemeralPostgres | None = None
        self.error: str | None = None

    def workerinput(self) -> dict[str, str]:
        """What each worker needs to find the run's server and databases."""
        if self.database == "postgresql" and self.server is None and self.error is None:
            try:
                self.server = _postgres.EphemeralPostgres.start()
            except (_postgres.PostgresNotFound, _postgres.PostgresError) as error:
                self.error = _server_error(error)
        values = {RUN_ID_INPUT: self.run_id}
        if self.server is not None:
            values[SERVER_INPUT] = str(self.server.directory)
        if self.error is not None:
            values[ERROR_INPUT] = self.error
        return values

    def close(self) -> None:
        """Stop the server, or drop the run's template from the user's server."""
        if self.server is not None:
            self.server.stop()
        elif "://" in self.database:
            template = _template_name(self.run_id)
            with contextlib.suppress(Exception):
                _postgres._run_in_fresh_loop(
                    _drop_databases(asyncpg_url(self.database), [template])
                )


def _server_error(error: Exception) -> str:
    if isinstance(error, _postgres.PostgresNotFound):
        return f"fastsched_database = 'postgresql': {error}"
    return f"fastsched_database = 'postgresql': the local PostgreSQL server did not start: {error}"


# -- the test database of this process -----------------------------------------------------


@dataclasses.dataclass
class _LoopEngine:
    engine: AsyncEngine
    keeper: AsyncIterator[None]


class TestDatabase:
    """The test database of one pytest process (one xdist worker), made on first use."""

    __test__ = False  # not a test class, whatever its name

    def __init__(
        self,
        settings: _options.Settings,
        *,
        worker: str = "main",
        workerinput: Mapping[str, Any] | None = None,
        schema_hook: _schema.SchemaHook | None = None,
    ) -> None:
        self.settings = settings
        self._schema_hook = schema_hook
        self.schema = _schema.Schema()
        self.seeds = _schema.Seeds(settings.seed_tables)
        self.worker = worker
        self._workerinput = dict(workerinput or {})
        self._owner = workerinput is None
        self._run_id = self._workerinput.get(RUN_ID_INPUT) or secrets.token_hex(4)
        self._server: _postgres.EphemeralPostgres | None = None
        self._location: _SqliteLocation | _PostgresLocation | None = None
        self._admin: str | None = None
        self.metadata: MetaData | None = None
        self._engine_options_source: object = None
        self.engine_options: dict[str, Any] = {}
        self._engine: AsyncEngine | None = None
        self._engines: dict[asyncio.AbstractEventLoop, _LoopEngine] = {}
        self._sync_engine: Engine | None = None
        self._keeper: _backends.BackendKeeper | None = None
        self.database_clock = (
            _dbclock.DatabaseClock(self.dialect) if settings.database_clock == "virtual" else None
        )
        """The database's clock, unless ``fastsched_database_clock = real``."""

    async def create(self) -> None:
        """Resolve the app's metadata and engine options, then create the database."""
        __tracebackhide__ = True
        self._resolve_app()
        if ERROR_INPUT in self._workerinput:
            raise failure(self._workerinput[ERROR_INPUT])
        location: _SqliteLocation | _PostgresLocation
        if self.settings.database == "sqlite":
            location = _SqliteLocation()
        else:
            self._admin = self._admin_url()
            location = _PostgresLocation(self._admin, self._run_id, self.worker)
        self._location = location
        if self.settings.engine_options is not None:
            self.engine_options = _check_engine_options(
                self._engine_options_source, self.settings.engine_options, location.url
            )
        await location.create(self.schema, self.database_clock)
        await self.seeds.snapshot(await self.engine())

    def _resolve_app(self) -> None:
        settings = self.settings
        try:
            if settings.metadata is not None:
                self.metadata = _check_metadata(
                    _options.resolve(settings.metadata, "fastsched_metadata"), settings.metadata
                )
            if settings.engine_options is not None:
                self._engine_options_source = _options.resolve(
                    settings.engine_options, "fastsched_engine_options"
                )
        except pytest.UsageError as error:
            raise failure(str(error)) from None
        self.schema = _schema.Schema.from_settings(settings, self.metadata, self._schema_hook)

    def _admin_url(self) -> str:
        """The server's URL of a database to connect to, never one the tests use."""
        database = self.settings.database
        if database != "postgresql":
            return asyncpg_url(database)
        directory = self._workerinput.get(SERVER_INPUT)
        if directory is not None:
            self._server = _postgres.EphemeralPostgres.attach(directory)
        else:
            try:
                self._server = _postgres.EphemeralPostgres.start()
            except (_postgres.PostgresNotFound, _postgres.PostgresError) as error:
                raise failure(_server_error(error)) from None
        return self._server.url()

    def owned(self) -> tuple[str | None, list[str]]:
        """What a sealed test owns: the test database's URL (once made), and the URL of the
        server where the plugin makes and drops its own databases."""
        location = self._location
        return (
            None if location is None else location.url,
            [] if self._admin is None else [self._admin],
        )

    @property
    def url(self) -> str:
        """The URL of the test database (after :meth:`create`)."""
        assert self._location is not None, "TestDatabase.create() has not run"
        return self._location.url

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return "sqlite" if self.settings.database == "sqlite" else "postgresql"

    # -- the engine, serving every event loop

    async def engine(self) -> AsyncEngine:
        """The test engine, ready for the running loop; the loop's share of its pool is ended
        when the loop shuts down.

        One engine serves every loop (its dialect initialized once, its statement cache
        shared) with a :class:`LoopPool`; a ``poolclass`` of ``fastsched_engine_options``
        gets an engine per loop instead, disposed when the loop ends.
        """
        loop = asyncio.get_running_loop()
        entry = self._engines.get(loop)
        if entry is None:
            engine = self._engine_for_loop()
            keeper = self._release_at_loop_end(loop, engine)
            await keeper.__anext__()
            entry = self._engines[loop] = _LoopEngine(engine, keeper)
        return entry.engine

    def _engine_for_loop(self) -> AsyncEngine:
        if (
            self.engine_options.get("poolclass", AsyncAdaptedQueuePool)
            is not AsyncAdaptedQueuePool
        ):
            return self._create_test_engine(self.engine_options)
        if self._engine is None:
            self._engine = self._create_test_engine({**self.engine_options, "poolclass": LoopPool})
        return self._engine

    def _create_test_engine(self, options: Mapping[str, Any]) -> AsyncEngine:
        clock = self.database_clock
        if clock is not None:
            options = clock.engine_options(options)
        try:
            engine = create_engine(self.url, **options)
        except (TypeError, ValueError, ArgumentError) as error:
            raise failure(
                f"fastsched_engine_options = {self.settings.engine_options!r}: "
                f"create_async_engine() rejected the options: {type(error).__name__}: {error}"
            ) from None
        if clock is not None:
            clock.listen(engine)
        keeper = self._backend_keeper(engine)
        if keeper is not None:
            event.listen(engine.sync_engine, "do_connect", _redirect_to(keeper))
        return engine

    def _backend_keeper(self, engine: AsyncEngine) -> _backends.BackendKeeper | None:
        """The keeper of the server's backends across loops: asyncpg to a server on a unix
        socket (the plugin's own, or one whose URL names a socket directory), unless
        ``fastsched_postgres_backends = new``."""
        if engine.dialect.driver != "asyncpg" or self.settings.postgres_backends == "new":
            return None
        if self._keeper is None:
            server = _unix_socket(engine.url)
            if server is None:
                return None
            self._keeper = _backends.BackendKeeper(*server)
        return self._keeper

    def sync_engine(self) -> Engine:
        """The sync engine of the test database, for the app's sync sessions under commit
        isolation: pysqlite, or psycopg 3 on PostgreSQL; made on first use, for every thread.

        The options of ``fastsched_engine_options`` are the async test engine's, not its.
        """
        if self._sync_engine is None:
            self._sync_engine = create_sync_engine(self.url, self.database_clock)
        return self._sync_engine

    @property
    def made_sync_engine(self) -> Engine | None:
        """The engine :meth:`sync_engine` made, or ``None`` before."""
        return self._sync_engine

    @contextlib.contextmanager
    def following(self, clock: _dbclock.Instant | None) -> Iterator[None]:
        """The database reads ``clock``'s instant while the block runs (``None``, or
        ``fastsched_database_clock = real``: the server's clock)."""
        following = self.database_clock.follow(clock) if self.database_clock else None
        with following or contextlib.nullcontext():
            yield

    async def _release_at_loop_end(
        self, loop: asyncio.AbstractEventLoop, engine: AsyncEngine
    ) -> AsyncIterator[None]:
        # Parked in the loop: loop.shutdown_asyncgens() closes it while the loop still runs.
        try:
            yield
        finally:
            self._engines.pop(loop, None)
            await _release(loop, engine, self._keeper)

    # -- emptied after a test of commit isolation

    async def empty_tables(self, engine: AsyncEngine) -> None:
        """Delete every row the tests wrote; put the seed tables back as the schema made them."""
        async with engine.begin() as connection:
            for table in await self._tables_to_empty(connection):
                await connection.execute(table.delete())
            await self.seeds.restore(connection)

    async def _tables_to_empty(self, connection: AsyncConnection) -> list[Table]:
        tables = self.schema.created_tables()
        if tables is None:
            names = await connection.run_sync(
                lambda sync: [name for name, _ in inspect(sync).get_sorted_table_and_fkc_names()]
            )
            tables = [Table(name, MetaData()) for name in names if name]
        kept = self.schema.kept_tables
        return [table for table in reversed(tables) if table.name not in kept]

    # -- the end of the process

    def close(self) -> None:
        """Dispose leftover engines, drop the scratch databases, stop an owned server."""
        for loop, entry in list(self._engines.items()):
            if not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(_release(loop, entry.engine, self._keeper))
        self._engines.clear()
        engine, self._engine = self._engine, None
        if engine is not None:
            _postgres._run_in_fresh_loop(engine.dispose())
        sync_engine, self._sync_engine = self._sync_engine, None
        if sync_engine is not None:
            sync_engine.dispose()
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.close()
        location, self._location = self._location, None
        if isinstance(location, _SqliteLocation):
            location.remove()
        elif location is not None and self._server is None:
            with contextlib.suppress(Exception):
                location.drop(template=self._owner)
        if self._server is not None:
            self._server.stop()
        if self.database_clock is not None:
            self.database_clock.close()


async def _release(
    loop: asyncio.AbstractEventLoop,
    engine: AsyncEngine,
    keeper: _backends.BackendKeeper | None,
) -> None:
    """The end of ``loop``: its share of ``engine``'s pool, or its own engine; the backends
    its connections used are kept for the next loop."""
    pool = engine.sync_engine.pool
    if isinstance(pool, LoopPool):
        pool.end_loop(loop)
        # A terminated connection's transport closes its socket in a loop callback: let it
        # run before the loop closes, or the socket is left for the garbage collector.
        await asyncio.sleep(0)
    else:
        await engine.dispose()
    if keeper is not None:
        keeper.end_loop(loop)


def _unix_socket(url: sqlalchemy.URL) -> tuple[Path, int] | None:
    """The socket directory and port of a PostgreSQL URL's server, if it is on a unix socket."""
    host = url.query.get("host") or url.host or ""
    port = url.query.get("port") or url.port or _postgres.PORT
    if not isinstance(host, str) or not isinstance(port, (str, int)) or not host.startswith("/"):
        return None
    return Path(host), int(port)


def _redirect_to(keeper: _backends.BackendKeeper) -> Any:
    def redirect(_dialect: Any, _record: Any, _args: Any, parameters: dict[str, Any]) -> None:
        keeper.redirect(parameters)

    return redirect


def _check_metadata(metadata: object, path: str) -> MetaData:
    if isinstance(metadata, MetaData):
        return metadata
    raise failure(
        f"fastsched_metadata = {path!r} is {describe(metadata)}, not a sqlalchemy.MetaData: "
        "point it at the app's MetaData, e.g. 'app.models:Base.metadata'."
    )


_FOREIGN_CONNECTIONS = ("creator", "async_creator")


def _check_engine_options(source: object, path: str, url: str) -> dict[str, Any]:
    """The test engine's options from ``fastsched_engine_options``: a dict or a function."""
    shown = f"fastsched_engine_options = {path!r}"
    options = source
    if callable(source):
        try:
            options = source(url)
        except Exception as error:
            raise failure(
                f"{shown}: calling it with the test database's URL raised "
                f"{type(error).__name__}: {error}"
            ) from error
    if not isinstance(options, Mapping) or not all(isinstance(key, str) for key in options):
        raise failure(
            f"{shown} gave {describe(options)}: give a dict of create_async_engine() keyword "
            "arguments, or a function of the database URL that returns one, e.g. "
            "{'connect_args': {'statement_cache_size': 0}}."
        )
    for key in _FOREIGN_CONNECTIONS:
        if key in options:
            raise failure(
                f"{shown} sets {key!r}: its connections would not go to the test database. "
                "Leave it out of the options the tests get; the plugin connects to the test "
                "database itself."
            )
    execution = options.get("execution_options") or {}
    if "AUTOCOMMIT" in (options.get("isolation_level"), execution.get("isolation_level")):
        raise failure(
            f"{shown} sets isolation_level='AUTOCOMMIT': every statement would commit at "
            "once, out of reach of the test's isolation. Leave it out of the options the "
            "tests get, and use an AUTOCOMMIT connection only where the app needs one."
        )
    return dict(options)


def worker_id(config: pytest.Config) -> str:
    """The xdist worker id (``gw0``, ...) or ``main`` outside xdist."""
    workerinput: Mapping[str, Any] = getattr(config, "workerinput", {})
    return str(workerinput.get("workerid", "main"))

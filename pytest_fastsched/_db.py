"""The per-test database behind ``fastsched_db``: where it lives, its isolation, its guards.

One :class:`Databases` per pytest process prepares the test database once, on first use:

- ``sqlite``: a file in a private temporary directory (separate connections, as in ``commit``
  isolation, see the same data), removed at exit;
- ``postgresql`` or a PostgreSQL URL: a scratch database per process (per xdist worker), a
  copy of a template database that holds the schema, on the plugin's ephemeral server
  (:mod:`pytest_fastsched._postgres`) or on the given server, never in the named database.

Engines belong to the event loop that made them (asyncpg connections cannot move between
loops), so there is one engine per loop, made on first use in that loop and disposed when the
loop shuts down (an asynchronous generator parked in the loop is closed by
``loop.shutdown_asyncgens()``, which ``asyncio.Runner`` calls before closing the loop).

Each test gets a :class:`Database`. Under ``rollback`` isolation it holds one connection
inside an outer transaction, the app's own ``async_sessionmaker`` is re-configured in place to
join it with savepoints (each app "commit" releases a savepoint), and one rollback undoes
everything. Under ``commit`` isolation sessions get their own connections and commit for
real; the tables are emptied after the test. Guards turn the ways code can escape the
isolation into errors that name the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import MetaData, Table, event, insert, inspect, select, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchTableError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import NullPool

from pytest_fastsched import _options, _postgres, _schema

if TYPE_CHECKING:
    from pytest_fastsched._prepared import PreparedStatementLeak, PreparedStatementMonitor

RUN_ID_INPUT = "fastsched_run_id"
SERVER_INPUT = "fastsched_postgres_directory"
ERROR_INPUT = "fastsched_database_error"
TEMPLATE_LOCK = 0x66617374  # an advisory lock id: the workers of a run build the template once
CONNECT_TIMEOUT = 10.0

MISSING_GREENLET_HINT = (
    "MissingGreenlet: SQLAlchemy had to do database I/O where it could not be awaited. "
    "Usual causes:\n"
    "- an attribute read after commit(): commit expires the loaded objects "
    "(expire_on_commit=True, the default), so the next read reloads it implicitly; read the "
    "values before the commit, `await session.refresh(obj)`, or build the sessionmaker with "
    "expire_on_commit=False;\n"
    "- a lazy-loaded relationship: load it eagerly (`selectinload(...)`) or read it with "
    "`await obj.awaitable_attrs.<name>`;\n"
    "- a synchronous Session or engine call made from async code.\n"
    "pytest-fastsched keeps the app's session settings as the app set them: this fails in "
    "production too."
)

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


def missing_greenlet_hint(error: BaseException) -> str | None:
    """The hint to show when ``MissingGreenlet`` is in the chain of ``error``, else ``None``."""
    for link in exception_chain(error):
        if type(link).__name__ == "MissingGreenlet":
            return MISSING_GREENLET_HINT
    return None


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


def _fail(message: str) -> BaseException:
    """A test failure that shows only ``message`` (the plugin's frames say nothing useful)."""
    return pytest.fail.Exception(message, pytrace=False)


# -- engines -----------------------------------------------------------------------------------


def import_driver(database: str) -> None:
    """Import the driver of ``database`` (and its SQLAlchemy dialect) now, not at first use."""
    dialect = "sqlite.aiosqlite" if database == "sqlite" else "postgresql.asyncpg"
    importlib.import_module(f"sqlalchemy.dialects.{dialect}")
    importlib.import_module("aiosqlite" if database == "sqlite" else "asyncpg")


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


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
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


@dataclasses.dataclass
class _TestState:
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
        self.state: _TestState | None = None
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
class _LoopEngine:
    engine: AsyncEngine
    guard: _Guard
    keeper: AsyncIterator[None]


# -- where the test database lives ---------------------------------------------------------


class _SqliteLocation:
    """A database file in a private temporary directory of this process."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="pytest-fastsched-sqlite-"))
        self.url = f"sqlite+aiosqlite:///{self.directory / 'test.db'}"

    async def create(self, schema: _schema.Schema) -> None:
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            await schema.build(engine)
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

    async def create(self, schema: _schema.Schema) -> None:
        admin = _admin_engine(self.admin_url)
        try:
            connection = await _connect(admin)
            try:
                await connection.execute(text(f"SELECT pg_advisory_lock({TEMPLATE_LOCK})"))
                await _drop_stale_databases(connection)
                await self._create_template(connection, schema)
                await connection.exec_driver_sql(
                    f"CREATE DATABASE {_quote(self.name)} TEMPLATE {_quote(self.template)}"
                )
                await _mark_owner(connection, self.name)
            finally:
                await connection.close()  # which releases the advisory lock
        finally:
            await admin.dispose()

    async def _create_template(self, admin: AsyncConnection, schema: _schema.Schema) -> None:
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
    return host == socket.gethostname() and pid.isdigit() and not _postgres._pid_alive(int(pid))


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
        raise _fail(
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


# -- the databases of this process -----------------------------------------------------------


class Databases:
    """The test databases of one pytest process (one xdist worker), prepared on first use."""

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
        self._error: BaseException | None = None
        self._ready = False
        self.sessionmaker: async_sessionmaker[Any] | None = None
        self.metadata: MetaData | None = None
        self._engine_options_source: object = None
        self.engine_options: dict[str, Any] = {}
        self._engines: dict[asyncio.AbstractEventLoop, _LoopEngine] = {}
        self._app_listeners: list[tuple[Engine, str, Callable[..., None]]] = []
        self.active: _TestState | None = None

    # -- setup, once per process

    async def setup(self) -> None:
        """Resolve the app's objects, then create the test database; a failure is kept."""
        __tracebackhide__ = True
        if self._error is not None:
            raise self._error
        if self._ready:
            return
        try:
            self._resolve_app()
            await self._create_database()
        except pytest.fail.Exception as failure:
            self._error = failure
            self.close()
            raise
        self._ready = True

    def _resolve_app(self) -> None:
        settings = self.settings
        try:
            if settings.sessionmaker is not None:
                self.sessionmaker = _check_sessionmaker(
                    _options.resolve(settings.sessionmaker, "fastsched_sessionmaker"),
                    settings.sessionmaker,
                )
            if settings.metadata is not None:
                self.metadata = _check_metadata(
                    _options.resolve(settings.metadata, "fastsched_metadata"), settings.metadata
                )
            if settings.engine_options is not None:
                self._engine_options_source = _options.resolve(
                    settings.engine_options, "fastsched_engine_options"
                )
        except pytest.UsageError as error:
            raise _fail(str(error)) from None
        self.schema = _schema.Schema.from_settings(settings, self.metadata, self._schema_hook)

    async def _create_database(self) -> None:
        if ERROR_INPUT in self._workerinput:
            raise _fail(self._workerinput[ERROR_INPUT])
        location: _SqliteLocation | _PostgresLocation
        if self.settings.database == "sqlite":
            location = _SqliteLocation()
        else:
            location = _PostgresLocation(self._admin_url(), self._run_id, self.worker)
        self._location = location
        if self.settings.engine_options is not None:
            self.engine_options = _check_engine_options(
                self._engine_options_source, self.settings.engine_options, location.url
            )
        await location.create(self.schema)
        await self.seeds.snapshot((await self.engine()).engine)

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
                raise _fail(_server_error(error)) from None
        return self._server.url()

    @property
    def url(self) -> str:
        """The URL of the test database (after :meth:`setup`)."""
        assert self._location is not None, "Databases.setup() has not run"
        return self._location.url

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return "sqlite" if self.settings.database == "sqlite" else "postgresql"

    # -- engines, one per event loop

    async def engine(self) -> _LoopEngine:
        """The engine of the running loop, made on first use, disposed when the loop ends."""
        loop = asyncio.get_running_loop()
        entry = self._engines.get(loop)
        if entry is None:
            engine = self._create_test_engine()
            keeper = self._dispose_at_loop_end(loop, engine)
            await keeper.__anext__()
            entry = self._engines[loop] = _LoopEngine(engine, _Guard(engine), keeper)
        return entry

    def _create_test_engine(self) -> AsyncEngine:
        try:
            return create_engine(self.url, **self.engine_options)
        except (TypeError, ValueError, ArgumentError) as error:
            raise _fail(
                f"fastsched_engine_options = {self.settings.engine_options!r}: "
                f"create_async_engine() rejected the options: {type(error).__name__}: {error}"
            ) from None

    async def _dispose_at_loop_end(
        self, loop: asyncio.AbstractEventLoop, engine: AsyncEngine
    ) -> AsyncIterator[None]:
        # Parked in the loop: loop.shutdown_asyncgens() closes it while the loop still runs.
        try:
            yield
        finally:
            self._engines.pop(loop, None)
            await engine.dispose()

    # -- one test

    @contextlib.asynccontextmanager
    async def open_test(
        self,
        isolation: _options.IsolationMode,
        prepared_statements: _options.PreparedStatementMode = "ignore",
    ) -> AsyncIterator[Database]:
        """Bind the app's sessionmaker to the test database for the duration of one test.

        With ``prepared_statements`` other than ``"ignore"`` on PostgreSQL, the named
        prepared statements of the test's connections are read as it runs
        (:mod:`pytest_fastsched._prepared`), a last time before the test's data is undone.
        """
        __tracebackhide__ = True
        await self.setup()
        entry = await self.engine()
        loop = asyncio.get_running_loop()
        if isolation == "rollback":
            opened = self._open_rollback(entry, loop)
        else:
            opened = self._open_commit(entry, loop)
        async with opened as database, database._recording(prepared_statements):
            yield database

    @contextlib.asynccontextmanager
    async def _open_rollback(
        self, entry: _LoopEngine, loop: asyncio.AbstractEventLoop
    ) -> AsyncIterator[Database]:
        connection = await entry.engine.connect()
        try:
            await connection.begin()
            state = _TestState("rollback", loop, connection.sync_connection)
            with self._activate(entry, state, bind=connection):
                yield Database(self, entry.engine, state, connection)
        finally:
            # Closing rolls the outer transaction back, and spares the pool its own reset.
            await connection.close()

    @contextlib.asynccontextmanager
    async def _open_commit(
        self, entry: _LoopEngine, loop: asyncio.AbstractEventLoop
    ) -> AsyncIterator[Database]:
        state = _TestState("commit", loop, None)
        try:
            with self._activate(entry, state, bind=entry.engine):
                yield Database(self, entry.engine, state, None)
        finally:
            await self._empty_tables(entry.engine)

    @contextlib.contextmanager
    def _activate(
        self, entry: _LoopEngine, state: _TestState, bind: AsyncEngine | AsyncConnection
    ) -> Iterator[None]:
        maker = self.sessionmaker
        saved = dict(maker.kw) if maker is not None else {}
        if maker is not None:
            self._guard_app_engine(saved.get("bind"))
            options: dict[str, Any] = {"bind": bind}
            if state.isolation == "rollback":
                options["join_transaction_mode"] = "create_savepoint"
            maker.configure(**options)
        entry.guard.state = self.active = state
        try:
            yield
        finally:
            entry.guard.state = self.active = None
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

    async def _empty_tables(self, engine: AsyncEngine) -> None:
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
                loop.run_until_complete(entry.engine.dispose())
        self._engines.clear()
        for engine, name, listener in self._app_listeners:
            event.remove(engine, name, listener)
        self._app_listeners.clear()
        location, self._location = self._location, None
        if isinstance(location, _SqliteLocation):
            location.remove()
        elif location is not None and self._server is None:
            with contextlib.suppress(Exception):
                location.drop(template=self._owner)
        if self._server is not None:
            self._server.stop()


def _check_sessionmaker(maker: object, path: str) -> async_sessionmaker[Any]:
    if isinstance(maker, async_sessionmaker):
        return maker
    raise _fail(
        f"fastsched_sessionmaker = {path!r} is {_describe(maker)}, not an async_sessionmaker: "
        "point it at the app's sqlalchemy.ext.asyncio.async_sessionmaker (the factory its "
        "jobs open sessions with)."
    )


def _check_metadata(metadata: object, path: str) -> MetaData:
    if isinstance(metadata, MetaData):
        return metadata
    raise _fail(
        f"fastsched_metadata = {path!r} is {_describe(metadata)}, not a sqlalchemy.MetaData: "
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
            raise _fail(
                f"{shown}: calling it with the test database's URL raised "
                f"{type(error).__name__}: {error}"
            ) from error
    if not isinstance(options, Mapping) or not all(isinstance(key, str) for key in options):
        raise _fail(
            f"{shown} gave {_describe(options)}: give a dict of create_async_engine() keyword "
            "arguments, or a function of the database URL that returns one, e.g. "
            "{'connect_args': {'statement_cache_size': 0}}."
        )
    for key in _FOREIGN_CONNECTIONS:
        if key in options:
            raise _fail(
                f"{shown} sets {key!r}: its connections would not go to the test database. "
                "Leave it out of the options the tests get; the plugin connects to the test "
                "database itself."
            )
    execution = options.get("execution_options") or {}
    if "AUTOCOMMIT" in (options.get("isolation_level"), execution.get("isolation_level")):
        raise _fail(
            f"{shown} sets isolation_level='AUTOCOMMIT': every statement would commit at "
            "once, out of reach of the test's isolation. Leave it out of the options the "
            "tests get, and use an AUTOCOMMIT connection only where the app needs one."
        )
    return dict(options)


def _describe(value: object) -> str:
    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    kind = type(value)
    return f"a {kind.__module__}.{kind.__qualname__}"


# -- the fixture's object ------------------------------------------------------------------


class Database:
    """The test database of one test (the ``fastsched_db`` fixture).

    ``url`` and ``dialect`` (``"sqlite"`` or ``"postgresql"``) tell where it lives, and
    ``isolation`` how the test is isolated. The helpers are coroutines that run on the test
    connection (rollback isolation) or on connections of their own that commit (commit
    isolation). Tables are given by name (looked up in ``fastsched_metadata``, else reflected
    from the database) or as ``Table`` objects.
    """

    def __init__(
        self,
        databases: Databases,
        engine: AsyncEngine,
        state: _TestState,
        connection: AsyncConnection | None,
    ) -> None:
        self._databases = databases
        self._state = state
        self._connection = connection
        self._tables: dict[str, Table] = {}
        self._default_maker: async_sessionmaker[AsyncSession] | None = None
        self.engine = engine
        """The engine of the test database on this test's loop (for commit isolation)."""
        self._prepared_mode: _options.PreparedStatementMode = "ignore"
        self._prepared_monitor: PreparedStatementMonitor | None = None

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the test database."""
        return self._databases.url

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._databases.dialect

    @property
    def isolation(self) -> _options.IsolationMode:
        """``"rollback"`` or ``"commit"``."""
        return self._state.isolation

    @contextlib.asynccontextmanager
    async def background_session(self) -> AsyncIterator[AsyncSession]:
        """A session from the app's sessionmaker that commits at the end, as jobs open them.

        Equivalent to the app pattern ``async with get_background_session() as session:``:
        commits when the block ends, rolls back when it raises. Without
        ``fastsched_sessionmaker`` the session comes from a sessionmaker with
        ``expire_on_commit=False``.
        """
        self._state.check_loop()
        async with self._sessionmaker()() as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise

    def _sessionmaker(self) -> async_sessionmaker[Any]:
        if self._databases.sessionmaker is not None:
            return self._databases.sessionmaker
        if self._default_maker is None:
            bind = self._connection if self._connection is not None else self.engine
            self._default_maker = async_sessionmaker(
                bind=bind, expire_on_commit=False, join_transaction_mode="create_savepoint"
            )
        return self._default_maker

    async def insert(
        self, table: str | Table, rows: Mapping[str, Any] | Sequence[Mapping[str, Any]]
    ) -> None:
        """Insert one row (a mapping) or several, committed like an app session commits."""
        found = await self.table(table)
        values = [rows] if isinstance(rows, Mapping) else list(rows)
        if not values:
            return
        async with self._helper_connection() as connection:
            await connection.execute(insert(found), [dict(row) for row in values])

    async def fetch(self, table: str | Table, /, **equal: Any) -> list[dict[str, Any]]:
        """The rows whose columns equal the keyword arguments, as dicts, by primary key."""
        found = await self.table(table)
        query = select(found).where(
            *(_column(found, name) == value for name, value in equal.items())
        )
        query = query.order_by(*found.primary_key.columns)
        async with self._helper_connection() as connection:
            result = await connection.execute(query)
            return [dict(row) for row in result.mappings()]

    async def value_of(self, table: str | Table, key: Any, column: str) -> Any:
        """The value of ``column`` in the row whose primary key is ``key`` (a tuple if wide).

        A missing row fails the test.
        """
        __tracebackhide__ = True
        found = await self.table(table)
        selected = _column(found, column)
        key_values = _key_values(found, key)
        query = select(selected).where(*(column == value for column, value in key_values))
        async with self._helper_connection() as connection:
            rows = (await connection.execute(query)).all()
        if not rows:
            shown = ", ".join(f"{column.name}={value!r}" for column, value in key_values)
            raise AssertionError(f"{found.name} has no row with {shown}")
        return rows[0][0]

    async def status_of(self, table: str | Table, key: Any, column: str = "status") -> Any:
        """The ``status`` column (or another ``column``) of the row with primary key ``key``."""
        __tracebackhide__ = True
        return await self.value_of(table, key, column)

    async def table(self, table: str | Table) -> Table:
        """The ``Table`` named ``table``: from ``fastsched_metadata``, else reflected."""
        if isinstance(table, Table):
            return table
        metadata = self._databases.metadata
        if metadata is not None and table in metadata.tables:
            return metadata.tables[table]
        if table not in self._tables:
            async with self._helper_connection() as connection:
                self._tables[table] = await connection.run_sync(_reflect, table)
        return self._tables[table]

    @contextlib.asynccontextmanager
    async def _helper_connection(self) -> AsyncIterator[AsyncConnection]:
        self._state.check_loop()
        if self._connection is None:
            async with self.engine.begin() as connection:
                yield connection
        else:
            async with self._connection.begin_nested():
                yield self._connection

    # -- named prepared statements (pytest_fastsched._prepared)

    @contextlib.asynccontextmanager
    async def _recording(self, mode: _options.PreparedStatementMode) -> AsyncIterator[None]:
        """Record the prepared statements of the test's connections (PostgreSQL, not "ignore").

        The last reading is taken when the block ends, before the test's data is undone.
        """
        self._prepared_mode = mode
        if mode == "ignore" or self.dialect != "postgresql":
            yield
            return
        from pytest_fastsched import _prepared

        target = self.engine if self._connection is None else self._connection
        monitor = self._prepared_monitor = _prepared.PreparedStatementMonitor(target)
        with monitor.watching():
            try:
                yield
            finally:
                await monitor.read_all()

    async def prepared_statement_leaks(self) -> list[PreparedStatementLeak]:
        """The app's named prepared statements that would break behind a transaction pooler.

        PostgreSQL only, and only when the test records them: ``fastsched_prepared_statements
        = check`` or ``record``, or ``@pytest.mark.fastsched(prepared_statements=...)``. Each
        :class:`~pytest_fastsched.PreparedStatementLeak` names the statement, its SQL, the
        ``reason`` (``"reused"`` by a later transaction, or a ``"shared name"`` other
        connections make too) and the job run (or code outside job runs) concerned.
        """
        __tracebackhide__ = True
        monitor = self._monitor()
        await monitor.read_all()
        return monitor.leaks

    async def assert_no_prepared_statement_leaks(self) -> None:
        """Fail with the list of leaks when :meth:`prepared_statement_leaks` finds any."""
        __tracebackhide__ = True
        monitor = self._monitor()
        await monitor.read_all()
        failure = self._prepared_failure(monitor)
        if failure is not None:
            raise AssertionError(failure)

    def check_prepared_statements(self) -> None:
        """Fail the test after it ran if it found leaks (``prepared_statements = check``)."""
        __tracebackhide__ = True
        monitor = self._prepared_monitor
        if self._prepared_mode != "check" or monitor is None:
            return
        failure = self._prepared_failure(monitor)
        if failure is not None:
            raise _fail(failure)

    def _prepared_failure(self, monitor: PreparedStatementMonitor) -> str | None:
        """The report of what ``monitor`` found, or ``None`` when it found nothing."""
        if not monitor.leaks and not monitor.errors:
            return None
        from pytest_fastsched import _prepared

        engine_options = self._databases.settings.engine_options
        return _prepared.report(monitor.leaks, monitor.errors, engine_options)

    def _monitor(self) -> PreparedStatementMonitor:
        if self.dialect != "postgresql":
            raise _fail(
                "fastsched_db: named prepared statements are a PostgreSQL matter (SQLite has "
                "none): run this test with fastsched_database = postgresql (or a PostgreSQL "
                "URL) to check them."
            )
        if self._prepared_monitor is None:
            raise _fail(
                "fastsched_db: the prepared statements were not recorded in this test: mark it "
                "@pytest.mark.fastsched(prepared_statements='record') (or 'check', which also "
                "fails the test on a leak), or set fastsched_prepared_statements for the suite."
            )
        return self._prepared_monitor

    def raise_guard_errors(self) -> None:
        """Raise the first guard error of the test (called after a test that passed)."""
        __tracebackhide__ = True
        if self._state.errors:
            raise self._state.errors[0]

    def unreported_guard_errors(self, failure: BaseException) -> list[DatabaseGuardError]:
        """The guard errors that are not part of the exception that failed the test."""
        reported = {id(link) for link in exception_chain(failure)}
        return [error for error in self._state.errors if id(error) not in reported]

    # -- for fastsched_history (pytest_fastsched._history) ----------------------------------

    @property
    def metadata(self) -> MetaData | None:
        """The app's ``MetaData`` (``fastsched_metadata``), or ``None`` when it is not set."""
        return self._databases.metadata

    def connection(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A connection of this test in a transaction that commits when the block ends.

        Under rollback isolation a savepoint of the test connection, released at the end;
        under commit isolation a connection of its own.
        """
        return self._helper_connection()


def _column(table: Table, name: str) -> Any:
    if name not in table.columns:
        columns = ", ".join(table.columns.keys())
        raise KeyError(f"{table.name} has no column {name!r}; its columns: {columns}")
    return table.columns[name]


def _key_values(table: Table, key: Any) -> list[tuple[Any, Any]]:
    columns = list(table.primary_key.columns)
    values = key if isinstance(key, tuple) else (key,)
    if len(values) != len(columns):
        names = ", ".join(column.name for column in columns)
        raise TypeError(
            f"{table.name} has the primary key ({names}): give {len(columns)} value(s) as key, "
            f"not {key!r}"
        )
    return list(zip(columns, values, strict=True))


def _reflect(connection: Connection, name: str) -> Table:
    try:
        return Table(name, MetaData(), autoload_with=connection)
    except NoSuchTableError:
        names = ", ".join(sorted(inspect(connection).get_table_names())) or "none"
        raise LookupError(
            f"fastsched_db: the test database has no table {name!r} (tables: {names}). "
            "Set fastsched_metadata to the app's MetaData so the schema is created."
        ) from None


def worker_id(config: pytest.Config) -> str:
    """The xdist worker id (``gw0``, ...) or ``main`` outside xdist."""
    workerinput: Mapping[str, Any] = getattr(config, "workerinput", {})
    return str(workerinput.get("workerid", "main"))


def for_config(config: pytest.Config, settings: _options.Settings) -> Databases:
    """The :class:`Databases` of this process, with what the xdist controller handed over."""
    return Databases(
        settings,
        worker=worker_id(config),
        workerinput=getattr(config, "workerinput", None),
        schema_hook=config.hook.pytest_fastsched_create_schema,
    )

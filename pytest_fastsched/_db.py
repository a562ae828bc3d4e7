"""``fastsched_db``: the test database of one test, as tests see it.

:class:`Databases` is the one entry of a pytest process (an xdist worker): on first use it
makes the test database (:mod:`._testdb`), and for each test it binds the app's sessionmaker
to it under the test's isolation (:mod:`._isolation`) and hands the test a :class:`Database`:
the URL and dialect, the engine, helpers to insert and read rows, and the opt-in check of
named prepared statements (:mod:`._prepared`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import pytest
from sqlalchemy import Integer, MetaData, Table, insert, inspect, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import NoSuchTableError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from pytest_fastsched import _isolation, _options, _prepared, _rebind, _schema, _seal, _testdb
from pytest_fastsched._isolation import DatabaseGuardError, RunningTest
from pytest_fastsched._options import failure
from pytest_fastsched._prepared import PreparedStatementLeak, PreparedStatementMonitor
from pytest_fastsched._worlds import World, world_of

if TYPE_CHECKING:
    from pytest_fastsched._clock import VirtualClock

_P = ParamSpec("_P")
_T = TypeVar("_T")

# -- the databases of this process -----------------------------------------------------------


class Databases:
    """The test database of one pytest process (one xdist worker) and its tests' isolation."""

    def __init__(
        self,
        settings: _options.Settings,
        *,
        worker: str = "main",
        workerinput: Mapping[str, Any] | None = None,
        schema_hook: _schema.SchemaHook | None = None,
    ) -> None:
        self.settings = settings
        self.testdb = _testdb.TestDatabase(
            settings, worker=worker, workerinput=workerinput, schema_hook=schema_hook
        )
        self.isolation = _isolation.Isolation()
        self.model_tables: dict[str, Table] = {}
        """The app's tables as the test database has them (see ``with_database_columns``)."""
        self._error: BaseException | None = None
        self._ready = False

    async def setup(self) -> None:
        """Resolve the app's objects, then create the test database; a failure is kept."""
        __tracebackhide__ = True
        if self._error is not None:
            raise self._error
        if self._ready:
            return
        with _seal.plugin_work():
            try:
                makers = _rebind.resolve_sessionmakers(self.settings.sessionmakers)
                engines = _rebind.resolve_engines(self.settings.engines)
                self.isolation.sessionmakers = makers
                self.isolation.engines = engines + _rebind.engines_of(makers)
                self.isolation.scoped = _rebind.resolve_scoped(self.settings.sessionmakers)
                self.isolation.sync_engine = self.testdb.sync_engine
                await self.testdb.create()
            except pytest.fail.Exception as error:
                self._error = error
                self.close()
                raise
        self._ready = True

    @property
    def sessionmaker(self) -> _rebind.AnySessionmaker | None:
        """The app's first async sessionmaker (``fastsched_sessionmaker``), or ``None``."""
        makers = [each for each in self.isolation.sessionmakers if not _rebind.is_sync(each)]
        return makers[0] if makers else None

    def owned(self) -> tuple[str | None, list[str]]:
        """What a sealed test owns: see :meth:`_testdb.TestDatabase.owned`."""
        return self.testdb.owned()

    @property
    def metadata(self) -> MetaData | None:
        """The app's ``MetaData`` (``fastsched_metadata``), or ``None``."""
        return self.testdb.metadata

    @property
    def url(self) -> str:
        """The URL of the test database (after :meth:`setup`)."""
        return self.testdb.url

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.testdb.dialect

    async def engine(self) -> AsyncEngine:
        """The test database's engine on the running loop."""
        return await self.testdb.engine()

    @contextlib.asynccontextmanager
    async def open_test(
        self,
        isolation: _options.IsolationMode,
        prepared_statements: _options.PreparedStatementMode = "ignore",
        clock: VirtualClock | None = None,
        world: World | None = None,
    ) -> AsyncIterator[Database]:
        """Bind the app's sessionmaker to the test database for the duration of one test.

        With ``prepared_statements`` other than ``"ignore"`` on PostgreSQL, the named
        prepared statements of the test's connections are read as it runs
        (:mod:`pytest_fastsched._prepared`), a last time before the test's data is undone.
        The database's clock reads ``clock``'s instant (:mod:`pytest_fastsched._dbclock`).
        """
        __tracebackhide__ = True
        await self.setup()
        engine = await self.engine()
        with self.testdb.following(clock):
            async with self.isolation.isolate(
                engine, isolation, self.testdb.empty_tables
            ) as bound:
                database = Database(
                    self, bound.engine, bound.state, bound.connection, clock, world
                )
                async with database._recording(prepared_statements):
                    yield database

    @contextlib.asynccontextmanager
    async def open_for(
        self, item: pytest.Item, clock: VirtualClock | None
    ) -> AsyncIterator[Database]:
        """:meth:`open_test` with the isolation and the prepared-statement mode ``item``'s
        marker and the settings ask for, and the test's ``clock`` (``None`` without one); the
        check of prepared statements fails the test after its data is undone."""
        __tracebackhide__ = True
        marker = _options.marker_options(item)
        isolation = marker.isolation or self.settings.isolation
        prepared = marker.prepared_statements or self.settings.prepared_statements
        world = world_of(item)
        world.adopt(asyncio.get_running_loop())  # a def test's calls run on this loop
        async with self.open_test(isolation, prepared, clock, world) as database:
            yield database
        database.check_prepared_statements()

    def close(self) -> None:
        """Stop guarding, dispose the engines, drop the scratch databases, stop the server."""
        self.isolation.close()
        self.testdb.close()


# -- the fixture's object ------------------------------------------------------------------


class _AsyncOnly:
    """``fastsched_db.background_session()``: an async context manager, and a clear error
    for ``with`` (a ``def`` test)."""

    def __init__(self, manager: contextlib.AbstractAsyncContextManager[AsyncSession]) -> None:
        self._manager = manager

    async def __aenter__(self) -> AsyncSession:
        return await self._manager.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._manager.__aexit__(*exc_info)

    def __enter__(self) -> None:
        raise TypeError(
            "fastsched_db.background_session() is an async session: use it with `async with` "
            "in an async def test; a def test opens the app's own sync sessions "
            "(with SessionLocal() as session:)"
        )

    def __exit__(self, *exc_info: Any) -> None:
        """Never reached: :meth:`__enter__` raises."""


def _both_worlds(
    method: Callable[Concatenate[Database, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[Database, _P], Awaitable[_T]]:
    """Make a helper of :class:`Database` callable from a ``def`` test (see :mod:`._worlds`):
    awaited in an ``async def`` test, it returns its result directly in a ``def`` test."""

    @functools.wraps(method)
    def call(self: Database, /, *args: _P.args, **kwargs: _P.kwargs) -> Awaitable[_T]:
        __tracebackhide__ = True
        return self._world.run(  # type: ignore[no-any-return]
            f"fastsched_db.{method.__name__}()", lambda: method(self, *args, **kwargs)
        )

    return call


class Database:
    """The test database of one test (the ``fastsched_db`` fixture).

    ``url`` and ``dialect`` (``"sqlite"`` or ``"postgresql"``) tell where it lives, and
    ``isolation`` how the test is isolated. The helpers are coroutines that run on the test
    connection (rollback isolation) or on connections of their own that commit (commit
    isolation). Tables are given by name (looked up in ``fastsched_metadata``, else reflected
    from the database) or as ``Table`` objects. An ``async def`` test awaits them; a ``def``
    test calls them without await and gets their result.
    """

    def __init__(
        self,
        databases: Databases,
        engine: AsyncEngine,
        state: RunningTest,
        connection: AsyncConnection | None,
        clock: VirtualClock | None = None,
        world: World | None = None,
    ) -> None:
        self._databases = databases
        self._world = world or World(sync_test=False)
        self._state = state
        self._connection = connection
        self._tables: dict[str, Table] = {}
        self._default_maker: async_sessionmaker[AsyncSession] | None = None
        self.engine = engine
        """The engine of the test database on this test's loop (for commit isolation)."""
        self.clock = clock
        """The test's ``fastsched_clock``, whose instant the database's ``now()`` and
        ``CURRENT_TIMESTAMP`` read (unless ``fastsched_database_clock = real``); ``None`` when
        the test has no clock: the database then reads real time."""
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

    @property
    def sync_engine(self) -> Engine | None:
        """The sync engine of the test database that the app's sync sessions and engines use
        under commit isolation (pysqlite, or psycopg 3 on PostgreSQL), once made; ``None``
        before. Under rollback isolation they run on the test connection instead."""
        return self._databases.testdb.made_sync_engine

    def background_session(self) -> _AsyncOnly:
        """A session from the app's sessionmaker that commits at the end, as jobs open them.

        Equivalent to the app pattern ``async with get_background_session() as session:``:
        commits when the block ends, rolls back when it raises. Without
        ``fastsched_sessionmaker``, or when it names a sync sessionmaker, the session comes
        from an async sessionmaker with ``expire_on_commit=False``. Async only: a ``def``
        test uses the app's own sync sessions.
        """
        return _AsyncOnly(self._background_session())

    @contextlib.asynccontextmanager
    async def _background_session(self) -> AsyncIterator[AsyncSession]:
        self._state.check_loop()
        async with self._sessionmaker()() as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise

    def _sessionmaker(self) -> _rebind.AnySessionmaker:
        maker = self._databases.sessionmaker
        if maker is not None and not _rebind.is_sync(maker):
            return maker
        if self._default_maker is None:
            bind = self._connection if self._connection is not None else self.engine
            self._default_maker = async_sessionmaker(
                bind=bind, expire_on_commit=False, join_transaction_mode="create_savepoint"
            )
        return self._default_maker

    @_both_worlds
    async def insert(
        self, table: str | Table, rows: Mapping[str, Any] | Sequence[Mapping[str, Any]]
    ) -> None:
        """Insert one row (a mapping) or several, committed like an app session commits.

        On PostgreSQL, a sequence behind a primary key the rows give is moved past them, so
        that the app's next insert does not take an id they took.
        """
        found = await self.table(table)
        values = [rows] if isinstance(rows, Mapping) else list(rows)
        if not values:
            return
        async with self._helper_connection() as connection:
            await connection.execute(insert(found), [dict(row) for row in values])
            if self.dialect == "postgresql":
                await _advance_sequences(connection, found, values)

    @_both_worlds
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

    @_both_worlds
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

    @_both_worlds
    async def status_of(self, table: str | Table, key: Any, column: str = "status") -> Any:
        """The ``status`` column (or another ``column``) of the row with primary key ``key``."""
        __tracebackhide__ = True
        return await self.value_of(table, key, column)

    @_both_worlds
    async def table(self, table: str | Table) -> Table:
        """The ``Table`` named ``table``: from ``fastsched_metadata`` (with the columns the
        database has and the model lacks, added by a migration or the schema hook), else
        reflected."""
        if isinstance(table, Table):
            return table
        metadata = self._databases.metadata
        model = metadata.tables.get(table) if metadata is not None else None
        known = self._tables if model is None else self._databases.model_tables
        if table not in known:
            async with self._helper_connection() as connection:
                if model is None:
                    known[table] = await connection.run_sync(
                        _reflect, table, metadata, self._databases.settings.metadata
                    )
                else:
                    known[table] = await connection.run_sync(with_database_columns, model)
        return known[table]

    @contextlib.asynccontextmanager
    async def _helper_connection(self) -> AsyncIterator[AsyncConnection]:
        self._state.check_loop()
        with _prepared.plugin_statements():
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
        target = self.engine if self._connection is None else self._connection
        monitor = self._prepared_monitor = _prepared.PreparedStatementMonitor(target)
        with monitor.watching():
            try:
                yield
            finally:
                await monitor.read_all()

    @_both_worlds
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

    @_both_worlds
    async def assert_no_prepared_statement_leaks(self) -> None:
        """Fail with the list of leaks when :meth:`prepared_statement_leaks` finds any."""
        __tracebackhide__ = True
        monitor = self._monitor()
        await monitor.read_all()
        report = self._prepared_failure(monitor)
        if report is not None:
            raise AssertionError(report)

    def check_prepared_statements(self) -> None:
        """Fail the test after it ran if it found leaks (``prepared_statements = check``)."""
        __tracebackhide__ = True
        monitor = self._prepared_monitor
        if self._prepared_mode != "check" or monitor is None:
            return
        report = self._prepared_failure(monitor)
        if report is not None:
            raise failure(report)

    def _prepared_failure(self, monitor: PreparedStatementMonitor) -> str | None:
        """The report of what ``monitor`` found, or ``None`` when it found nothing."""
        if not monitor.leaks and not monitor.errors:
            return None
        engine_options = self._databases.settings.engine_options
        return _prepared.report(monitor.leaks, monitor.errors, engine_options)

    def _monitor(self) -> PreparedStatementMonitor:
        if self.dialect != "postgresql":
            raise failure(
                "fastsched_db: named prepared statements are a PostgreSQL matter (SQLite has "
                "none): run this test with fastsched_database = postgresql (or a PostgreSQL "
                "URL) to check them."
            )
        if self._prepared_monitor is None:
            raise failure(
                "fastsched_db: the prepared statements were not recorded in this test: mark it "
                "@pytest.mark.fastsched(prepared_statements='record') (or 'check', which also "
                "fails the test on a leak), or set fastsched_prepared_statements for the suite."
            )
        return self._prepared_monitor

    @property
    def guard_errors(self) -> list[DatabaseGuardError]:
        """The guard errors of the test so far, in the order they happened."""
        return list(self._state.errors)

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


async def _advance_sequences(
    connection: AsyncConnection, table: Table, rows: Sequence[Mapping[str, Any]]
) -> None:
    """Move the sequences of ``table``'s integer key columns ``rows`` gave values for past
    them."""
    quote = connection.dialect.identifier_preparer
    for column in table.primary_key.columns:
        if not isinstance(column.type, Integer) or not any(column.name in row for row in rows):
            continue
        await connection.execute(
            text(
                "SELECT setval(sequence, GREATEST(top, 1), top >= 1) "
                "FROM pg_get_serial_sequence(:table, :column) AS sequence, "
                f"(SELECT COALESCE(max({quote.quote(column.name)}), 0) AS top "
                f"FROM {quote.format_table(table)}) AS existing "
                "WHERE sequence IS NOT NULL"
            ),
            {"table": quote.format_table(table), "column": column.name},
        )


def with_database_columns(connection: Connection, table: Table) -> Table:
    """``table``, with the columns the database has and the model lacks (a column a migration
    or the schema hook added, such as ``last_error``) reflected into a copy of it."""
    found = inspect(connection).get_columns(table.name, schema=table.schema)
    extra = [column["name"] for column in found if column["name"] not in table.columns]
    if not extra:
        return table
    reflected = Table(table.name, MetaData(), autoload_with=connection, schema=table.schema)
    columns = [*(column._copy() for column in table.columns)]
    columns += [reflected.columns[name]._copy() for name in extra]
    return Table(table.name, MetaData(), *columns, schema=table.schema)


def _reflect(
    connection: Connection, name: str, metadata: MetaData | None, metadata_path: str | None
) -> Table:
    try:
        return Table(name, MetaData(), autoload_with=connection)
    except NoSuchTableError:
        names = ", ".join(sorted(inspect(connection).get_table_names())) or "none"
        raise LookupError(
            f"fastsched_db: the test database has no table {name!r} (tables: {names}). "
            + _missing_table_hint(metadata, metadata_path)
        ) from None


def _missing_table_hint(metadata: MetaData | None, metadata_path: str | None) -> str:
    if metadata is None:
        return "Set fastsched_metadata to the app's MetaData so the schema is created."
    if not metadata.tables:
        return _schema.empty_metadata_message(metadata_path)
    known = ", ".join(sorted(metadata.tables))
    return (
        f"fastsched_metadata = {metadata_path!r} does not define it either (its tables: "
        f"{known}): check the name, or import the module of its model."
    )


def for_config(config: pytest.Config, settings: _options.Settings) -> Databases:
    """The :class:`Databases` of this process, with what the xdist controller handed over."""
    return Databases(
        settings,
        worker=_testdb.worker_id(config),
        workerinput=getattr(config, "workerinput", None),
        schema_hook=config.hook.pytest_fastsched_create_schema,
    )

"""The schema of the test database, built once per test session (per xdist worker database).

What builds it, in this order, each step optional:

- ``fastsched_extensions``: ``CREATE EXTENSION IF NOT EXISTS`` for each, on PostgreSQL;
- ``fastsched_alembic``: ``alembic upgrade heads`` with the project's own ``env.py``, sync or
  async (``fastsched_metadata`` then only names the tables);
- otherwise ``fastsched_metadata``: ``create_all()``, with the PostgreSQL enum and domain types
  of its columns created first, even those declared ``create_type=False``; with
  ``fastsched_tables`` only the named tables and the tables their foreign keys reach, for
  models that do not create as a whole;
- the ``pytest_fastsched_create_schema(connection, dialect)`` hook, for anything else: DDL the
  models do not hold, seed rows.

``fastsched_seed_tables`` names the tables whose rows the build seeds: rollback isolation
keeps them by nature, commit isolation puts them back as they were (:class:`Seeds`) instead
of emptying them. Every failure is a test failure that names its cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect as pyinspect
import logging
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any

from sqlalchemy import ARRAY, MetaData, Table, TypeDecorator, insert, inspect, select
from sqlalchemy.dialects.postgresql import ENUM
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.types import TypeEngine

from pytest_fastsched import _options
from pytest_fastsched._options import failure

if TYPE_CHECKING:
    from alembic.config import Config

ALEMBIC_VERSION_TABLE = "alembic_version"
HOOK_NAME = "pytest_fastsched_create_schema"
CONNECTION_RECIPE = (
    "Alembic's cookbook recipe 'Sharing a Connection across one or more programmatic "
    "migration commands'"
)

SchemaHook = Callable[..., Sequence[object]]
"""``config.hook.pytest_fastsched_create_schema``: called with ``connection`` and ``dialect``."""


def empty_metadata_message(path: str | None) -> str:
    """Why a ``fastsched_metadata`` without tables creates no schema, and the fix."""
    module = (path or "").partition(":")[0] or "the models module"
    return (
        f"fastsched_metadata = {path!r} has no tables: no model class was defined on it when "
        f"the tests ran, so the modules that define the models were never imported (a "
        f"MetaData fills up only as its model classes are imported; {module!r} may hold only "
        f"Base). Import the model modules where the metadata lives (e.g. in the package's "
        f"__init__.py) or in conftest.py, or point fastsched_metadata at a module that "
        f"imports them."
    )


@dataclasses.dataclass(frozen=True)
class Schema:
    """What the schema of the test database is built from: the settings and the app's objects."""

    metadata: MetaData | None = None
    metadata_path: str | None = None
    tables: tuple[str, ...] = ()
    alembic: str | None = None
    extensions: tuple[str, ...] = ()
    seed_tables: tuple[str, ...] = ()
    hook: SchemaHook | None = None

    @classmethod
    def from_settings(
        cls, settings: _options.Settings, metadata: MetaData | None, hook: SchemaHook | None
    ) -> Schema:
        """The schema of ``settings``, with the app's resolved ``metadata``."""
        return cls(
            metadata=metadata,
            metadata_path=settings.metadata,
            tables=settings.tables,
            alembic=settings.alembic,
            extensions=settings.extensions,
            seed_tables=settings.seed_tables,
            hook=hook,
        )

    @property
    def kept_tables(self) -> frozenset[str]:
        """The tables commit isolation does not empty: seed data and Alembic's version."""
        version = {ALEMBIC_VERSION_TABLE} if self.alembic is not None else set()
        return frozenset(self.seed_tables) | version

    def created_tables(self) -> list[Table] | None:
        """The tables of the metadata the build creates, parents first.

        ``None`` when other steps (Alembic, the hook) may have made tables the metadata does
        not hold: the database itself then tells which tables it has.
        """
        if self.metadata is None or self.alembic is not None or self._hook_implemented():
            return None
        return self._selected_tables()

    def _hook_implemented(self) -> bool:
        get_hookimpls = getattr(self.hook, "get_hookimpls", None)
        return self.hook is not None and (get_hookimpls is None or bool(get_hookimpls()))

    # -- the build

    async def build(self, engine: AsyncEngine) -> None:
        """Build the schema in the new, empty database of ``engine``."""
        __tracebackhide__ = True
        if self.extensions and engine.dialect.name == "postgresql":
            await self._create_extensions(engine)
        if self.alembic is not None:
            await self._upgrade(engine, self.alembic)
        elif self.metadata is not None:
            await self._create_all(engine, self.metadata)
        if self.hook is not None:
            async with engine.begin() as connection:
                await connection.run_sync(self._run_hook)
        async with engine.connect() as connection:
            await connection.run_sync(self._check_built)

    async def _create_extensions(self, engine: AsyncEngine) -> None:
        for name in self.extensions:
            statement = f"CREATE EXTENSION IF NOT EXISTS {_quote(name)}"
            try:
                async with engine.begin() as connection:
                    await connection.exec_driver_sql(statement)
            except Exception as error:
                raise failure(
                    f"fastsched_extensions: {statement} failed: {_error_line(error)}. Install "
                    "the extension on the PostgreSQL server, or remove it from "
                    "fastsched_extensions."
                ) from None

    # -- fastsched_metadata

    async def _create_all(self, engine: AsyncEngine, metadata: MetaData) -> None:
        try:
            async with engine.begin() as connection:
                await connection.run_sync(self._create_tables, metadata)
        except Exception as error:
            raise failure(self._create_all_failure(error, engine.dialect.name)) from None

    def _create_tables(self, connection: Connection, metadata: MetaData) -> None:
        ddl_only = bool(metadata.dispatch.before_create or metadata.dispatch.after_create)
        if not metadata.tables and not ddl_only and not self._hook_implemented():
            raise failure(empty_metadata_message(self.metadata_path))
        tables = self._selected_tables()
        if connection.dialect.name == "postgresql":
            for enum_type in _enum_types(tables, connection.dialect):
                enum_type.create(connection, checkfirst=True)
        metadata.create_all(connection, tables=tables)

    def _selected_tables(self) -> list[Table]:
        """The tables to create, parents first: all, or the named ones and what they reach."""
        assert self.metadata is not None
        if not self.tables:
            return list(self.metadata.sorted_tables)
        unknown = [name for name in self.tables if name not in self.metadata.tables]
        if unknown:
            known = ", ".join(sorted(self.metadata.tables)) or "none"
            raise failure(
                f"fastsched_tables names {', '.join(map(repr, unknown))}, which "
                f"{'is' if len(unknown) == 1 else 'are'} not in fastsched_metadata = "
                f"{self.metadata_path!r} (its tables: {known})."
            )
        wanted: set[Table] = set()
        pending = [self.metadata.tables[name] for name in self.tables]
        while pending:
            table = pending.pop()
            if table not in wanted:
                wanted.add(table)
                pending.extend(key.column.table for key in table.foreign_keys)
        return [table for table in self.metadata.sorted_tables if table in wanted]

    def _create_all_failure(self, error: Exception, dialect: str) -> str:
        source = f"fastsched_metadata = {self.metadata_path!r}"
        if self.tables:
            source += f", fastsched_tables = {' '.join(self.tables)!r}"
        lines = [
            f"{source}: create_all() failed on {dialect}: {_error_line(error)}. Fix the model "
            "(or the DDL it emits) so that the schema can be created on this database.",
            *_statement_lines(error),
        ]
        if not self.tables:
            lines.append(
                "Models that do not create as a whole: list the tables the tests need in "
                "fastsched_tables (the tables their foreign keys reach come along), build the "
                "schema with the app's migrations (fastsched_alembic), or create what is "
                f"missing in a {HOOK_NAME}(connection, dialect) hook."
            )
        return "\n".join(lines)

    # -- fastsched_alembic

    async def _upgrade(self, engine: AsyncEngine, ini_path: str) -> None:
        command, config = _alembic_config(ini_path)
        url = engine.url.render_as_string(hide_password=False)
        try:
            config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
            env_py = _env_py(config)
            with _logging_kept():
                if _runs_own_event_loop(env_py):
                    # The plugin's engine puts a SQLite file in WAL mode on connect, which
                    # lasts: env.py's own engine, committing each DDL statement, then runs
                    # five times faster.
                    await (await engine.connect()).close()
                    await _in_thread(command.upgrade, config, "heads")
                else:
                    async with engine.begin() as connection:
                        await connection.run_sync(_upgrade_on, config)
        except Exception as error:
            raise failure(self._migration_failure(error, engine.dialect.name)) from None

    def _migration_failure(self, error: Exception, dialect: str) -> str:
        assert self.alembic is not None
        refused = _refused_database(error)
        if refused is not None:
            return (
                f"fastsched_alembic = {_shown(self.alembic)!r}: env.py connected to another "
                f"database than the test database ({refused}), and the plugin stopped it "
                "there: a test run never migrates the app's own database. Let env.py use the "
                f"connection in config.attributes['connection'] when it is set "
                f"({CONNECTION_RECIPE}), or the sqlalchemy.url the plugin sets, instead of a "
                "URL of its own."
            )
        return "\n".join(
            [
                f"fastsched_alembic = {_shown(self.alembic)!r}: alembic upgrade heads failed on "
                f"{dialect}{_migration_place(error)}: {_error_line(error)}",
                *_statement_lines(error),
                "The test database starts empty: every revision runs, from the first.",
            ]
        )

    # -- the hook

    def _run_hook(self, connection: Connection) -> None:
        assert self.hook is not None
        try:
            results = self.hook(connection=connection, dialect=connection.dialect.name)
        except Exception as error:
            raise failure(self._hook_failure(error, connection.dialect.name)) from None
        for result in results:
            if pyinspect.iscoroutine(result):
                result.close()
                code = result.cr_code
                raise failure(
                    f"{HOOK_NAME} ({_shown(code.co_filename)}, line {code.co_firstlineno}) is "
                    "a coroutine function: the hook is called synchronously, with a "
                    "sqlalchemy Connection. Write it as a plain def; connection.execute(...) "
                    "needs no await."
                )

    def _hook_failure(self, error: Exception, dialect: str) -> str:
        where = ""
        found = _deepest_frame(error, lambda frame: frame.f_code.co_name == HOOK_NAME)
        if found is not None:
            where = f" ({_shown(found[0].f_code.co_filename)}, line {found[1]})"
        return "\n".join(
            [
                f"{HOOK_NAME}{where} failed on {dialect}: {_error_line(error)}",
                *_statement_lines(error),
                "The hook runs once per test database, after the schema of fastsched_alembic "
                "or fastsched_metadata is built.",
            ]
        )

    # -- what the build left

    def _check_built(self, connection: Connection) -> None:
        names = set(inspect(connection).get_table_names())
        if self.alembic is not None and not names:
            raise failure(
                f"fastsched_alembic = {_shown(self.alembic)!r}: alembic upgrade heads ran, but "
                f"the test database is still empty (not even an {ALEMBIC_VERSION_TABLE} "
                "table): env.py migrated another database. Let env.py use the connection in "
                f"config.attributes['connection'] when it is set ({CONNECTION_RECIPE}), or "
                "the sqlalchemy.url the plugin sets, instead of a URL of its own."
            )
        missing = [name for name in self.seed_tables if name not in names]
        if missing:
            known = ", ".join(sorted(names)) or "none"
            raise failure(
                f"fastsched_seed_tables names {', '.join(map(repr, missing))}, which the test "
                f"database does not have (its tables: {known})."
            )


# -- PostgreSQL enum types


def _enum_types(tables: Iterable[Table], dialect: Dialect) -> list[ENUM]:
    """The PostgreSQL enum types of the columns of ``tables``, in arrays and decorators too.

    An ``ENUM(..., create_type=False)`` is left out by ``create_all()``: in the app, a
    migration creates it. The test database has no migrations, so it is created here.
    """
    found: dict[tuple[str | None, str], ENUM] = {}
    for table in tables:
        for column in table.columns:
            for part in _type_parts(column.type, dialect):
                impl = part.dialect_impl(dialect)
                if isinstance(impl, ENUM) and impl.name is not None:
                    found.setdefault((impl.schema, impl.name), impl)
    return list(found.values())


def _type_parts(type_: TypeEngine[Any], dialect: Dialect) -> Iterator[TypeEngine[Any]]:
    yield type_
    if isinstance(type_, TypeDecorator):
        yield from _type_parts(type_.load_dialect_impl(dialect), dialect)
    elif isinstance(type_, ARRAY):
        yield from _type_parts(type_.item_type, dialect)


# -- Alembic


def _alembic_config(ini_path: str) -> tuple[ModuleType, Config]:
    """Alembic's ``command`` module and the project's ``Config``; a missing Alembic is named."""
    try:
        from alembic import command
        from alembic.config import Config
    except ImportError:
        raise failure(
            f"fastsched_alembic = {_shown(ini_path)!r} needs Alembic, which is not installed: "
            "pip install 'pytest-fastsched[alembic]'."
        ) from None
    return command, Config(ini_path)


def _env_py(config: Config) -> str:
    from alembic.script import ScriptDirectory

    path = Path(ScriptDirectory.from_config(config).dir, "env.py")
    return path.read_text() if path.is_file() else ""


def _runs_own_event_loop(env_py: str) -> bool:
    """Whether ``env.py`` starts an event loop of its own and takes no connection from us.

    Such an ``env.py`` (Alembic's ``async`` template) calls ``asyncio.run()``, which cannot
    run inside a running loop: it runs in a thread of its own and migrates the database of
    ``sqlalchemy.url``. Every other ``env.py`` runs inside ``AsyncConnection.run_sync()``,
    with the connection in ``config.attributes["connection"]`` (the cookbook recipe); one
    that builds an engine from ``sqlalchemy.url`` anyway can do so there, even a synchronous
    one, as SQLAlchemy's greenlet runs the async driver.
    """
    return "asyncio" in env_py and "attributes" not in env_py


def _migration_place(error: BaseException) -> str:
    """Where the upgrade failed: in which revision (its module has ``down_revision``), else
    in ``env.py``, with the file and line."""
    found = _deepest_frame(error, lambda frame: "down_revision" in frame.f_globals)
    if found is not None:
        frame, line = found
        revision = frame.f_globals.get("revision")
        return f" in revision {revision!r} ({_shown(frame.f_code.co_filename)}, line {line})"
    found = _deepest_frame(error, lambda frame: Path(frame.f_code.co_filename).name == "env.py")
    if found is not None:
        frame, line = found
        return f" in env.py ({_shown(frame.f_code.co_filename)}, line {line})"
    return ""


def _upgrade_on(connection: Connection, config: Config) -> None:
    from alembic import command

    config.attributes["connection"] = connection
    command.upgrade(config, "heads")


async def _in_thread(function: Callable[..., object], *args: object) -> None:
    # In a copy of the context: the seal lets the plugin's own work reach the test server.
    context = contextvars.copy_context()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsched-alembic") as thread:
        await asyncio.wrap_future(thread.submit(context.run, function, *args))


@contextlib.contextmanager
def _logging_kept() -> Iterator[None]:
    """Undo what ``env.py``'s usual ``fileConfig()`` does to the loggers of the test run.

    ``fileConfig()`` disables every logger it does not name (the app's, APScheduler's, so
    ``caplog`` would see nothing of them) and gives others handlers of its own.
    """
    manager = logging.Logger.manager
    before = [logging.getLogger(), *manager.loggerDict.values()]
    saved = [
        (logger, logger.level, logger.disabled, logger.propagate, list(logger.handlers))
        for logger in before
        if isinstance(logger, logging.Logger)
    ]
    try:
        yield
    finally:
        known = {id(logger) for logger in before}
        for logger in manager.loggerDict.values():
            if isinstance(logger, logging.Logger) and id(logger) not in known:
                logger.setLevel(logging.NOTSET)
                logger.handlers.clear()
                logger.disabled, logger.propagate = False, True
        for logger, level, disabled, propagate, handlers in saved:
            logger.setLevel(level)
            logger.disabled, logger.propagate = disabled, propagate
            logger.handlers[:] = handlers


# -- seed data


class Seeds:
    """The rows of the seed tables as the schema build left them.

    Read once per process from its own database (:meth:`snapshot`); after a test under
    commit isolation, :meth:`restore` puts them back if the test changed them.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._tables: list[Table] = []
        self._rows: list[list[dict[str, Any]]] = []

    async def snapshot(self, engine: AsyncEngine) -> None:
        """Remember the rows of the seed tables of the database of ``engine``."""
        if not self.names:
            return
        async with engine.connect() as connection:
            self._tables = await connection.run_sync(_reflect_sorted, self.names)
            self._rows = [await _rows_of(connection, table) for table in self._tables]

    async def restore(self, connection: AsyncConnection) -> None:
        """Put the remembered rows back, if a test changed them (children emptied before)."""
        current = [await _rows_of(connection, table) for table in self._tables]
        if list(map(_fingerprint, current)) == list(map(_fingerprint, self._rows)):
            return
        for table in reversed(self._tables):
            await connection.execute(table.delete())
        for table, rows in zip(self._tables, self._rows, strict=True):
            if rows:
                await connection.execute(insert(table), rows)


def _reflect_sorted(connection: Connection, names: Sequence[str]) -> list[Table]:
    metadata = MetaData()
    metadata.reflect(connection, only=list(names))
    return [table for table in metadata.sorted_tables if table.name in names]


async def _rows_of(connection: AsyncConnection, table: Table) -> list[dict[str, Any]]:
    result = await connection.execute(select(table))
    return [dict(row) for row in result.mappings()]


def _fingerprint(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(repr(sorted(row.items())) for row in rows)


# -- messages


def _refused_database(error: BaseException) -> str | None:
    """The database the seal refused somewhere in ``error``'s chain, if it did."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        refused = getattr(link, "refused", None)
        if isinstance(refused, str):
            return refused
        link = link.__cause__ or link.__context__
    return None


def _error_line(error: BaseException) -> str:
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0] if message else ''}".rstrip()


def _statement_lines(error: BaseException) -> list[str]:
    """``statement: ...`` of the SQL statement that failed, on one line, if one did."""
    link: BaseException | None = error
    while link is not None:
        if isinstance(link, StatementError) and link.statement:
            return [f"statement: {' '.join(link.statement.split())}"]
        link = link.__cause__ or link.__context__
    return []


def _deepest_frame(
    error: BaseException, matches: Callable[[FrameType], bool]
) -> tuple[FrameType, int] | None:
    """The last frame of the traceback of ``error`` that ``matches``, with its line number."""
    found = None
    for frame, line in traceback.walk_tb(error.__traceback__):
        if matches(frame):
            found = (frame, line)
    return found


def _shown(path: str) -> str:
    """``path`` relative to the current directory when it is below it."""
    resolved = Path(path).resolve()
    with contextlib.suppress(ValueError):
        return str(resolved.relative_to(Path.cwd()))
    return str(resolved)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'

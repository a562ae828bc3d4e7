"""The database's clock: ``now()``, ``CURRENT_TIMESTAMP`` and friends read the virtual instant.

With ``fastsched_database_clock = virtual`` (the default), the test database tells the time of
the running test's ``fastsched_clock``, in the app's queries and in column defaults, under both
isolation modes; a test without a clock, and the schema build, read the server's real clock.

- **PostgreSQL.** The schema ``fastsched_clock`` holds a sequence whose value is the virtual
  instant in microseconds (``setval`` is not transactional: no rollback of a savepoint or of
  the test's transaction can undo it, and every connection sees it at once) and functions
  that read it: ``now()``, ``transaction_timestamp()``, ``statement_timestamp()``,
  ``clock_timestamp()`` and ``timeofday()``, each the server's own while the sequence is
  unset. The test engine's connections search ``"$user", public, fastsched_clock,
  pg_catalog`` (``public`` first, so that unqualified ``CREATE TABLE`` still goes there; an
  app's own ``search_path`` in ``server_settings`` gets the schema inserted before
  ``pg_catalog``), so unqualified calls bind to these functions.
- **SQLite.** ``datetime``, ``date``, ``time``, ``julianday``, ``strftime``, ``unixepoch`` and
  ``timediff`` are replaced on each connection by functions that put the virtual instant
  where SQLite would read ``'now'`` (or a missing time value) and hand everything else to
  SQLite's own functions on a private in-memory connection, so modifiers keep their
  semantics. They are declared deterministic, as SQLite's own are within a statement, so
  that expression indexes and generated columns over them keep working.

The keywords ``CURRENT_TIMESTAMP``, ``LOCALTIMESTAMP``, ``CURRENT_DATE``, ``CURRENT_TIME`` and
``LOCALTIME`` cannot be shadowed: a statement listener rewrites them into calls of the above,
skipping string literals, quoted identifiers, comments and (PostgreSQL) dollar quotes, in one
cached pass. Column defaults the schema build made (``create_all``, Alembic, the hook) are
re-bound once, in the template: on PostgreSQL with ``ALTER TABLE ... SET DEFAULT``, on SQLite
by rewriting the schema's SQL, the way SQLite documents for changing a default.

The instant is published to PostgreSQL by the statement listener, on the connection about to
run the statement, only when the virtual instant changed since the last publication: one
round trip per virtual instant that touches the database.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_only

from pytest_fastsched._options import failure
from pytest_fastsched._wallclock import from_us

SCHEMA = "fastsched_clock"
SEARCH_PATH = f'"$user", public, {SCHEMA}, pg_catalog'
"""The search path of the test engine's connections on PostgreSQL."""


class Instant(Protocol):
    """What the database's clock follows: the virtual instant, in microseconds since the epoch
    (a ``VirtualClock``)."""

    now_us: int


# -- rewriting the keywords ------------------------------------------------------------------

_KEYWORD = (
    r"(?<![\w.$])(?P<kw>current_timestamp|localtimestamp|current_date|current_time|localtime)"
    r"(?![\w$])"
)
_TOKENS = {
    # What is matched and kept as it is (literals, quoted identifiers, comments), or replaced.
    "postgresql": re.compile(
        r"(?P<skip>[Ee]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*"
        r"|/\*.*?\*/|(?<![\w$])\$(?P<tag>(?:[A-Za-z_]\w*)?)\$.*?\$(?P=tag)\$)"
        rf"|{_KEYWORD}(?P<precision>\s*\(\s*\d+\s*\))?"
        r"|(?<![\w.$\"])pg_catalog\s*\.\s*(?P<function>now|transaction_timestamp"
        r"|statement_timestamp|clock_timestamp|timeofday)(?=\s*\()",
        re.IGNORECASE | re.DOTALL,
    ),
    "sqlite": re.compile(
        r"(?P<skip>'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`(?:[^`]|``)*`|\[[^\]]*\]|--[^\n]*"
        rf"|/\*.*?\*/)|{_KEYWORD}",
        re.IGNORECASE | re.DOTALL,
    ),
}
_MAYBE = {
    "postgresql": re.compile(r"current_|localtime|pg_catalog", re.IGNORECASE),
    "sqlite": re.compile(r"current_", re.IGNORECASE),
}
_CALLS = {
    "postgresql": {
        "current_timestamp": (f"{SCHEMA}.now()", "timestamptz"),
        "localtimestamp": (f"{SCHEMA}.local_timestamp()", "timestamp"),
        "current_date": (f"{SCHEMA}.current_day()", ""),
        "current_time": (f"{SCHEMA}.current_time_tz()", "timetz"),
        "localtime": (f"{SCHEMA}.local_time()", "time"),
    },
    # SQLite's documented equivalents, in parentheses so that DEFAULT (...) stays valid.
    "sqlite": {
        "current_timestamp": ("(datetime('now'))", ""),
        "current_date": ("(date('now'))", ""),
        "current_time": ("(time('now'))", ""),
    },
}
_LABEL = re.compile(r"\bAS\s*\Z", re.IGNORECASE)
"""``SELECT 1 AS current_date``: a keyword used as a column label stays as it is."""


def _replace(dialect: str, match: re.Match[str]) -> str:
    if dialect == "postgresql" and match["function"] is not None:
        return f"{SCHEMA}.{match['function']}"  # pg_catalog.now(): the clock's now()
    keyword = match["kw"]
    if keyword is None or keyword.lower() not in _CALLS[dialect]:
        return match.group(0)
    if _LABEL.search(match.string, max(0, match.start() - 16), match.start()):
        return match.group(0)
    call, cast = _CALLS[dialect][keyword.lower()]
    precision = match["precision"] if dialect == "postgresql" else None
    if precision:  # CURRENT_TIMESTAMP(3): rounded to 3 digits, as PostgreSQL does
        return f"CAST({call} AS {cast}{precision.strip()})"
    return call


def _rewriter(dialect: str) -> Callable[[str], str]:
    tokens, maybe = _TOKENS[dialect], _MAYBE[dialect]
    replace = functools.partial(_replace, dialect)

    @functools.lru_cache(maxsize=4096)
    def rewrite(statement: str) -> str:
        if not maybe.search(statement):
            return statement
        return tokens.sub(replace, statement)

    return rewrite


rewrite_postgresql = _rewriter("postgresql")
"""A PostgreSQL statement with the time keywords (and ``pg_catalog.now()`` & co.) rewritten
into calls of the ``fastsched_clock`` functions."""
rewrite_sqlite = _rewriter("sqlite")
"""A SQLite statement with ``CURRENT_TIMESTAMP`` & co. rewritten into ``datetime('now')`` &
co."""


# -- PostgreSQL ------------------------------------------------------------------------------

_VIRTUAL = (
    f"pg_catalog.pg_sequence_last_value('{SCHEMA}.instant_us'::pg_catalog.regclass)"
    " * interval '1 microsecond' + timestamptz 'epoch'"
)
"""The published instant, or NULL while none is (the sequence is unset)."""


def _function(name: str, returns: str, volatility: str, body: str) -> str:
    # plpgsql: its simple-expression path costs a fraction of a SQL function's executor.
    return (
        f"CREATE FUNCTION {SCHEMA}.{name}() RETURNS {returns} LANGUAGE plpgsql {volatility} "
        f"PARALLEL RESTRICTED AS $$ BEGIN RETURN {body}; END $$"
    )


POSTGRESQL_CLOCK = (
    f"CREATE SCHEMA {SCHEMA}",
    f"COMMENT ON SCHEMA {SCHEMA} IS 'pytest-fastsched: the database reads the virtual clock'",
    f"CREATE SEQUENCE {SCHEMA}.instant_us AS bigint MINVALUE -9223372036854775808",
    *(
        _function(name, "timestamptz", volatility, f"COALESCE({_VIRTUAL}, pg_catalog.{name}())")
        for name, volatility in (
            ("now", "STABLE"),
            ("transaction_timestamp", "STABLE"),
            ("statement_timestamp", "STABLE"),
            ("clock_timestamp", "VOLATILE"),
        )
    ),
    _function(
        "timeofday",
        "text",
        "VOLATILE",
        f"COALESCE(pg_catalog.to_char({_VIRTUAL}, 'Dy Mon DD HH24:MI:SS.US YYYY TZ'), "
        "pg_catalog.timeofday())",
    ),
    *(
        _function(name, returns, "STABLE", f"{SCHEMA}.now()::pg_catalog.{returns}")
        for name, returns in (
            ("local_timestamp", "timestamp"),
            ("current_day", "date"),
            ("current_time_tz", "timetz"),
            ("local_time", "time"),
        )
    ),
)
"""The ``fastsched_clock`` schema, made once in the template database."""

_DEFAULTS = """
SELECT n.nspname, c.relname, a.attname, pg_catalog.pg_get_expr(d.adbin, d.adrelid)
FROM pg_catalog.pg_attrdef d
JOIN pg_catalog.pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
JOIN pg_catalog.pg_class c ON c.oid = d.adrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT a.attisdropped
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'fastsched_clock')
"""
"""Every column default of the user's tables, as text under :data:`SEARCH_PATH` (where the
server's own ``now()`` reads ``pg_catalog.now()``)."""
_PUBLISH = f"SELECT pg_catalog.setval('{SCHEMA}.instant_us', {{}}, {{}})"
_TRANSACTION_CONTROL = re.compile(
    r"\s*(SAVEPOINT|RELEASE|ROLLBACK|BEGIN|COMMIT|START TRANSACTION)\b", re.IGNORECASE
)
"""Statements that read no clock, and that must run even in a failed transaction."""
_UNPUBLISHED = object()
"""The published instant before the first publication: unknown."""


def with_clock_schema(search_path: str | None) -> str:
    """``search_path`` with ``fastsched_clock`` right before ``pg_catalog`` (appended, with
    ``pg_catalog`` after it, when the path does not name ``pg_catalog``)."""
    if search_path is None:
        return SEARCH_PATH
    entries = [entry.strip() for entry in search_path.split(",") if entry.strip()]
    entries = [entry for entry in entries if entry.strip('"').lower() != SCHEMA]
    names = [entry.strip('"').lower() for entry in entries]
    if "pg_catalog" not in names:
        return ", ".join([*entries, SCHEMA, "pg_catalog"])
    entries.insert(names.index("pg_catalog"), SCHEMA)
    return ", ".join(entries)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _install_postgresql(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.exec_driver_sql(f"SET LOCAL search_path = {SEARCH_PATH}")
        for statement in POSTGRESQL_CLOCK:
            await connection.exec_driver_sql(statement)
        defaults = (await connection.exec_driver_sql(_DEFAULTS)).all()
        for schema, table, column, default in map(tuple, defaults):
            rebound = rewrite_postgresql(default)
            if rebound != default:
                await connection.exec_driver_sql(
                    f"ALTER TABLE ONLY {_quote(schema)}.{_quote(table)} "
                    f"ALTER COLUMN {_quote(column)} SET DEFAULT {rebound}"
                )


# -- SQLite ----------------------------------------------------------------------------------

_TIME_VALUES = {
    "datetime": (0,),
    "date": (0,),
    "time": (0,),
    "julianday": (0,),
    "strftime": (1,),
    "unixepoch": (0,),
    "timediff": (0, 1),
}
"""SQLite's date functions, by the positions of their time values."""
_SQLITE_COMPUTED = ("datetime", "date", "time", "julianday", "unixepoch")
"""The functions whose result for ``'now'`` alone is computed without SQLite."""
_SINCE = {"unixepoch": (3, 38, 0), "timediff": (3, 43, 0)}
_JULIAN_EPOCH_MS = 210866760000000
"""The Unix epoch in milliseconds of the Julian day count, as SQLite computes ``julianday``."""


def _sqlite_functions() -> dict[str, tuple[int, ...]]:
    """The date functions of the SQLite library in use."""
    return {
        name: positions
        for name, positions in _TIME_VALUES.items()
        if sqlite3.sqlite_version_info >= _SINCE.get(name, (0, 0, 0))
    }


class _SqliteNow:
    """A virtual instant as SQLite gives ``'now'``: to the millisecond."""

    def __init__(self, now_us: int) -> None:
        self.now_us = now_us
        ms = now_us // 1000
        instant = from_us(ms * 1000)
        self.text = (
            f"{instant.year:04d}-{instant.month:02d}-{instant.day:02d} "
            f"{instant.hour:02d}:{instant.minute:02d}:{instant.second:02d}."
            f"{instant.microsecond // 1000:03d}"
        )
        """The time value SQLite's own functions get in place of ``'now'``."""
        self.results: dict[str, object] = {
            "datetime": self.text[:19],
            "date": self.text[:10],
            "time": self.text[11:19],
            "julianday": (ms + _JULIAN_EPOCH_MS) / 86_400_000.0,
            "unixepoch": ms // 1000,
        }
        """What each function gives for ``'now'`` alone, computed here without SQLite."""


class _Pristine:
    """SQLite's own date functions, on a private in-memory connection shared by all threads."""

    def __init__(self) -> None:
        self._connection = sqlite3.connect(":memory:", check_same_thread=False)
        self._lock = threading.Lock()

    def call(self, name: str, args: Sequence[object]) -> object:
        marks = ", ".join("?" * len(args))
        with self._lock:
            return self._connection.execute(f"SELECT {name}({marks})", args).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._connection.close()


def _is_now(value: object) -> bool:
    return isinstance(value, str) and value.lower() == "now"


async def _install_sqlite(engine: AsyncEngine) -> None:
    """Rewrite the keywords in the schema's SQL (column defaults, views, triggers) the way
    SQLite documents for changing a column's default: ``writable_schema``, then a new
    ``schema_version``."""
    async with engine.begin() as connection:
        rows = await connection.exec_driver_sql(
            "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL"
        )
        changed = [
            (rewrite_sqlite(sql), kind, name)
            for kind, name, sql in map(tuple, rows.all())
            if rewrite_sqlite(sql) != sql
        ]
        if not changed:
            return
        version = (await connection.exec_driver_sql("PRAGMA schema_version")).scalar_one()
        await connection.exec_driver_sql("PRAGMA writable_schema = ON")
        for sql, kind, name in changed:
            await connection.exec_driver_sql(
                "UPDATE sqlite_master SET sql = ? WHERE type = ? AND name = ?", (sql, kind, name)
            )
        await connection.exec_driver_sql(f"PRAGMA schema_version = {version + 1}")
        await connection.exec_driver_sql("PRAGMA writable_schema = OFF")


# -- the clock of one test database ----------------------------------------------------------


class DatabaseClock:
    """The clock of one test database: the virtual instant of the test it :meth:`follow`\\ s.

    :meth:`install` puts it into the database once (the template), :meth:`listen` onto each of
    its test engines; :meth:`close` at the end of the process.
    """

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self.following: Instant | None = None
        """The clock of the running test, or ``None``: the database reads real time."""
        self._published: object = _UNPUBLISHED
        self._sqlite_now: _SqliteNow | None = None
        self._pristine = _Pristine() if dialect == "sqlite" else None

    @contextlib.contextmanager
    def follow(self, clock: Instant | None) -> Iterator[None]:
        """Read ``clock``'s instant (``None``: the real time) while the block runs."""
        self.following = clock
        try:
            yield
        finally:
            self.following = None

    # -- once per test database

    async def install(self, engine: AsyncEngine) -> None:
        """Put the clock into the new database of ``engine``, after its schema is built."""
        __tracebackhide__ = True
        try:
            if self.dialect == "postgresql":
                await _install_postgresql(engine)
            else:
                await _install_sqlite(engine)
        except Exception as error:
            raise failure(_install_failure(error)) from None

    # -- each test engine

    def engine_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """A test engine's ``create_async_engine()`` options, with the search path that finds
        the clock's functions first (PostgreSQL)."""
        if self.dialect != "postgresql":
            return dict(options)
        connect_args = dict(options.get("connect_args") or {})
        server_settings = dict(connect_args.get("server_settings") or {})
        server_settings["search_path"] = with_clock_schema(server_settings.get("search_path"))
        connect_args["server_settings"] = server_settings
        return {**options, "connect_args": connect_args}

    def sync_engine_options(self) -> dict[str, Any]:
        """The sync test engine's ``create_engine()`` options (psycopg 3 on PostgreSQL: the
        search path that finds the clock's functions first)."""
        if self.dialect != "postgresql":
            return {}
        search_path = with_clock_schema(None).replace(" ", "")  # libpq splits options at spaces
        return {"connect_args": {"options": f"-c search_path={search_path}"}}

    def listen(self, engine: AsyncEngine | Engine) -> None:
        """Rewrite the statements of ``engine`` (and publish the instant, on PostgreSQL)."""
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        if self.dialect == "postgresql":
            event.listen(sync_engine, "before_cursor_execute", self._on_postgresql, retval=True)
        else:
            event.listen(sync_engine, "connect", self._on_sqlite_connect)
            event.listen(sync_engine, "before_cursor_execute", self._on_sqlite, retval=True)

    def _on_postgresql(
        self,
        connection: Connection,
        _cursor: Any,
        statement: str,
        parameters: Any,
        _context: Any,
        _executemany: bool,
    ) -> tuple[str, Any]:
        following = self.following
        wanted = None if following is None else following.now_us
        if wanted != self._published and not _TRANSACTION_CONTROL.match(statement):
            self._publish(connection, wanted)
        return rewrite_postgresql(statement), parameters

    def _publish(self, connection: Connection, now_us: int | None) -> None:
        # Inside SQLAlchemy's greenlet, on the driver connection about to run the statement,
        # under the adapter's statement lock; over the simple query protocol, which prepares
        # no statement. In a failed transaction the statement fails anyway: publish later.
        driver = connection.connection.driver_connection
        mutex = getattr(connection.connection.dbapi_connection, "_execute_mutex", None)
        sql = _PUBLISH.format(0, "false") if now_us is None else _PUBLISH.format(now_us, "true")
        with contextlib.suppress(Exception):
            if connection.dialect.is_async:
                await_only(_execute(driver, mutex, sql))
            elif driver is not None:  # psycopg 3, the sync side's driver
                driver.execute(sql)
            self._published = now_us

    def _on_sqlite(
        self,
        _connection: Connection,
        _cursor: Any,
        statement: str,
        parameters: Any,
        _context: Any,
        _executemany: bool,
    ) -> tuple[str, Any]:
        return rewrite_sqlite(statement), parameters

    def _on_sqlite_connect(self, dbapi_connection: Any, _record: Any) -> None:
        for name, positions in _sqlite_functions().items():
            arity = len(positions) if name == "timediff" else -1
            dbapi_connection.create_function(
                name, arity, self._sqlite_function(name, positions), deterministic=True
            )

    def _sqlite_function(self, name: str, positions: tuple[int, ...]) -> Callable[..., object]:
        pristine = self._pristine
        assert pristine is not None
        computed = name in _SQLITE_COMPUTED

        def function(*args: object) -> object:
            following = self.following
            if following is None:
                return pristine.call(name, args)
            now = self._now(following.now_us)
            if computed and (not args or (len(args) == 1 and _is_now(args[0]))):
                return now.results[name]
            values = list(args)
            if len(positions) == 1 and len(values) == positions[0]:
                values.append(now.text)  # date() alone, strftime('%Y') alone: now
            for position in positions:
                if position < len(values) and _is_now(values[position]):
                    values[position] = now.text
            return pristine.call(name, values)

        return function

    def _now(self, now_us: int) -> _SqliteNow:
        now = self._sqlite_now
        if now is None or now.now_us != now_us:
            now = self._sqlite_now = _SqliteNow(now_us)
        return now

    def close(self) -> None:
        """Close the private SQLite connection (the end of the process)."""
        if self._pristine is not None:
            self._pristine.close()


def _install_failure(error: Exception) -> str:
    message = str(error).strip().splitlines()
    statement = getattr(error, "statement", None)
    lines = [
        "fastsched_database_clock = 'virtual': the database's clock could not be installed in "
        f"the test database: {type(error).__name__}: {message[0] if message else ''}",
        *([f"statement: {' '.join(statement.split())}"] if statement else []),
        "Set fastsched_database_clock = real to leave the test database on the server's clock.",
    ]
    return "\n".join(lines)


async def _execute(driver: Any, mutex: Any, sql: str) -> None:
    async with mutex or contextlib.nullcontext():
        await driver.execute(sql)

"""The database's clock: ``now()``, ``CURRENT_TIMESTAMP`` and friends read the virtual instant.

User suites run on SQLite and on PostgreSQL (the ``database`` fixture), each test under both
isolation modes: the app of :data:`CLOCK_APP` stamps rows with the database's time, in
column defaults, in its jobs' updates and in a stale-claim query. The rewriting of the time
keywords is checked on its own at the end.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_fastsched import _dbclock

NO_RANDOM_ORDER = ("-p", "no:randomly")
OPTIONS = ("-o", "asyncio_mode=auto", "--fastsched-scheduler=app:scheduler")

CLOCK_APP = """
import datetime as dt
import os

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import DateTime, String, func, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    stamped_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.current_timestamp()
    )
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    processed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


# The production engine, on the suite's canary: the tests must never reach it.
engine = create_async_engine(os.environ["FASTSCHED_CANARY_URL"])
async_session_factory = async_sessionmaker(engine, expire_on_commit=False)
scheduler = AsyncIOScheduler(timezone="UTC")
engine_options = {"connect_args": {"server_settings": {"search_path": "public"}}}

NOW = {"postgresql": "now()", "sqlite": "datetime('now')"}
STALE = {
    "postgresql": "now() - interval '15 minutes'",
    "sqlite": "datetime('now', '-15 minutes')",
}


async def execute(statement, **values):
    async with async_session_factory() as session:
        result = await session.execute(text(statement), values)
        rows = result.all() if result.returns_rows else None
        await session.commit()
    return rows


async def process_pending(dialect):
    await execute(
        f"UPDATE tasks SET status = 'completed', processed_at = {NOW[dialect]}, "
        "finished_at = CURRENT_TIMESTAMP WHERE status = 'pending'"
    )


async def claim(task_id, dialect):
    await execute(
        f"UPDATE tasks SET status = 'claimed', claimed_at = {NOW[dialect]} WHERE id = :id",
        id=task_id,
    )


async def stale_claims(dialect):
    rows = await execute(
        f"SELECT id FROM tasks WHERE status = 'claimed' AND claimed_at < {STALE[dialect]} "
        "ORDER BY id"
    )
    return [row[0] for row in rows]
"""

# The isolation modes, as a fixture every test requests; a table and an index the schema
# hook makes, whose defaults read the time with the keywords and pg_catalog.now().
CONFTEST = """
import pytest
from sqlalchemy import text

HOOK_DDL = {
    "postgresql": [
        "CREATE TABLE notes (id integer PRIMARY KEY, noted_at timestamptz DEFAULT "
        "CURRENT_TIMESTAMP, day date DEFAULT CURRENT_DATE, late_at timestamptz DEFAULT "
        "(pg_catalog.now() + interval '1 hour'), label text DEFAULT 'CURRENT_TIMESTAMP')",
    ],
    "sqlite": [
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, noted_at TEXT DEFAULT CURRENT_TIMESTAMP, "
        "day TEXT DEFAULT CURRENT_DATE, late_at TEXT DEFAULT (datetime('now', '+1 hour')), "
        "label TEXT DEFAULT 'CURRENT_TIMESTAMP')",
        "CREATE INDEX tasks_day ON tasks (date(created_at))",
    ],
}


def pytest_fastsched_create_schema(connection, dialect):
    for statement in HOOK_DDL[dialect]:
        connection.execute(text(statement))


@pytest.fixture(
    params=[
        pytest.param("rollback", id="rollback"),
        pytest.param("commit", marks=pytest.mark.fastsched(isolation="commit"), id="commit"),
    ]
)
def isolation(request):
    return request.param
"""

STAMPS = """
import datetime as dt

import pytest

import app

START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def at(dialect, minutes=0):
    # SQLite keeps the time as text, which SQLAlchemy reads as a naive datetime.
    value = START + dt.timedelta(minutes=minutes)
    return value if dialect == "postgresql" else value.replace(tzinfo=None)


async def test_a_job_and_the_defaults_stamp_the_virtual_instant(
    isolation, fastsched_clock, fastsched_scheduler, fastsched_db
):
    dialect = fastsched_db.dialect
    app.scheduler.add_job(app.process_pending, "interval", minutes=5, args=[dialect])
    await fastsched_db.insert("tasks", [{"id": 1}])
    await fastsched_clock.advance(minutes=5)
    (row,) = await fastsched_db.fetch("tasks")
    assert row["status"] == "completed"
    assert (row["created_at"], row["stamped_at"]) == (at(dialect), at(dialect))
    assert (row["processed_at"], row["finished_at"]) == (at(dialect, 5), at(dialect, 5))


async def test_stale_claims_are_the_ones_production_would_pick(
    isolation, fastsched_clock, fastsched_db
):
    dialect = fastsched_db.dialect
    await fastsched_db.insert("tasks", [{"id": 1}, {"id": 2}])
    await app.claim(1, dialect)
    await fastsched_clock.advance(minutes=10)
    await app.claim(2, dialect)
    assert await app.stale_claims(dialect) == []
    await fastsched_clock.advance(minutes=15)
    assert await app.stale_claims(dialect) == [1]
    await fastsched_clock.advance(minutes=1)
    assert await app.stale_claims(dialect) == [1, 2]


NOTES = {
    "postgresql": (
        START + dt.timedelta(minutes=5),
        dt.date(2030, 1, 1),
        START + dt.timedelta(minutes=65),
        "CURRENT_TIMESTAMP",
    ),
    "sqlite": ("2030-01-01 00:05:00", "2030-01-01", "2030-01-01 01:05:00", "CURRENT_TIMESTAMP"),
}


async def test_the_defaults_the_schema_hook_made_read_it_too(
    isolation, fastsched_clock, fastsched_db
):
    await fastsched_clock.advance(minutes=5)
    await app.execute("INSERT INTO notes (id) VALUES (1)")
    (row,) = await app.execute("SELECT noted_at, day, late_at, label FROM notes")
    assert tuple(row) == NOTES[fastsched_db.dialect]


@pytest.fixture
async def seeded(fastsched_db):
    await fastsched_db.insert("tasks", [{"id": 7}])


async def test_a_row_a_fixture_inserted_before_the_clock_has_the_start_instant(
    isolation, seeded, fastsched_db, fastsched_clock
):
    (row,) = await fastsched_db.fetch("tasks")
    assert row["created_at"] == at(fastsched_db.dialect)


async def test_without_a_clock_the_database_reads_real_time(isolation, fastsched_db):
    real = dt.datetime.now(dt.timezone.utc)
    await fastsched_db.insert("tasks", [{"id": 1}])
    (row,) = await fastsched_db.fetch("tasks")
    for column in ("created_at", "stamped_at"):
        value = row[column].replace(tzinfo=dt.timezone.utc)
        assert abs(value - real) < dt.timedelta(minutes=1), (column, value, real)
"""

POSTGRESQL_SPELLINGS = """
import datetime as dt

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

import app

START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
INSTANT = START + dt.timedelta(minutes=5, microseconds=123456)


async def test_every_spelling_reads_the_virtual_instant(isolation, fastsched_clock, fastsched_db):
    await fastsched_clock.advance(dt.timedelta(minutes=5, microseconds=123456))
    async with app.async_session_factory() as session:
        await session.execute(text("SET LOCAL TIME ZONE 'UTC'"))
        row = (await session.execute(text(
            "SELECT now(), transaction_timestamp(), statement_timestamp(), clock_timestamp(), "
            "CURRENT_TIMESTAMP, pg_catalog.now(), current_timestamp(0), LOCALTIMESTAMP, "
            "LOCALTIMESTAMP(3), CURRENT_DATE, CURRENT_TIME, LOCALTIME, timeofday(), "
            "'CURRENT_TIMESTAMP', $$now() CURRENT_DATE$$, E'it\\\\'s CURRENT_TIME', "
            '1 AS "current_date", 2 AS localtime -- CURRENT_TIMESTAMP'
        ))).one()
    utc = dt.timezone.utc
    assert tuple(row) == (
        *(INSTANT,) * 6,
        START + dt.timedelta(minutes=5),
        INSTANT.replace(tzinfo=None),
        INSTANT.replace(tzinfo=None, microsecond=123000),
        dt.date(2030, 1, 1),
        dt.time(0, 5, 0, 123456, tzinfo=utc),
        dt.time(0, 5, 0, 123456),
        "Tue Jan 01 00:05:00.123456 2030 UTC",
        "CURRENT_TIMESTAMP",
        "now() CURRENT_DATE",
        "it's CURRENT_TIME",
        1,
        2,
    )


async def test_the_time_after_a_failed_statement(isolation, fastsched_clock, fastsched_db):
    async with app.async_session_factory() as session:
        with pytest.raises(DBAPIError):
            await session.execute(text("SELECT 1 / 0"))
        await fastsched_clock.advance(minutes=1)  # while the transaction has failed
        await session.rollback()
        assert await session.scalar(text("SELECT now()")) == START + dt.timedelta(minutes=1)
"""

SQLITE_SPELLINGS = """
import datetime as dt
import sqlite3

import app

UNIXEPOCH = sqlite3.sqlite_version_info >= (3, 38)


async def test_every_spelling_reads_the_virtual_instant(isolation, fastsched_clock, fastsched_db):
    await fastsched_clock.advance(dt.timedelta(days=14, minutes=5, microseconds=123456))
    (row,) = await app.execute(
        "SELECT CURRENT_TIMESTAMP, CURRENT_DATE, CURRENT_TIME, datetime('now'), datetime(), "
        "date('now'), time('NOW'), julianday('now'), julianday('2030-01-15 00:05:00.123'), "
        "strftime('%Y-%m-%d %H:%M:%f', 'now'), strftime('%s'), "
        + ("unixepoch('now'), " if UNIXEPOCH else "1894665900, ")
        + "datetime('now', '+1 day'), date('now', 'start of month'), "
        "datetime('2020-02-10 10:00', 'start of month', '+1 month'), "
        "'CURRENT_TIMESTAMP', 1 AS [current_date], 2 AS `current_time`, "
        "3 AS current_timestamp -- CURRENT_TIMESTAMP"
    )
    (now, today, time, *rest) = row
    assert (now, today, time) == ("2030-01-15 00:05:00", "2030-01-15", "00:05:00")
    assert tuple(rest[:4]) == (now, now, today, time)
    assert rest[4] == rest[5]  # julianday, computed without SQLite, to SQLite's own digit
    assert tuple(rest[6:]) == (
        "2030-01-15 00:05:00.123",
        "1894665900",
        1894665900,
        "2030-01-16 00:05:00",
        "2030-01-01",
        "2020-03-01 00:00:00",
        "CURRENT_TIMESTAMP",
        1,
        2,
        3,
    )


async def test_an_expression_index_over_a_date_function_keeps_working(
    isolation, fastsched_clock, fastsched_db
):
    await fastsched_db.insert("tasks", [{"id": 1}])
    query = "SELECT id FROM tasks WHERE date(created_at) = '2030-01-01'"
    assert await app.execute(query) == [(1,)]
    plan = await app.execute("EXPLAIN QUERY PLAN " + query)
    assert "tasks_day" in plan[-1][-1]
"""

POSTGRESQL_ONLY = pytest.mark.parametrize("database", ["postgresql"], indirect=True)
SPELLINGS = {"sqlite": SQLITE_SPELLINGS, "postgresql": POSTGRESQL_SPELLINGS}


def _dialect(database: str) -> str:
    return "sqlite" if database == "sqlite" else "postgresql"


@pytest.fixture
def clock_suite(make_db_suite: Callable[[str], pytest.Pytester], database: str) -> pytest.Pytester:
    """A user project on ``database``: the app of :data:`CLOCK_APP`, its conftest."""
    pytester = make_db_suite(database)
    pytester.makepyfile(app=CLOCK_APP)
    pytester.makeconftest(CONFTEST)
    return pytester


def test_the_app_and_its_defaults_read_the_virtual_instant(clock_suite: pytest.Pytester) -> None:
    clock_suite.makepyfile(test_stamps=STAMPS)
    result = clock_suite.runpytest_inprocess(*NO_RANDOM_ORDER, *OPTIONS)
    result.assert_outcomes(passed=10)


def test_every_spelling_of_now_reads_it(clock_suite: pytest.Pytester, database: str) -> None:
    clock_suite.makepyfile(test_spellings=SPELLINGS[_dialect(database)])
    result = clock_suite.runpytest_inprocess(*NO_RANDOM_ORDER, *OPTIONS)
    result.assert_outcomes(passed=4)


REAL = """
import datetime as dt

import app


async def test_the_database_keeps_the_servers_clock(
    isolation, fastsched_clock, fastsched_scheduler, fastsched_db
):
    dialect = fastsched_db.dialect
    app.scheduler.add_job(app.process_pending, "interval", minutes=5, args=[dialect])
    await fastsched_db.insert("tasks", [{"id": 1}])
    await fastsched_clock.advance(minutes=5)
    (row,) = await fastsched_db.fetch("tasks")
    real = fastsched_clock.real_start
    for column in ("created_at", "stamped_at", "processed_at", "finished_at"):
        value = row[column].replace(tzinfo=dt.timezone.utc)
        assert abs(value - real) < dt.timedelta(minutes=1), (column, value, real)
    if dialect == "postgresql":  # nothing of the clock was installed
        assert await app.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname = 'fastsched_clock'"
        ) == []
        assert await app.execute("SHOW search_path") == [('"$user", public',)]
    else:
        (schema,) = await app.execute("SELECT sql FROM sqlite_master WHERE name = 'tasks'")
        assert "DEFAULT CURRENT_TIMESTAMP" in schema[0]
"""


def test_the_opt_out_leaves_the_database_on_real_time(clock_suite: pytest.Pytester) -> None:
    clock_suite.makepyfile(test_real=REAL)
    result = clock_suite.runpytest_inprocess(
        *NO_RANDOM_ORDER, *OPTIONS, "--fastsched-database-clock=real"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["fastsched database clock: real"])


SEARCH_PATH = """
import datetime as dt

import app


async def test_the_apps_search_path_gets_the_clock(isolation, fastsched_clock, fastsched_db):
    assert await app.execute("SHOW search_path") == [("public, fastsched_clock, pg_catalog",)]
    await fastsched_clock.advance(minutes=5)
    (row,) = await app.execute("SELECT now()")
    assert row[0] == dt.datetime(2030, 1, 1, 0, 5, tzinfo=dt.timezone.utc)
"""


@POSTGRESQL_ONLY
def test_an_apps_own_search_path_finds_the_clock_too(clock_suite: pytest.Pytester) -> None:
    clock_suite.makepyfile(test_search_path=SEARCH_PATH)
    result = clock_suite.runpytest_inprocess(
        *NO_RANDOM_ORDER, *OPTIONS, "--fastsched-engine-options=app:engine_options"
    )
    result.assert_outcomes(passed=2)


CLASHING_HOOK = """
from sqlalchemy import text


def pytest_fastsched_create_schema(connection, dialect):
    connection.execute(text("CREATE SCHEMA fastsched_clock"))
"""

ONE_TEST = """
async def test_one(fastsched_db):
    pass
"""


@POSTGRESQL_ONLY
def test_a_clock_that_cannot_be_installed_says_so(clock_suite: pytest.Pytester) -> None:
    clock_suite.makeconftest(CLASHING_HOOK)
    clock_suite.makepyfile(test_one=ONE_TEST)
    result = clock_suite.runpytest_inprocess(*NO_RANDOM_ORDER, *OPTIONS)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "fastsched_database_clock = 'virtual': the database's clock could not be installed "
            'in the test database: ProgrammingError: *schema "fastsched_clock" already exists',
            "statement: CREATE SCHEMA fastsched_clock",
            "Set fastsched_database_clock = real to leave the test database on the server's "
            "clock.",
        ],
        consecutive=True,
    )


# -- the README's example ----------------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_block() -> str:
    section = README.read_text().split("#### The database's clock\n", 1)[1]
    (block,) = re.findall(r"```python\n(.+?)```", section.split("\n#### ", 1)[0], re.DOTALL)
    return str(block)


@POSTGRESQL_ONLY
def test_the_readme_example_runs_as_shown(clock_suite: pytest.Pytester) -> None:
    clock_suite.makepyfile(test_readme=_readme_block())
    result = clock_suite.runpytest_inprocess(*NO_RANDOM_ORDER, *OPTIONS)
    result.assert_outcomes(passed=1)


# -- rewriting the keywords ----------------------------------------------------------------

POSTGRESQL_REWRITES = {
    "SELECT CURRENT_TIMESTAMP": "SELECT fastsched_clock.now()",
    "select current_timestamp(3), localtimestamp(0)": (
        "select CAST(fastsched_clock.now() AS timestamptz(3)), "
        "CAST(fastsched_clock.local_timestamp() AS timestamp(0))"
    ),
    "SELECT CURRENT_DATE, CURRENT_TIME, LOCALTIME": (
        "SELECT fastsched_clock.current_day(), fastsched_clock.current_time_tz(), "
        "fastsched_clock.local_time()"
    ),
    "SELECT pg_catalog.now(), pg_catalog.clock_timestamp(), pg_catalog.pg_backend_pid()": (
        "SELECT fastsched_clock.now(), fastsched_clock.clock_timestamp(), "
        "pg_catalog.pg_backend_pid()"
    ),
    "UPDATE t SET a = now() WHERE b < now() - interval '15 minutes'": (
        "UPDATE t SET a = now() WHERE b < now() - interval '15 minutes'"
    ),
}
UNTOUCHED = [
    "SELECT 'CURRENT_TIMESTAMP', 'it''s CURRENT_DATE'",
    "SELECT E'it\\'s CURRENT_TIME'",
    'SELECT "current_timestamp" FROM t',
    "SELECT t.current_date FROM t",
    "SELECT 1 AS current_date",
    "SELECT 1 -- CURRENT_TIMESTAMP\n",
    "SELECT 1 /* CURRENT_TIMESTAMP */",
    "CREATE FUNCTION f() RETURNS timestamptz AS $body$ SELECT CURRENT_TIMESTAMP $body$",
    "SELECT $$CURRENT_TIMESTAMP$$, $1::VARCHAR",
    "SELECT current_timestamp_column, my_current_date FROM t",
]


@pytest.mark.parametrize(("statement", "rewritten"), POSTGRESQL_REWRITES.items())
def test_the_postgresql_keywords_become_calls(statement: str, rewritten: str) -> None:
    assert _dbclock.rewrite_postgresql(statement) == rewritten


@pytest.mark.parametrize("statement", UNTOUCHED)
def test_literals_identifiers_comments_and_labels_are_left_alone(statement: str) -> None:
    assert _dbclock.rewrite_postgresql(statement) == statement


def test_the_sqlite_keywords_become_date_functions() -> None:
    statement = (
        "CREATE TABLE t (a TEXT DEFAULT CURRENT_TIMESTAMP, b TEXT DEFAULT (current_date), "
        "[current_time] TEXT, `current_date` TEXT, c TEXT DEFAULT 'CURRENT_TIME')"
    )
    assert _dbclock.rewrite_sqlite(statement) == (
        "CREATE TABLE t (a TEXT DEFAULT (datetime('now')), b TEXT DEFAULT ((date('now'))), "
        "[current_time] TEXT, `current_date` TEXT, c TEXT DEFAULT 'CURRENT_TIME')"
    )
    assert _dbclock.rewrite_sqlite("SELECT LOCALTIMESTAMP") == "SELECT LOCALTIMESTAMP"


@pytest.mark.parametrize(
    ("search_path", "with_clock"),
    [
        (None, '"$user", public, fastsched_clock, pg_catalog'),
        ("public", "public, fastsched_clock, pg_catalog"),
        ("tenant, pg_catalog, public", "tenant, fastsched_clock, pg_catalog, public"),
        ('"PG_CATALOG_X", fastsched_clock', '"PG_CATALOG_X", fastsched_clock, pg_catalog'),
    ],
)
def test_an_apps_search_path_gets_the_schema_before_pg_catalog(
    search_path: str | None, with_clock: str
) -> None:
    assert _dbclock.with_clock_schema(search_path) == with_clock


def test_sqlite_now_is_computed_as_sqlite_computes_it() -> None:
    now = _dbclock._SqliteNow(1_894_665_900_123_456)  # 2030-01-15 00:05:00.123456
    connection = sqlite3.connect(":memory:")
    try:
        assert connection.execute(
            "SELECT datetime(?), date(?), time(?), julianday(?), CAST(strftime('%s', ?) AS INT)",
            [now.text] * 5,
        ).fetchone() == tuple(now.results[name] for name in _dbclock._SQLITE_COMPUTED)
    finally:
        connection.close()

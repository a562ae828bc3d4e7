"""The seal: a test that uses the plugin reaches no database but its own.

Every way a job, a request, the lifespan or a fixture can reach the app's database ends on
the test database, and every way out to another database ends in the asserted refusal; the
app's databases ("production" and "elsewhere", on SQLite and on the PostgreSQL server the
plugin works on) are compared byte for byte, row for row, before and after.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from conftest import execute_sql, in_a_thread

from pytest_fastsched._postgres import EphemeralPostgres

APP = """
import os

from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from fastapi import FastAPI
from sqlalchemy import String, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

PRODUCTION = os.environ["SEALED_PRODUCTION_URL"]
ELSEWHERE = os.environ["SEALED_ELSEWHERE_URL"]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")


engine = create_async_engine(PRODUCTION)
sessions = async_sessionmaker(engine, expire_on_commit=False)
more_sessions = async_sessionmaker(engine, expire_on_commit=False)
class_sessions = sessionmaker(bind=engine, class_=AsyncSession, expire_on_commit=False)
elsewhere = create_async_engine(ELSEWHERE)
scheduler = AsyncIOScheduler(
    timezone="UTC",
    jobstores={
        "default": MemoryJobStore(),
        "persisted": SQLAlchemyJobStore(url=os.environ["SEALED_JOBS_URL"]),
    },
)


async def add_item(item_id, maker=sessions):
    async with maker() as session:
        session.add(Item(id=item_id, status="done"))
        await session.commit()


async def count(maker=sessions):
    async with maker() as session:
        return await session.scalar(select(func.count()).select_from(Item))


async def write_elsewhere():
    async with elsewhere.begin() as connection:
        await connection.execute(text("INSERT INTO items (id, status) VALUES (7, 'leak')"))


app = FastAPI()


@app.post("/items/{item_id}")
async def create(item_id: int):
    await add_item(item_id)
    return {"count": await count()}
"""

REACHED = """
import functools
import os
import sqlite3

import aiosqlite
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker

import sealed_app as app

COMMIT = pytest.mark.fastsched(isolation="commit")
ISOLATIONS = [pytest.param("rollback"), pytest.param("commit", marks=COMMIT)]


def once(func, job_id, **options):
    app.scheduler.add_job(func, "date", run_date="2030-01-01 00:05:00+00:00", id=job_id, **options)


async def engine_begin(item_id):
    async with app.engine.begin() as connection:
        await connection.execute(
            text("INSERT INTO items (id, status) VALUES (:id, 'raw')"), {"id": item_id}
        )


async def engine_connect(item_id):
    async with app.engine.connect() as connection:
        await connection.execute(
            text("INSERT INTO items (id, status) VALUES (:id, 'raw')"), {"id": item_id}
        )
        await connection.commit()


async def sessionmaker_of_the_job(item_id):
    await app.add_item(item_id, async_sessionmaker(app.engine))


WAYS = {
    "engine.begin()": engine_begin,
    "engine.connect()": engine_connect,
    "an async_sessionmaker made in the job": sessionmaker_of_the_job,
    "a second configured sessionmaker": functools.partial(app.add_item, maker=app.more_sessions),
    "sessionmaker(class_=AsyncSession)": functools.partial(app.add_item, maker=app.class_sessions),
}


async def test_jobs_run_on_the_test_database_unasked(fastsched_clock, fastsched_scheduler):
    once(app.add_item, "add", args=[1])
    await fastsched_clock.advance(minutes=5)
    fastsched_scheduler.assert_ran("add", times=1)
    assert await app.count() == 1


async def test_requests_run_on_the_test_database(fastsched_client):
    response = await fastsched_client.post("/items/2")
    assert response.json() == {"count": 1}


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("way", list(WAYS))
async def test_every_way_to_the_apps_database_reaches_the_test_database(
    fastsched_clock, fastsched_scheduler, fastsched_db, isolation, way
):
    assert fastsched_db.isolation == isolation
    once(WAYS[way], "write", args=[3])
    await fastsched_clock.advance(minutes=5)
    fastsched_scheduler.assert_ran("write", times=1)
    assert [row["id"] for row in await fastsched_db.fetch("items")] == [3]


async def test_in_memory_sqlite_is_the_apps_business(fastsched_clock, fastsched_scheduler):
    async def scratch():
        async with aiosqlite.connect(":memory:") as db:
            await db.execute("SELECT 1")
        sqlite3.connect(":memory:").close()

    once(scratch, "scratch")
    await fastsched_clock.advance(minutes=5)
    fastsched_scheduler.assert_ran("scratch", times=1)


@pytest.mark.fastsched(allow_databases=[os.environ["SEALED_ELSEWHERE_URL"]])
async def test_a_database_the_marker_allows(fastsched_clock, fastsched_scheduler):
    async def read_elsewhere():
        async with app.elsewhere.connect() as connection:
            return (await connection.execute(text("SELECT count(*) FROM items"))).scalar()

    once(read_elsewhere, "read")
    await fastsched_clock.advance(minutes=5)
    assert [run.retval for run in fastsched_scheduler.runs_of("read")] == [1]


async def test_a_persistent_job_store_is_left_alone(fastsched_clock, fastsched_scheduler):
    fired = []
    app.scheduler.add_job(
        fired.append, "interval", minutes=5, args=[1], id="persisted", jobstore="persisted"
    )
    assert [job.id for job in app.scheduler.get_jobs(jobstore="persisted")] == ["persisted"]
    await fastsched_clock.advance(minutes=10)
    assert fired == [1, 1]
"""

REFUSED = """
import asyncio
import os
import sqlite3

import pytest
from sqlalchemy import create_engine, text

import sealed_app as app

SYNC_ELSEWHERE = os.environ["SEALED_SYNC_ELSEWHERE_URL"]


def once(func, job_id, **options):
    app.scheduler.add_job(func, "date", run_date="2030-01-01 00:05:00+00:00", id=job_id, **options)


async def test_an_engine_the_settings_do_not_name(fastsched_clock, fastsched_scheduler):
    once(app.write_elsewhere, "elsewhere")
    await fastsched_clock.advance(minutes=5)


async def test_a_refusal_the_job_swallows(fastsched_clock, fastsched_scheduler):
    async def swallowing():
        try:
            await app.write_elsewhere()
        except Exception:
            pass  # as jobs do: log it and carry on

    once(swallowing, "swallowing")
    await fastsched_clock.advance(minutes=5)


async def test_a_sync_engine_in_a_worker_thread(fastsched_clock, fastsched_scheduler):
    def write():
        with create_engine(SYNC_ELSEWHERE).begin() as connection:
            connection.execute(text("INSERT INTO items (id, status) VALUES (8, 'leak')"))

    async def threaded():
        await asyncio.get_running_loop().run_in_executor(None, write)

    once(threaded, "threaded")
    await fastsched_clock.advance(minutes=5)


async def test_an_engine_made_in_the_test_body(fastsched_db):
    from sqlalchemy.ext.asyncio import create_async_engine

    async with create_async_engine(app.ELSEWHERE).connect():
        pass


@pytest.fixture
async def elsewhere_connection():
    async with app.elsewhere.connect() as connection:
        yield connection


async def test_a_fixture_that_connects_elsewhere(elsewhere_connection, fastsched_db):
    pass
"""

REFUSED_SQLITE = """
import sqlite3

import aiosqlite

import sealed_app as app
from test_refused import once

PATH = app.ELSEWHERE.split(":///", 1)[1]


async def test_aiosqlite_connect(fastsched_clock, fastsched_scheduler):
    async def raw():
        async with aiosqlite.connect(PATH):
            pass

    once(raw, "raw")
    await fastsched_clock.advance(minutes=5)


async def test_sqlite3_connect_imported_by_name(fastsched_clock, fastsched_scheduler):
    from sqlite3 import connect

    def raw():
        connect(PATH).close()

    once(raw, "raw")
    await fastsched_clock.advance(minutes=5)
"""

REFUSED_POSTGRESQL = """
import asyncpg
import psycopg
import psycopg2

import sealed_app as app
from test_refused import once

DSN = app.ELSEWHERE.replace("postgresql+asyncpg://", "postgresql://")


async def test_asyncpg_connect(fastsched_clock, fastsched_scheduler):
    async def raw():
        connection = await asyncpg.connect(DSN)
        await connection.close()

    once(raw, "raw")
    await fastsched_clock.advance(minutes=5)


async def test_an_asyncpg_pool(fastsched_clock, fastsched_scheduler):
    async def pooled():
        async with asyncpg.create_pool(DSN, min_size=1, max_size=1):
            pass

    once(pooled, "pooled")
    await fastsched_clock.advance(minutes=5)


async def test_psycopg_connect(fastsched_db):
    psycopg.connect(DSN).close()


async def test_psycopg2_connect(fastsched_db):
    psycopg2.connect(DSN).close()
"""

LIFESPAN = """
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI

import sealed_app as app


@asynccontextmanager
async def lifespan(_):
    await app.write_elsewhere()
    yield


@pytest.fixture
def fastsched_app():
    return FastAPI(lifespan=lifespan)


async def test_the_apps_lifespan(fastsched_client):
    pass
"""

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
fastsched_database = {database}
fastsched_scheduler = sealed_app:scheduler
fastsched_sessionmaker = sealed_app:sessions, sealed_app:more_sessions sealed_app:class_sessions
fastsched_metadata = sealed_app:Base.metadata
fastsched_app = sealed_app:app
"""


class AppDatabases:
    """The app's own databases, which no test may change: "production" and "elsewhere"."""

    def __init__(self, directory: Path, server: EphemeralPostgres | None) -> None:
        self.server = server
        if server is None:
            self.urls = {name: f"sqlite+aiosqlite:///{directory / name}.db" for name in NAMES}
            self.sync_elsewhere = f"sqlite:///{directory / 'elsewhere.db'}"
        else:
            # "production" is the database the run's URL names: the plugin must not write it.
            self.urls = {"production": server.url(), "elsewhere": server.url("elsewhere")}
            self.sync_elsewhere = server.url("elsewhere").replace("+asyncpg", "+psycopg")
        self.jobs = directory / "jobs.db"

    def make(self) -> None:
        if self.server is None:
            for name in NAMES:
                with sqlite3.connect(self.urls[name].split(":///", 1)[1]) as connection:
                    connection.executescript(SEED)
        else:
            self.server.create_database("elsewhere")
            for name in NAMES:
                in_a_thread(execute_sql(self.server.dsn(_database_of(self.urls[name])), SEED))

    def contents(self) -> dict[str, object]:
        """Every byte of the SQLite files, every row of the PostgreSQL databases."""
        found: dict[str, object] = {"jobs": _digest(self.jobs)}
        for name, url in self.urls.items():
            if self.server is None:
                found[name] = _digest(Path(url.split(":///", 1)[1]))
            else:
                found[name] = in_a_thread(_rows(self.server.dsn(_database_of(url))))
        return found

    def drop(self) -> None:
        if self.server is not None:
            in_a_thread(execute_sql(self.server.dsn(), "DROP TABLE IF EXISTS items"))
            self.server.drop_database("elsewhere")


NAMES = ("production", "elsewhere")
SEED = (
    "CREATE TABLE items (id INTEGER PRIMARY KEY, status VARCHAR(20));"
    "INSERT INTO items (id, status) VALUES (100, 'real');"
)


def _database_of(url: str) -> str:
    return url.split("@/", 1)[1].split("?", 1)[0]


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


async def _rows(dsn: str) -> list[tuple[object, ...]]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch("SELECT * FROM items ORDER BY id")
        tables = await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
    finally:
        await connection.close()
    return [tuple(row) for row in tables] + [tuple(row) for row in rows]


@pytest.fixture
def sealed_suite(
    pytester: pytest.Pytester,
    database: str,
    user_tmpdir: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[pytest.Pytester, AppDatabases]]:
    """The sealed user project on ``database``, with the app's databases made and checked."""
    server = request.getfixturevalue("postgres_server") if database != "sqlite" else None
    apps = AppDatabases(Path(os.path.realpath(pytester.path)), server)
    apps.make()
    monkeypatch.setenv("SEALED_PRODUCTION_URL", apps.urls["production"])
    monkeypatch.setenv("SEALED_ELSEWHERE_URL", apps.urls["elsewhere"])
    monkeypatch.setenv("SEALED_SYNC_ELSEWHERE_URL", apps.sync_elsewhere)
    monkeypatch.setenv("SEALED_JOBS_URL", f"sqlite:///{apps.jobs}")
    pytester.makeini(INI.format(database=database))
    pytester.makepyfile(sealed_app=APP)
    try:
        yield pytester, apps
    finally:
        apps.drop()


@pytest.mark.parametrize("workers", [0, 2], ids=["one process", "xdist"])
def test_every_way_to_the_apps_database_ends_on_the_test_database(
    sealed_suite: tuple[pytest.Pytester, AppDatabases], workers: int
) -> None:
    pytester, apps = sealed_suite
    before = apps.contents()
    pytester.makepyfile(test_reached=REACHED)
    if workers:
        result = pytester.runpytest_subprocess("-p", "xdist", "-n", str(workers))
    else:
        result = pytester.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(passed=15)
    assert apps.contents() == before


def test_an_engine_the_settings_name_is_pointed_at_the_test_database(
    sealed_suite: tuple[pytest.Pytester, AppDatabases],
) -> None:
    pytester, apps = sealed_suite
    before = apps.contents()
    pytester.makepyfile(test_refused=REFUSED)
    result = pytester.runpytest_inprocess(
        "-p", "no:randomly", "--fastsched-engine=sealed_app:elsewhere", "-k", "do_not_name"
    )
    result.assert_outcomes(passed=1)
    assert apps.contents() == before


def test_a_persistent_job_store_is_neither_read_nor_written(
    sealed_suite: tuple[pytest.Pytester, AppDatabases],
) -> None:
    pytester, apps = sealed_suite
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    # The app's real store, holding a job it persisted in production.
    store = SQLAlchemyJobStore(url=f"sqlite:///{apps.jobs}")
    real = BackgroundScheduler(jobstores={"default": store})
    real.add_job(print, "interval", hours=1, id="nightly", args=["real"])
    real.start(paused=True)
    real.shutdown()
    store.engine.dispose()
    before = apps.contents()
    pytester.makepyfile(test_reached=REACHED)
    result = pytester.runpytest_inprocess("-p", "no:randomly", "-k", "persistent")
    result.assert_outcomes(passed=1)
    assert apps.contents() == before


def test_a_store_whose_table_does_not_exist_yet(
    sealed_suite: tuple[pytest.Pytester, AppDatabases],
) -> None:
    pytester, apps = sealed_suite
    pytester.makepyfile(test_reached=REACHED)
    result = pytester.runpytest_inprocess("-p", "no:randomly", "-k", "persistent")
    result.assert_outcomes(passed=1)
    assert not apps.jobs.exists()


def _refusal(call: str, target: str, by: str, engine: str | None) -> re.Pattern[str]:
    """The refusal's message as a pattern: all of it, but the random test database."""
    through = f", through the SQLAlchemy engine {engine}" if engine else ""
    fix = (
        "Add that engine to fastsched_engine (or its sessionmaker to fastsched_sessionmaker) "
        "so that each test points it at the test database"
        if engine
        else "Connect through an engine named in fastsched_engine"
    )
    key = re.sub(r"//[^:@/]+:\*\*\*@", "//", target)
    return re.compile(
        re.escape(f"fastsched: database access not allowed: {call} to {target}, by {by}{through}")
        + re.escape(". A test that uses the plugin reaches only its test database (")
        + r"(sqlite:////\S+/test\.db|postgresql://postgres:\*\*\*@\S+/fastsched_\w+)"
        + re.escape(
            f"). {fix}, or allow this database with "
            f"@pytest.mark.fastsched(allow_databases=['{key}']) or the ini option "
            "fastsched_allow_databases. See "
            "https://github.com/pytest-fastsched/pytest-fastsched#the-seal"
        )
    )


def _job(job_id: str) -> str:
    return f"job {job_id!r} (scheduled 2030-01-01T00:05:00+00:00)"


TEST = "the test (its body or a fixture)"
LIFESPAN_OF_THE_APP = "the lifespan of the app 'sealed_app:app'"


def _shown(url: str) -> str:
    """A database as the refusal shows it: no driver, the password hidden, the port given."""
    if url.startswith("sqlite"):
        return "sqlite:///" + url.split(":///", 1)[1]
    match = re.match(r"postgresql(\+\w+)?://(\w+)@/(\w+)\?host=([^&]+)&port=(\d+)", url)
    assert match is not None, url
    _, user, database, host, port = match.groups()
    return f"postgresql://{user}:***@{host}:{port}/{database}"


def _engine(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def test_every_way_out_is_refused_with_the_fix(
    sealed_suite: tuple[pytest.Pytester, AppDatabases],
) -> None:
    pytester, apps = sealed_suite
    before = apps.contents()
    postgres = apps.server is not None
    pytester.makepyfile(
        test_refused=REFUSED,
        test_lifespan=LIFESPAN,
        test_drivers=REFUSED_POSTGRESQL if postgres else REFUSED_SQLITE,
    )
    result = pytester.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(failed=8 if postgres else 6, errors=2)
    target = _shown(apps.urls["elsewhere"])
    engine = _engine(apps.urls["elsewhere"])
    connect = "asyncpg.connect()" if postgres else "aiosqlite.connect()"
    path = apps.urls["elsewhere"].split(":///", 1)[-1]
    sync_call = "psycopg.connect()" if postgres else f"sqlite3.connect({path!r})"
    expected = [
        (connect, _job("elsewhere"), engine),
        (connect, _job("swallowing"), engine),
        (sync_call, _job("threaded"), _engine(apps.sync_elsewhere)),
        (connect, TEST, engine),
        (connect, LIFESPAN_OF_THE_APP, engine),
    ]
    if postgres:
        expected += [
            ("asyncpg.connect()", _job("raw"), None),
            ("asyncpg.connect()", _job("pooled"), None),
            ("psycopg.connect()", TEST, None),
            ("psycopg2.connect()", TEST, None),
        ]
    else:
        expected += [
            ("aiosqlite.connect()", _job("raw"), None),
            (f"sqlite3.connect({path!r})", _job("raw"), None),
        ]
    output = result.stdout.str()
    for call, by, through in expected:
        assert _refusal(call, target, by, through).search(output), (call, by)
    # The swallowed refusal still fails its test, by itself.
    result.stdout.fnmatch_lines(
        ["*_ test_a_refusal_the_job_swallows _*", "*DatabaseGuardError: fastsched: database*"]
    )
    assert apps.contents() == before

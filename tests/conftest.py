"""Fixtures shared by the plugin's own tests."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import shutil
import sqlite3
import tempfile
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# In-process pytester runs restore sys.modules afterwards: a C extension first imported by a
# user suite would be imported again by the next one, which crashes asyncpg. Imported here,
# the database stack outlives every inner run. So do APScheduler's triggers and executors,
# which it loads on first use and caches by class: a class cached from a module that an inner
# run imported, and that left sys.modules with it, would be out of freezegun's reach.
import aiosqlite  # noqa: F401
import apscheduler.executors.asyncio
import apscheduler.executors.pool
import apscheduler.jobstores.memory
import apscheduler.triggers.cron
import apscheduler.triggers.date
import apscheduler.triggers.interval  # noqa: F401
import asyncpg
import pytest
import sqlalchemy.dialects.postgresql.asyncpg
import sqlalchemy.dialects.sqlite.aiosqlite  # noqa: F401

import pytest_fastsched._db  # noqa: F401
from pytest_fastsched._postgres import EphemeralPostgres

# A user's app in the pattern the plugin serves: each step of a job is its own short session
# that commits; `observe` lets a test look at the database between the steps.
DB_APP = """
import os
from contextlib import asynccontextmanager

from sqlalchemy import DDL, MetaData, String, event, select, text, update
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    last_error: Mapped[str | None] = mapped_column(String(200))


# The production engine, on the suite's canary: the tests must never reach it.
engine = create_async_engine(os.environ["FASTSCHED_CANARY_URL"])
async_session_factory = async_sessionmaker(engine, expire_on_commit=False)
expiring_session_factory = async_sessionmaker(engine)  # expire_on_commit=True
broken_metadata = MetaData()
event.listen(broken_metadata, "after_create", DDL("THIS IS NOT SQL"))
empty_metadata = MetaData()  # as when the module of the models is never imported


@asynccontextmanager
async def get_background_session(factory=async_session_factory):
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except Exception:
            await session.rollback()
            raise


async def nothing(item_id, step):
    pass


async def process_pending(fail=(), observe=nothing):
    async with get_background_session() as session:
        query = select(Item.id).where(Item.status == "pending").order_by(Item.id)
        ids = list((await session.scalars(query)).all())
    for item_id in ids:
        async with get_background_session() as session:
            await session.execute(
                update(Item).where(Item.id == item_id).values(status="processing")
            )
        await observe(item_id, "processing")
        try:
            async with get_background_session() as session:
                item = await session.get(Item, item_id)
                item.status = "completed"
                await session.flush()
                if item_id in fail:
                    raise RuntimeError(f"boom {item_id}")
            await observe(item_id, "completed")
        except RuntimeError as error:
            await observe(item_id, "failed")
            async with get_background_session() as session:
                await session.execute(
                    text("UPDATE items SET status = 'error', last_error = :error WHERE id = :id"),
                    {"error": str(error), "id": item_id},
                )
            await observe(item_id, "error")
    return ids
"""


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[EphemeralPostgres]:
    """One PostgreSQL server for the database tests of this test process."""
    with EphemeralPostgres.start() as server:
        yield server


CANARY = os.environ.setdefault("FASTSCHED_CANARY_URL", "sqlite+aiosqlite:///never-used.db")
CANARY_ROWS = (
    "CREATE TABLE items (id INTEGER PRIMARY KEY, status VARCHAR(20), last_error VARCHAR(200));"
    "CREATE TABLE ticks (id INTEGER PRIMARY KEY, job VARCHAR(20), at VARCHAR(40));"
    "INSERT INTO items VALUES (100, 'pending', NULL), (101, 'completed', NULL);"
    "INSERT INTO ticks VALUES (100, 'production', '2026-11-29');"
)


class Canaries:
    """Production databases that every app of the plugin's own suites points at.

    A SQLite file and a PostgreSQL database outside the plugin's scratch databases, with
    rows in them: the apps' production engines (``FASTSCHED_CANARY_URL``) point at them, as
    a real app's configured engine points at its real database. Whatever the plugin lets
    reach them changes them; they are compared, whole, with how they started.
    """

    def __init__(self, directory: Path, server: EphemeralPostgres) -> None:
        self.sqlite = directory / "canary.db"
        self.server = server
        with sqlite3.connect(self.sqlite) as connection:
            connection.executescript(CANARY_ROWS)
        server.create_database("canary")
        in_a_thread(execute_sql(server.dsn("canary"), CANARY_ROWS))
        self.urls = {
            "sqlite": f"sqlite+aiosqlite:///{self.sqlite}",
            "postgresql": server.url("canary"),
        }
        self.start = self.contents()

    def contents(self) -> dict[str, object]:
        """Every byte of the SQLite file; every table and row of the PostgreSQL database."""
        rows = in_a_thread(_contents(self.server.dsn("canary")))
        return {"sqlite": hashlib.sha256(self.sqlite.read_bytes()).hexdigest(), "postgresql": rows}

    def assert_untouched(self) -> None:
        assert self.contents() == self.start, "a test reached the production canary"


def sync_url(url: str) -> str:
    """The URL of the same database for a sync engine: pysqlite, or psycopg 3."""
    return url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg")


@pytest.fixture(scope="session", autouse=True)
def canaries(
    postgres_server: EphemeralPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Canaries]:
    """The production canaries of this test process, checked after its last test."""
    canaries = Canaries(tmp_path_factory.mktemp("canary"), postgres_server)
    os.environ["FASTSCHED_CANARY_URL"] = canaries.urls["sqlite"]
    os.environ["REFERENCE_APP_DATABASE_URL"] = canaries.urls["sqlite"]
    os.environ["REFERENCE_APP_SYNC_DATABASE_URL"] = sync_url(canaries.urls["sqlite"])
    try:
        yield canaries
    finally:
        os.environ["FASTSCHED_CANARY_URL"] = CANARY
    canaries.assert_untouched()


async def execute_sql(dsn: str, sql: str) -> None:
    """Run ``sql`` on the PostgreSQL database of ``dsn``, on a connection of its own."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def _contents(dsn: str) -> list[object]:
    connection = await asyncpg.connect(dsn)
    try:
        tables = [
            row[0]
            for row in await connection.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            )
        ]
        found: list[object] = list(tables)
        for table in tables:
            found += [tuple(row) for row in await connection.fetch(f"SELECT * FROM {table}")]
        return found
    finally:
        await connection.close()


def in_a_thread(coroutine: Any) -> Any:
    """Run ``coroutine`` to its end in a thread, so that this thread's event loop stays as
    pytest-asyncio set it."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, coroutine).result()


@pytest.fixture
def user_tmpdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The temporary directory of the user suites the test runs, in process or not.

    Outside pytest's own temporary directories, which the ``postgres`` user that runs an
    ephemeral server cannot enter.
    """
    directory = Path(tempfile.mkdtemp(prefix="fastsched-tests-"))
    directory.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    monkeypatch.setenv("TMPDIR", str(directory))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    """The ``fastsched_database`` of a user suite: SQLite, or the shared server by URL.

    After the test, neither the suite's temporary directory nor the server may hold anything
    the plugin made.
    """
    server = request.getfixturevalue("postgres_server") if request.param != "sqlite" else None
    scratch = request.getfixturevalue("user_tmpdir")
    if server is not None:  # the apps' production database is on the same server
        canary = request.getfixturevalue("canaries").urls["postgresql"]
        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setenv("FASTSCHED_CANARY_URL", canary)
        monkeypatch.setenv("REFERENCE_APP_DATABASE_URL", canary)
        monkeypatch.setenv("REFERENCE_APP_SYNC_DATABASE_URL", sync_url(canary))
    yield "sqlite" if server is None else server.url()
    assert list(scratch.iterdir()) == []
    if server is not None:
        assert scratch_databases(server) == []


def scratch_databases(server: EphemeralPostgres) -> list[str]:
    """The databases the plugin made on ``server`` and did not drop."""

    async def names() -> list[str]:
        connection = await asyncpg.connect(server.dsn())
        try:
            rows = await connection.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE 'fastsched%'"
            )
        finally:
            await connection.close()
        return sorted(row["datname"] for row in rows)

    # In a thread, so that this thread's event loop stays as pytest-asyncio set it.
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, names()).result()


# pytest-asyncio 1.0 asks the thread for its event loop around every async test, and asyncio
# makes one, never closed, for a main thread that never set one: say that it has none. (A loop
# dropped unclosed is reported by whichever test happens to run when it is collected.)
asyncio.set_event_loop(None)


@pytest.fixture(autouse=True)
def _thread_loop_of_inner_runs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Give the in-process runs of a pytester test a thread event loop, closed after it.

    pytest-asyncio 1.0 in an inner run uses the thread's loop; any other loop an inner run
    leaves set is closed too.
    """
    if "pytester" not in request.fixturenames:
        yield
        return
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield
    finally:
        left = _thread_loop()
        asyncio.set_event_loop(None)
        for each in (loop, left):
            if each is not None and not each.is_closed():
                each.close()


def _thread_loop() -> asyncio.AbstractEventLoop | None:
    """The loop set for this thread, if any, without making one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            return None


@pytest.fixture
def make_db_suite(pytester: pytest.Pytester) -> Callable[[str], pytest.Pytester]:
    """Make a user project on a database: ``app.py`` (:data:`DB_APP`) and an ini for it."""
    return functools.partial(_write_db_suite, pytester)


def _write_db_suite(pytester: pytest.Pytester, database: str) -> pytest.Pytester:
    pytester.makepyfile(app=DB_APP)
    pytester.makeini(
        f"""
        [pytest]
        asyncio_mode = strict
        asyncio_default_fixture_loop_scope = function
        filterwarnings = error
        fastsched_database = {database}
        fastsched_sessionmaker = app:async_session_factory
        fastsched_metadata = app:Base.metadata
        """
    )
    return pytester


@pytest.fixture
def db_suite(make_db_suite: Callable[[str], pytest.Pytester], database: str) -> pytest.Pytester:
    """A user project (see ``make_db_suite``) on the ``database`` of the test."""
    return make_db_suite(database)

"""``fastsched_db``: every commit of a job is visible during the test and gone after it.

Each test runs a small user suite (``db_suite``, see conftest) on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, insert, select
from sqlalchemy.ext.asyncio import create_async_engine

from pytest_fastsched import _testdb

NO_RANDOM_ORDER = ("-p", "no:randomly")

# What the test sees between the steps of `process_pending` (conftest.DB_APP): every commit,
# the failing block of item 2 undone while its earlier "processing" stays, then the error.
JOB_STEPS = """
import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import app

URLS = []


async def run_job_and_observe(fastsched_db):
    await fastsched_db.insert("items", [{"id": 1}, {"id": 2}])
    seen = []

    async def observe(item_id, step):
        seen.append((item_id, step, await fastsched_db.status_of("items", item_id)))

    assert await app.process_pending(fail={2}, observe=observe) == [1, 2]
    assert seen == [
        (1, "processing", "processing"),
        (1, "completed", "completed"),
        (2, "processing", "processing"),
        (2, "failed", "processing"),
        (2, "error", "error"),
    ]
    assert await fastsched_db.fetch("items", status="error") == [
        {"id": 2, "status": "error", "last_error": "boom 2"}
    ]
    URLS.append(fastsched_db.url)


@pytest.mark.asyncio
async def test_rollback_sees_each_commit(fastsched_db):
    assert fastsched_db.isolation == "rollback"
    await run_job_and_observe(fastsched_db)


@pytest.mark.asyncio
@pytest.mark.fastsched(isolation="commit")
async def test_commit_sees_each_commit(fastsched_db):
    assert fastsched_db.isolation == "commit"
    await run_job_and_observe(fastsched_db)
    # Really committed: another connection sees the rows.
    async with fastsched_db.engine.connect() as other:
        assert (await other.execute(text("SELECT count(*) FROM items"))).scalar() == 2


def test_tables_are_back_to_their_start_state_for_a_fresh_connection():
    assert len(set(URLS)) == 1

    async def count():
        engine = create_async_engine(URLS[0])
        try:
            async with engine.connect() as connection:
                return (await connection.execute(text("SELECT count(*) FROM items"))).scalar()
        finally:
            await engine.dispose()

    # In a thread: asyncio.run() here would unset the event loop of this thread, which
    # pytest-asyncio 1.0 looks up for the next test on a session loop.
    with ThreadPoolExecutor(1) as thread:
        assert thread.submit(asyncio.run, count()).result() == 0


@pytest.mark.asyncio
async def test_the_next_test_starts_empty(fastsched_db):
    assert await fastsched_db.fetch("items") == []
"""

# pytest-asyncio 1.0 finds a session loop through the thread's current event loop, which an
# in-process run shares with the outer test run: session loops get a process of their own.
LOOP_SETTINGS = {
    "strict mode, function loops": ("runpytest_inprocess",),
    "auto mode": ("runpytest_inprocess", "-o", "asyncio_mode=auto"),
    "session loops": (
        "runpytest_subprocess",
        "-o",
        "asyncio_default_fixture_loop_scope=session",
        "-o",
        "asyncio_default_test_loop_scope=session",
    ),
}


@pytest.mark.parametrize("loops", LOOP_SETTINGS.values(), ids=LOOP_SETTINGS.keys())
def test_each_commit_is_seen_during_the_test_and_gone_after_it(
    db_suite: pytest.Pytester, loops: tuple[str, ...]
) -> None:
    db_suite.makepyfile(test_job=JOB_STEPS)
    run, *options = loops
    getattr(db_suite, run)(*NO_RANDOM_ORDER, *options).assert_outcomes(passed=4)


SESSION_SETTINGS = """
import os

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

import app

ORIGINAL = dict(app.async_session_factory.kw)


@pytest.mark.asyncio
async def test_rollback_binds_the_test_connection_and_keeps_the_rest(fastsched_db):
    kw = app.async_session_factory.kw
    assert isinstance(kw["bind"], AsyncConnection)
    assert kw["join_transaction_mode"] == "create_savepoint"
    assert kw["expire_on_commit"] is False
    assert app.async_session_factory.class_ is AsyncSession
    joined = {**ORIGINAL, "join_transaction_mode": "create_savepoint"}
    assert {**kw, "bind": ORIGINAL["bind"]} == joined


@pytest.mark.asyncio
@pytest.mark.fastsched(isolation="commit")
async def test_commit_binds_the_test_engine_and_keeps_the_rest(fastsched_db):
    kw = app.async_session_factory.kw
    assert kw["bind"] is fastsched_db.engine
    assert isinstance(kw["bind"], AsyncEngine)
    assert {**kw, "bind": ORIGINAL["bind"]} == ORIGINAL


@pytest.mark.asyncio
async def test_the_apps_engine_is_the_test_engines_for_the_test(fastsched_db):
    assert app.engine.url == fastsched_db.engine.url
    assert app.engine.pool is fastsched_db.engine.pool


def test_the_app_settings_are_restored_after_the_test():
    assert app.async_session_factory.kw == ORIGINAL
    assert app.async_session_factory.kw["bind"] is app.engine
    assert app.engine.url == make_url(os.environ["FASTSCHED_CANARY_URL"])
"""


def test_the_apps_session_settings_are_kept_and_restored(db_suite: pytest.Pytester) -> None:
    db_suite.makepyfile(test_settings=SESSION_SETTINGS)
    db_suite.runpytest_inprocess(*NO_RANDOM_ORDER).assert_outcomes(passed=4)


# pytest-asyncio's default: a new loop per test. Two tasks wait for the test connection at
# once (a lock of SQLAlchemy's adapter then belongs to that test's loop).
ONE_ENGINE = """
import asyncio

import pytest

SEEN = []


def select_one(connection):
    cursor = connection.connection.dbapi_connection.cursor()
    cursor.execute("SELECT 1")
    cursor.close()


async def use_the_test_connection(fastsched_db):
    async with fastsched_db.connection() as connection:
        await asyncio.gather(*(connection.run_sync(select_one) for _ in range(3)))
        raw = await connection.get_raw_connection()
        SEEN.append((fastsched_db.engine, raw.driver_connection))


@pytest.mark.asyncio
@pytest.mark.parametrize("n", range(3))
async def test_a_loop_of_its_own(fastsched_db, n):
    await use_the_test_connection(fastsched_db)


@pytest.mark.asyncio
@pytest.mark.fastsched(isolation="commit")
async def test_commit(fastsched_db):
    await use_the_test_connection(fastsched_db)


def test_one_engine_served_every_loop():
    engines = {id(engine) for engine, _ in SEEN}
    connections = {id(connection) for _, connection in SEEN}
    assert len(SEEN) == 4 and len(engines) == 1
    # asyncpg's connections belong to their loop; aiosqlite's pass to the next loop.
    assert len(connections) == (1 if SEEN[0][0].dialect.name == "sqlite" else 4)
"""


def test_one_engine_serves_every_loop_and_sqlite_keeps_its_connection(
    db_suite: pytest.Pytester,
) -> None:
    db_suite.makepyfile(test_engine=ONE_ENGINE)
    db_suite.runpytest_inprocess(*NO_RANDOM_ORDER).assert_outcomes(passed=5)


ISOLATION_SETTING = """
import pytest


@pytest.mark.asyncio
async def test_the_setting_is_the_default(fastsched_db):
    assert fastsched_db.isolation == "commit"


@pytest.mark.asyncio
@pytest.mark.fastsched(isolation="rollback")
async def test_the_marker_wins(fastsched_db):
    assert fastsched_db.isolation == "rollback"
"""


LATE_MARKER = """
import pytest


@pytest.fixture
def commit_isolation(request):
    request.applymarker(pytest.mark.fastsched(isolation="commit"))


@pytest.mark.asyncio
async def test_applied_in_a_fixture_the_database_comes_after(commit_isolation, fastsched_db):
    assert fastsched_db.isolation == "commit"


@pytest.mark.asyncio
async def test_applied_in_the_test_body(request, fastsched_db):
    request.applymarker(pytest.mark.fastsched(isolation="commit"))
"""


def test_a_marker_applied_too_late_fails_the_test(db_suite: pytest.Pytester) -> None:
    db_suite.makepyfile(test_late=LATE_MARKER)
    result = db_suite.runpytest_inprocess(*NO_RANDOM_ORDER)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "a fastsched marker was applied to test_late.py::test_applied_in_the_test_body "
            "after the plugin's fixtures were set up, so it changed nothing: "
            "isolation='commit' (the fixtures used None). Put the marker on the test (or its "
            "class or module), or apply it in a fixture that the plugin's fixtures come after."
        ]
    )


def test_fastsched_isolation_sets_the_suites_default(db_suite: pytest.Pytester) -> None:
    db_suite.makepyfile(test_isolation=ISOLATION_SETTING)
    result = db_suite.runpytest_inprocess(*NO_RANDOM_ORDER, "-o", "fastsched_isolation=commit")
    result.assert_outcomes(passed=2)


HELPERS = """
import pytest

import app


@pytest.mark.asyncio
async def test_helpers(fastsched_db):
    assert fastsched_db.dialect == DIALECT
    assert fastsched_db.url.startswith(URL_START)
    await fastsched_db.insert("items", {"id": 7, "status": "pending"})
    await fastsched_db.insert(app.Item.__table__, [{"id": 8, "status": "done"}])
    assert await fastsched_db.fetch("items") == [
        {"id": 7, "status": "pending", "last_error": None},
        {"id": 8, "status": "done", "last_error": None},
    ]
    assert await fastsched_db.value_of("items", 8, "status") == "done"
    async with fastsched_db.background_session() as session:
        (await session.get(app.Item, 7)).status = "processing"
    assert await fastsched_db.status_of("items", 7) == "processing"
    with pytest.raises(RuntimeError):
        async with fastsched_db.background_session() as session:
            (await session.get(app.Item, 7)).status = "lost"
            await session.flush()
            raise RuntimeError
    assert await fastsched_db.status_of("items", 7) == "processing"


@pytest.mark.asyncio
async def test_the_apps_next_insert_gets_a_new_id(fastsched_db):
    await fastsched_db.insert("items", [{"id": 1}, {"id": 2}])
    async with fastsched_db.background_session() as session:
        session.add(app.Item(status="new"))
    assert [row["id"] for row in await fastsched_db.fetch("items", status="new")] == [3]


@pytest.mark.asyncio
async def test_a_missing_row_fails(fastsched_db):
    await fastsched_db.status_of("items", 99)


@pytest.mark.asyncio
async def test_an_unknown_column_names_the_columns(fastsched_db):
    await fastsched_db.fetch("items", stauts="pending")


@pytest.mark.asyncio
async def test_a_table_outside_the_metadata_is_reflected(fastsched_db):
    async with fastsched_db.background_session() as session:
        await session.execute(app.text("CREATE TABLE extra (id INTEGER PRIMARY KEY, note TEXT)"))
    await fastsched_db.insert("extra", {"id": 1, "note": "reflected"})
    assert await fastsched_db.value_of("extra", 1, "note") == "reflected"
    await fastsched_db.fetch("no_such_table")
"""


def test_the_helpers_insert_fetch_and_read_columns(
    db_suite: pytest.Pytester, database: str
) -> None:
    dialect, url_start = (
        ("sqlite", "sqlite+aiosqlite:///")
        if database == "sqlite"
        else ("postgresql", "postgresql+asyncpg://")
    )
    db_suite.makepyfile(
        test_helpers=f"DIALECT = {dialect!r}\nURL_START = {url_start!r}\n" + HELPERS
    )
    result = db_suite.runpytest_inprocess(*NO_RANDOM_ORDER, "--tb=short")
    result.assert_outcomes(passed=2, failed=3)
    result.stdout.fnmatch_lines(["E   AssertionError: items has no row with id=99"])
    result.stdout.fnmatch_lines(
        ["E   KeyError: \"items has no column 'stauts'; its columns: id, status, last_error\""]
    )
    result.stdout.fnmatch_lines(
        [
            "E   LookupError: fastsched_db: the test database has no table 'no_such_table' "
            "(tables: extra, items). fastsched_metadata = 'app:Base.metadata' does not define "
            "it either (its tables: items): check the name, or import the module of its model."
        ]
    )


XDIST_WORKERS = """
import os
import time

import pytest

import app


async def insert_and_wait_for_the_other_worker(fastsched_db, barrier):
    worker = os.environ["PYTEST_XDIST_WORKER"]
    row_id = int(worker.removeprefix("gw")) + 1
    await fastsched_db.insert("items", {"id": row_id, "status": worker})
    barrier.mkdir(parents=True, exist_ok=True)
    (barrier / worker).write_text(fastsched_db.url)
    deadline = time.monotonic() + 60
    while len(list(barrier.iterdir())) < 2:
        assert time.monotonic() < deadline, "the other worker never inserted its row"
        time.sleep(0.05)
    assert await fastsched_db.fetch("items") == [
        {"id": row_id, "status": worker, "last_error": None}
    ]


@pytest.mark.asyncio
async def test_rollback(fastsched_db):
    await insert_and_wait_for_the_other_worker(fastsched_db, BARRIER / "rollback")


@pytest.mark.asyncio
@pytest.mark.fastsched(isolation="commit")
async def test_commit(fastsched_db):
    await insert_and_wait_for_the_other_worker(fastsched_db, BARRIER / "commit")
"""


def test_xdist_workers_get_a_database_each(
    make_db_suite: Callable[[str], pytest.Pytester], tmp_path: Path, database: str
) -> None:
    """Each worker sees only its own rows, committed or not, in a database of its own."""
    _run_two_workers(make_db_suite(database), tmp_path / "barrier")


def test_xdist_workers_share_the_plugins_own_server(
    make_db_suite: Callable[[str], pytest.Pytester], tmp_path: Path, user_tmpdir: Path
) -> None:
    """``postgresql``: one server for both workers, stopped and removed after the run."""
    _run_two_workers(make_db_suite("postgresql"), tmp_path / "barrier")
    assert list(user_tmpdir.iterdir()) == []


def _run_two_workers(pytester: pytest.Pytester, barrier: Path) -> None:
    pytester.makepyfile(
        test_workers=f"from pathlib import Path\nBARRIER = Path({str(barrier)!r})\n"
        + XDIST_WORKERS
    )
    result = pytester.runpytest_subprocess(
        "-p", "xdist", "-n", "2", "--dist", "each", *NO_RANDOM_ORDER
    )
    result.assert_outcomes(passed=4)
    for isolation in ("rollback", "commit"):
        urls = {path.read_text() for path in (barrier / isolation).iterdir()}
        assert len(urls) == 2


def test_sqlite_needs_the_savepoint_workaround(tmp_path: Path) -> None:
    """Without it, a released savepoint survives the outer rollback: the data would leak."""
    table = Table("t", MetaData(), Column("id", Integer, primary_key=True))
    url = f"sqlite+aiosqlite:///{tmp_path / 'leak.db'}"

    async def rows_left_after_rollback(with_workaround: bool) -> list[int]:
        engine = _testdb.create_engine(url) if with_workaround else create_async_engine(url)
        try:
            async with engine.begin() as connection:
                await connection.run_sync(table.metadata.drop_all)
                await connection.run_sync(table.metadata.create_all)
            async with engine.connect() as connection:
                await connection.begin()
                async with connection.begin_nested():
                    await connection.execute(insert(table).values(id=1))
                await connection.rollback()
            async with engine.connect() as connection:
                return list((await connection.execute(select(table.c.id))).scalars())
        finally:
            await engine.dispose()

    with ThreadPoolExecutor(1) as thread:  # this thread's event loop stays as it is
        assert thread.submit(asyncio.run, rows_left_after_rollback(False)).result() == [1]
        assert thread.submit(asyncio.run, rows_left_after_rollback(True)).result() == []

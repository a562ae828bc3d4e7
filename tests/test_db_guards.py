"""The guards of ``fastsched_db``: each way out of the isolation fails the test, naming the fix.

Jobs catch their own exceptions, so each guard error is also recorded and fails a test that
would otherwise pass.
"""

from __future__ import annotations

import pytest
from conftest import Canaries

GUARDED = """
import asyncio

import pytest
from sqlalchemy import text

import app


async def swallowing(job):
    try:
        await job
    except Exception:
        pass  # as the app's jobs do: log it and carry on


async def write_through(engine):
    async with engine.begin() as connection:
        await connection.execute(text("INSERT INTO items (id, status) VALUES (9, 'leak')"))


@pytest.mark.asyncio
async def test_second_connection(fastsched_db):
    await swallowing(write_through(fastsched_db.engine))


@pytest.mark.asyncio
async def test_the_apps_own_engine_joins_the_test_connection(fastsched_db):
    await write_through(app.engine)
    assert await fastsched_db.fetch("items") == [{"id": 9, "status": "leak", "last_error": None}]


async def step_by_step(name):
    async with app.get_background_session() as session:
        await session.execute(text("SELECT 1"))
        await asyncio.sleep(0)
        await session.execute(text("SELECT 2"))


@pytest.mark.asyncio
async def test_overlapping_jobs(fastsched_db):
    await asyncio.gather(swallowing(step_by_step("a")), swallowing(step_by_step("b")))


@pytest.mark.asyncio
@pytest.mark.fastsched(isolation="commit")
async def test_overlapping_jobs_under_commit_isolation(fastsched_db):
    await asyncio.gather(step_by_step("a"), step_by_step("b"))


@pytest.mark.asyncio
async def test_vacuum(fastsched_db):
    async with app.get_background_session() as session:
        await session.execute(text("VACUUM"))


@pytest.mark.asyncio
async def test_create_index_concurrently(fastsched_db):
    async with app.get_background_session() as session:
        await session.execute(text("CREATE INDEX CONCURRENTLY ix_status ON items (status)"))


@pytest.mark.asyncio(loop_scope="module")
async def test_another_loop(fastsched_db):
    await fastsched_db.insert("items", {"id": 1})
"""

SECOND_CONNECTION = (
    "fastsched_db: a second connection to the test database was opened during a "
    "rollback-isolated test. Only the test connection is rolled back at the end: this "
    "connection's writes would really commit and leak into later tests. Open sessions "
    "through the app's sessionmaker (it is bound to the test connection), or mark the test "
    "@pytest.mark.fastsched(isolation='commit') for work that needs several connections."
)
OVERLAP = (
    "fastsched_db: two {what} used the shared test connection at the same time: "
    "{owner} still had a session transaction open when {intruder} used the connection.{note} "
    "Under rollback isolation every session shares one connection, so jobs that overlap "
    "(max_instances > 1, several replicas, jobs due together, asyncio.gather) cannot run at "
    "once. Mark the test @pytest.mark.fastsched(isolation='commit') to give each session its "
    "own connection, or let the jobs run one after another."
)
NOT_IN_A_TRANSACTION = (
    "fastsched_db: {!r} cannot run inside a transaction, and under rollback isolation "
    "every statement runs inside the test's outer transaction. Mark the test "
    "@pytest.mark.fastsched(isolation='commit') and run it on an AUTOCOMMIT connection (as "
    "in production), or leave it to the migrations."
)
ANOTHER_LOOP = (
    "fastsched_db: the test connection was used from another event loop than the one "
    "fastsched_db was set up on; database connections cannot move between loops. Run the "
    "test and its async fixtures on one loop: give them the same loop scope "
    "(asyncio_default_fixture_loop_scope = asyncio_default_test_loop_scope, or the same "
    "@pytest.mark.asyncio(loop_scope=...)), and do not run database code in an event loop "
    "of another thread."
)


def test_each_guard_fails_the_test_with_its_fix(
    db_suite: pytest.Pytester, canaries: Canaries
) -> None:
    db_suite.makepyfile(test_guarded=GUARDED)
    result = db_suite.runpytest_inprocess("-p", "no:randomly", "--tb=short")
    result.assert_outcomes(passed=2, failed=5)
    error = "E   pytest_fastsched.DatabaseGuardError: "
    for test, message in [
        ("test_second_connection", SECOND_CONNECTION),
        (
            "test_overlapping_jobs",
            OVERLAP.format(
                what="tasks",
                owner="task 'Task-*' (swallowing)",
                intruder="task 'Task-*' (swallowing)",
                note="",
            ),
        ),
        ("test_vacuum", NOT_IN_A_TRANSACTION.format("VACUUM")),
        (
            "test_create_index_concurrently",
            NOT_IN_A_TRANSACTION.format("CREATE INDEX CONCURRENTLY ix_status"),
        ),
        ("test_another_loop", ANOTHER_LOOP),
    ]:
        result.stdout.fnmatch_lines([f"_* {test} _*", error + message])
    # The app's own engine wrote to the test database, never to the app's.
    canaries.assert_untouched()
    # Each error is reported once: the test's own failure is not repeated in a section.
    assert "fastsched_db guard" not in result.stdout.str()


DUE_TOGETHER = """
import asyncio

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import text

import app

scheduler = AsyncIOScheduler(timezone="UTC")


async def step_by_step():
    async with app.get_background_session() as session:
        await session.execute(text("SELECT 1"))
        await asyncio.sleep(1)
        await session.execute(text("SELECT 2"))


async def test_two_jobs_due_at_midnight(fastsched_clock, fastsched_scheduler, fastsched_db):
    fastsched_scheduler.attach(scheduler)
    for job_id in ("five_minutes", "nightly"):
        scheduler.add_job(step_by_step, "cron", hour=0, minute=5, id=job_id)
    await fastsched_clock.advance(minutes=5)
"""


def test_jobs_due_at_the_same_instant_are_named_with_their_time(
    db_suite: pytest.Pytester,
) -> None:
    db_suite.makepyfile(test_due=DUE_TOGETHER)
    result = db_suite.runpytest_inprocess("-p", "no:randomly", "-o", "asyncio_mode=auto")
    result.assert_outcomes(failed=1)
    due = "2030-01-01T00:05:00+00:00"
    result.stdout.fnmatch_lines(
        [
            "*DatabaseGuardError: "
            + OVERLAP.format(
                what="jobs",
                owner=f"job '*' (scheduled {due})",
                intruder=f"job '*' (scheduled {due})",
                note=f" Both were due at {due}: jobs due at the same instant run at once.",
            )
        ]
    )


UNREPORTED = """
import pytest

import app


@pytest.mark.asyncio
async def test_a_swallowed_guard_error_explains_a_failure(fastsched_db):
    await fastsched_db.insert("items", {"id": 1})
    try:
        async with fastsched_db.engine.begin() as connection:
            await connection.exec_driver_sql("UPDATE items SET status = 'completed'")
    except Exception:
        pass
    assert await fastsched_db.status_of("items", 1) == "completed"
"""


def test_a_guard_error_behind_another_failure_is_shown_beside_it(
    db_suite: pytest.Pytester,
) -> None:
    db_suite.makepyfile(test_unreported=UNREPORTED)
    result = db_suite.runpytest_inprocess("--tb=short")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E   AssertionError: assert 'pending' == 'completed'"])
    result.stdout.fnmatch_lines(["-* fastsched_db guard -*", SECOND_CONNECTION], consecutive=True)


MISSING_GREENLET = """
import pytest

import app


@pytest.mark.asyncio
async def test_an_expired_attribute_read_after_commit(fastsched_db):
    await fastsched_db.insert("items", {"id": 1})
    async with app.expiring_session_factory() as session:
        item = await session.get(app.Item, 1)
        item.status = "completed"
        await session.commit()
        assert item.status == "completed"
"""


def test_missing_greenlet_gets_a_hint(db_suite: pytest.Pytester) -> None:
    db_suite.makepyfile(test_greenlet=MISSING_GREENLET)
    # In a process of its own: on SQLite, MissingGreenlet leaves an aiosqlite coroutine that
    # is never awaited (inside SQLAlchemy), and its RuntimeWarning would hit a later test.
    result = db_suite.runpytest_subprocess(
        "--tb=short", "--fastsched-sessionmaker=app:expiring_session_factory"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E   sqlalchemy.exc.MissingGreenlet: *"])
    result.stdout.fnmatch_lines(
        [
            "-* pytest-fastsched hint -*",
            "MissingGreenlet: SQLAlchemy had to do database I/O where it could not be awaited. "
            "Usual causes:",
            "- an attribute read after commit(): commit expires the loaded objects "
            "(expire_on_commit=True, the default), so the next read reloads it implicitly; "
            "read the values before the commit, `await session.refresh(obj)`, or build the "
            "sessionmaker with expire_on_commit=False;",
            "- a lazy-loaded relationship: load it eagerly (`selectinload(...)`) or read it "
            "with `await obj.awaitable_attrs.<name>`;",
            "- a synchronous Session or engine call made from async code.",
            "pytest-fastsched keeps the app's session settings as the app set them: this fails "
            "in production too.",
        ],
        consecutive=True,
    )

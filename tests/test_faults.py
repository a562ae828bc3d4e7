"""``fastsched_faults``: chosen statements fail with the driver's own errors, for one test."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pytest_fastsched._postgres import EphemeralPostgres

NO_RANDOM_ORDER = ("-p", "no:randomly")

FAULTS = """
import pytest
import sqlalchemy.exc


@pytest.mark.asyncio
async def test_the_nth_match_fails_as_the_driver_fails(fastsched_db, fastsched_faults):
    fault = fastsched_faults.fail("^INSERT INTO items", nth=2)
    await fastsched_db.insert("items", {"id": 1})
    with pytest.raises(sqlalchemy.exc.DBAPIError) as failure:
        await fastsched_db.insert("items", {"id": 2})
    await fastsched_db.insert("items", {"id": 3})
    assert fault.fired == 1
    assert [row["id"] for row in await fastsched_db.fetch("items")] == [1, 3]
    print("caught", type(failure.value).__name__, type(failure.value.orig).__module__,
          type(failure.value.orig).__name__, "|", str(failure.value.orig))


@pytest.mark.asyncio
@pytest.mark.fastsched(isolation="commit")
async def test_a_disconnect_invalidates_the_connection(fastsched_db, fastsched_faults):
    fastsched_faults.fail("^INSERT INTO items", error="disconnect")
    with pytest.raises(sqlalchemy.exc.DBAPIError) as failure:
        await fastsched_db.insert("items", {"id": 1})
    assert failure.value.connection_invalidated
    await fastsched_db.insert("items", {"id": 2})
    assert [row["id"] for row in await fastsched_db.fetch("items")] == [2]


@pytest.mark.asyncio
async def test_the_next_test_has_no_fault(fastsched_db):
    await fastsched_db.insert("items", [{"id": 1}, {"id": 2}])
    assert len(await fastsched_db.fetch("items")) == 2


@pytest.mark.asyncio
async def test_a_fault_that_never_fires_fails_the_test(fastsched_db, fastsched_faults):
    fastsched_faults.fail("^UPDATE nothing", nth=2, times=3)


@pytest.mark.asyncio
async def test_bad_faults_name_the_fix(fastsched_db, fastsched_faults):
    with pytest.raises(ValueError) as bad_kind:
        fastsched_faults.fail("x", error="timeout")
    with pytest.raises(ValueError) as bad_nth:
        fastsched_faults.fail("x", nth=0)
    with pytest.raises(ValueError) as disconnect:
        fastsched_faults.fail("x", error="disconnect")
    print("kind |", bad_kind.value)
    print("nth |", bad_nth.value)
    print("disconnect |", disconnect.value)
    if fastsched_db.dialect == "sqlite":
        with pytest.raises(ValueError) as serialization:
            fastsched_faults.fail("x", error="serialization")
        print("serialization |", serialization.value)
"""

# Older SQLAlchemy releases put the driver's exception class before the message: "| *".
CAUGHT = {
    "sqlite": "caught OperationalError sqlite3 OperationalError | *database is locked",
    "postgresql": (
        "caught DBAPIError sqlalchemy.dialects.postgresql.asyncpg Error | *canceling statement "
        "due to statement timeout"
    ),
}


def test_faults_fail_the_chosen_statements_for_one_test(
    db_suite: pytest.Pytester, database: str
) -> None:
    db_suite.makepyfile(test_user_faults=FAULTS)
    result = db_suite.runpytest_inprocess(*NO_RANDOM_ORDER, "-s", "-q")
    result.assert_outcomes(passed=5, errors=1)
    dialect = "sqlite" if database == "sqlite" else "postgresql"
    result.stdout.fnmatch_lines([CAUGHT[dialect]])
    result.stdout.fnmatch_lines(
        [
            "*kind | fastsched_faults.fail(error='timeout'): use one of 'operational', "
            "'serialization', 'disconnect'",
            "nth | fastsched_faults.fail(nth=0): give an int of at least 1",
            "disconnect | fastsched_faults.fail(error='disconnect') needs "
            "@pytest.mark.fastsched(isolation='commit'): under rollback isolation the dropped "
            "connection would be the test connection, and every later statement of the test "
            "would fail with it",
        ],
        consecutive=True,
    )
    if dialect == "sqlite":
        result.stdout.fnmatch_lines(
            [
                "serialization | fastsched_faults.fail(error='serialization') needs PostgreSQL: "
                "SQLite runs one writer at a time and never fails a transaction with a "
                "serialization error"
            ]
        )
    result.stdout.fnmatch_lines(
        [
            "fastsched_faults: declared faults never fired, so the test did not exercise the "
            "failure it declares:",
            "  fail('^UPDATE nothing', nth=2, times=3, error='operational'): 0 matching "
            "statements",
            "Check the pattern against the SQL the driver gets (PostgreSQL parameters read $1, "
            "SQLite's ?), and nth.",
        ],
        consecutive=True,
    )


# Hangs: the clock's real-time watchdog fails the clock call, naming the job, the virtual
# time and what its task awaits. (A job blocking its thread: tests/test_clock.py.)
HANGS = """
import asyncio
import time

import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import text

import app
from pytest_fastsched._clock import WatchdogTimeout


async def spin():
    while True:
        await asyncio.sleep(0)


async def wait_for_the_row_lock():
    async with app.get_background_session() as session:
        await session.execute(text("UPDATE items SET status = 'processing' WHERE id = 1"))


@pytest.fixture
def scheduler(fastsched_scheduler):
    fastsched_scheduler.attach(AsyncIOScheduler(timezone="UTC"))
    return fastsched_scheduler.scheduler


@pytest.mark.asyncio
async def test_spin(fastsched_clock, scheduler):
    fastsched_clock.watchdog_seconds = 0.5
    scheduler.add_job(spin, "interval", minutes=5, id="spin")
    began = time.monotonic()
    with pytest.raises(WatchdogTimeout) as timeout:
        await fastsched_clock.advance(minutes=10)
    assert time.monotonic() - began < 5
    print("HANG", str(timeout.value).replace(chr(10), " | "))


@pytest.mark.asyncio
@pytest.mark.fastsched(isolation="commit")
async def test_lock_wait(fastsched_clock, fastsched_db, scheduler):
    fastsched_clock.watchdog_seconds = 0.5
    await fastsched_db.insert("items", {"id": 1})
    scheduler.add_job(wait_for_the_row_lock, "interval", minutes=5, id="locked")
    async with fastsched_db.engine.connect() as holder:
        await holder.execute(text("SELECT id FROM items WHERE id = 1 FOR UPDATE"))
        began = time.monotonic()
        with pytest.raises(WatchdogTimeout) as timeout:
            await fastsched_clock.advance(minutes=10)
        assert time.monotonic() - began < 5
        await holder.rollback()
    print("HANG", str(timeout.value).replace(chr(10), " | "))


@pytest.mark.asyncio
async def test_the_next_test_runs_normally(fastsched_clock, scheduler):
    done = []
    scheduler.add_job(done.append, "interval", minutes=5, args=[1], id="fine")
    await fastsched_clock.advance(minutes=10)
    assert done == [1, 1]
"""


def test_hangs_fail_within_the_watchdog_limit_naming_the_job(
    make_db_suite: Callable[[str], pytest.Pytester], postgres_server: EphemeralPostgres
) -> None:
    suite = make_db_suite(postgres_server.url())
    suite.makepyfile(test_hangs=HANGS)
    result = suite.runpytest_inprocess(*NO_RANDOM_ORDER, "-s", "-q")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*HANG fastsched watchdog: work did not finish within 0.5 real seconds at virtual "
            "2030-01-01T00:05:00+00:00. | Still running: |   job 'spin' (scheduled "
            "2030-01-01T00:05:00+00:00) |     task * awaits * in sleep (*asyncio*tasks.py:*) | *",
            "*HANG fastsched watchdog: work did not finish within 0.5 real seconds at virtual "
            "2030-01-01T00:05:00+00:00. | Still running: |   job 'locked' (scheduled "
            "2030-01-01T00:05:00+00:00) |     task * awaits * in __do_execute (*asyncpg*) | *",
        ]
    )

"""``@pytest.mark.fastsched(replicas=N)``: N copies of the app's scheduler on one clock."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from pytest_fastsched import SchedulerHarness, VirtualClock
from pytest_fastsched._clock import ClockError
from pytest_fastsched._postgres import EphemeralPostgres
from pytest_fastsched._records import RunRef

UTC = dt.timezone.utc
START = dt.datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def scheduler(fastsched_scheduler: SchedulerHarness) -> AsyncIOScheduler:
    app_scheduler = AsyncIOScheduler(timezone="UTC")
    fastsched_scheduler.attach(app_scheduler)
    return app_scheduler


def minutes(*offsets: int) -> list[dt.datetime]:
    return [START + dt.timedelta(minutes=offset) for offset in offsets]


@pytest.mark.asyncio
@pytest.mark.fastsched(replicas=3)
async def test_each_replica_fires_each_job_at_the_same_instants(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    seen: list[tuple[str, dt.datetime]] = []

    async def job(name: str) -> None:
        seen.append((name, dt.datetime.now(UTC)))

    scheduler.add_job(job, "interval", minutes=5, id="tick", args=["tick"])
    await fastsched_clock.advance(minutes=10)
    # Added after start: mirrored on every replica.
    scheduler.add_job(job, "date", run_date=START + dt.timedelta(minutes=12), args=["once"])
    await fastsched_clock.advance(minutes=5)

    runs = fastsched_scheduler.runs_of("tick")
    assert sorted((run.scheduled, run.replica) for run in runs) == [
        (instant, replica) for instant in minutes(5, 10, 15) for replica in range(3)
    ]
    assert seen.count(("once", START + dt.timedelta(minutes=12))) == 3
    assert fastsched_scheduler.run_times("tick") == sorted(minutes(5, 10, 15) * 3)


@pytest.mark.asyncio
@pytest.mark.fastsched(replicas=2)
async def test_removed_jobs_leave_every_replica_and_errors_name_the_replica(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    async def fail() -> None:
        raise RuntimeError("boom")

    scheduler.add_job(fail, "interval", minutes=5, id="fail")
    with fastsched_scheduler.expect_job_error(RuntimeError, match="boom") as failed:
        await fastsched_clock.advance(minutes=5)
    assert sorted(run.replica for run in failed) == [0, 1]
    assert max(failed, key=lambda run: run.replica).describe() == (
        "fail  replica 1  scheduled 2030-01-01T00:05:00+00:00  error  (0s)  RuntimeError: boom"
    )
    scheduler.remove_job("fail")
    await fastsched_clock.advance(minutes=10)
    assert len(fastsched_scheduler.runs_of("fail")) == 2


def test_a_job_run_is_named_with_its_replica() -> None:
    (five,) = minutes(5)
    assert RunRef("fail", five).describe() == "job 'fail' (scheduled 2030-01-01T00:05:00+00:00)"
    assert RunRef("fail", five, replica=1).describe() == (
        "job 'fail' (scheduled 2030-01-01T00:05:00+00:00) on replica 1"
    )


MARKERS = """
import pytest


@pytest.mark.fastsched(replicas=0)
def test_zero(fastsched_scheduler):
    pass


@pytest.mark.fastsched(replicas=2, isolation="rollback")
def test_rollback(fastsched_scheduler):
    pass
"""


def test_bad_replica_markers_name_the_fix(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_markers=MARKERS)
    result = pytester.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "E*UsageError: @pytest.mark.fastsched(replicas=0) is not valid: give the "
            "number of copies of the app's scheduler to run, an int of at least 1",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "E*UsageError: @pytest.mark.fastsched(replicas=2) cannot run under "
            "isolation='rollback': the replicas' jobs run at once, and under rollback "
            "isolation every session shares the one test connection. Remove "
            "isolation='rollback' (replicas imply isolation='commit'), or run one replica.",
        ]
    )


# conftest.DB_APP's process_pending reads the pending ids, then updates each row in a later
# session without checking its status: two replicas process every row. PostgreSQL only: on
# SQLite its read-then-flush session fails with "database is locked" (SQLITE_BUSY_SNAPSHOT)
# when the other replica committed in between, as it would in production; the reference app's
# suite shows the double processing on SQLite with single-statement updates.
NAIVE_REPLICAS = """
from collections import Counter

import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler

import app


@pytest.mark.asyncio
@pytest.mark.fastsched(replicas=2)
async def test_naive(fastsched_clock, fastsched_scheduler, fastsched_db, fastsched_history):
    assert fastsched_db.isolation == "commit"
    fastsched_scheduler.attach(AsyncIOScheduler(timezone="UTC"))
    fastsched_scheduler.scheduler.add_job(app.process_pending, "interval", minutes=5, id="job")
    await fastsched_db.insert("items", [{"id": 1}, {"id": 2}, {"id": 3}])
    await fastsched_clock.advance(minutes=5)
    claims = Counter(
        record.key for record in fastsched_history.all_records() if record.status == "processing"
    )
    twice = sorted(key for key, count in claims.items() if count == 2)
    assert twice == [], "processed twice"
"""


def test_a_naive_job_on_two_replicas_processes_rows_twice(
    make_db_suite: Callable[[str], pytest.Pytester], postgres_server: EphemeralPostgres
) -> None:
    db_suite = make_db_suite(postgres_server.url())
    db_suite.makepyfile(test_naive=NAIVE_REPLICAS)
    result = db_suite.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    # Which rows both replicas get depends on how their statements interleave: at least the
    # last one, as the replicas start together.
    result.stdout.fnmatch_lines(
        ["E       AssertionError: processed twice", "E       assert [[]*3] == []"]
    )
    result.stdout.fnmatch_lines(
        [
            "*- fastsched replicas -*",
            "replica 0  job  scheduled 2030-01-01T00:05:00+00:00  success  returned [[]*3]",
            "replica 1  job  scheduled 2030-01-01T00:05:00+00:00  success  returned [[]*3]",
        ],
        consecutive=True,
    )


def test_a_harness_made_without_replicas_says_where_replicas_come_from() -> None:
    harness = SchedulerHarness(VirtualClock(start=START))
    with pytest.raises(ClockError) as excinfo:
        harness.use_replicas(2)
    assert excinfo.value.args == (
        "this SchedulerHarness was made without replicas: use the fastsched_scheduler "
        "fixture, whose harness can run them",
    )

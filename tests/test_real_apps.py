"""The shapes of real apps, run as user suites: thread-pool jobs, worker threads, schedulers
started by the app, run-at-startup jobs, freezes started by the test."""

from __future__ import annotations

import pytest

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
{extra}
"""

BOTH_BACKENDS = """
import pytest


@pytest.fixture(params=["freezegun", "time-machine"])
def fastsched_clock_backend(request):
    return request.param
"""


def _suite(pytester: pytest.Pytester, ini: str = "", **files: str) -> pytest.RunResult:
    pytester.makeconftest(BOTH_BACKENDS)
    pytester.makepyfile(**files)
    pytester.makeini(INI.format(extra=ini))
    return pytester.runpytest_inprocess("-p", "no:randomly")


# -- thread-pool executors ---------------------------------------------------------------------

THREAD_POOL_APP = """
import datetime as dt
import time

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler

scheduler = AsyncIOScheduler(timezone="UTC", executors={"default": ThreadPoolExecutor(10)})
seen = []
fail = []


def work():
    seen.append(dt.datetime.now(dt.timezone.utc))
    if fail:
        raise RuntimeError("boom in a thread")


def slow_work():
    time.sleep(0.05)


scheduler.add_job(work, "interval", seconds=10, id="work")
"""

THREAD_POOL_TESTS = """
import datetime as dt

import app

START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


async def test_first(fastsched_clock, fastsched_scheduler):
    app.seen.clear()
    await fastsched_clock.advance(seconds=30)
    fastsched_scheduler.assert_ran("work", times=3)
    assert app.seen == [START + dt.timedelta(seconds=s) for s in (10, 20, 30)]


async def test_second(fastsched_clock, fastsched_scheduler):
    app.seen.clear()
    await fastsched_clock.advance(seconds=30)
    fastsched_scheduler.assert_ran("work", times=3)


async def test_a_date_job_on_the_pool_is_waited_for(fastsched_clock, fastsched_scheduler):
    fastsched_scheduler.scheduler.add_job(
        app.slow_work, "date", run_date=START + dt.timedelta(seconds=5), id="slow"
    )
    await fastsched_clock.advance(seconds=5)
    assert [run.outcome for run in fastsched_scheduler.runs_of("slow")] == ["success"]


async def test_a_manual_run_on_the_pool(fastsched_clock, fastsched_scheduler):
    run = await fastsched_scheduler.run_job("work")
    assert run.outcome == "success"
    assert fastsched_scheduler.format_runs().count("work") == 1


async def test_error_in_a_later_test_fails_it(fastsched_clock, fastsched_scheduler):
    app.fail.append(1)
    try:
        await fastsched_clock.advance(seconds=10)
    finally:
        app.fail.clear()
"""


def test_thread_pool_jobs_run_are_recorded_and_waited_for_in_every_test(
    pytester: pytest.Pytester,
) -> None:
    # A fast sync job's "executed" event comes from the pool's thread, often before the
    # scheduler's "submitted" event: the run must still be closed (not left "running" until
    # the watchdog fires), in the first test and in every later one.
    result = _suite(
        pytester,
        "fastsched_scheduler = app:scheduler\nfastsched_watchdog = 5",
        app=THREAD_POOL_APP,
        test_app=THREAD_POOL_TESTS,
    )
    result.assert_outcomes(passed=8, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*JobRunError: job 'work' (scheduled 2030-01-01T00:00:10+00:00) raised RuntimeError: "
            "boom in a thread"
        ]
    )
    result.stdout.no_fnmatch_line("*watchdog*")


THREAD_POOL_LIFESPAN_APP = """
from contextlib import asynccontextmanager

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from fastapi import FastAPI

scheduler = AsyncIOScheduler(timezone="UTC", executors={"default": ThreadPoolExecutor(2)})
calls = []


def work():
    calls.append(1)


scheduler.add_job(work, "interval", seconds=10, id="work")


@asynccontextmanager
async def lifespan(app):
    scheduler.start()
    yield
    scheduler.shutdown()


app = FastAPI(lifespan=lifespan)
"""

THREAD_POOL_LIFESPAN_TESTS = """
import pytest


@pytest.mark.parametrize("n", range(2))
async def test_the_pool_works_after_each_shutdown(
    fastsched_client, fastsched_clock, fastsched_scheduler, n
):
    await fastsched_clock.advance(seconds=20)
    fastsched_scheduler.assert_ran("work", times=2)
"""


def test_a_thread_pool_shut_down_by_the_app_runs_jobs_again_when_it_restarts(
    pytester: pytest.Pytester,
) -> None:
    # APScheduler's shutdown() closes its pools for good and start() makes no new ones: the
    # harness gives the restarted scheduler fresh threads (else every submission fails and
    # APScheduler only logs it).
    result = _suite(
        pytester,
        "fastsched_scheduler = app:scheduler\nfastsched_app = app:app",
        app=THREAD_POOL_LIFESPAN_APP,
        test_app=THREAD_POOL_LIFESPAN_TESTS,
    )
    result.assert_outcomes(passed=4)


# -- worker threads a job waits for --------------------------------------------------------------

WORKER_THREAD_TESTS = """
import asyncio
import datetime as dt
import time

import anyio.to_thread
import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from starlette.concurrency import run_in_threadpool

UTC = dt.timezone.utc
START = dt.datetime(2030, 1, 1, tzinfo=UTC)
WAYS = {
    "starlette": lambda f: run_in_threadpool(f),
    "anyio": lambda f: anyio.to_thread.run_sync(f),
    "asyncio": lambda f: asyncio.to_thread(f),
}


@pytest.mark.parametrize("way", sorted(WAYS))
async def test_time_holds_while_a_job_waits_for_a_thread(
    fastsched_clock, fastsched_scheduler, way
):
    scheduler = AsyncIOScheduler(timezone="UTC")
    fastsched_scheduler.attach(scheduler)
    seen = []

    def blocking():
        time.sleep(0.05)
        return dt.datetime.now(UTC)

    async def job():
        started = dt.datetime.now(UTC)
        finished = await WAYS[way](blocking)
        seen.append((started, finished, dt.datetime.now(UTC)))

    scheduler.add_job(job, "interval", seconds=10, id="job", max_instances=1)
    await fastsched_clock.advance(seconds=50)
    assert fastsched_scheduler.skipped("job") == []
    assert [run.outcome for run in fastsched_scheduler.runs_of("job")] == ["success"] * 5
    assert seen == [(START + dt.timedelta(seconds=s),) * 3 for s in (10, 20, 30, 40, 50)]
"""


def test_worker_threads_a_job_waits_for_hold_the_clock(pytester: pytest.Pytester) -> None:
    # Starlette's run_in_threadpool and anyio.to_thread do not go through run_in_executor:
    # without counting them, time jumped past the thread (a run stuck "running", 4 skipped).
    result = _suite(pytester, test_threads=WORKER_THREAD_TESTS)
    result.assert_outcomes(passed=6)

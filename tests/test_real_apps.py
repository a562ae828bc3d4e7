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
import threading

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
    threading.Event().wait(0.05)  # real work: time.sleep() would sleep in virtual time


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


def test_a_thread_pool_shut_down_by_the_lifespan_runs_jobs_in_the_next_test(
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


THREAD_POOL_RESTART_TESTS = """
import app


async def test_the_pool_works_after_a_restart(fastsched_clock, fastsched_scheduler):
    await fastsched_clock.advance(seconds=10)
    app.scheduler.shutdown()
    await fastsched_clock.run_until_idle()
    app.scheduler.start()
    app.scheduler.add_job(app.work, "interval", seconds=10, id="again")
    await fastsched_clock.advance(seconds=10)
    fastsched_scheduler.assert_ran("work", times=1)
    fastsched_scheduler.assert_ran("again", times=1)
"""


def test_a_thread_pool_shut_down_by_the_app_runs_jobs_again_when_it_restarts_in_the_test(
    pytester: pytest.Pytester,
) -> None:
    # The app's own shutdown() and start() inside the test: the restarted scheduler gets
    # fresh threads too, and its new job runs on them.
    result = _suite(
        pytester,
        "fastsched_scheduler = app:scheduler",
        app=THREAD_POOL_APP,
        test_app=THREAD_POOL_RESTART_TESTS,
    )
    result.assert_outcomes(passed=2)


# -- worker threads a job waits for --------------------------------------------------------------

WORKER_THREAD_TESTS = """
import asyncio
import datetime as dt
import threading

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
        threading.Event().wait(0.05)  # real work: time.sleep() would sleep in virtual time
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


# -- where the scheduler comes from ---------------------------------------------------------------

LIFESPAN_APP = """
from contextlib import asynccontextmanager

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from fastapi import FastAPI

calls = []
second = []


async def sync_items():
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("remote service down")


@asynccontextmanager
async def lifespan(app):
    scheduler = AsyncIOScheduler(timezone="UTC")
    scheduler.add_job(sync_items, "interval", minutes=5, id="sync")
    scheduler.start()
    app.state.scheduler = scheduler
    if second:
        other = AsyncIOScheduler(timezone="UTC")
        other.start()
    yield
    scheduler.shutdown()


app = FastAPI(lifespan=lifespan)
"""

LIFESPAN_TESTS = """
import app


async def test_runs_under_the_harness(fastsched_client, fastsched_clock, fastsched_scheduler):
    app.calls.clear()
    await fastsched_clock.advance(minutes=5)
    assert fastsched_scheduler.scheduler is app.app.state.scheduler
    fastsched_scheduler.assert_ran("sync", times=1)


async def test_a_job_error_fails_the_test(fastsched_client, fastsched_clock):
    app.calls.clear()
    await fastsched_clock.advance(minutes=10)


async def test_a_second_scheduler_is_named(fastsched_clock, fastsched_scheduler, fastsched_app):
    from pytest_fastsched._client import open_client

    app.second.append(1)
    try:
        async with open_client(fastsched_app, fastsched_clock, fastsched_scheduler):
            pass
    finally:
        app.second.clear()
"""


def test_a_scheduler_built_and_started_in_the_lifespan_is_taken_under_the_harness(
    pytester: pytest.Pytester,
) -> None:
    # No module-level handle to point fastsched_scheduler at: the AsyncIOScheduler the
    # lifespan starts is attached, so its runs are recorded and its job errors fail the test
    # (before, its jobs ran unrecorded and an error was only logged).
    result = _suite(pytester, "fastsched_app = app:app", app=LIFESPAN_APP, test_app=LIFESPAN_TESTS)
    result.assert_outcomes(passed=2, failed=4)
    result.stdout.fnmatch_lines(
        [
            "*JobRunError: job 'sync' (scheduled 2030-01-01T00:10:00+00:00) raised "
            "RuntimeError: remote service down"
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*FastschedWarning: a second AsyncIOScheduler (<*AsyncIOScheduler object at *>) "
            "was started during the test; fastsched_scheduler drives only the first "
            "(<*AsyncIOScheduler object at *>): the second one's runs are not recorded and its "
            "job errors are only logged. Drive the one the test is about: set "
            "fastsched_scheduler = 'module:attr' to it, or call "
            "fastsched_scheduler.attach(scheduler) before the app starts the other."
        ]
    )


SETUP_APP = """
from apscheduler.schedulers.asyncio import AsyncIOScheduler

scheduler = AsyncIOScheduler(timezone="UTC")
fired = []


async def job():
    fired.append(1)


def setup_jobs():
    added = scheduler.add_job(job, "interval", seconds=30, id="job", replace_existing=True)
    return added.next_run_time
"""

SETUP_HEAD = """
import datetime as dt

import pytest
import pytest_asyncio

import app

START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
"""

ASYNC_FIXTURE_TESTS = (
    SETUP_HEAD
    + """

@pytest_asyncio.fixture
async def started():
    app.scheduler.start()
    return app.setup_jobs()


@pytest.mark.parametrize("n", range(60))
async def test_started_in_an_async_fixture(started, fastsched_clock, fastsched_scheduler, n):
    assert started == START + dt.timedelta(seconds=30)
    await fastsched_clock.advance(seconds=30)
    fastsched_scheduler.assert_ran("job", times=1)
"""
)


def test_a_scheduler_the_app_starts_in_an_async_fixture_fires_on_time_every_time(
    pytester: pytest.Pytester,
) -> None:
    # The app's start() finds the scheduler the harness started, paused at the virtual start:
    # no timer is armed on the real clock before the test's loop joins virtual time (before,
    # 1 to 3 of 60 such tests ran nothing in advance(seconds=30)).
    result = _suite(
        pytester,
        "fastsched_scheduler = app:scheduler",
        app=SETUP_APP,
        test_app=ASYNC_FIXTURE_TESTS,
    )
    result.assert_outcomes(passed=120)


SYNC_FIXTURE_TESTS = (
    SETUP_HEAD
    + """

@pytest.fixture
def started():
    app.scheduler.start()
    return app.setup_jobs()


@pytest.fixture
def set_up():
    return app.setup_jobs()


async def test_started_in_a_sync_fixture(started, fastsched_clock, fastsched_scheduler):
    assert started == START + dt.timedelta(seconds=30)
    await fastsched_clock.advance(seconds=30)
    fastsched_scheduler.assert_ran("job", times=1)


async def test_set_up_code_sees_a_running_scheduler(set_up, fastsched_clock, fastsched_scheduler):
    assert set_up == START + dt.timedelta(seconds=30)
    await fastsched_clock.advance(seconds=60)
    fastsched_scheduler.assert_ran("job", times=2)
"""
)


def test_set_up_code_in_sync_fixtures_finds_the_scheduler_running(
    pytester: pytest.Pytester,
) -> None:
    # While fixtures run the scheduler is running, paused at the virtual start: the app's
    # set-up code reads job.next_run_time and may call start() itself, as in production.
    result = _suite(
        pytester,
        "fastsched_scheduler = app:scheduler",
        app=SETUP_APP,
        test_app=SYNC_FIXTURE_TESTS,
    )
    result.assert_outcomes(passed=4)


START_WITHOUT_LOOP = """
import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler


@pytest.fixture
def scheduler():
    scheduler = AsyncIOScheduler(timezone="UTC")
    scheduler.start()
    return scheduler


async def test_start(scheduler, fastsched_clock):
    pass


@pytest.fixture
def fixed(fastsched_scheduler):
    scheduler = AsyncIOScheduler(timezone="UTC")
    scheduler.start()
    scheduler.add_job(print, "interval", seconds=30, id="job")
    return scheduler


async def test_the_fix(fixed, fastsched_clock, fastsched_scheduler):
    assert fastsched_scheduler.scheduler is fixed
    await fastsched_clock.advance(seconds=30)
    fastsched_scheduler.assert_ran("job", times=1)
"""


def test_a_start_with_no_running_loop_names_the_fix(pytester: pytest.Pytester) -> None:
    result = _suite(pytester, test_start=START_WITHOUT_LOOP)
    result.assert_outcomes(errors=2, passed=2)
    result.stdout.fnmatch_lines(
        [
            "scheduler: AsyncIOScheduler.start() was called with no running event "
            "loop (a sync fixture runs before the test's loop). An AsyncIOScheduler runs on an "
            "event loop. Make scheduler request fastsched_scheduler (or set "
            "fastsched_scheduler = 'module:attr'): under it, the app's scheduler is started "
            "paused at the virtual start and moves onto the test's loop when the test starts. "
            "Or start it from an async fixture (@pytest_asyncio.fixture) or from the app's "
            "lifespan under fastsched_client."
        ]
    )


CLOCK_ONLY_TESTS = (
    SETUP_HEAD
    + """

async def test_the_clock_alone_fires_the_apps_jobs(fastsched_clock):
    app.fired.clear()
    app.setup_jobs()
    await fastsched_clock.advance(seconds=60)
    assert app.fired == [1, 1]


@pytest.mark.fastsched(scheduler=False)
async def test_opting_out(fastsched_clock):
    app.fired.clear()
    app.scheduler.add_job(app.job, "interval", seconds=30, id="job")
    await fastsched_clock.advance(seconds=60)
    assert app.fired == []
    app.scheduler.remove_all_jobs()
"""
)


def test_the_clock_alone_drives_the_configured_scheduler_unless_the_marker_opts_out(
    pytester: pytest.Pytester,
) -> None:
    # Before, a test that asked only for fastsched_clock fired nothing, and passed.
    result = _suite(
        pytester,
        "fastsched_scheduler = app:scheduler",
        app=SETUP_APP,
        test_app=CLOCK_ONLY_TESTS,
    )
    result.assert_outcomes(passed=4)


# -- the "run at start-up" idiom ------------------------------------------------------------------

STARTUP_APP = """
import datetime as dt

from apscheduler.schedulers.asyncio import AsyncIOScheduler

scheduler = AsyncIOScheduler(timezone="UTC")


async def refresh():
    pass


now = dt.datetime.now(dt.timezone.utc)
scheduler.add_job(refresh, "interval", hours=1, next_run_time=now, id="refresh")
scheduler.add_job(refresh, "cron", minute=30, next_run_time=now, id="cron")
scheduler.add_job(
    refresh, "interval", hours=1, next_run_time=now + dt.timedelta(minutes=5), id="later"
)
scheduler.add_job(refresh, "interval", hours=1, next_run_time=None, id="paused")
"""

STARTUP_TESTS = """
import datetime as dt

START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
HOUR = dt.timedelta(hours=1)


async def test_runs_at_start_up_then_on_schedule(fastsched_clock, fastsched_scheduler):
    await fastsched_clock.advance(hours=2)
    fastsched_scheduler.assert_ran("refresh", at=[START, START + HOUR, START + 2 * HOUR])
    fastsched_scheduler.assert_ran(
        "cron", at=[START, START + HOUR / 2, START + HOUR + HOUR / 2]
    )
    five = dt.timedelta(minutes=5)
    fastsched_scheduler.assert_ran("later", at=[START + five, START + five + HOUR])
    fastsched_scheduler.assert_ran("paused", times=0)
"""


def test_the_run_at_start_up_idiom_fires_at_the_virtual_start(pytester: pytest.Pytester) -> None:
    # next_run_time=datetime.now() at import is the real "now": it runs at the virtual start,
    # as production runs it when the app starts (before, the first run was dropped).
    result = _suite(
        pytester,
        "fastsched_scheduler = app:scheduler",
        app=STARTUP_APP,
        test_app=STARTUP_TESTS,
    )
    result.assert_outcomes(passed=2)


# -- a freeze started by the test -----------------------------------------------------------------

FOREIGN_FREEZE_TESTS = """
import datetime as dt

import pytest
import time_machine
from freezegun import freeze_time

UTC = dt.timezone.utc
FREEZERS = {
    "freezegun": freeze_time,
    "time-machine": lambda when: time_machine.travel(when, tick=False),
}


@pytest.mark.parametrize("library", sorted(FREEZERS))
async def test_daily_from_june(fastsched_clock, library):
    with FREEZERS[library](dt.datetime(2031, 6, 1, tzinfo=UTC)):
        pass


@pytest.mark.parametrize("library", sorted(FREEZERS))
async def test_started_by_hand(fastsched_clock, library):
    FREEZERS[library](dt.datetime(2031, 6, 1, tzinfo=UTC)).start()


@pytest.mark.parametrize("library", sorted(FREEZERS))
async def test_as_a_decorator(fastsched_clock, library):
    @FREEZERS[library](dt.datetime(2031, 6, 1, tzinfo=UTC))
    def report():
        pass

    report()


@pytest.mark.parametrize("library", sorted(FREEZERS))
async def test_after_the_test_it_works_again(library):
    with FREEZERS[library](dt.datetime(2031, 6, 1, tzinfo=UTC)):
        assert dt.datetime.now(UTC).year == 2031
"""


def test_a_freeze_started_by_the_test_is_refused_with_the_fix(
    pytester: pytest.Pytester,
) -> None:
    # Before, it silently overrode the virtual clock: a run due in June 2031 started at the
    # virtual start instead.
    result = _suite(pytester, test_freeze=FOREIGN_FREEZE_TESTS)
    # Context manager, start() and decorator; each library on each backend.
    result.assert_outcomes(failed=12, passed=2)
    for label in ("freezegun.freeze_time", "time_machine.travel"):
        result.stdout.fnmatch_lines(
            [
                f"E *ClockError: {label} to 2031-06-01T00:00:00+00:00 was started during a "
                "test that uses fastsched_clock: it would override the virtual clock for "
                "datetime.now() and time.time() while the event loop and the scheduler's "
                "timers stay at virtual 2030-01-01T00:00:00+00:00, so jobs would run at the "
                "wrong instants. Move the virtual clock instead: await "
                "fastsched_clock.advance_to(datetime.fromisoformat("
                "'2031-06-01T00:00:00+00:00')) (the jobs due on the way fire) or jump() "
                'there, or start the test there with @pytest.mark.fastsched(start="'
                '2031-06-01T00:00:00+00:00").'
            ]
        )

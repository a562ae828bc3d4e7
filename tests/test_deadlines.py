"""Deadlines measured on the monotonic clock inside job runs, as in production.

Inside a job run ``time.monotonic()`` reads virtual time and ``time.sleep()`` in a job thread
sleeps in virtual time; the test body, the event loop and ``threading``'s timeouts stay real.
Async jobs and thread jobs (the scheduler's own executor and a thread pool), on both
wall-clock backends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import queue
import threading
import time

import pytest
import tenacity
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from pytest_fastsched import SchedulerHarness, VirtualClock

pytestmark = pytest.mark.asyncio
UTC = dt.timezone.utc
AT = dt.datetime(2030, 1, 1, 0, 1, tzinfo=UTC)
# What production does with stop_after_delay(60) + wait_fixed(5): 13 attempts, 5 s apart.
THIRTEEN_ATTEMPTS = [AT + dt.timedelta(seconds=5 * n) for n in range(13)]
GAVE_UP = ("success", "gave up", AT + dt.timedelta(seconds=60))


@pytest.fixture(params=["freezegun", "time-machine"])
def fastsched_clock_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def scheduler(fastsched_scheduler: SchedulerHarness) -> AsyncIOScheduler:
    app_scheduler = AsyncIOScheduler(timezone="UTC")
    app_scheduler.add_executor(ThreadPoolExecutor(2), "threads")
    fastsched_scheduler.attach(app_scheduler)
    return app_scheduler


class Unavailable(Exception):
    pass


def flaky(attempts: list[dt.datetime]) -> None:
    attempts.append(dt.datetime.now(UTC))
    raise Unavailable("the other service is down")


async def test_tenacity_stop_after_delay_in_an_async_job(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    attempts: list[dt.datetime] = []

    @tenacity.retry(stop=tenacity.stop_after_delay(60), wait=tenacity.wait_fixed(5))
    async def call() -> None:
        flaky(attempts)

    async def job() -> str:
        try:
            await call()
        except tenacity.RetryError:
            return "gave up"
        return "done"

    scheduler.add_job(job, "date", run_date=AT, id="retry")
    await fastsched_clock.advance(minutes=10)
    assert attempts == THIRTEEN_ATTEMPTS
    (run,) = fastsched_scheduler.runs_of("retry")
    assert (run.outcome, run.retval, run.finished) == GAVE_UP


@pytest.mark.parametrize("executor", ["default", "threads"])
async def test_tenacity_stop_after_delay_in_a_thread_job(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler, executor
) -> None:
    attempts: list[dt.datetime] = []

    @tenacity.retry(stop=tenacity.stop_after_delay(60), wait=tenacity.wait_fixed(5))
    def call() -> None:
        flaky(attempts)

    def job() -> str:
        try:
            call()
        except tenacity.RetryError:
            return "gave up"
        return "done"

    scheduler.add_job(job, "date", run_date=AT, id="retry", executor=executor)
    await fastsched_clock.advance(minutes=10)
    assert attempts == THIRTEEN_ATTEMPTS
    (run,) = fastsched_scheduler.runs_of("retry")
    assert (run.outcome, run.retval, run.finished) == GAVE_UP


async def test_a_monotonic_deadline_loop_in_an_async_job(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    polls: list[tuple[float, float, dt.datetime]] = []

    async def job() -> None:
        start = time.monotonic()
        while time.monotonic() - start < 30:
            loop_time = asyncio.get_running_loop().time()
            polls.append((time.monotonic() - start, loop_time, dt.datetime.now(UTC)))
            assert time.monotonic_ns() == round(time.monotonic() * 1e9)
            await asyncio.sleep(7)

    scheduler.add_job(job, "date", run_date=AT, id="poll")
    await fastsched_clock.advance(minutes=5)
    assert [elapsed for elapsed, _, _ in polls] == pytest.approx([0, 7, 14, 21, 28])
    assert [now for _, _, now in polls] == [AT + dt.timedelta(seconds=s) for s in range(0, 30, 7)]
    fastsched_scheduler.assert_ran("poll", times=1)


@pytest.mark.parametrize("executor", ["default", "threads"])
async def test_a_monotonic_deadline_loop_in_a_thread_job(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler, executor
) -> None:
    polls: list[dt.datetime] = []

    def job() -> None:
        start = time.monotonic()
        while time.monotonic() - start < 30:
            polls.append(dt.datetime.now(UTC))
            time.sleep(7)

    async def tick() -> None:
        polls.append(dt.datetime.now(UTC))

    scheduler.add_job(job, "date", run_date=AT, id="poll", executor=executor)
    scheduler.add_job(tick, "date", run_date=AT + dt.timedelta(seconds=10), id="tick")
    await fastsched_clock.advance(minutes=5)
    # The thread sleeps in virtual time: a job due meanwhile runs while it sleeps.
    assert polls == [AT + dt.timedelta(seconds=s) for s in (0, 7, 10, 14, 21, 28)]
    (run,) = fastsched_scheduler.runs_of("poll")
    assert (run.outcome, run.finished) == ("success", AT + dt.timedelta(seconds=35))


async def test_a_thread_polling_the_wall_clock_with_sleeps_ends(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    def job() -> int:
        start, polls = dt.datetime.now(UTC), 0
        while dt.datetime.now(UTC) < start + dt.timedelta(seconds=30):
            polls += 1
            time.sleep(0.1)
        return polls

    scheduler.add_job(job, "date", run_date=AT, id="poll", executor="threads")
    await fastsched_clock.advance(minutes=2)
    (run,) = fastsched_scheduler.runs_of("poll")
    assert (run.outcome, run.finished) == ("success", AT + dt.timedelta(seconds=30))
    assert run.retval == pytest.approx(300, abs=1)


async def test_a_thread_sleeping_past_a_clock_call_wakes_in_the_next(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    def job() -> dt.datetime:
        time.sleep(3600)
        return dt.datetime.now(UTC)

    scheduler.add_job(job, "date", run_date=AT, id="nap", executor="threads")
    await fastsched_clock.advance(minutes=5)
    (run,) = fastsched_scheduler.runs_of("nap")
    assert run.outcome == "running"
    await fastsched_clock.advance(hours=1)
    assert (run.outcome, run.retval) == ("success", AT + dt.timedelta(hours=1))


async def test_outside_job_runs_the_monotonic_clock_and_sleeps_stay_real(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    before = time.monotonic()
    await fastsched_clock.advance(hours=1)
    time.sleep(0.01)
    elapsed = time.monotonic() - before
    assert 0.01 <= elapsed < 3600
    loop = asyncio.get_running_loop()
    assert loop.time() - time.monotonic() > 3000  # the loop's clock is virtual, this is not

    def in_a_thread() -> float:
        started = time.monotonic()
        time.sleep(0.01)
        return time.monotonic() - started

    # Work the test itself hands to a thread is not a job run: real time.
    assert await asyncio.to_thread(in_a_thread) >= 0.01


async def test_threading_timeouts_and_an_own_event_loop_stay_real_in_a_job_thread(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    def job() -> list[object]:
        waited = [threading.Event().wait(0.02)]
        with (condition := threading.Condition()):
            waited.append(condition.wait(0.02))
        try:
            queue.Queue().get(timeout=0.02)
        except queue.Empty:
            waited.append("empty")

        async def own_loop() -> float:
            started = time.monotonic()
            await asyncio.sleep(0.02)
            return time.monotonic() - started

        waited.append(asyncio.run(own_loop()) >= 0.02)
        return waited

    scheduler.add_job(job, "date", run_date=AT, id="waits", executor="threads")
    await fastsched_clock.advance(minutes=2)
    (run,) = fastsched_scheduler.runs_of("waits")
    assert (run.outcome, run.retval) == ("success", [False, False, "empty", True])
    assert run.finished == AT

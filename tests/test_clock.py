"""Virtual time firing the app's own APScheduler jobs, on both wall-clock backends."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import random
import threading
import time
import warnings
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from pytest_fastsched import JobRunError, SchedulerHarness, VirtualClock
from pytest_fastsched._clock import ClockError, WatchdogTimeout
from pytest_fastsched._records import RunRef, current_run
from pytest_fastsched._scheduler import FastschedWarning

pytestmark = pytest.mark.asyncio
UTC = dt.timezone.utc
START = dt.datetime(2030, 1, 1, tzinfo=UTC)
BERLIN = ZoneInfo("Europe/Berlin")


@pytest.fixture(params=["freezegun", "time-machine"])
def fastsched_clock_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def scheduler(fastsched_scheduler: SchedulerHarness) -> AsyncIOScheduler:
    app_scheduler = AsyncIOScheduler(timezone="UTC")
    fastsched_scheduler.attach(app_scheduler)
    return app_scheduler


def at(hour: int = 0, minute: int = 0, second: int = 0, day: int = 1) -> dt.datetime:
    return dt.datetime(2030, 1, day, hour, minute, second, tzinfo=UTC)


async def test_interval_job_fires_288_times_a_day_at_its_scheduled_instants(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    seen: list[tuple[dt.datetime, dt.datetime]] = []

    async def job() -> None:
        seen.append((dt.datetime.now(UTC), dt.datetime.fromtimestamp(time.time(), UTC)))

    scheduler.add_job(job, "interval", minutes=5, id="tick")
    await fastsched_clock.advance(days=1)

    expected = [START + dt.timedelta(minutes=5 * n) for n in range(1, 289)]
    assert [now for now, _ in seen] == expected
    assert [wall for _, wall in seen] == expected
    assert fastsched_scheduler.run_times("tick") == expected
    fastsched_scheduler.assert_ran("tick", times=288)
    assert fastsched_clock.now() == at(day=2)


async def test_time_moves_only_inside_clock_calls(fastsched_clock: VirtualClock) -> None:
    loop_time = asyncio.get_running_loop().time()
    time.sleep(0.02)
    assert dt.datetime.now(UTC) == START
    assert asyncio.get_running_loop().time() == loop_time
    await fastsched_clock.advance(seconds=90)
    assert dt.datetime.now(UTC) == START + dt.timedelta(seconds=90)
    assert asyncio.get_running_loop().time() == pytest.approx(loop_time + 90)


async def test_utcnow_and_time_agree_in_loop_and_threads(fastsched_clock: VirtualClock) -> None:
    await fastsched_clock.advance(hours=1)

    def read() -> tuple[dt.datetime, float]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return dt.datetime.utcnow(), time.time()

    in_loop = read()
    in_thread = await asyncio.to_thread(read)
    expected = START + dt.timedelta(hours=1)
    assert in_loop == in_thread == (expected.replace(tzinfo=None), expected.timestamp())


async def test_asyncio_sleep_in_a_job_costs_no_real_time(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    woke: list[dt.datetime] = []

    async def slow_job() -> None:
        await asyncio.sleep(3600)
        woke.append(dt.datetime.now(UTC))

    scheduler.add_job(slow_job, "date", run_date=at(minute=1), id="slow")
    started = time.monotonic()
    await fastsched_clock.advance(hours=2)
    assert time.monotonic() - started < 10
    assert woke == [at(hour=1, minute=1)]


async def test_monotonic_is_real_in_the_test_body(fastsched_clock: VirtualClock) -> None:
    before = time.monotonic()
    time.sleep(0.01)
    assert time.monotonic() > before


async def test_cron_at_midnight_fires_three_times_in_three_days(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    async def nightly() -> None:
        pass

    await fastsched_clock.advance(hours=12)
    scheduler.add_job(nightly, "cron", hour=0, minute=0, id="nightly")
    await fastsched_clock.advance(days=3)
    assert fastsched_scheduler.run_times("nightly") == [
        at(day=2),
        at(day=3),
        at(day=4),
    ]


@pytest.mark.fastsched(start="2030-03-30T12:00:00+00:00")
async def test_cron_0230_in_berlin_fires_at_0330_on_spring_forward_day(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    async def job() -> None:
        pass

    scheduler.add_job(job, "cron", hour=2, minute=30, timezone=BERLIN, id="night")
    await fastsched_clock.advance(days=1)
    (fired,) = fastsched_scheduler.run_times("night")
    assert fired.astimezone(BERLIN).isoformat() == "2030-03-31T03:30:00+02:00"


@pytest.mark.fastsched(start="2030-10-26T12:00:00+00:00")
async def test_cron_0230_in_berlin_fires_twice_on_fall_back_day(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    async def job() -> None:
        pass

    scheduler.add_job(job, "cron", hour=2, minute=30, timezone=BERLIN, id="night")
    await fastsched_clock.advance(days=1)
    fired = [t.astimezone(BERLIN).isoformat() for t in fastsched_scheduler.run_times("night")]
    assert fired == ["2030-10-27T02:30:00+02:00", "2030-10-27T02:30:00+01:00"]


@pytest.mark.parametrize(
    "start", ["2030-03-30T22:00:00+00:00", "2030-10-26T22:00:00+00:00"], ids=["spring", "fall"]
)
async def test_half_hourly_cron_fires_49_times_in_24_hours_across_dst(
    fastsched_clock: VirtualClock,
    fastsched_scheduler: SchedulerHarness,
    scheduler,
    start: str,
    request: pytest.FixtureRequest,
) -> None:
    async def job() -> None:
        pass

    await fastsched_clock.advance_to(dt.datetime.fromisoformat(start))
    scheduler.add_job(job, "cron", minute="*/30", timezone=BERLIN, id="half")
    await fastsched_clock.advance(hours=24)
    runs = fastsched_scheduler.run_times("half")
    assert len(runs) == 49
    gaps = {b - a for a, b in itertools.pairwise(runs)}
    assert gaps == {dt.timedelta(minutes=30)}


async def test_date_job_fires_at_its_run_date_then_is_gone(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    async def once() -> None:
        pass

    scheduler.add_job(once, "date", run_date=at(hour=1), id="once")
    await fastsched_clock.advance(minutes=59)
    fastsched_scheduler.assert_ran("once", times=0)
    await fastsched_clock.advance(minutes=1)
    fastsched_scheduler.assert_ran("once", times=1, at=[at(hour=1)])
    assert scheduler.get_job("once") is None
    await fastsched_clock.advance(days=1)
    fastsched_scheduler.assert_ran("once", times=1)


@pytest.mark.parametrize(
    ("coalesce", "grace", "runs", "missed"),
    [(True, 30, 1, 0), (False, 30, 1, 9), (False, None, 10, 0)],
    ids=["coalesce", "grace-30s", "no-grace-limit"],
)
async def test_misfire_and_coalesce_after_a_stall(
    fastsched_clock: VirtualClock,
    fastsched_scheduler: SchedulerHarness,
    scheduler,
    coalesce: bool,
    grace: int | None,
    runs: int,
    missed: int,
) -> None:
    async def job() -> None:
        pass

    scheduler.add_job(
        job,
        "interval",
        minutes=1,
        id="minutely",
        coalesce=coalesce,
        misfire_grace_time=grace,
    )
    await fastsched_clock.run_until_idle()
    await fastsched_clock.jump(minutes=10)
    assert len(fastsched_scheduler.run_times("minutely")) == runs
    assert len(fastsched_scheduler.missed("minutely")) == missed
    assert fastsched_clock.now() == at(minute=10)


async def test_max_instances_skips_runs_while_one_is_running(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    async def seven_minutes() -> None:
        await asyncio.sleep(7 * 60)

    scheduler.add_job(seven_minutes, "interval", minutes=5, id="long", max_instances=1)
    await fastsched_clock.advance(minutes=31)
    assert fastsched_scheduler.run_times("long") == [at(minute=5), at(minute=15), at(minute=25)]
    assert [run.scheduled for run in fastsched_scheduler.skipped("long")] == [
        at(minute=10),
        at(minute=20),
        at(minute=30),
    ]


@pytest.mark.fastsched(allow_databases=["sqlite:///*/io.db"])  # the test's own file
async def test_real_io_in_a_job_sees_no_time_jump(
    fastsched_clock: VirtualClock,
    fastsched_scheduler: SchedulerHarness,
    scheduler,
    tmp_path,
) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'io.db'}")
    observed: list[tuple[dt.datetime, dt.datetime]] = []
    ticks: list[dt.datetime] = []

    def slow_read() -> None:
        threading.Event().wait(0.05)  # blocking I/O: real time (time.sleep would be virtual)

    async def io_job() -> None:
        before = dt.datetime.now(UTC)
        async with engine.begin() as conn:
            await conn.execute(text("select 1"))
        await asyncio.get_running_loop().run_in_executor(None, slow_read)
        observed.append((before, dt.datetime.now(UTC)))

    async def every_second() -> None:
        ticks.append(dt.datetime.now(UTC))

    scheduler.add_job(io_job, "date", run_date=at(second=10), id="io")
    scheduler.add_job(every_second, "interval", seconds=1, id="tick")
    try:
        await fastsched_clock.advance(seconds=20)
    finally:
        await engine.dispose()
    assert observed == [(at(second=10), at(second=10))]
    assert ticks == [at(second=n) for n in range(1, 21)]
    assert fastsched_scheduler.skipped("tick") == []
    assert fastsched_scheduler.missed("tick") == []


async def test_a_job_waits_for_aiosqlites_connect_and_close(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    import sqlite3

    import aiosqlite

    class SlowToOpen(sqlite3.Connection):
        def __init__(self, *args: object, **kwargs: object) -> None:
            time.sleep(0.2)  # aiosqlite's own thread: real time
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    done: list[dt.datetime] = []

    async def scratch() -> None:
        async with aiosqlite.connect(":memory:", factory=SlowToOpen) as db:
            await db.execute("SELECT 1")
        done.append(dt.datetime.now(UTC))

    scheduler.add_job(scratch, "date", run_date=at(second=10), id="scratch")
    await fastsched_clock.advance(seconds=20)
    # Before, the connect (and the end of close) went by unseen: advance() returned with the
    # job still waiting for aiosqlite's thread, which later wrote to a closed loop.
    assert done == [at(second=10)]
    assert [run.outcome for run in fastsched_scheduler.runs_of("scratch")] == ["success"]


@pytest.mark.parametrize("executor", ["default", "threads"])
async def test_sync_jobs_see_virtual_time_and_advance_waits_for_them(
    fastsched_clock: VirtualClock,
    fastsched_scheduler: SchedulerHarness,
    scheduler,
    executor: str,
) -> None:
    seen: list[tuple[dt.datetime, str]] = []
    scheduler.add_executor(ThreadPoolExecutor(2), "threads")

    def sync_job() -> None:
        threading.Event().wait(0.05)  # real work, which holds the clock
        seen.append((dt.datetime.now(UTC), threading.current_thread().name))

    scheduler.add_job(sync_job, "interval", minutes=1, id="sync", executor=executor)
    await fastsched_clock.advance(minutes=3)
    assert [now for now, _ in seen] == [at(minute=1), at(minute=2), at(minute=3)]
    assert all(name != threading.main_thread().name for _, name in seen)
    fastsched_scheduler.assert_ran("sync", times=3)


async def test_a_thread_pool_job_knows_its_run_inside_its_thread(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    # What the history stamps on a row written by the job: the job run, in the job's thread.
    seen: list[RunRef | None] = []
    scheduler.add_executor(ThreadPoolExecutor(2), "threads")
    scheduler.add_job(
        lambda: seen.append(current_run.get()),
        "interval",
        minutes=1,
        id="sync",
        executor="threads",
    )
    await fastsched_clock.advance(minutes=2)
    assert seen == [RunRef("sync", at(minute=1)), RunRef("sync", at(minute=2))]


async def test_an_off_grid_timer_leaves_the_loop_clock_on_the_microsecond_grid(
    fastsched_clock: VirtualClock,
) -> None:
    # A timer armed between two virtual microseconds (on the real clock, before the clock
    # attached): when it fires, the loop's clock must stay on the grid, or the next timer
    # armed from it (APScheduler's wake-up) rounds to a microsecond past the advance() target.
    loop = asyncio.get_running_loop()
    origin = loop.time()
    seen: list[float] = []
    loop.call_later(10.0000004, lambda: seen.append(loop.time() - origin))
    await fastsched_clock.advance(seconds=20)
    assert len(seen) == 1
    assert abs(seen[0] - 10) < 1e-7


def _timers_at_one_instant(loop: asyncio.AbstractEventLoop, delay: float) -> list[str]:
    """Timers due together, what they queue, arm for the same instant and start: the order."""
    order: list[str] = []
    when = loop.time() + delay

    async def task() -> None:
        order.append("task starts")
        await asyncio.sleep(0)
        order.append("task resumes")

    def first() -> None:
        order.append("timer 1")
        loop.call_soon(lambda: (order.append("soon of 1"), loop.call_soon(order.append, "soon²")))
        loop.call_at(loop.time(), order.append, "timer armed by 1 for now")

    def second() -> None:
        order.append("timer 2")
        loop.create_task(task())
        loop.call_soon(order.append, "soon of 2")

    loop.call_at(when, first)
    loop.call_at(when, second)
    loop.call_at(when + delay, order.append, "next instant")
    return order


async def test_timers_due_together_run_in_the_order_of_asyncios_own_loop(
    fastsched_clock: VirtualClock,
) -> None:
    # When time steps to an instant, the clock runs its due timers inside the loop's select
    # (one loop iteration less per step): what they queue and arm must still run in the
    # order the loop gives on real time.
    async def on_real_time() -> list[str]:
        order = _timers_at_one_instant(asyncio.get_running_loop(), 0.01)
        while "next instant" not in order:
            await asyncio.sleep(0.005)
        return order

    expected = await asyncio.to_thread(asyncio.run, on_real_time())
    order = _timers_at_one_instant(asyncio.get_running_loop(), 60)
    await fastsched_clock.advance(minutes=1)
    assert order == expected[: expected.index("next instant")]
    await fastsched_clock.advance(minutes=1)
    assert order == expected
    assert expected[:4] == ["timer 1", "timer 2", "soon of 1", "task starts"]


async def test_job_exception_is_raised_at_its_instant_and_stops_time(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    async def fails_on_third() -> None:
        if len(fastsched_scheduler.runs_of("flaky")) == 3:
            raise ValueError("third run broke")

    scheduler.add_job(fails_on_third, "interval", minutes=5, id="flaky")
    with pytest.raises(JobRunError) as excinfo:
        await fastsched_clock.advance(hours=1)
    message = str(excinfo.value)
    assert message.startswith(
        "job 'flaky' (scheduled 2030-01-01T00:15:00+00:00) raised ValueError: third run broke\n"
        "at virtual 2030-01-01T00:15:00+00:00\n"
    )
    assert "fails_on_third" in message
    assert isinstance(excinfo.value.__cause__, ValueError)
    assert fastsched_clock.now() == at(minute=15)
    assert fastsched_scheduler.run_times("flaky") == [at(minute=5), at(minute=10), at(minute=15)]


async def test_expected_job_error_is_recorded_not_raised(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    async def boom() -> None:
        raise RuntimeError("boom")

    scheduler.add_job(boom, "interval", minutes=5, id="boom")
    with fastsched_scheduler.expect_job_error(RuntimeError, match="bo+m") as errors:
        await fastsched_clock.advance(minutes=10)
    assert [run.scheduled for run in errors] == [at(minute=5), at(minute=10)]


async def test_expect_job_error_fails_when_nothing_raised(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    async def fine() -> None:
        pass

    scheduler.add_job(fine, "interval", minutes=5, id="fine")
    with (
        pytest.raises(AssertionError) as excinfo,
        fastsched_scheduler.expect_job_error(KeyError, job_id="fine"),
    ):
        await fastsched_clock.advance(minutes=5)
    assert str(excinfo.value) == (
        "expected a job to raise KeyError in job 'fine' but none did.\n"
        "Run log:\n"
        "  fine  scheduled 2030-01-01T00:05:00+00:00  success  (0s)"
    )


@pytest.mark.fastsched(job_errors="record")
async def test_job_errors_record_mode_keeps_going(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    async def boom() -> None:
        raise RuntimeError("boom")

    scheduler.add_job(boom, "interval", minutes=5, id="boom")
    await fastsched_clock.advance(minutes=15)
    assert [run.outcome for run in fastsched_scheduler.runs_of("boom")] == ["error"] * 3


async def test_jitter_is_reproducible_under_a_seed(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    fired: list[dt.datetime] = []

    async def job() -> None:
        fired.append(dt.datetime.now(UTC))

    async def run_day(job_id: str) -> list[dt.datetime]:
        random.seed(1234)
        fired.clear()
        scheduler.add_job(job, "interval", hours=1, jitter=120, id=job_id)
        await fastsched_clock.advance(hours=6)
        scheduler.remove_job(job_id)
        return [t - fastsched_clock.now() for t in fired]  # type: ignore[misc]

    first = await run_day("a")
    second = await run_day("b")
    assert first == second
    assert len(first) >= 5
    assert len({delta.total_seconds() % 3600 for delta in first}) > 1


async def test_run_job_fires_now_and_keeps_the_schedule(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    async def job() -> str:
        return "done"

    scheduler.add_job(job, "interval", minutes=5, id="job")
    await fastsched_clock.advance(minutes=2)
    run = await fastsched_scheduler.run_job("job")
    assert (run.scheduled, run.outcome, run.retval, run.manual) == (
        at(minute=2),
        "success",
        "done",
        True,
    )
    assert fastsched_scheduler.next_run_times("job", 3) == [
        at(minute=5),
        at(minute=10),
        at(minute=15),
    ]
    await fastsched_clock.advance(minutes=3)
    assert fastsched_scheduler.run_times("job") == [at(minute=2), at(minute=5)]


async def test_async_job_on_thread_pool_is_an_error(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    async def never_runs() -> None:
        raise AssertionError("unreachable")

    scheduler.add_executor(ThreadPoolExecutor(1), "threads")
    scheduler.add_job(never_runs, "interval", minutes=5, id="wrong", executor="threads")
    with pytest.raises(JobRunError) as excinfo:
        await fastsched_clock.advance(minutes=5)
    assert (
        "job 'wrong' is an async def function on executor 'threads': APScheduler would call "
        "it in a thread, get a coroutine back and report success without running it. Run it "
        "on the AsyncIOScheduler's default executor (remove executor=...)."
    ) in str(excinfo.value)


async def test_time_moves_on_a_loop_whose_select_another_library_patched(
    fastsched_clock_backend: str,
) -> None:
    # The clock steps from the selector's select() when it can patch it; when it cannot (a
    # patch already there), from a loop callback that waits for work in flight the slow way.
    loop = asyncio.get_running_loop()
    selector = loop._selector  # type: ignore[attr-defined]
    selector.select = selector.select  # an instance attribute, as another patch leaves
    clock = VirtualClock(start=START, backend=fastsched_clock_backend)
    clock.start()
    try:
        harness = SchedulerHarness(clock)
        scheduler = AsyncIOScheduler(timezone="UTC")
        seen: list[dt.datetime] = []

        async def job() -> None:
            # Work in flight on a thread holds the clock until it ends.
            seen.append(await asyncio.to_thread(dt.datetime.now, UTC))

        scheduler.add_job(job, "interval", minutes=5, id="tick")
        harness.attach(scheduler)
        clock.attach()
        assert clock._loop_patch is not None
        assert not clock._loop_patch.watches_select
        await clock.advance(hours=1)
        expected = [START + dt.timedelta(minutes=5 * n) for n in range(1, 13)]
        assert seen == expected
        assert harness.run_times("tick") == expected
        harness.close()
    finally:
        clock.close()
        del selector.select


class _RefusingExecutor(AsyncIOExecutor):
    def _do_submit_job(self, job: Any, run_times: list[dt.datetime]) -> Any:
        raise RuntimeError("no room")


async def test_a_run_the_async_executor_refuses_is_a_job_error(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    # The run is opened before its executor gets it; APScheduler only logs the refusal.
    async def tick() -> None:
        pass

    scheduler.add_executor(_RefusingExecutor(), "refusing")
    scheduler.add_job(tick, "interval", minutes=5, id="tick", executor="refusing")
    with pytest.raises(JobRunError) as excinfo:
        await fastsched_clock.advance(minutes=5)
    assert (
        "job 'tick' (scheduled 2030-01-01T00:05:00+00:00) raised JobRunError: job 'tick' "
        "could not be given to its executor: RuntimeError: no room"
    ) in str(excinfo.value)
    assert [run.outcome for run in fastsched_scheduler.runs_of("tick")] == ["error"]


async def _imported_tick() -> None:
    pass


IMPORTED = AsyncIOScheduler(timezone="UTC")
IMPORTED.add_job(_imported_tick, "interval", minutes=5, id="imported")


async def test_jobs_added_at_import_are_reanchored_to_virtual_time(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness
) -> None:
    fastsched_scheduler.attach(IMPORTED)
    await fastsched_clock.advance(minutes=10)
    assert fastsched_scheduler.run_times("imported") == [at(minute=5), at(minute=10)]


async def test_date_job_computed_from_the_real_clock_is_reported(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness
) -> None:
    app_scheduler = AsyncIOScheduler(timezone="UTC")
    real_soon = fastsched_clock.real_start + dt.timedelta(minutes=1)
    app_scheduler.add_job(_imported_tick, "date", run_date=real_soon, id="soon")
    with pytest.warns(FastschedWarning) as record:
        fastsched_scheduler.attach(app_scheduler)
    assert str(record[0].message) == (
        f"job 'soon' runs at {real_soon.isoformat()}, a date computed from the real clock "
        f"before the virtual clock started at 2030-01-01T00:00:00+00:00; add the job inside "
        f"the test (or set @pytest.mark.fastsched(start=...)) so that it fires in virtual time"
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda clock: clock.advance(seconds=0),
            "advance() needs a positive duration, got datetime.timedelta(0): to run what is "
            "due now without moving time, await run_until_idle()",
        ),
        (
            lambda clock: clock.advance(dt.timedelta(minutes=-1)),
            "advance() needs a positive duration, got datetime.timedelta(days=-1, seconds=86340)"
            ": to run what is due now without moving time, await run_until_idle()",
        ),
        (
            lambda clock: clock.advance_to(dt.datetime(2030, 1, 2)),
            "advance_to('2030-01-02T00:00:00') got a naive datetime: give it a tzinfo, "
            "e.g. 2030-01-02T00:00:00+00:00 or tzinfo=timezone.utc",
        ),
        (
            lambda clock: clock.advance_to(dt.datetime(2029, 12, 31, tzinfo=UTC)),
            "advance_to(2029-12-31T00:00:00+00:00) would move time backwards from "
            "2030-01-01T00:00:00+00:00: virtual time only moves forward",
        ),
        (
            lambda clock: clock.advance(dt.timedelta(seconds=1), minutes=1),
            "give advance() either a timedelta or keyword amounts, not both",
        ),
        (
            lambda clock: clock.advance("5m"),
            "advance() takes a timedelta or a number of seconds, not '5m'",
        ),
        (lambda clock: clock.advance(float("nan")), "advance(nan) needs a finite duration"),
        (lambda clock: clock.advance(float("inf")), "advance(inf) needs a finite duration"),
        (
            lambda clock: clock.advance(minutes=float("inf")),
            "advance(minutes=inf) needs a finite duration",
        ),
        (
            lambda clock: clock.advance(days=10**9),
            "advance(days=1000000000) is too long for a datetime",
        ),
        (
            lambda clock: clock.advance(days=999_999_999),
            "advance() would move time past 9999-12-31T23:59:59.999999+00:00, the last instant "
            "a datetime can hold (now 2030-01-01T00:00:00+00:00)",
        ),
        (
            lambda clock: clock.jump(-5),
            "jump() needs a positive duration, got datetime.timedelta(days=-1, seconds=86395): "
            "to run what is due now without moving time, await run_until_idle()",
        ),
    ],
    ids=[
        "zero",
        "negative",
        "naive",
        "backwards",
        "both",
        "string",
        "nan",
        "inf",
        "inf-kw",
        "overflow",
        "past-max",
        "jump-negative",
    ],
)
async def test_bad_clock_calls_name_the_fix(
    fastsched_clock: VirtualClock, call, message: str
) -> None:
    with pytest.raises(ClockError) as excinfo:
        await call(fastsched_clock)
    assert excinfo.value.args == (message,)
    assert fastsched_clock.now() == START


async def test_unknown_job_id_lists_the_known_ones(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    async def job() -> None:
        pass

    scheduler.add_job(job, "interval", minutes=5, id="known")
    await fastsched_clock.run_until_idle()
    with pytest.raises(LookupError) as excinfo:
        await fastsched_scheduler.run_job("unknown")
    assert excinfo.value.args == ("no job with id 'unknown'; the scheduler has: 'known'",)
    with pytest.raises(LookupError):
        fastsched_scheduler.assert_ran("unknown")


async def test_a_scheduler_the_plugin_cannot_drive_is_refused(
    fastsched_scheduler: SchedulerHarness,
) -> None:
    with pytest.raises(pytest.UsageError) as excinfo:
        fastsched_scheduler.attach(object())
    assert excinfo.value.args == (
        "fastsched_scheduler needs an apscheduler AsyncIOScheduler or BackgroundScheduler, got "
        "builtins.object: the plugin drives an AsyncIOScheduler "
        "or a BackgroundScheduler. Create the app's scheduler as AsyncIOScheduler() (async "
        "jobs) or BackgroundScheduler() (sync jobs).",
    )


@pytest.mark.parametrize("fastsched_clock_backend", ["freezegun"])
async def test_watchdog_names_a_job_that_never_finishes(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    release = threading.Event()

    def stuck() -> None:
        release.wait(10)

    fastsched_clock.watchdog_seconds = 0.3
    scheduler.add_job(stuck, "date", run_date=at(minute=1), id="stuck")
    try:
        with pytest.raises(WatchdogTimeout) as excinfo:
            await fastsched_clock.advance(minutes=2)
    finally:
        release.set()
    assert str(excinfo.value).startswith(
        "fastsched watchdog: work did not finish within 0.3 real seconds at virtual "
        "2030-01-01T00:01:00+00:00.\n"
        "Still running:\n"
        "  job 'stuck' (scheduled 2030-01-01T00:01:00+00:00)\n"
    )


async def test_a_job_due_at_the_start_instant_fires_at_the_first_clock_call(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    fired: list[dt.datetime] = []

    async def at_start() -> None:
        fired.append(dt.datetime.now(UTC))

    scheduler.add_job(at_start, "cron", minute=0, id="hourly")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert fired == []
    assert scheduler.running
    await fastsched_clock.run_until_idle()
    assert fired == [START]


async def test_a_sleep_in_the_test_moves_virtual_time_like_advance_to(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    ticks: list[dt.datetime] = []

    async def tick() -> None:
        ticks.append(dt.datetime.now(UTC))

    scheduler.add_job(tick, "interval", minutes=1, id="tick")
    started = time.monotonic()
    await asyncio.sleep(600)
    assert time.monotonic() - started < 5
    assert fastsched_clock.now() == at(minute=10)
    assert ticks == [at(minute=n) for n in range(1, 11)]  # the one due at 00:10 too
    await fastsched_clock.advance(seconds=1)
    assert fastsched_clock.now() == at(minute=10, second=1)


@pytest.mark.skipif(not hasattr(asyncio, "timeout"), reason="asyncio.timeout: Python 3.11+")
async def test_timeouts_in_the_test_expire_in_virtual_time(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness
) -> None:
    with pytest.raises((asyncio.TimeoutError, TimeoutError)):
        await asyncio.wait_for(asyncio.Event().wait(), timeout=300)
    assert fastsched_clock.now() == at(minute=5)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(60):
            await asyncio.Event().wait()
    assert fastsched_clock.now() == at(minute=6)


async def test_a_test_woken_before_its_timer_stops_time_there(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    event = asyncio.Event()

    async def release() -> None:
        event.set()

    scheduler.add_job(release, "date", run_date=at(minute=5), id="release")
    await asyncio.wait_for(event.wait(), timeout=3600)
    await fastsched_clock.advance(seconds=1)
    assert fastsched_clock.now() == at(minute=5, second=1)


async def test_a_job_error_during_the_tests_sleep_is_raised_at_the_sleep(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler
) -> None:
    async def boom() -> None:
        raise ValueError("boom")

    scheduler.add_job(boom, "date", run_date=at(minute=5), id="boom")
    with pytest.raises(JobRunError, match="job 'boom'"):
        await asyncio.sleep(3600)
    assert fastsched_clock.now() == at(minute=5)

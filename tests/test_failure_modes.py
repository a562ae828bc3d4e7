"""Every stuck or runaway job ends in one failed test that names it; the session goes on.

Each failure mode runs in a user suite (through pytester) followed by a test that checks the
state it left, as the soak suite's conftest does: a clean database, the real wall clock and
loop clock, the scheduler stopped with its own jobs, no thread and no task. The whole inner
session must finish within a few watchdog periods, and leave no thread, open file or
PostgreSQL server behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

APP = """
import asyncio

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import String
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(20))


engine = create_async_engine("sqlite+aiosqlite:///production.db")
async_session_factory = async_sessionmaker(engine, expire_on_commit=False)
scheduler = AsyncIOScheduler(timezone="UTC")


async def write(status):
    async with async_session_factory() as session:
        session.add(Item(status=status))
        await session.commit()
"""

CONFTEST = """
import asyncio
import datetime as dt
import json
import os
import threading
import time
import warnings

import pytest

import app

REAL_DATETIME = dt.datetime
REAL_TIME = time.time
REAL_CLOCKS = (time.monotonic, time.monotonic_ns, time.sleep)


@pytest.fixture
def after():
    async def check(db):
        assert dt.datetime is REAL_DATETIME and time.time is REAL_TIME
        assert (time.monotonic, time.monotonic_ns, time.sleep) == REAL_CLOCKS
        assert dt.datetime.now().year < 2030
        assert abs(time.time() - dt.datetime.now().timestamp()) < 5
        assert abs(asyncio.get_running_loop().time() - time.monotonic()) < 5
        assert not app.scheduler.running
        assert app.scheduler.get_jobs() == []
        assert await db.fetch("items") == []
        threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        # aiosqlite's thread of the test engine's pooled connection serves every loop.
        assert [name for name in threads if name != "fastsched-sqlite-connection"] == []
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    return check


def pytest_configure(config):
    config.fds_at_start = set(os.listdir("/proc/self/fd"))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # After the plugin's own: its engines are disposed, its server stopped.
    for thread in threading.enumerate():
        if thread is not threading.main_thread():
            thread.join(2)
    # Some pytest-asyncio releases (1.0 to 1.2 with pytest 8.2) leave a fresh event loop set
    # as the current loop after the last test; it is theirs, not the plugin's: close it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            current = asyncio.get_event_loop()
        except RuntimeError:
            current = None
    if current is not None and not current.is_running():
        current.close()
    fds = set(os.listdir("/proc/self/fd")) - config.fds_at_start
    left = {
        "threads": sorted(
            t.name for t in threading.enumerate() if t is not threading.main_thread()
        ),
        "files": sorted(
            os.readlink(f"/proc/self/fd/{fd}")
            for fd in fds
            if os.path.exists(f"/proc/self/fd/{fd}")
        ),
    }
    with open("leftovers.json", "w") as file:
        json.dump(left, file)
"""

SUITE = """
import asyncio
import datetime as dt
import threading
import time

import pytest
from apscheduler.executors.pool import ThreadPoolExecutor

import app

AT = "2030-01-01 00:01:00+00:00"


def add(func, job_id, **options):
    app.scheduler.add_job(func, "date", run_date=AT, id=job_id, **options)


def spin():
    while True:
        pass


def poll_wall_clock():
    start = dt.datetime.now()
    while dt.datetime.now() < start + dt.timedelta(seconds=30):
        threading.Event().wait(0.1)


async def block_loop():
    while True:
        pass


async def swallow_cancel():
    while True:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass


async def write_later():
    await asyncio.sleep(600)
    await app.write("leaked")


async def spawn():
    asyncio.create_task(write_later())


def boom():
    raise ValueError("boom during the test's sleep")


async def fan_out():
    await asyncio.gather(asyncio.sleep(3600), asyncio.sleep(7200))


async def test_thread_spins(fastsched_clock, fastsched_scheduler, fastsched_db):
    await fastsched_db.insert("items", [{"id": 1, "status": "pending"}])
    add(spin, "spin")
    await fastsched_clock.advance(minutes=2)


async def test_thread_spins_after(fastsched_db, after):
    await after(fastsched_db)


async def test_thread_polls_wall_clock(fastsched_clock, fastsched_scheduler, fastsched_db):
    await fastsched_db.insert("items", [{"id": 1, "status": "pending"}])
    if "threads" not in app.scheduler._executors:
        app.scheduler.add_executor(ThreadPoolExecutor(2), "threads")
    add(poll_wall_clock, "poll", executor="threads")
    await fastsched_clock.advance(minutes=2)


async def test_thread_polls_wall_clock_after(fastsched_db, after):
    await after(fastsched_db)


async def test_loop_blocked(fastsched_clock, fastsched_scheduler, fastsched_db):
    await fastsched_db.insert("items", [{"id": 1, "status": "pending"}])
    add(block_loop, "block")
    await fastsched_clock.advance(minutes=2)


async def test_loop_blocked_after(fastsched_db, after):
    await after(fastsched_db)


async def test_cancel_swallowed(fastsched_clock, fastsched_scheduler, fastsched_db):
    await fastsched_db.insert("items", [{"id": 1, "status": "pending"}])
    add(swallow_cancel, "stubborn")
    await fastsched_clock.advance(minutes=2)


async def test_cancel_swallowed_after(fastsched_db, after):
    await after(fastsched_db)


async def test_spawned_task_leaks(fastsched_clock, fastsched_scheduler, fastsched_db):
    add(spawn, "spawner")
    await fastsched_clock.advance(minutes=2)


async def test_spawned_task_leaks_after(fastsched_db, after):
    await asyncio.sleep(0.05)
    await after(fastsched_db)


async def test_sleep_in_the_test_is_virtual_time(fastsched_clock, fastsched_scheduler):
    fired = []
    app.scheduler.add_job(
        fired.append, "date", run_date="2030-01-01 00:02:30+00:00", args=[1], id="half"
    )
    await fastsched_clock.advance(minutes=2)
    started = time.monotonic()
    await asyncio.sleep(60)
    assert time.monotonic() - started < 1
    assert fastsched_clock.now() == dt.datetime(2030, 1, 1, 0, 3, tzinfo=dt.timezone.utc)
    assert fired == [1]


async def test_sleep_in_the_test_is_virtual_time_after(fastsched_db, after):
    await after(fastsched_db)


async def test_a_running_jobs_own_tasks_are_no_leak(fastsched_clock, fastsched_scheduler):
    add(fan_out, "fan_out")
    await fastsched_clock.advance(minutes=2)
    assert [run.outcome for run in fastsched_scheduler.runs_of("fan_out")] == ["running"]


async def test_a_running_jobs_own_tasks_are_no_leak_after(fastsched_db, after):
    await after(fastsched_db)


async def test_job_error_during_the_tests_sleep(fastsched_clock, fastsched_scheduler):
    add(boom, "boom")
    await asyncio.sleep(120)


async def test_job_error_during_the_tests_sleep_after(fastsched_db, after):
    await after(fastsched_db)
"""

TESTS = SUITE.count("\nasync def test_")
WATCHDOG = 1.0
FAILED = [
    "test_thread_spins",
    "test_thread_polls_wall_clock",
    "test_loop_blocked",
    "test_cancel_swallowed",
    "test_spawned_task_leaks",
    "test_job_error_during_the_tests_sleep",
]
MESSAGES = [
    [
        "E       pytest_fastsched._clock.WatchdogTimeout: fastsched watchdog: work did not "
        "finish within 1 real seconds at virtual 2030-01-01T00:01:00+00:00.",
        "E       Still running:",
        "E         job 'spin' (scheduled 2030-01-01T00:01:00+00:00)",
        "E       Thread fastsched-thread_* running job 'spin' (scheduled "
        "2030-01-01T00:01:00+00:00): stopped (JobStopped raised in it). It was at:",
        'E             File "*test_modes.py", line *, in spin',
    ],
    [
        "E         job 'poll' (scheduled 2030-01-01T00:01:00+00:00)",
        "E       Thread fastsched-threads_* running job 'poll' (scheduled "
        "2030-01-01T00:01:00+00:00): stopped (JobStopped raised in it). It was at:",
        'E             File "*test_modes.py", line *, in poll_wall_clock',
        "E               threading.Event().wait(0.1)",
    ],
    [
        "E       Under virtual time the wall clock (datetime.now(), time.time()) stands still "
        "except inside fastsched_clock calls, in every thread: a loop that waits for the wall "
        "clock to pass a deadline never ends unless it sleeps in virtual time. Sleep with "
        "asyncio.sleep() in an async job or time.sleep() in a job thread; threading's own "
        "timeouts (Event.wait, Queue.get) wait in real time.",
    ],
    [
        "E         job 'block' (scheduled 2030-01-01T00:01:00+00:00)",
        "E       The event loop was blocked by job 'block' (scheduled "
        "2030-01-01T00:01:00+00:00), which ran without awaiting for the whole limit; the "
        "watchdog interrupted it (JobStopped raised in it). It was at:",
        'E             File "*test_modes.py", line *, in block_loop',
    ],
    [
        "E * pytest_fastsched._leftovers.LeftoverWorkError: fastsched: the test's jobs "
        "left work running when the test ended:",
        "* job 'stubborn' (scheduled 2030-01-01T00:01:00+00:00): task * ignored "
        "cancellation (it caught CancelledError and kept running, at swallow_cancel "
        "(*test_modes.py:*), awaiting sleep); it was closed by force.*",
    ],
    [
        "* job 'spawner' (scheduled 2030-01-01T00:01:00+00:00) started task *, "
        "still pending at the end of the test (at write_later (*test_modes.py:*), awaiting "
        "sleep); it was cancelled, so that it cannot run in a later test.*",
    ],
    [">       await asyncio.sleep(120)"],
    [
        "E * pytest_fastsched.JobRunError: job 'boom' (scheduled "
        "2030-01-01T00:01:00+00:00) raised ValueError: boom during the test's sleep",
        "E * at virtual 2030-01-01T00:01:00+00:00",
    ],
]


@pytest.mark.parametrize(
    ("loop_scope", "backend", "database"),
    [
        ("function", "freezegun", "sqlite"),
        ("session", "freezegun", "sqlite"),
        ("session", "time-machine", "sqlite"),
        ("function", "time-machine", "postgresql"),
    ],
)
def test_each_failure_mode_fails_one_test_and_the_session_goes_on(
    pytester: pytest.Pytester, user_tmpdir: Path, loop_scope: str, backend: str, database: str
) -> None:
    pytester.makeini(
        f"""
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = {loop_scope}
        asyncio_default_test_loop_scope = {loop_scope}
        fastsched_scheduler = app:scheduler
        fastsched_sessionmaker = app:async_session_factory
        fastsched_metadata = app:Base.metadata
        fastsched_clock_backend = {backend}
        fastsched_database = {database}
        fastsched_watchdog = {WATCHDOG}
        """
    )
    pytester.makepyfile(app=APP, conftest=CONFTEST, test_modes=SUITE)
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:randomly", timeout=60)
    elapsed = time.monotonic() - started
    result.assert_outcomes(failed=len(FAILED), passed=TESTS - len(FAILED))
    failed = [
        line.split("::")[1].split(" ")[0]
        for line in result.stdout.lines
        if line.startswith("FAILED ")
    ]
    assert failed == FAILED
    for lines in MESSAGES:
        result.stdout.fnmatch_lines(lines, consecutive=True)
    leftovers = json.loads((pytester.path / "leftovers.json").read_text())
    assert leftovers == {"threads": [], "files": []}
    assert list(user_tmpdir.iterdir()) == []  # the ephemeral server's directory included
    # Four watchdog periods for the hangs (a stopped thread is waited for up to one more),
    # a cancellation grace for the stubborn task, and the start-up of the inner session (and
    # of its PostgreSQL server).
    assert elapsed < 8 * WATCHDOG + (20 if database == "postgresql" else 10)


def scheduler_suite(pytester: pytest.Pytester, *ini_lines: str) -> None:
    """A user project whose app is an AsyncIOScheduler (``app:scheduler``), and no database."""
    pytester.makeini(
        "\n".join(
            [
                "[pytest]",
                "asyncio_mode = auto",
                "asyncio_default_fixture_loop_scope = function",
                "fastsched_scheduler = app:scheduler",
                *ini_lines,
            ]
        )
    )
    pytester.makepyfile(
        app="from apscheduler.schedulers.asyncio import AsyncIOScheduler\n"
        "scheduler = AsyncIOScheduler(timezone='UTC')\n"
    )


def test_a_thread_blocked_in_c_code_is_left_behind_and_the_session_ends(
    pytester: pytest.Pytester,
) -> None:
    scheduler_suite(pytester, "fastsched_watchdog = 0.5")
    pytester.makepyfile(
        test_blocked="""
        import datetime as dt
        import threading

        import app

        def wait_forever():
            threading.Event().wait()

        async def test_blocked(fastsched_clock, fastsched_scheduler):
            app.scheduler.add_job(wait_forever, "date", run_date=fastsched_clock.now(), id="w")
            await fastsched_clock.advance(minutes=1)

        def test_after():
            assert dt.datetime.now().year < 2030
        """,
    )
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:randomly", timeout=60)
    assert time.monotonic() - started < 20
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "E       Thread fastsched-thread_* running job 'w' (scheduled "
            "2030-01-01T00:00:00+00:00): could not be stopped (blocked outside Python code); "
            "left running as a daemon thread. It was at:",
            'E             File "*test_blocked.py", line *, in wait_forever',
        ]
    )


def test_a_job_cleaning_up_with_real_work_at_the_tests_end_is_not_cancelled_again(
    pytester: pytest.Pytester,
) -> None:
    # A job run still running at the end of its test is cancelled; its cleanup may wait for
    # real work (a rollback, a thread) while other tasks keep the loop busy: it gets real
    # time to finish before it is cancelled again.
    scheduler_suite(pytester)
    pytester.makepyfile(
        test_cleanup="""
        import asyncio
        import threading

        import app

        CLEANED = []


        async def cleans_up_with_real_work():
            try:
                await asyncio.sleep(3600)
            finally:
                await asyncio.to_thread(threading.Event().wait, 0.003)  # real time
                CLEANED.append("cleaned")


        async def keeps_the_loop_busy_while_it_cleans_up():
            try:
                await asyncio.sleep(3600)
            finally:
                for _ in range(20):
                    try:
                        await asyncio.sleep(0)
                    except asyncio.CancelledError:
                        pass


        async def test_jobs_running_at_the_end(fastsched_clock, fastsched_scheduler):
            for job in (cleans_up_with_real_work, keeps_the_loop_busy_while_it_cleans_up):
                app.scheduler.add_job(job, "date", run_date=fastsched_clock.now())
            await fastsched_clock.advance(minutes=1)


        def test_the_cleanup_ran_to_its_end():
            assert CLEANED == ["cleaned"]
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", timeout=60)
    result.assert_outcomes(passed=2)

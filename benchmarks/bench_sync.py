"""Speed of a sync app in virtual time: python benchmarks/bench_sync.py [--rounds 5]

1. One virtual day of a 1-minute ``def`` job on a ``BackgroundScheduler``'s thread pool doing
   one SQLite round trip through a sync engine (pysqlite), on each wall-clock backend,
   against calling the same job body 1440 times in a plain loop (the per-round ratio; target
   at most 1.5x), and against APScheduler's own work for the same day: the scheduler, not
   started, its ``_process_jobs()`` called at each minute under the same wall clock, each run
   given to its own ``ThreadPoolExecutor`` and waited for (trigger arithmetic, job store,
   the pool's thread hand-off and done callback: what any harness pays), and against the
   body handed to a ``ThreadPoolExecutor`` and waited for 1440 times with no scheduler at all
   (the floor of running the job on a thread pool, as APScheduler does). Beside it, in the
   same run, the async figure of ``bench_clock.py``: an ``AsyncIOScheduler``'s ``async def``
   job doing the round trip through aiosqlite, against awaiting its body 1440 times.
2. The sync job through the plugin's rollback isolation, as a test with ``fastsched_db``
   runs it: the app's ``SessionLocal`` bound to the test connection, each of its calls handed
   from the job's thread to the test's loop; against the body called 1440 times with a
   plain session (reported: the cost of sharing the test's connection).

The sides of each measure alternate A B B A (``abba.py``), ``--rounds`` times; the report
gives medians with their range and the median and range of the per-round ratios. The
figures and the load average of the last run are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import abba
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import sessionmaker

from pytest_fastsched import _db, _options
from pytest_fastsched._clock import VirtualClock
from pytest_fastsched._scheduler import SchedulerHarness
from pytest_fastsched._wallclock import make_wall_clock

START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
FIRES = 1440
BACKENDS = ("time-machine", "freezegun")

metadata = MetaData()
Table("items", metadata, Column("id", Integer, primary_key=True))
SessionLocal = sessionmaker()
"""The app's sync sessionmaker of measure 2, bound for each test by the plugin."""


def _sync_round_trip(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("select 1"))


async def _async_round_trip(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("select 1"))


def _session_round_trip() -> None:
    with SessionLocal() as session:
        session.execute(text("select 1"))


async def _virtual_day(scheduler: Any, job: Callable[[], Any], backend: str) -> float:
    """Seconds of one virtual day of ``job`` every minute on ``scheduler``."""
    clock = VirtualClock(start=START, backend=backend)
    clock.start()
    harness = SchedulerHarness(clock)
    scheduler.add_job(job, "interval", minutes=1, id="job")
    harness.attach(scheduler)
    clock.attach()
    try:
        began = time.perf_counter()
        await clock.advance(days=1)
        elapsed = time.perf_counter() - began
        assert len(harness.run_times("job")) == FIRES
    finally:
        harness.close()
        clock.close()
    return elapsed


def _apscheduler_own(body: Callable[[], None], backend: str) -> float:
    """Seconds of APScheduler's own work for one virtual day of ``body`` every minute."""
    from apscheduler.schedulers.base import BaseScheduler

    wall = make_wall_clock(backend)
    wall.start(START)
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler._event = threading.Event()  # BlockingScheduler.wakeup() sets it
    scheduler.add_job(body, "interval", minutes=1, id="job")
    BaseScheduler.start(scheduler)  # no scheduler thread: the loop below is its thread
    executor = scheduler._lookup_executor("default")
    try:
        began = time.perf_counter()
        for minute in range(1, FIRES + 1):
            wall.move_to(START + dt.timedelta(minutes=minute))
            scheduler._process_jobs()
            while executor._instances.get("job"):  # until the run's done callback
                time.sleep(0)
        elapsed = time.perf_counter() - began
        assert scheduler.get_job("job").next_run_time == START + dt.timedelta(minutes=FIRES + 1)
    finally:
        BaseScheduler.shutdown(scheduler)
        wall.stop()
    return elapsed


def _thread_pool_alone(body: Callable[[], None]) -> float:
    """Seconds of handing ``body`` to a thread pool and waiting for it, 1440 times: the floor
    of any harness that runs a job on the scheduler's thread pool, before any scheduling."""
    with ThreadPoolExecutor(max_workers=10) as pool:
        pool.submit(body).result()
        began = time.perf_counter()
        for _ in range(FIRES):
            pool.submit(body).result()
        return time.perf_counter() - began


def _plain(body: Callable[[], None]) -> float:
    began = time.perf_counter()
    for _ in range(FIRES):
        body()
    return time.perf_counter() - began


async def _plain_async(engine: AsyncEngine) -> float:
    began = time.perf_counter()
    for _ in range(FIRES):
        await _async_round_trip(engine)
    return time.perf_counter() - began


async def days(sync_engine: Engine, async_engine: AsyncEngine, rounds: int) -> None:
    """Measure 1."""
    body = lambda: _sync_round_trip(sync_engine)  # noqa: E731

    async def sync_side(side: str) -> float:
        if side == "plain":
            return _plain(body)
        if side == "thread pool":
            return _thread_pool_alone(body)
        if side.startswith("apscheduler "):
            return _apscheduler_own(body, side.split()[1])
        return await _virtual_day(BackgroundScheduler(timezone="UTC"), body, side)

    async def job() -> None:
        await _async_round_trip(async_engine)

    async def async_side(side: str) -> float:
        if side == "plain":
            return await _plain_async(async_engine)
        return await _virtual_day(AsyncIOScheduler(timezone="UTC"), job, side)

    own = tuple(f"apscheduler {backend}" for backend in BACKENDS)
    sync_sides = ("plain", "thread pool", *BACKENDS, *own)
    sync = await abba.alternate_async(sync_side, sync_sides, rounds)
    asynchronous = await abba.alternate_async(async_side, ("plain", *BACKENDS), rounds)
    print("| measure | median (range) | ratio: median (range) |")
    print("|---|---|---|")
    print(
        "| the sync body handed to a thread pool and waited for, 1440 times (no scheduler) | "
        f"{abba.ms(sync['thread pool'], 0)} | "
        f"{abba.ratio(sync['thread pool'], sync['plain'])} of plain |"
    )
    for backend in BACKENDS:
        print(
            f"| APScheduler's own work for the sync day (its thread pool), {backend} | "
            f"{abba.ms(sync['apscheduler ' + backend], 0)} | "
            f"{abba.ratio(sync['apscheduler ' + backend], sync['plain'])} of plain; harness "
            f"{abba.ratio(sync[backend], sync['apscheduler ' + backend])} of it |"
        )
    for name, figures, kind in (
        (
            "sync: 1440 calls of the def job body (pysqlite round trip)",
            sync,
            "BackgroundScheduler",
        ),
        (
            "async: 1440 awaits of the job body (aiosqlite round trip)",
            asynchronous,
            "AsyncIOScheduler",
        ),
    ):
        print(f"| {name} | {abba.ms(figures['plain'], 0)} | |")
        for backend in BACKENDS:
            ratio = abba.ratio(figures[backend], figures["plain"])
            print(
                f"| virtual day, 1-minute job on a {kind}, {backend} | "
                f"{abba.ms(figures[backend], 0)} | {ratio} of plain |"
            )


def settings() -> _options.Settings:
    """Settings as the plugin reads them, pointing at this module's app objects."""
    return _options.Settings(
        scheduler=None,
        sessionmaker="__main__:SessionLocal",
        metadata="__main__:metadata",
        app=None,
        database="sqlite",
        clock_backend="time-machine",
        start=START,
        watchdog=30.0,
    )


async def isolated(databases: _db.Databases, sync_engine: Engine, rounds: int) -> None:
    """Measure 2."""

    async def side(name: str) -> float:
        if name == "plain":
            SessionLocal.configure(bind=sync_engine)
            return _plain(_session_round_trip)
        clock = VirtualClock(start=START, backend="time-machine")
        async with databases.open_test("rollback", clock=clock):
            return await _virtual_day(
                BackgroundScheduler(timezone="UTC"), _session_round_trip, "time-machine"
            )

    await side("isolated")  # warm-up: the test database and engine
    figures = await abba.alternate_async(side, ("plain", "isolated"), rounds)
    ratio = abba.ratio(figures["isolated"], figures["plain"])
    plain = abba.ms(figures["plain"], 0)
    print(
        f"| def job with SessionLocal on the test connection (rollback isolation), time-machine"
        f" | {abba.ms(figures['isolated'], 0)} | {ratio} of plain ({plain}) |"
    )


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "bench.db"
        sync_engine = create_engine(f"sqlite:///{path}")
        async_engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
        _sync_round_trip(sync_engine)
        await _async_round_trip(async_engine)
        await days(sync_engine, async_engine, rounds)
        await async_engine.dispose()
        databases = _db.Databases(settings())
        try:
            await isolated(databases, sync_engine, rounds)
        finally:
            databases.close()
            sync_engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()
    abba.header(f"bench_sync: a sync app in virtual time, {arguments.rounds} rounds")
    asyncio.run(main(arguments.rounds))
    abba.footer()

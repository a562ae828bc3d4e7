"""Speed of virtual time: python benchmarks/bench_clock.py

1. One virtual day of a 1-minute interval job doing one SQLite round trip, against awaiting
   the same job body 1440 times in a plain loop (ratio, same run; target at most 1.5x).
2. Harness overhead per firing of a no-op job (median of the per-firing cost over runs).
3. Clock set-up + tear-down per test for each wall-clock backend (median of 200).

Prints a markdown table; figures are medians of repeated runs in one process.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from pytest_fastsched._clock import VirtualClock
from pytest_fastsched._scheduler import SchedulerHarness

START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
REPEATS = 5


async def _round_trip(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("select 1"))


async def _virtual_day(engine: AsyncEngine | None, backend: str) -> float:
    clock = VirtualClock(start=START, backend=backend)
    clock.start()
    harness = SchedulerHarness(clock)
    scheduler = AsyncIOScheduler(timezone="UTC")

    async def job() -> None:
        if engine is not None:
            await _round_trip(engine)

    scheduler.add_job(job, "interval", minutes=1, id="job")
    harness.attach(scheduler)
    clock.attach()
    began = time.perf_counter()
    await clock.advance(days=1)
    elapsed = time.perf_counter() - began
    assert len(harness.run_times("job")) == 1440
    harness.close()
    clock.close()
    return elapsed


async def _plain_loop(engine: AsyncEngine) -> float:
    began = time.perf_counter()
    for _ in range(1440):
        await _round_trip(engine)
    return time.perf_counter() - began


def _setup_teardown(backend: str, count: int = 200) -> float:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        clock = VirtualClock(start=START, backend=backend)
        clock.start()
        clock.close()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


async def _median(run: Callable[[], Awaitable[float]]) -> float:
    return statistics.median([await run() for _ in range(REPEATS)])


async def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        engine = create_async_engine(f"sqlite+aiosqlite:///{Path(directory) / 'bench.db'}")
        await _round_trip(engine)
        plain = await _median(lambda: _plain_loop(engine))
        rows = [("plain loop: 1440 awaits of the job body (SQLite round trip)", plain, "")]
        for backend in ("freezegun", "time-machine"):
            day = await _median(lambda backend=backend: _virtual_day(engine, backend))
            rows.append((f"virtual day, 1-minute job + SQLite, {backend}", day, plain))
        await engine.dispose()
        for backend in ("freezegun", "time-machine"):
            noop = await _median(lambda backend=backend: _virtual_day(None, backend))
            per_fire_us = noop / 1440 * 1e6
            print(f"| harness overhead per firing, no-op job, {backend} | {per_fire_us:.0f} µs |")
    for label, seconds, baseline in rows:
        ratio = f" ({seconds / baseline:.2f}x plain)" if baseline else ""
        print(f"| {label} | {seconds * 1000:.0f} ms{ratio} |")
    for backend in ("freezegun", "time-machine"):
        print(
            f"| clock set-up + tear-down per test, {backend} | "
            f"{_setup_teardown(backend) * 1e6:.0f} µs |"
        )


if __name__ == "__main__":
    asyncio.run(main())

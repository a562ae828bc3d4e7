"""Speed of virtual time: python benchmarks/bench_clock.py [--rounds 5]

1. One virtual day of a 1-minute interval job doing one SQLite round trip, on each wall-clock
   backend, against awaiting the same job body 1440 times in a plain loop (the per-round
   ratio; target at most 1.5x).
2. Harness overhead per firing of a no-op job, on each backend (a no-op virtual day / 1440).
3. Clock set-up + tear-down per test for each wall-clock backend (median of 200 a round).

The sides of each measure alternate A B B A (``abba.py``), ``--rounds`` times; the report
gives medians with their range and the median and range of the per-round ratios. The
figures and the load average of the last run are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

import abba
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from pytest_fastsched._clock import VirtualClock
from pytest_fastsched._scheduler import SchedulerHarness

START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


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


BACKENDS = ("freezegun", "time-machine")


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        engine = create_async_engine(f"sqlite+aiosqlite:///{Path(directory) / 'bench.db'}")
        await _round_trip(engine)

        async def day(side: str) -> float:
            if side == "plain":
                return await _plain_loop(engine)
            return await _virtual_day(engine, side)

        days = await abba.alternate_async(day, ("plain", *BACKENDS), rounds)
        await engine.dispose()

        async def no_op_day(backend: str) -> float:
            return await _virtual_day(None, backend)

        no_ops = await abba.alternate_async(no_op_day, BACKENDS, rounds)
    setups = abba.alternate(_setup_teardown, BACKENDS, rounds)
    print("| measure | median (range) | ratio: median (range) |")
    print("|---|---|---|")
    print(
        "| plain loop: 1440 awaits of the job body (SQLite round trip) | "
        f"{abba.ms(days['plain'], 0)} | |"
    )
    for backend in BACKENDS:
        print(
            f"| virtual day, 1-minute job + SQLite, {backend} | {abba.ms(days[backend], 0)} | "
            f"{abba.ratio(days[backend], days['plain'])} of plain |"
        )
    for backend in BACKENDS:
        per_fire = [seconds / 1440 * 1e6 for seconds in no_ops[backend]]
        print(
            f"| harness overhead per firing, no-op job, {backend} | "
            f"{statistics.median(per_fire):.0f} µs ({min(per_fire):.0f}-{max(per_fire):.0f}) | |"
        )
    for backend in BACKENDS:
        micros = [seconds * 1e6 for seconds in setups[backend]]
        print(
            f"| clock set-up + tear-down per test, {backend} | "
            f"{statistics.median(micros):.0f} µs ({min(micros):.0f}-{max(micros):.0f}) | |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()
    abba.header(f"bench_clock: virtual time, {arguments.rounds} rounds")
    asyncio.run(main(arguments.rounds))
    abba.footer()

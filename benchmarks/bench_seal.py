"""What the seal costs: python benchmarks/bench_seal.py [--pairs 4]

Two measures, each with the seal off and on:

1. one virtual day of a 1-minute interval job doing one SQLite round trip (the virtual-day
   benchmark of ``bench_clock.py``, on the time-machine backend), the whole day sealed;
2. per-test rollback isolation on SQLite, in one event loop (``bench_db.py``'s measure), 300
   tests, each one sealed: the seal's start and end, and the test database's check.

Python cannot remove an audit hook, which the seal adds once a process seals a test, so each
side runs in a process of its own, the sides alternated A B B A, ``--pairs`` times. Prints
the median of each side, the median and range of the per-pair ratios (on / off), and the
load average.

Wall time on a shared 2-core machine moves by more than the seal costs, so the seal's own
work is also counted and timed on its own: how many times the audit hook runs per fire of the
virtual day (Python calls it for every audited event: ``id()``, attribute reads of frames...)
times what one call costs, and what sealing and unsealing one test costs; each as a share of
the median time of the measure it adds to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Iterator

import abba
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker

from pytest_fastsched import _db, _options, _seal
from pytest_fastsched._clock import VirtualClock
from pytest_fastsched._scheduler import SchedulerHarness

START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
TESTS = 300  # per-test isolation: tests measured per process
sessionmaker = async_sessionmaker(expire_on_commit=False)


def settings() -> _options.Settings:
    return _options.Settings(
        scheduler=None,
        sessionmaker="__main__:sessionmaker",
        metadata=None,
        app=None,
        database="sqlite",
        clock_backend="time-machine",
        start=START,
        watchdog=30.0,
    )


@contextlib.contextmanager
def maybe_sealed(sealed: bool, databases: _db.Databases) -> Iterator[None]:
    if not sealed:
        yield
        return
    with _seal.sealed(_seal.Seal(databases.owned)):
        yield


async def virtual_day(databases: _db.Databases, sealed: bool) -> float:
    await databases.setup()
    async with databases.open_test("rollback"):
        clock = VirtualClock(start=START, backend="time-machine")
        clock.start()
        harness = SchedulerHarness(clock)
        scheduler = AsyncIOScheduler(timezone="UTC")

        async def job() -> None:
            async with sessionmaker() as session:
                await session.execute(text("SELECT 1"))

        scheduler.add_job(job, "interval", minutes=1, id="job")
        harness.attach(scheduler)
        clock.attach()
        with maybe_sealed(sealed, databases):
            began = time.perf_counter()
            await clock.advance(days=1)
            elapsed = time.perf_counter() - began
        assert len(harness.run_times("job")) == 1440
        harness.close()
        clock.close()
    return elapsed


async def isolation(databases: _db.Databases, sealed: bool) -> float:
    await databases.setup()
    async with databases.open_test("rollback"):
        pass  # the pooled connection, made once
    samples = []
    for _ in range(TESTS):
        began = time.perf_counter()
        with maybe_sealed(sealed, databases):
            async with databases.open_test("rollback"):
                pass
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def side(measure: str, sealed: bool) -> float:
    """One measurement, in this process."""
    databases = _db.Databases(settings())
    try:
        run = virtual_day if measure == "day" else isolation
        return asyncio.run(run(databases, sealed))
    finally:
        databases.close()


def in_a_process(measure: str, sealed: bool) -> float:
    command = [sys.executable, __file__, "--side", measure, "--sealed" if sealed else "--open"]
    with tempfile.TemporaryDirectory() as directory:
        out = subprocess.run(
            command, check=True, capture_output=True, text=True, cwd=directory
        ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["seconds"])


def compare(measure: str, pairs: int) -> tuple[float, float, list[float]]:
    """The seal off and on, each in a process of its own, ``pairs`` times A B B A."""
    sides = {"off": False, "on": True}
    results = abba.alternate(lambda side: in_a_process(measure, sides[side]), sides, pairs)
    off, on = results["off"], results["on"]
    return statistics.median(off), statistics.median(on), abba.ratios(on, off)


def audit_events_per_fire() -> float:
    """Audited events per fire of the virtual day: the calls the seal's hook gets."""
    counted = [0]
    counting = [False]

    def hook(_event: str, _args: tuple[object, ...]) -> None:
        if counting[0]:
            counted[0] += 1

    sys.addaudithook(hook)
    databases = _db.Databases(settings())

    async def day() -> None:
        await databases.setup()
        counting[0] = True
        await virtual_day(databases, sealed=False)
        counting[0] = False

    try:
        asyncio.run(day())
    finally:
        databases.close()
    return counted[0] / 1440


def seal_work() -> dict[str, float]:
    """The seal's own costs, timed in this process (after the measurements)."""
    seal = _seal.Seal(lambda: (None, []))
    with _seal.sealed(seal):
        hook_call = timeit.timeit(lambda: _seal._audit("builtins.id", ()), number=200_000)
    cycle = timeit.timeit(
        lambda: _seal.sealed(seal).__enter__() or _seal._ACTIVE.pop(), number=50_000
    )
    return {"hook": hook_call / 200_000, "test": cycle / 50_000}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--events", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=("day", "isolation"))
    parser.add_argument("--sealed", action="store_true")
    parser.add_argument("--open", action="store_true")
    options = parser.parse_args()
    if options.side:
        print(json.dumps({"seconds": side(options.side, options.sealed)}))
        return
    if options.events:
        print(json.dumps({"events": audit_events_per_fire()}))
        return
    abba.header(f"bench_seal: the seal off and on, {options.pairs} pairs of processes")
    print("| measure | seal off | seal on | on/off: median (range) |")
    print("|---|---|---|---|")
    medians = {}
    for measure, label in (
        ("day", "virtual day, 1-minute job + SQLite, time-machine"),
        ("isolation", "per-test rollback isolation, SQLite, one loop"),
    ):
        off, on, ratios = compare(measure, options.pairs)
        medians[measure] = off
        print(
            f"| {label} | {off * 1e3:.2f} ms | {on * 1e3:.2f} ms | "
            f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}) |"
        )
    abba.footer()
    events = float(
        json.loads(
            subprocess.run(
                [sys.executable, __file__, "--events"], check=True, capture_output=True, text=True
            )
            .stdout.strip()
            .splitlines()[-1]
        )["events"]
    )
    work = seal_work()
    per_fire = medians["day"] / 1440
    print(
        f"seal's work per fire: {events:.1f} audit-hook calls x {work['hook'] * 1e9:.0f} ns = "
        f"{events * work['hook'] * 1e6:.2f} us, {events * work['hook'] / per_fire:.3%} of the "
        f"{per_fire * 1e6:.0f} us a fire takes"
    )
    print(
        f"seal's work per test: sealing and unsealing {work['test'] * 1e6:.2f} us, "
        f"{work['test'] / medians['isolation']:.2%} of the {medians['isolation'] * 1e3:.3f} ms "
        "of one test's rollback isolation"
    )


if __name__ == "__main__":
    main()

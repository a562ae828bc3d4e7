"""Per-fire cost of the harness against APScheduler's own job processing, and its growth.

    python benchmarks/bench_fire.py [fire|instructions|growth|many|all] [--reps N] [--days N]
        [--hours N] [--backend time-machine|freezegun]

What is measured (each figure in one process; sides alternate A B B A within every
repetition and the report gives the median and range of the per-repetition ratios):

fire   Per-fire cost of a no-op ``async def`` job on a 1-minute interval trigger, 1,440 fires
       (one virtual day), for each wall-clock backend:
       - harness:      ``await clock.advance(days=1)`` with a SchedulerHarness attached to an
                       AsyncIOScheduler (the plugin's real path: loop timers, settle, run log);
       - apscheduler:  "APScheduler's own": the same scheduler, job and wall-clock backend, but
                       no harness and no loop timers: the scheduler is started with its wake-up
                       timer disabled, and the benchmark loops 1,440 times over
                           wall.move_to(next minute); scheduler._process_jobs()
                           for future in list(executor._pending_futures): await future
                           while executor._pending_futures: await <bare yield>
                       (the executor's done callback was added before ours, so with one job
                       it has run when the await returns; with many, the loop lets the other
                       jobs' callbacks run before the clock moves)
                       i.e. trigger math, job-store update, executor submit, the job's task,
                       and the executor's done callback (which dispatches EVENT_JOB_EXECUTED),
                       each fire run to completion before the clock moves on;
       - timer floor:  no harness; APScheduler on its own loop timer, driven by a bare
                       settle-and-jump loop (what any harness of this design must pay);
       - callback floor: the same, settled by a loop callback instead of a coroutine;
       - sleep(0):     1,440 iterations of ``await asyncio.sleep(0)`` (the loop's floor).
       Per-fire cost = elapsed / 1,440.
instructions
       The same two sides' instructions per fire, counted by callgrind (load-independent;
       needs valgrind, skipped in ``all`` without it): each side runs once, in a process
       of its own, under ``valgrind --tool=callgrind --separate-threads=yes
       --dump-before=time_perf_counter``, which splits the counts at each
       ``time.perf_counter()`` call: the main thread's instructions between the two calls
       that time the 1,440 fires, over 1,440, are the figure (the set-up is left out); the
       callback floor (below) is counted the same way.
growth A 1-minute no-op job driven day by day (``advance(days=1)`` 30 times, one clock);
       the real time of every virtual day; reports the median of the last 5 days over that
       of the first 5 (target <= 1.1; single days jump with the machine's load).
many   100 no-op 1-minute jobs for N virtual hours (default 2 = 12,000 fires): harness
       against the APScheduler baseline above with the same 100 jobs (target <= 1.5x).
The virtual day of a 1-minute job doing one SQLite round trip against a plain loop, and the
clock's set-up and tear-down, are ``bench_clock.py``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any

import abba
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from pytest_fastsched._clock import VirtualClock
from pytest_fastsched._scheduler import SchedulerHarness
from pytest_fastsched._wallclock import from_us, make_wall_clock, to_us

START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
MINUTE = dt.timedelta(minutes=1)
BACKENDS = ("time-machine", "freezegun")


async def noop() -> None:
    pass


# -- the two sides ------------------------------------------------------------------------------


async def harness_run(backend: str, *, jobs: int = 1, minutes: int = 1440) -> float:
    """Real seconds of ``advance(minutes=...)`` with ``jobs`` no-op 1-minute jobs."""
    clock = VirtualClock(start=START, backend=backend)
    clock.start()
    harness = SchedulerHarness(clock)
    scheduler = AsyncIOScheduler(timezone="UTC")
    for index in range(jobs):
        scheduler.add_job(noop, "interval", minutes=1, id=f"job{index}")
    harness.attach(scheduler)
    clock.attach()
    gc.collect()
    began = time.perf_counter()
    await clock.advance(minutes=minutes)
    elapsed = time.perf_counter() - began
    assert len(harness.runs) == jobs * minutes, len(harness.runs)
    harness.close()
    clock.close()
    return elapsed


async def apscheduler_run(backend: str, *, jobs: int = 1, minutes: int = 1440) -> float:
    """Real seconds of APScheduler's own processing of the same fires (see the module doc)."""
    wall = make_wall_clock(backend)
    wall.start(START)
    try:
        scheduler = AsyncIOScheduler(timezone="UTC")
        scheduler._start_timer = lambda wait_seconds: None  # no loop timers: we drive it
        for index in range(jobs):
            scheduler.add_job(noop, "interval", minutes=1, id=f"job{index}")
        scheduler.start()
        await asyncio.sleep(0)  # start() queues a first wakeup via call_soon_threadsafe
        await asyncio.sleep(0)
        executor = scheduler._lookup_executor("default")
        gc.collect()
        began = time.perf_counter()
        for minute in range(1, minutes + 1):
            wall.move_to(START + minute * MINUTE)
            scheduler._process_jobs()
            for future in list(executor._pending_futures):
                await future
            # With several jobs, the first awaited task resumes this coroutine before the
            # executor callbacks of the others have run: let them run (no extra loop
            # iteration for a single job), or the next minute hits max_instances.
            while executor._pending_futures:
                await _yield()
            assert not executor._instances, "a run was skipped (max_instances)"
        elapsed = time.perf_counter() - began
        # Checked after the timing, from the job store, so the baseline has no listener.
        job = scheduler.get_job("job0")
        assert job.next_run_time == START + (minutes + 1) * MINUTE, job.next_run_time
        scheduler.shutdown(wait=False)
        await asyncio.sleep(0)
    finally:
        wall.stop()
    return elapsed


@types.coroutine
def _yield() -> Generator[None, None, None]:
    yield


@dataclasses.dataclass
class _Bare:
    """APScheduler on loop timers with nothing else: what a floor run drives."""

    wall: Any
    loop: asyncio.AbstractEventLoop
    scheduler: AsyncIOScheduler
    origin: float
    origin_us: int
    current: list[float]

    def step_to_next_timer(self, target_us: int) -> bool:
        """Jump the loop and wall clocks to the next timer; False when it lies past the target."""
        when = self.loop._scheduled[0].when()  # type: ignore[attr-defined]
        due_us = round(self.origin_us + (when - self.origin) * 1e6)
        if due_us > target_us:
            return False
        self.wall.move_to(from_us(due_us))
        self.current[0] = math.nextafter(when, math.inf)
        return True


@contextlib.asynccontextmanager
async def _bare_scheduler(backend: str, jobs: int, minutes: int) -> AsyncIterator[_Bare]:
    """``jobs`` no-op 1-minute jobs on a started scheduler whose wakeup timer is a loop timer
    (its body called directly, without the call_soon_threadsafe hop), on a loop whose
    ``time()`` is replaced on the instance; checked after ``minutes`` and torn down."""
    wall = make_wall_clock(backend)
    wall.start(START)
    loop = asyncio.get_running_loop()
    origin = loop.time()
    current = [origin]
    loop.time = lambda: current[0]  # type: ignore[method-assign]
    try:
        scheduler = AsyncIOScheduler(timezone="UTC")
        body = AsyncIOScheduler.wakeup.__wrapped__  # type: ignore[attr-defined]

        def start_timer(wait_seconds: float | None) -> None:
            scheduler._stop_timer()
            if wait_seconds is not None:
                scheduler._timeout = loop.call_later(wait_seconds, body, scheduler)

        scheduler._start_timer = start_timer
        for index in range(jobs):
            scheduler.add_job(noop, "interval", minutes=1, id=f"job{index}")
        scheduler.start()
        yield _Bare(wall, loop, scheduler, origin, to_us(START), current)
        job = scheduler.get_job("job0")
        assert job.next_run_time == START + (minutes + 1) * MINUTE, job.next_run_time
        scheduler.shutdown(wait=False)
        await asyncio.sleep(0)
    finally:
        del loop.time
        wall.stop()


async def timer_floor_run(backend: str, *, jobs: int = 1, minutes: int = 1440) -> float:
    """The floor of any harness that lets APScheduler wake up on its own loop timer.

    No harness: a bare driver settles the loop (yield while anything is ready or due), then
    jumps the loop and wall clocks to the next timer. No run log, no checks, no watchdog.
    """
    async with _bare_scheduler(backend, jobs, minutes) as bare:
        target = bare.origin_us + minutes * 60_000_000
        ready, timers = bare.loop._ready, bare.loop._scheduled  # type: ignore[attr-defined]
        current = bare.current
        gc.collect()
        began = time.perf_counter()
        while True:
            while ready or (timers and timers[0].when() < current[0]):
                await _yield()
            if not bare.step_to_next_timer(target):
                break
        return time.perf_counter() - began  # measured before the check and tear-down


async def callback_floor_run(backend: str, *, jobs: int = 1, minutes: int = 1440) -> float:
    """Like ``timer_floor_run``, but settled by a callback instead of a polling coroutine.

    The probe is a plain loop callback: while anything is ready it re-queues itself, except
    that while a job task is pending it waits as that task's done-callback (so it runs right
    after the executor's callback, in the same loop iteration); when idle it jumps the
    clocks itself. The driving coroutine is resumed once, at the end. This is the floor of a
    callback-driven clock: 3 loop iterations per fire instead of 4.
    """
    async with _bare_scheduler(backend, jobs, minutes) as bare:
        loop, current = bare.loop, bare.current
        executor = bare.scheduler._lookup_executor("default")
        target = bare.origin_us + minutes * 60_000_000
        ready, timers = loop._ready, loop._scheduled  # type: ignore[attr-defined]
        finished = loop.create_future()

        def probe(_: object = None) -> None:
            for future in executor._pending_futures:
                if not future.done():
                    future.add_done_callback(probe)
                    return
            if ready or (timers and timers[0].when() < current[0]):
                loop.call_soon(probe)
                return
            if not bare.step_to_next_timer(target):
                finished.set_result(None)
                return
            loop.call_soon(probe)

        gc.collect()
        began = time.perf_counter()
        loop.call_soon(probe)
        await finished
        return time.perf_counter() - began  # measured before the check and tear-down


async def sleep0_run(iterations: int = 1440) -> float:
    began = time.perf_counter()
    for _ in range(iterations):
        await asyncio.sleep(0)
    return time.perf_counter() - began


async def growth_run(backend: str, days: int) -> list[float]:
    clock = VirtualClock(start=START, backend=backend)
    clock.start()
    harness = SchedulerHarness(clock)
    scheduler = AsyncIOScheduler(timezone="UTC")
    scheduler.add_job(noop, "interval", minutes=1, id="job")
    harness.attach(scheduler)
    clock.attach()
    per_day = []
    for _ in range(days):
        began = time.perf_counter()
        await clock.advance(days=1)
        per_day.append(time.perf_counter() - began)
    assert len(harness.runs) == days * 1440
    harness.close()
    clock.close()
    return per_day


# -- reporting ----------------------------------------------------------------------------------


async def paired(
    a: Callable[[], Awaitable[float]], b: Callable[[], Awaitable[float]], reps: int
) -> tuple[list[float], list[float], list[float]]:
    """Per-repetition A B B A; returns (a samples, b samples, per-rep ratios a/b)."""
    a_samples: list[float] = []
    b_samples: list[float] = []
    ratios: list[float] = []
    for _ in range(reps):
        a1 = await a()
        b1 = await b()
        b2 = await b()
        a2 = await a()
        a_samples += [a1, a2]
        b_samples += [b1, b2]
        ratios.append((a1 + a2) / (b1 + b2))
    return a_samples, b_samples, ratios


async def bench_fire(reps: int) -> None:
    floor = statistics.median([await sleep0_run() for _ in range(5)]) / 1440
    print(f"| asyncio.sleep(0) per iteration | {floor * 1e6:.1f} us | |")
    for backend in BACKENDS:
        h, a, ratios = await paired(
            lambda backend=backend: harness_run(backend),
            lambda backend=backend: apscheduler_run(backend),
            reps,
        )
        f, a2, floor_ratios = await paired(
            lambda backend=backend: timer_floor_run(backend),
            lambda backend=backend: apscheduler_run(backend),
            reps,
        )
        print(
            f"| per fire, no-op job, {backend}: harness / APScheduler's own | "
            f"{statistics.median(h) / 1440 * 1e6:.0f} us / "
            f"{statistics.median(a) / 1440 * 1e6:.0f} us | {abba.spread(ratios)} | "
            f"load {abba.load()}"
        )
        c, a3, callback_ratios = await paired(
            lambda backend=backend: callback_floor_run(backend),
            lambda backend=backend: apscheduler_run(backend),
            reps,
        )
        print(
            f"| per fire, no-op job, {backend}: callback floor / APScheduler's own | "
            f"{statistics.median(c) / 1440 * 1e6:.0f} us / "
            f"{statistics.median(a3) / 1440 * 1e6:.0f} us | {abba.spread(callback_ratios)} | "
            f"load {abba.load()}"
        )
        print(
            f"| per fire, no-op job, {backend}: timer floor / APScheduler's own | "
            f"{statistics.median(f) / 1440 * 1e6:.0f} us / "
            f"{statistics.median(a2) / 1440 * 1e6:.0f} us | {abba.spread(floor_ratios)} | "
            f"load {abba.load()}"
        )


def _instructions(side: str, backend: str) -> float:
    """Instructions per fire of the main thread in the timed section of ``side``."""
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "callgrind.out")
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--separate-threads=yes",
                "--dump-before=time_perf_counter",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "_one",
                side,
                backend,
                "1440",
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        # One dump before each perf_counter() call (out.1-01 is the start-up, out-01 what
        # follows the last call): the parts in between are the timed section.
        parts = sorted(
            name for name in os.listdir(directory) if re.fullmatch(r"callgrind\.out\.\d+-01", name)
        )
        if len(parts) < 2:
            raise RuntimeError("callgrind did not split the run at time.perf_counter()")
        total = 0
        for name in parts[1:]:
            with open(os.path.join(directory, name)) as part:
                found = re.search(r"^(?:summary|totals):\s*(\d+)", part.read(), re.MULTILINE)
            if found is None:
                raise RuntimeError(f"callgrind wrote no instruction count in {name}")
            total += int(found.group(1))
    return total / 1440


def bench_instructions(backends: tuple[str, ...]) -> None:
    for backend in backends:
        per_fire = {
            side: _instructions(side, backend) for side in ("harness", "apscheduler", "floor")
        }
        own = per_fire["apscheduler"]
        print(
            f"| instructions per fire, main thread (callgrind), {backend}: harness / "
            f"APScheduler's own | {per_fire['harness']:,.0f} / {own:,.0f}: "
            f"{per_fire['harness'] / own:.2f}x | callback floor {per_fire['floor']:,.0f}: "
            f"{per_fire['floor'] / own:.2f}x |"
        )


async def _one(side: str, backend: str, minutes: int) -> None:
    """One run of one side, for callgrind (``bench_fire.py _one SIDE BACKEND MINUTES``)."""
    runs = {"harness": harness_run, "apscheduler": apscheduler_run, "floor": callback_floor_run}
    await runs[side](backend, minutes=minutes)


async def bench_many(reps: int, hours: int) -> None:
    minutes = hours * 60
    for backend in BACKENDS:
        h, a, ratios = await paired(
            lambda backend=backend: harness_run(backend, jobs=100, minutes=minutes),
            lambda backend=backend: apscheduler_run(backend, jobs=100, minutes=minutes),
            reps,
        )
        print(
            f"| 100 jobs x {minutes} min, {backend}: harness / APScheduler's own | "
            f"{statistics.median(h) * 1e3:.0f} ms / {statistics.median(a) * 1e3:.0f} ms | "
            f"{abba.spread(ratios)} | load {abba.load()}"
        )


async def bench_growth(days: int, backends: tuple[str, ...]) -> None:
    for backend in backends:
        per_day = await growth_run(backend, days)
        shown = ", ".join(f"{seconds:.2f}" for seconds in per_day)
        span = max(1, min(5, days // 3))
        first, last = statistics.median(per_day[:span]), statistics.median(per_day[-span:])
        print(
            f"| {days} days of a 1-min no-op job, {backend}: day 1 {per_day[0]:.2f} s, "
            f"day {days} {per_day[-1]:.2f} s | median of the last {span} days / of the first "
            f"{span}: {last / first:.2f}x | load {abba.load()} |\n  per day: {shown}"
        )


async def main() -> None:
    if sys.argv[1:2] == ["_one"]:
        await _one(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="?", default="all")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--hours", type=int, default=2)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    backends = (args.backend,) if args.backend else BACKENDS
    print(f"pid {os.getpid()}, load {abba.load()}")
    if args.what in ("fire", "all"):
        await bench_fire(args.reps)
    if args.what == "instructions" or (args.what == "all" and shutil.which("valgrind")):
        bench_instructions(backends)
    if args.what in ("many", "all"):
        await bench_many(max(1, args.reps // 2), args.hours)
    if args.what in ("growth", "all"):
        await bench_growth(args.days, backends)


if __name__ == "__main__":
    asyncio.run(main())

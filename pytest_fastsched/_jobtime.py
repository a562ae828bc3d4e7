"""The clocks a job run reads besides the wall clock: the monotonic clock and its sleeps.

In production ``time.monotonic()`` advances with the time the job waits, so deadlines such
as tenacity's ``stop_after_delay(60)`` end a retry loop after 60 seconds. Under virtual time
the job's waits are virtual: inside a job run, ``time.monotonic()`` and
``time.monotonic_ns()`` read the test loop's clock (``loop.time()``, as in production), and
``time.sleep()`` in a job thread sleeps in virtual time, like ``asyncio.sleep()`` in an
async job.

A job run is code that runs with :data:`~._records.current_run` set (the job's task, the
tasks it starts, and its threads) on the test's loop or in a thread without an event loop
of its own. Everything else reads the real clocks: the test body, the event loop's
machinery, ``threading``'s timeouts (``threading`` keeps its own reference to the real
``monotonic``), an event loop a job thread runs itself (``asyncio.run``), and
``time.perf_counter()``, which measures how long code takes, not deadlines. Code that bound
``from time import monotonic`` before the test keeps the real clock too.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable
from typing import SupportsIndex

from pytest_fastsched._records import current_run
from pytest_fastsched._threads import JobThreads, Parking

_REAL_MONOTONIC = time.monotonic
_REAL_MONOTONIC_NS = time.monotonic_ns
_REAL_SLEEP = time.sleep
# How often (real seconds) a sleeping job thread checks whether the watchdog stopped it.
_NAP = 0.05


class JobTime:
    """The virtual monotonic clock and sleeps of the job runs on one event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        loop_time: Callable[[], float],
        poke: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.loop_time = loop_time
        self._poke = poke

    def in_job_run(self) -> bool:
        """Whether the calling code is a job run on this loop or in a job's thread."""
        if current_run.get() is None:
            return False
        running = asyncio.events._get_running_loop()
        return running is None or running is self.loop

    def sleep(self, executor: JobThreads, seconds: float) -> None:
        """Sleep ``seconds`` of virtual time in a job thread, holding no work meanwhile.

        A loop timer wakes the thread, so the clock moves to it as it moves to an async job's
        ``asyncio.sleep``; everything due before it runs first.
        """
        parking = Parking()
        woke = threading.Event()
        timer: list[asyncio.TimerHandle] = []

        def wake() -> None:
            executor.unpark(parking)
            woke.set()

        def arm() -> None:
            if parking.state == "new":
                timer.append(self.loop.call_later(seconds, wake))
                executor.park(parking)

        try:
            self.loop.call_soon_threadsafe(arm)
        except RuntimeError:  # the loop is closed: the test is over
            _REAL_SLEEP(seconds)
            return
        try:
            while not woke.wait(_NAP):
                pass
        finally:
            executor.unpark(parking)
            if timer and not woke.is_set():
                with contextlib.suppress(RuntimeError):
                    self.loop.call_soon_threadsafe(timer[0].cancel)


_active: JobTime | None = None


def _monotonic() -> float:
    active = _active
    if active is None or not active.in_job_run():
        return _REAL_MONOTONIC()
    return active.loop_time()


def _monotonic_ns() -> int:
    active = _active
    if active is None or not active.in_job_run():
        return _REAL_MONOTONIC_NS()
    return round(active.loop_time() * 1e9)


def _sleep(seconds: float | SupportsIndex) -> None:
    active = _active
    executor = JobThreads.of_this_thread()
    if (
        active is None
        or executor is None
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or seconds <= 0
        or not active.in_job_run()
    ):
        _REAL_SLEEP(seconds)
        return
    active.sleep(executor, seconds)


def install(job_time: JobTime) -> None:
    """Put the job runs of ``job_time``'s loop on virtual monotonic time and sleeps."""
    global _active
    _active = job_time
    time.monotonic = _monotonic
    time.monotonic_ns = _monotonic_ns
    time.sleep = _sleep


def uninstall() -> None:
    """Give every caller the real clocks again."""
    global _active
    _active = None
    time.monotonic = _REAL_MONOTONIC
    time.monotonic_ns = _REAL_MONOTONIC_NS
    time.sleep = _REAL_SLEEP

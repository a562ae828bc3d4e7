"""The watchdog: the real-time limit of one clock call, kept by a thread of its own.

A clock call waits (in real time) for the work it can see in flight. The watchdog ends a wait
that lasts longer than ``fastsched_watchdog`` seconds, whatever blocks it:

- a thread that never returns (a sync job in ``while True: pass``, or polling the wall clock,
  which stands still under virtual time): :func:`stop_threads` raises
  :class:`~._threads.JobStopped` in it and tells where it was;
- a coroutine that never awaits, so that the loop itself answers no poke for the whole limit
  (an async job in ``while True: pass``): the watchdog's thread records the loop thread's
  stack and raises :class:`~._threads.JobStopped` there, as pytest-timeout's thread method
  dumps the stacks of a stuck test.

The clock call then fails with what was found (``_clock.WatchdogTimeout``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from pytest_fastsched._threads import JobStopped, JobThreads, raise_in_thread

TICK = 0.05
"""How often (real seconds) a waiting clock call re-checks its watchdog."""
STOP_GRACE = 1.0
"""Real seconds the watchdog waits for a stopped thread to end before leaving it behind."""
# Tries at interrupting a blocked loop: a coroutine that catches JobStopped gets two more.
_MAX_INTERRUPTS = 3
# Bound at import: the clock patches time.monotonic (see _jobtime), and its patch, a Python
# function, would cost the clock a call on every look at the limit.
_REAL_MONOTONIC = time.monotonic

WALL_CLOCK_HINT = (
    "Under virtual time the wall clock (datetime.now(), time.time()) stands still except "
    "inside fastsched_clock calls, in every thread: a loop that waits for the wall clock to "
    "pass a deadline never ends unless it sleeps in virtual time. Sleep with asyncio.sleep() "
    "in an async job or time.sleep() in a job thread; threading's own timeouts (Event.wait, "
    "Queue.get) wait in real time."
)
_WALL_CLOCK_READ = re.compile(r"\b(?:now|utcnow|today|time|time_ns)\(\)|\.now\(")
_PACKAGE = os.path.dirname(os.path.abspath(__file__)).replace("\\", "/") + "/"
# The code that calls user code: threads, executors, the event loop, APScheduler, the plugin.
_MACHINERY = (
    "/threading.py",
    "/selectors.py",
    "/concurrent/futures/",
    "/asyncio/",
    "/apscheduler/executors/",
)


@dataclasses.dataclass(frozen=True)
class Blocked:
    """What the watchdog found blocking the event loop, and whether it could interrupt it."""

    what: str
    stack: list[str]
    interrupted: bool

    def details(self) -> list[str]:
        """The lines of the watchdog's failure that tell about it."""
        outcome = (
            "interrupted it (JobStopped raised in it)"
            if self.interrupted
            else "could not interrupt it"
        )
        return [
            f"The event loop was blocked by {self.what}, which ran without awaiting for the "
            f"whole limit; the watchdog {outcome}. It was at:",
            *(f"    {line}" for line in self.stack),
            "An async job must await to let other work run: do blocking work in "
            "asyncio.to_thread(), and wait with asyncio.sleep().",
        ]


class Watchdog:
    """The real-time limit of one clock call.

    Its thread pokes the loop every tick so that waits re-check the limit
    (:meth:`wake_on_tick`). When the loop answers no poke for the whole limit, the same user
    frame blocking it at two ticks in a row, the watchdog raises
    :class:`~._threads.JobStopped` in the loop's thread (at most three times) and keeps what
    it found in ``blocked``; ``describe_task`` names the task that ran there.

    While the loop steps time without waiting for anything, the thread sleeps until the limit
    could pass instead of ticking: the clock tells it as the loop goes round
    (:meth:`alive`) and when it is about to wait (:meth:`attend`). A thread that wakes takes
    Python's lock from the loop's thread, which costs that thread far more than the tick's
    own work while it goes round without pause.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        seconds: float,
        describe_task: Callable[[asyncio.Task[Any] | None], str],
    ) -> None:
        self.seconds = seconds
        self.deadline = _REAL_MONOTONIC() + seconds
        self.blocked: Blocked | None = None
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._describe_task = describe_task
        self._seen = _REAL_MONOTONIC()
        self._suspect: FrameType | None = None
        self._interrupts = 0
        self._stop = threading.Event()
        self._signal = threading.Event()
        self._attention = False  # set while the loop waits for work: tick meanwhile
        self._sleeping = False
        self._waiter: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._run, name="fastsched-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            woken = self._signal.wait(self._pause())
            self._sleeping = False
            if self._stop.is_set():
                return
            if woken:  # the loop is about to wait: tick from now on
                self._signal.clear()
                continue
            if _REAL_MONOTONIC() - self._seen > self.seconds:
                self._interrupt_loop()
            try:
                self._loop.call_soon_threadsafe(self._poke)
            except RuntimeError:
                return

    def _pause(self) -> float:
        """Real seconds until the next tick: one tick while anything may wait for it."""
        waiter = self._waiter
        if self._attention or (waiter is not None and not waiter.done()):
            self._attention = False
            return TICK
        left = self._seen + self.seconds - _REAL_MONOTONIC()
        if left < TICK:  # the loop has not gone round for (nearly) the whole limit
            return TICK
        self._sleeping = True
        if self._attention:  # set by the loop meanwhile, before it saw the thread asleep
            self._attention = self._sleeping = False
            return TICK
        return left + TICK

    def alive(self) -> None:
        """The loop goes round (told by the clock as it steps, and now and then between)."""
        self._seen = _REAL_MONOTONIC()

    def attend(self) -> None:
        """The loop is about to wait for work in flight: poke it every tick meanwhile."""
        self._attention = True
        if self._sleeping:
            self._sleeping = False
            self._signal.set()

    def _poke(self) -> None:
        self._seen = _REAL_MONOTONIC()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _interrupt_loop(self) -> None:
        """The loop has not run a callback for the whole limit: stop what blocks it."""
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None or self._stop.is_set() or self._interrupts >= _MAX_INTERRUPTS:
            return
        stack = user_stack(frame, limit=12)
        if not stack:  # in the loop's own machinery, not in user code: not blocked by it
            self._seen = _REAL_MONOTONIC()
            return
        # Only a frame seen blocking at two ticks in a row: the exception must not land in
        # whatever the loop runs next if the blocking code just returned.
        anchor = _outermost_user_frame(frame)
        suspect, self._suspect = self._suspect, anchor
        if suspect is not anchor:
            return
        task = asyncio.current_task(self._loop)
        # Known before the exception lands: the clock sees it while the job is still open.
        first = self.blocked is None
        if first:
            self.blocked = Blocked(self._describe_task(task), stack, interrupted=True)
        interrupted = raise_in_thread(self._loop_thread, JobStopped)
        self._interrupts += 1
        self._seen = _REAL_MONOTONIC()  # another limit before trying again
        if first and not interrupted and self.blocked is not None:
            self.blocked = dataclasses.replace(self.blocked, interrupted=False)

    def expired(self) -> bool:
        """Whether the limit has passed without progress, or the loop was found blocked."""
        return self.blocked is not None or _REAL_MONOTONIC() > self.deadline

    def progress(self) -> None:
        """Time moved on: the limit starts again; the loop goes round (:meth:`alive`)."""
        self._seen = now = _REAL_MONOTONIC()
        self.deadline = now + self.seconds

    def wake_on_tick(self, waiter: asyncio.Future[None]) -> None:
        """Resolve ``waiter`` at the next tick, so that a waiting clock call re-checks."""
        self._waiter = waiter
        self.attend()

    def stop(self) -> None:
        """End the watchdog's thread."""
        self._stop.set()
        self._signal.set()
        self._thread.join()


def stop_threads(executors: Iterable[JobThreads]) -> list[str]:
    """Stop the threads of ``executors`` still running calls; describe each, and where it was.

    A thread blocked in C code (a lock, a socket without timeout) cannot be stopped: it is
    left running as a daemon thread, and the lines say so. When the code of a stopped thread
    reads the wall clock, the lines end with :data:`WALL_CLOCK_HINT`.
    """
    frames = sys._current_frames()
    found = [
        (executor, thread, label)
        for executor in executors
        for thread, label in list(executor.running.items())
    ]
    lines: list[str] = []
    polls = False
    for executor, thread, label in found:
        frame = frames.get(thread.ident or 0)
        stack = user_stack(frame) if frame is not None else []
        polls = polls or (frame is not None and _reads_wall_clock(frame))
        executor.stop(thread)
        thread.join(STOP_GRACE)
        outcome = (
            "stopped (JobStopped raised in it)"
            if not thread.is_alive()
            else "could not be stopped (blocked outside Python code); left running as a "
            "daemon thread"
        )
        lines.append(f"Thread {thread.name} running {label}: {outcome}. It was at:")
        lines.extend(f"    {line}" for line in stack)
    if polls:
        lines.append(WALL_CLOCK_HINT)
    return lines


def user_stack(frame: FrameType, limit: int = 8) -> list[str]:
    """The formatted frames of ``frame``'s stack from the user code that the machinery
    (threads, executors, the event loop, this plugin) called, down to ``frame``."""
    entries = traceback.extract_stack(frame)
    start, in_user_code = 0, False
    for index, entry in enumerate(entries):
        machinery = _is_machinery_file(entry.filename)
        if machinery and not in_user_code:
            start = index + 1
        elif not machinery and start:
            in_user_code = True
    shown: list[traceback.FrameSummary | None] = list(entries[start:])
    if len(shown) > limit:
        shown = [*shown[:2], None, *shown[-(limit - 2) :]]
    return [
        part
        for entry in shown
        for part in (
            ["  ..."] if entry is None else traceback.format_list([entry])[0].rstrip().split("\n")
        )
    ]


def _is_machinery_file(filename: str) -> bool:
    filename = filename.replace("\\", "/")
    return filename.startswith(_PACKAGE) or any(part in filename for part in _MACHINERY)


def _outermost_user_frame(frame: FrameType) -> FrameType:
    """The frame of user code that the machinery called (e.g. the job's coroutine)."""
    outermost = frame
    current: FrameType | None = frame
    while current is not None and not _is_machinery_file(current.f_code.co_filename):
        outermost, current = current, current.f_back
    return outermost


def _reads_wall_clock(frame: FrameType) -> bool:
    """Whether user code on ``frame``'s stack reads the wall clock (a look at its source)."""
    current: FrameType | None = frame
    while current is not None:
        filename = current.f_code.co_filename.replace("\\", "/")
        library = "site-packages/" in filename or "/lib/python" in filename
        if not library and not _is_machinery_file(filename):
            try:
                source = inspect.getsource(current.f_code)
            except (OSError, TypeError):
                source = ""
            if _WALL_CLOCK_READ.search(source):
                return True
        current = current.f_back
    return False

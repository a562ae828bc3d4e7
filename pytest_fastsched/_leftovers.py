"""The end of a test: what its jobs left running on the loop is ended, and named.

A job run still in progress when the test ends is cancelled quietly, as the app's shutdown
would. But a task must not outlive its test: on a session-scoped loop it would run in the
next test and write there, credited to nobody; a task that ignores cancellation hangs the
loop's close. So :class:`JobTasks` remembers which job run created each task on the test's
loop, and :meth:`JobTasks.end` cancels them all in bounded real time, closes by force those
that swallow ``CancelledError``, and describes each task left behind, for the
:class:`LeftoverWorkError` that fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any

from pytest_fastsched._records import RunRef, current_run

CANCEL_GRACE = 1.0
"""Real seconds the end of a test waits for cancelled tasks to finish."""
# Loop cycles that let cancelled tasks run their cleanup, and the real-time pause before a
# task still running is cancelled again, while real I/O (a rollback) may be finishing.
_IDLE_CYCLES = 3
_PAUSE = 0.01
# The size at which the job tasks' record is first rid of its finished tasks.
_PRUNE_AT = 256


class LeftoverWorkError(AssertionError):
    """Work started by the test's jobs was still running when the test ended."""


def failure(problems: list[str]) -> LeftoverWorkError | None:
    """The error that fails the test for ``problems`` (one line each), if any."""
    if not problems:
        return None
    return LeftoverWorkError(
        "fastsched: the test's jobs left work running when the test ended:\n"
        + "\n".join(f"  {line}" for line in problems)
    )


class JobTasks:
    """The tasks of a test's jobs: the job runs' own, and those the job runs created.

    The scheduler harness tells which tasks are job runs (:meth:`add_runs`); the clock tells
    of each task created on the test's loop (:meth:`created`), whose job run is the
    ``current_run`` of the context it starts in.
    """

    def __init__(self) -> None:
        # A plain dict (one entry per fire: a weak one costs a callback per task), rid of
        # its finished tasks each time it has doubled since it was last.
        self._runs: dict[asyncio.Task[Any], RunRef] = {}
        self._prune_at = _PRUNE_AT
        self._sources: list[Callable[[], list[asyncio.Task[Any]]]] = []

    def add_runs(self, source: Callable[[], list[asyncio.Task[Any]]]) -> None:
        """``source()`` lists the tasks that are job runs (cancelled quietly at the end)."""
        self._sources.append(source)

    def created(self, task: asyncio.Task[Any], context: contextvars.Context | None) -> None:
        """Remember the job run of a task created on the test's loop, if a job created it."""
        run = current_run.get() if context is None else context.get(current_run)
        if run is not None:
            runs = self._runs
            runs[task] = run
            if len(runs) >= self._prune_at:
                self._runs = {task: run for task, run in runs.items() if not task.done()}
                self._prune_at = max(_PRUNE_AT, 2 * len(self._runs))

    def describe(self, task: asyncio.Task[Any] | None, test_task: asyncio.Task[Any] | None) -> str:
        """What ``task`` is, for messages: a job run, a task a job run started, the test."""
        if task is None:
            return "a callback (no task)"
        run = self._runs.get(task)
        if run is not None and getattr(task.get_coro(), "__name__", "") == "run_coroutine_job":
            return run.describe()
        if run is not None:
            return f"task {task.get_name()} started by {run.describe()}"
        if task is test_task:
            return "the test itself"
        return f"task {task.get_name()}"

    def end(self, loop: asyncio.AbstractEventLoop, also: list[asyncio.Task[Any]]) -> list[str]:
        """Cancel the jobs' tasks (and ``also``) on ``loop``, which is not running.

        Returns a line for each task that ignored cancellation, and for each task a job
        created and left pending after the job returned.
        """
        runs = {task for source in self._sources for task in source()}
        leftovers: list[tuple[asyncio.Task[Any], RunRef | None, bool]] = [
            (task, run, task in runs) for task, run in list(self._runs.items()) if not task.done()
        ]
        leftovers += [(task, None, True) for task in runs if task not in self._runs]
        tasks = [task for task, _, _ in leftovers if not task.done()]
        tasks += [task for task in also if not task.done()]
        if not tasks:
            return []
        running = {run for _, run, is_run in leftovers if is_run and run is not None}
        where = {task: awaiting(task) for task, _, _ in leftovers}
        stubborn = loop.run_until_complete(cancel_within(tasks, CANCEL_GRACE))
        resisted = close_by_force(loop, stubborn)
        problems = []
        for task, run, is_run in leftovers:
            who = run.describe() if run is not None else f"task {task.get_name()}"
            if task in stubborn:
                ended = "could not be ended" if task in resisted else "was closed by force"
                problems.append(
                    f"{who}: task {task.get_name()} ignored cancellation (it caught "
                    f"CancelledError and kept running, at {where[task]}); it {ended}. Let "
                    f"CancelledError propagate: re-raise it after cleaning up."
                )
            elif not is_run and run not in running:  # its job returned and left it
                problems.append(
                    f"{who} started task {task.get_name()}, still pending at the end of the "
                    f"test (at {where[task]}); it was cancelled, so that it cannot run in a "
                    f"later test. Await the tasks a job starts (asyncio.gather, a TaskGroup) "
                    f"before the job returns."
                )
        return problems


def awaiting(task: asyncio.Task[Any]) -> str:
    """Where ``task`` waits: the innermost coroutine outside asyncio, and what it awaits."""
    coro: Any = task.get_coro()
    location, awaited = "?", ""
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            if "/asyncio/" in frame.f_code.co_filename.replace("\\", "/"):
                awaited = awaited or frame.f_code.co_name
            else:
                location = f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return f"{location}, awaiting {awaited}" if awaited else location


async def cancel_within(tasks: list[asyncio.Task[Any]], seconds: float) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` until they end or ``seconds`` of real time pass; the survivors."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + seconds
    pending = {task for task in tasks if not task.done()}
    while pending and time.monotonic() < deadline:
        for task in pending:
            task.cancel()
        for _ in range(_IDLE_CYCLES):
            await asyncio.sleep(0)
        pending = {task for task in pending if not task.done()}
        if pending:  # real work (a rollback, a thread) may be finishing: let it, whatever
            await _real_sleep(loop, _PAUSE)  # else keeps the loop busy meanwhile
            pending = {task for task in pending if not task.done()}
    _retrieve(tasks)
    return pending


def close_by_force(
    loop: asyncio.AbstractEventLoop, tasks: set[asyncio.Task[Any]]
) -> set[asyncio.Task[Any]]:
    """End tasks that ignore cancellation by closing their coroutines; those that resist."""
    for task in tasks:
        # GeneratorExit at its await, which `except CancelledError` misses; RuntimeError if it
        # caught GeneratorExit too and awaited again.
        with contextlib.suppress(RuntimeError):
            task.get_coro().close()
        task.cancel()

    async def settle() -> None:
        for _ in range(_IDLE_CYCLES):
            await asyncio.sleep(0)

    loop.run_until_complete(settle())
    _retrieve(tasks)
    return {task for task in tasks if not task.done()}


def _retrieve(tasks: set[asyncio.Task[Any]] | list[asyncio.Task[Any]]) -> None:
    """Read the exception of each finished task: no "exception was never retrieved" later."""
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()


async def _real_sleep(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    """Sleep in real time on a loop whose clock is virtual."""
    future = loop.create_future()

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    timer = threading.Timer(seconds, loop.call_soon_threadsafe, args=(wake,))
    timer.daemon = True
    timer.start()
    try:
        await future
    finally:
        timer.cancel()

"""Job threads: the threads that run a test's sync work, made so that they can be stopped.

A sync job runs in a thread: APScheduler's thread pools run it there, and so does the loop's
default executor (``AsyncIOExecutor``'s sync jobs, ``run_in_executor(None, ...)``,
``asyncio.to_thread``). A thread of a ``concurrent.futures.ThreadPoolExecutor`` that never
returns (``while True: pass``, a loop that polls the wall clock, frozen under virtual time)
hangs the session twice: the loop's close joins its default executor, and the interpreter's
exit joins every pool thread. While a clock is attached, that work runs on
:class:`JobThreads` instead: daemon threads that know which job each one runs and can be
stopped by raising :class:`JobStopped` in them. A thread that finished its call waits for the
next one (starting a thread costs far more than handing it a call); one that was stopped
ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import ctypes
import datetime as dt
import functools
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Literal

from pytest_fastsched._records import RunRef, current_run


class JobStopped(BaseException):
    """Raised by the watchdog inside job code that never lets the clock move on.

    A ``BaseException``, so that a job's ``except Exception`` does not swallow it. It ends a
    thread that never returns and a coroutine that blocks the event loop; the watchdog's
    failure tells what it was doing.
    """


def raise_in_thread(ident: int | None, exc_type: type[BaseException] | None) -> bool:
    """Raise ``exc_type`` in the thread ``ident`` at its next bytecode (``None`` clears it).

    CPython's ``PyThreadState_SetAsyncExc``, as pytest-timeout's thread method uses: it
    interrupts pure-Python code (``while True: pass``, a ``time.sleep(0.1)`` polling loop) but
    not a call blocked in C code, which only sees the exception when it returns.
    """
    if ident is None or not hasattr(ctypes, "pythonapi"):
        return False
    # Untyped arguments: None passes NULL, which clears a pending exception.
    exc = None if exc_type is None else ctypes.py_object(exc_type)
    return int(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), exc)) == 1


def describe_call(fn: Callable[..., Any], args: tuple[Any, ...]) -> str:
    """What a job thread runs, for messages: the job run, or the function and its job run.

    Called where the work is submitted, in the context of the code that submits it: the job
    run (``current_run``) is the one that starts the work.
    """
    run = current_run.get()
    if _is_apscheduler_run_job(fn) and args:
        job_id, run_times = getattr(args[0], "id", None), args[2] if len(args) > 2 else []
        if run is not None and run.job_id == job_id:
            return run.describe()
        if run_times:
            return RunRef(str(job_id), run_times[0].astimezone(dt.timezone.utc)).describe()
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return name if run is None else f"{name} started by {run.describe()}"


def _is_apscheduler_run_job(fn: Callable[..., Any]) -> bool:
    module, name = getattr(fn, "__module__", ""), getattr(fn, "__name__", "")
    return bool(module == "apscheduler.executors.base" and name == "run_job")


class Labelled:
    """A call and what it runs, for :class:`JobThreads` (see :func:`describe_call`)."""

    def __init__(self, fn: Callable[..., Any], label: str) -> None:
        self.fn = fn
        self.label = label

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class Parking:
    """One sleep of a job thread in virtual time: while parked, it holds no work in flight."""

    def __init__(self) -> None:
        self.state: Literal["new", "parked", "awake"] = "new"


_current = threading.local()

_IDLE_END = 1.0
"""Real seconds :meth:`JobThreads.shutdown` waits for an idle thread to end."""

AFTER_CALL: list[Callable[[], None]] = []
"""Called in a job thread after each call returns, before its result is set: a room that
keeps per-thread state of a call (``_rebind``'s sync transactions) ends it there."""


_Call = tuple[
    concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any], str, int
]


class JobThreads(concurrent.futures.Executor):
    """Runs each call on a daemon thread, at most ``max_workers`` at once.

    A thread that never returns then blocks neither the loop's close nor the interpreter's
    exit, and :meth:`stop` ends one that runs Python code. ``running`` maps each thread that
    runs a call to what it runs. ``on_change`` is called (in the thread) whenever ``pending``
    drops: the clock waiting for the work wakes up. Idle threads wait for the next call and
    end at :meth:`shutdown`; each call renames its thread ``<name>_<n>``, n counting calls.
    """

    def __init__(
        self,
        name: str,
        max_workers: int | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._name = name
        self.max_workers = max_workers
        self._on_change = on_change
        self._slots = threading.BoundedSemaphore(max_workers) if max_workers else None
        self._lock = threading.Lock()
        self._count = 0
        self._shutdown = False
        self.pending = 0
        """Calls submitted and not finished: real work in flight for the clock."""
        self.running: dict[threading.Thread, str] = {}
        self._stopped: set[threading.Thread] = set()
        self._threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._idle = 0
        """Threads waiting for a call on ``_calls``, and not yet handed one."""
        self._waiting: set[threading.Thread] = set()

    @property
    def is_shut_down(self) -> bool:
        """Whether :meth:`shutdown` was called: it takes no more calls."""
        return self._shutdown

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on an idle daemon thread, or a new one; its future.

        The call runs in a copy of the caller's context, as ``asyncio.to_thread`` does: a job
        run's thread knows its run (``current_run``).
        """
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        label = fn.label if isinstance(fn, Labelled) else describe_call(fn, args)
        call = functools.partial(contextvars.copy_context().run, fn)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._count += 1
            self.pending += 1
            item: _Call = (future, call, args, kwargs, label, self._count)
            if self._idle:
                self._idle -= 1
                self._calls.put(item)
                return future
        thread = threading.Thread(
            target=self._serve, args=(item,), name=f"{self._name}_{item[5]}", daemon=True
        )
        self._threads.add(thread)
        thread.start()
        return future

    def _serve(self, item: _Call | None) -> None:
        """A thread's life: run ``item``, then each call handed to it while idle."""
        thread = threading.current_thread()
        while item is not None:
            self._work(*item)
            with self._lock:
                if self._shutdown or thread in self._stopped:
                    return
                self._idle += 1
                self._waiting.add(thread)
            item = self._calls.get()
            with self._lock:
                self._waiting.discard(thread)

    def _work(
        self,
        future: concurrent.futures.Future[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        label: str,
        number: int,
    ) -> None:
        thread = threading.current_thread()
        thread.name = f"{self._name}_{number}"
        try:
            if self._slots is not None:
                self._slots.acquire()
            try:
                if not future.set_running_or_notify_cancel():
                    return
                with self._lock:
                    self.running[thread] = label
                _current.executor = self
                try:
                    outcome: tuple[bool, Any] = (True, fn(*args, **kwargs))
                except BaseException as error:
                    outcome = (False, error)
                finally:
                    for after in AFTER_CALL:
                        after()
                    _current.executor = None
                with self._lock:
                    del self.running[thread]
                    if thread in self._stopped:
                        raise_in_thread(thread.ident, None)  # not delivered yet: drop it
                if outcome[0]:
                    future.set_result(outcome[1])
                else:
                    future.set_exception(outcome[1])
            finally:
                if self._slots is not None:
                    self._slots.release()
        except JobStopped as stopped:  # delivered just as the call returned
            if not future.done():
                future.set_exception(stopped)
        finally:
            with self._lock:
                self.pending -= 1
            if self._on_change is not None:
                self._on_change()

    @staticmethod
    def of_this_thread() -> JobThreads | None:
        """The executor whose call the current thread runs, or ``None``."""
        executor: JobThreads | None = getattr(_current, "executor", None)
        return executor

    def park(self, parking: Parking) -> None:
        """The thread sleeps in virtual time: its call no longer counts as work in flight.

        Does nothing when the sleep has ended already (:meth:`unpark` came first).
        """
        with self._lock:
            if parking.state != "new":
                return
            parking.state = "parked"
            self.pending -= 1
        if self._on_change is not None:
            self._on_change()

    def unpark(self, parking: Parking) -> None:
        """The sleep is over (or the thread was stopped): the call is work in flight again."""
        with self._lock:
            if parking.state == "parked":
                self.pending += 1
            parking.state = "awake"

    def stop(self, thread: threading.Thread) -> bool:
        """Raise :class:`JobStopped` in ``thread`` if it still runs a call."""
        with self._lock:
            if thread not in self.running:
                return False
            self._stopped.add(thread)
            return raise_in_thread(thread.ident, JobStopped)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more calls and end the idle threads; with ``wait``, join the threads that
        were not stopped, unless called on an event loop's thread."""
        with self._lock:
            self._shutdown = True
            threads = [thread for thread in self._threads if thread not in self._stopped]
            idle, self._idle = self._idle, 0
            waiting = list(self._waiting)
        for _ in range(idle):
            self._calls.put(None)
        for thread in waiting:  # they end at once: none is left behind the test
            thread.join(_IDLE_END)
        if wait and asyncio.events._get_running_loop() is not None:
            # On an event loop's thread (an app's shutdown(wait=True) in its lifespan), whose
            # blocking would keep the job threads from ever finishing: their sleeps and
            # database calls wait for that loop. They finish as the clock moves on, or are
            # stopped when the test ends.
            return
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()


def stop_threads(executors: Iterable[JobThreads], grace: float) -> None:
    """Stop every thread of ``executors`` still running a call; wait ``grace`` s for them."""
    deadline = time.monotonic() + grace
    for executor in executors:
        for thread in list(executor.running):
            executor.stop(thread)
            thread.join(max(0.0, deadline - time.monotonic()))

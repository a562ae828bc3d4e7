"""Virtual time: one clock with two faces, the event loop's ``time()`` and the wall clock.

The wall clock (``datetime.now()``, ``datetime.utcnow()``, ``time.time()``, in every thread)
is patched by a pluggable backend (freezegun or time-machine). The event loop's clock is
patched on the loop instance only: a virtual ``time.monotonic`` for everyone would hang
asyncio and every ``threading`` timeout, so it reads virtual time only inside job runs
(:mod:`._jobtime`).

Time moves only inside :meth:`VirtualClock.advance`, :meth:`VirtualClock.advance_to`,
:meth:`VirtualClock.jump`, :meth:`VirtualClock.run_until_idle` and, while a request of the
``fastsched_client`` is awaited, :meth:`VirtualClock.drive_until`, and while the test itself
sleeps on a loop timer (``await asyncio.sleep(s)`` in the test is ``advance_to()`` that
timer). Each of them repeats: let everything runnable at this instant run, wait (in real
time) for work the clock can see in flight, then step to the next loop timer (APScheduler's
wake-ups are loop timers) and go on.

A real-time watchdog (:mod:`._watchdog`) bounds each of them. While the clock is attached,
the loop's default executor is a :class:`~._threads.JobThreads`, whose threads the watchdog
can stop; at the end of the test, :meth:`VirtualClock.end_of_test` ends what the test's jobs
left running (:mod:`._leftovers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import functools
import heapq
import inspect
import math
import threading
from asyncio import _get_running_loop
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from pytest_fastsched import _jobtime, _leftovers, _threads, _watchdog
from pytest_fastsched._leftovers import LeftoverWorkError
from pytest_fastsched._network import NetworkCalls
from pytest_fastsched._options import Settings, clock_backend, marker_options
from pytest_fastsched._wallclock import from_us, make_wall_clock, refuse_foreign_freezes, to_us
from pytest_fastsched._watchdog import Watchdog
from pytest_fastsched._worlds import World, close_world, world_of

_T = TypeVar("_T")
_US = 1_000_000
_MISSING = object()
# Loop iterations with work queued between two looks at the watchdog's deadline.
_SPINS_PER_LOOK = 64
_MAX_US = to_us(dt.datetime.max.replace(tzinfo=dt.timezone.utc))
# The async functions that wait for database drivers: (module, attribute path).
_IO_TARGETS = (
    ("sqlalchemy.ext.asyncio.engine", "greenlet_spawn"),
    ("sqlalchemy.ext.asyncio.session", "greenlet_spawn"),
    ("sqlalchemy.ext.asyncio.result", "greenlet_spawn"),
    ("sqlalchemy.ext.asyncio.engine", "_ensure_sync_result"),
    ("sqlalchemy.ext.asyncio.session", "_ensure_sync_result"),
    ("aiosqlite.core", "Connection._execute"),
    # aiosqlite's connect and the end of its close wait for its thread without _execute.
    ("aiosqlite.core", "Connection._connect"),
    ("aiosqlite.core", "Connection.close"),
    # anyio's worker threads (anyio.to_thread.run_sync, Starlette's run_in_threadpool, FastAPI's
    # sync endpoints and dependencies) hand their result back with call_soon_threadsafe, not
    # through loop.run_in_executor: only the coroutine that awaits the thread can be counted.
    ("anyio._backends._asyncio", "AsyncIOBackend.run_sync_in_worker_thread"),
)
# Imported before wrapping, when installed: anyio loads its backend on first use, which may be
# inside a job, after the clock call that would have wrapped it began.
_IO_IMPORTS = ("anyio._backends._asyncio",)
# The async functions that wait for a socket (see _network): httpx's transport (httpcore),
# aiohttp's client (its connector, the response's head and body), asyncio's streams, and
# every connect on asyncio's own loops.
_NETWORK_TARGETS = (
    ("httpcore._backends.anyio", "AnyIOBackend.connect_tcp"),
    ("httpcore._backends.anyio", "AnyIOBackend.connect_unix_socket"),
    ("httpcore._backends.anyio", "AnyIOStream.read"),
    ("httpcore._backends.anyio", "AnyIOStream.write"),
    ("httpcore._backends.anyio", "AnyIOStream.start_tls"),
    ("asyncio.streams", "StreamReader._wait_for_data"),
    ("asyncio.streams", "StreamWriter.drain"),
    ("asyncio.selector_events", "BaseSelectorEventLoop.sock_connect"),
    ("aiohttp.connector", "BaseConnector.connect"),
    ("aiohttp.streams", "DataQueue.read"),
    ("aiohttp.streams", "StreamReader._wait"),
)
# Target modules that their packages import on first use (httpx imports httpcore when a
# client is made, httpcore its backend on the first connection): imported, to be wrapped,
# once one of these packages is.
_LAZY_MODULES = {"httpcore._backends.anyio": ("httpx", "httpcore")}


class ClockError(Exception):
    """A clock call was used wrongly; the message says how to call it."""


class WatchdogTimeout(AssertionError):
    """Work the clock waited for did not finish within the real-time watchdog."""


class _Inflight:
    """Counts real work in flight on the loop: executor futures and SQLAlchemy I/O."""

    def __init__(self) -> None:
        self.count = 0
        self.waiter: asyncio.Future[None] | None = None

    def enter(self) -> None:
        self.count += 1

    def exit(self) -> None:
        self.count -= 1
        # Wake a waiting clock call only when the last piece of work ends: while others are
        # in flight it would only look, see them, and wait again (one loop iteration each).
        if not self.count and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class _LoopPatch:
    """The instance-level patches that put one event loop on virtual time.

    Besides the loop's clock: ``run_in_executor`` counts the work in flight, runs it in a
    copy of the caller's context and runs the default executor's work on the clock's
    :class:`~._threads.JobThreads`; ``create_task`` tells the clock of each task (to know
    which job started it); ``call_soon_threadsafe`` called on the loop's own thread skips
    the self-pipe write; the selector's ``select`` lets the test's own sleeps move time.

    The loop's clock stays on the virtual microsecond grid: ``loop_time_of(us)`` is the loop
    time of an instant, and ``us_of_loop_time`` inverts it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: VirtualClock) -> None:
        if not isinstance(loop, asyncio.BaseEventLoop):
            raise ClockError(
                f"fastsched_clock cannot drive this event loop ({type(loop).__module__}."
                f"{type(loop).__qualname__}): it needs asyncio's own event loop "
                f"(asyncio.BaseEventLoop), whose clock can be replaced per instance. Run the "
                f"tests that use fastsched_clock without uvloop (e.g. do not install uvloop's "
                f"event loop policy for them)."
            )
        self.loop = loop
        self.origin_loop_time = loop.time()
        self.origin_us = clock.now_us
        self.loop_time = self.origin_loop_time
        self._clock = clock
        self._saved = {
            name: vars(loop).get(name, _MISSING)
            for name in ("time", "run_in_executor", "create_task", "call_soon_threadsafe")
        }
        original_run_in_executor = loop.run_in_executor
        original_create_task = loop.create_task
        original_call_soon_threadsafe = loop.call_soon_threadsafe
        call_soon = loop.call_soon
        inflight = clock.inflight

        def run_in_executor(executor: Any, func: Callable[..., _T], *args: Any) -> Any:
            # Executor threads run in a copy of the caller's context, as asyncio.to_thread
            # does, so job-run context vars reach sync jobs too.
            context = contextvars.copy_context()
            call: Callable[..., Any] = functools.partial(context.run, func)
            if executor is None:
                # Instead of the loop's default executor, whose threads asyncio joins when the
                # loop closes: a job thread that never ended would hang the session there.
                executor = clock.default_executor()
                call = _threads.Labelled(call, _threads.describe_call(func, args))
            future = original_run_in_executor(executor, call, *args)
            if not isinstance(executor, _threads.JobThreads):  # those count their own work
                inflight.enter()
                future.add_done_callback(lambda _: inflight.exit())
            return future

        def create_task(coro: Any, **kwargs: Any) -> Any:
            task = original_create_task(coro, **kwargs)
            clock.job_tasks.created(task, kwargs.get("context"))
            return task

        def call_soon_threadsafe(
            callback: Callable[..., Any], *args: Any, context: Any = None
        ) -> Any:
            # From the loop's own thread (APScheduler's wakeup(), job-event listeners) the
            # self-pipe write is wasted: the loop looks at its ready queue before it selects.
            if _get_running_loop() is loop:
                return call_soon(callback, *args, context=context)
            return original_call_soon_threadsafe(callback, *args, context=context)

        loop.time = lambda: self.loop_time  # type: ignore[method-assign]
        loop.run_in_executor = run_in_executor  # type: ignore[method-assign, assignment]
        loop.create_task = create_task  # type: ignore[method-assign]
        loop.call_soon_threadsafe = call_soon_threadsafe  # type: ignore[method-assign, assignment]
        self.probe: Callable[[], bool] | None = None
        """Called each time the loop selects, while a clock call steps (see ``_stepper``)."""
        self._selector = getattr(loop, "_selector", None)
        if self._selector is not None and "select" not in vars(self._selector):
            original_select = self._selector.select

            ready = loop._ready  # type: ignore[attr-defined]

            def select(timeout: float | None = None) -> Any:
                # The loop has run its ready queue and is about to wait: a clock call that
                # steps looks at the instant here (and moves time instead of waiting); if the
                # test itself sleeps on a loop timer, move virtual time to it instead of
                # waiting in real time (forever).
                probe = self.probe
                if probe is not None and probe():
                    events = original_select(0)
                    if not events and not ready:
                        self._run_due_timers()
                    return events
                if self.probe is None and (timeout is None or timeout > 0):
                    # (A probe still there waits for work in flight: the test does not sleep.)
                    timeout = 0 if clock.test_sleeps() else timeout
                return original_select(timeout)

            self._selector.select = select
        else:
            self._selector = None
        self.watches_select = self._selector is not None

    def _run_due_timers(self) -> None:
        """Run the timers due now as the loop would right after this ``select``, but at once.

        Called from the patched ``select`` when the loop's ready queue is empty and no I/O
        is ready: the loop would now move exactly these timers to its queue and run them,
        and run what they queue in its next iteration. Run here, what they queue runs in
        this iteration instead (the loop counts its queue after ``select``), in the same
        order: one loop iteration, and its ``epoll_wait``, less per step of the clock. A
        timer that one of them arms for this instant still runs after all of them, as the
        loop takes it from its heap after ``select``.
        """
        loop: Any = self.loop
        scheduled = loop._scheduled
        # Debug mode times each callback, and a stopping loop leaves what they queue for its
        # next run: leave both to the loop.
        if not scheduled or loop._debug or loop._stopping:
            return
        end_time = self.loop_time + loop._clock_resolution
        due = []
        while scheduled and scheduled[0]._when < end_time:
            handle = heapq.heappop(scheduled)
            handle._scheduled = False
            due.append(handle)
        for index, handle in enumerate(due):
            if handle._cancelled:
                continue
            try:
                handle._run()
            except BaseException:
                # Out of the loop's iteration as from its own run: the rest stay first in line.
                loop._ready.extendleft(reversed(due[index + 1 :]))
                raise

    def sync_to(self, now_us: int, timer_when: float | None = None) -> None:
        computed = self.loop_time_of(now_us)
        if timer_when is not None:
            # The timers that fall at this microsecond run now. Their ``when`` may lie a
            # little past it: a float error, a sub-microsecond delay, or a timer armed on the
            # real clock before the clock attached. Pull them back to the instant instead of
            # moving the loop's clock past them: a loop clock off the microsecond grid shifts
            # every timer armed next (APScheduler arms its next wake-up from here).
            scheduled = self.loop._scheduled  # type: ignore[attr-defined]
            pulled = False
            for handle in scheduled:
                if handle._when > computed and self.us_of_loop_time(handle._when) <= now_us:
                    handle._when = computed
                    pulled = True
            if pulled:
                heapq.heapify(scheduled)
            # The loop runs a timer only when ``when < time() + clock_resolution``; far from
            # zero a float cannot hold that sum, so step one float past the instant instead.
            computed = math.nextafter(computed, math.inf)
        self.loop_time = computed

    def loop_time_of(self, us: int) -> float:
        """The loop time of the virtual instant ``us`` (microseconds since the epoch)."""
        return self.origin_loop_time + (us - self.origin_us) / _US

    def us_of_loop_time(self, when: float) -> int:
        # Relative to the origin: the absolute microsecond count of a 2030 instant (about
        # 1.9e15) is a float only to a quarter of a microsecond.
        offset = (when - self.origin_loop_time) * _US
        nearest = round(offset)
        # A timer armed from a float delay lands within a fraction of a microsecond of its
        # instant: snap to it.
        return self.origin_us + (nearest if abs(offset - nearest) < 0.5 else math.ceil(offset))

    def restore(self) -> None:
        for name, saved in self._saved.items():
            if saved is _MISSING:
                vars(self.loop).pop(name, None)
            else:
                setattr(self.loop, name, saved)
        if self._selector is not None:
            vars(self._selector).pop("select", None)


class _IoCounter:
    """Counts I/O in flight by wrapping the async functions that wait for drivers and sockets.

    Every awaited database call of SQLAlchemy's asyncio extension (connect, execute, fetch,
    commit, rollback, close) runs inside ``greenlet_spawn``, except the cursor soft-close of
    ``_ensure_sync_result`` (SQLAlchemy 2.0.44+); raw aiosqlite calls all go through
    ``Connection._execute``. While one of them is in flight the loop waits for a driver
    (aiosqlite's thread, asyncpg's socket), so time must not jump. Network calls
    (``_NETWORK_TARGETS``) are counted by :class:`~._network.NetworkCalls`, which holds time
    at real pace. The wrappers are in place only while a clock is attached.
    """

    def __init__(self, inflight: _Inflight, network: NetworkCalls) -> None:
        self._inflight = inflight
        self._network = network
        self._patched: list[tuple[Any, str, Any]] = []
        self.install()

    def install(self) -> None:
        """Wrap the targets imported so far; called again before each clock call."""
        import importlib
        import sys

        for module_name in _IO_IMPORTS:
            if module_name not in sys.modules:
                with contextlib.suppress(ImportError):
                    importlib.import_module(module_name)
        counting = functools.partial(self._counting, inflight=self._inflight)
        holding = functools.partial(self._holding, network=self._network)
        for module_name, path in _IO_TARGETS:
            self._wrap(module_name, path, counting)
        for module_name, path in _NETWORK_TARGETS:
            _import_if_package_loaded(module_name)
            self._wrap(module_name, path, holding)

    def _wrap(self, module_name: str, path: str, wrapper: Callable[[Any], Any]) -> None:
        import sys

        owner: Any = sys.modules.get(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        original = getattr(owner, name, None)
        if original is None or getattr(original, "_fastsched", False):
            return
        # A classmethod is wrapped as one (its function), and put back as it was.
        raw = vars(owner).get(name, original) if isinstance(owner, type) else original
        if isinstance(raw, classmethod):
            wrapped: Any = classmethod(wrapper(raw.__func__))
        else:
            wrapped = wrapper(original)
        setattr(owner, name, wrapped)
        self._patched.append((owner, name, raw))

    @staticmethod
    def _counting(original: Callable[..., Awaitable[Any]], inflight: _Inflight) -> Any:
        @functools.wraps(original)
        async def counted(*args: Any, **kwargs: Any) -> Any:
            inflight.enter()
            try:
                return await original(*args, **kwargs)
            finally:
                inflight.exit()

        counted._fastsched = True  # type: ignore[attr-defined]
        return counted

    @staticmethod
    def _holding(original: Callable[..., Awaitable[Any]], network: NetworkCalls) -> Any:
        @functools.wraps(original)
        async def held(*args: Any, **kwargs: Any) -> Any:
            counted = network.enter()
            try:
                return await original(*args, **kwargs)
            finally:
                if counted:
                    network.exit()

        held._fastsched = True  # type: ignore[attr-defined]
        return held

    def restore(self) -> None:
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched.clear()


def _import_if_package_loaded(module_name: str) -> None:
    """Import a target module its package would import on first use (``_LAZY_MODULES``)."""
    import importlib
    import sys

    packages = _LAZY_MODULES.get(module_name, ())
    if module_name not in sys.modules and any(package in sys.modules for package in packages):
        importlib.import_module(module_name)


class VirtualClock:
    """The virtual clock of one test (the ``fastsched_clock`` fixture).

    ``now()`` is the virtual instant (aware, UTC). The wall clock reads it everywhere from
    the start of the test; the test's event loop reads it from the moment the test coroutine
    starts. Time moves only inside ``advance()``, ``advance_to()``, ``jump()`` and
    ``run_until_idle()``, which also run every job, timer and callback that falls due, and
    while the test itself awaits a loop timer (``await asyncio.sleep(s)``).
    """

    def __init__(
        self,
        *,
        start: dt.datetime,
        backend: str = "freezegun",
        watchdog: float = 30.0,
        world: World | None = None,
    ):
        if start.tzinfo is None or start.utcoffset() is None:
            raise ClockError(f"the start instant {start.isoformat()} is naive: give it a tzinfo")
        self.start_instant = start.astimezone(dt.timezone.utc)
        self.real_start = dt.datetime.now(dt.timezone.utc)
        self.now_us = to_us(self.start_instant)
        self._now = (self.now_us, from_us(self.now_us))
        self.watchdog_seconds = watchdog
        self.world = world or World(sync_test=False)
        """The test's world: a ``def`` test calls ``advance()`` and the like without await."""
        self.inflight = _Inflight()
        self.network = NetworkCalls(
            lambda: self.loop, lambda: self.now_us, self._next_timer_us, self._wake_waiter
        )
        self._wall = make_wall_clock(backend)
        self._loop_patch: _LoopPatch | None = None
        self._io_counter: _IoCounter | None = None
        self._driving = False
        self._drive_ended: list[asyncio.Future[None]] = []
        self._started = False
        self._unguard: Callable[[], None] = lambda: None
        self._checks: list[Callable[[], None]] = []
        self._busy_sources: list[Callable[[], int]] = [self.network.holding]
        self._on_attach: list[Callable[[asyncio.AbstractEventLoop], None]] = []
        self._describers: list[Callable[[], list[str]]] = []
        self._on_drive: list[Callable[[], None]] = []
        self.job_tasks = _leftovers.JobTasks()
        """The tasks of the test's jobs, ended at the end of the test."""
        self._executors: list[_threads.JobThreads] = []
        self._default_executor: _threads.JobThreads | None = None
        self._test_task: asyncio.Task[Any] | None = None
        self._autodrive: asyncio.Task[None] | None = None
        self._deferred_error: BaseException | None = None
        self.leftovers: list[LeftoverWorkError] = []
        """The failure of :meth:`end_of_test`, when the jobs left work running."""

    @property
    def backend(self) -> str:
        """The wall-clock backend in use: ``freezegun`` or ``time-machine``."""
        return self._wall.name

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop on virtual time, once the test coroutine has started."""
        return None if self._loop_patch is None else self._loop_patch.loop

    def now(self) -> dt.datetime:
        """The virtual instant, as an aware UTC datetime."""
        if self._now[0] != self.now_us:
            self._now = (self.now_us, from_us(self.now_us))
        return self._now[1]

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Put the wall clock on virtual time (the fixture calls this).

        Until :meth:`close`, a freeze of freezegun or time-machine started by the test is
        refused with a ``ClockError`` that says how to move the virtual clock instead.
        """
        self._wall.start(self.now())
        self._started = True
        self._unguard = refuse_foreign_freezes(self.now, ClockError)

    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Put ``loop`` (default: the running loop) on virtual time; idempotent."""
        loop = loop or asyncio.get_running_loop()
        if self._loop_patch is not None:
            if self._loop_patch.loop is not loop:
                raise ClockError(
                    "fastsched_clock is already attached to another event loop: use it only "
                    "from the test's own loop"
                )
            return
        patch = self._loop_patch = _LoopPatch(loop, self)
        self._io_counter = _IoCounter(self.inflight, self.network)
        _jobtime.install(_jobtime.JobTime(loop, lambda: patch.loop_time, self.poke))
        for callback in self._on_attach:
            callback(loop)

    def attach_on_test_start(self, item: pytest.Item) -> Callable[[], None]:
        """Make the test attach the clock to its loop before its first line runs.

        An ``async def`` test attaches it to the loop it runs on; a ``def`` test to the loop
        its calls run on (see :mod:`._worlds`).
        """
        original = getattr(item, "obj", None)
        if original is None or not callable(original):
            return lambda: None
        clock = self
        attached: Callable[..., Any]
        if inspect.iscoroutinefunction(original):

            @functools.wraps(original)
            async def attached_test(*args: Any, **kwargs: Any) -> Any:
                clock.attach()
                clock._test_task = asyncio.current_task()
                try:
                    return await original(*args, **kwargs)
                finally:
                    clock._test_task = None

            attached = attached_test
        elif self.world.sync_test:

            @functools.wraps(original)
            def attached_sync_test(*args: Any, **kwargs: Any) -> Any:
                clock.attach(clock.world.loop_of_sync_test())
                return original(*args, **kwargs)

            attached = attached_sync_test
        else:
            return lambda: None
        item.obj = attached  # type: ignore[attr-defined]

        def restore() -> None:
            item.obj = original  # type: ignore[attr-defined]

        return restore

    def close(self) -> None:
        """Restore the loop's clock and the wall clock (the fixture calls this)."""
        _threads.stop_threads(self._executors, grace=0)
        for executor in self._executors:
            executor.shutdown(wait=False)
        self._executors.clear()
        self._default_executor = None
        if self._io_counter is not None:
            self._io_counter.restore()
            self._io_counter = None
        if self._loop_patch is not None:
            _jobtime.uninstall()
            self._loop_patch.restore()
            self._loop_patch = None
        if self._started:
            self._unguard()
            self._wall.stop()
            self._started = False

    # -- hooks for the scheduler harness and the client ---------------------------------------

    def add_check(self, check: Callable[[], None]) -> None:
        """Run ``check`` after every settled instant; it raises to stop the clock call."""
        self._checks.append(check)

    def add_busy_source(self, source: Callable[[], int]) -> None:
        """Count real work in flight that the clock cannot see (e.g. thread-pool jobs)."""
        self._busy_sources.append(source)

    def on_attach(self, callback: Callable[[asyncio.AbstractEventLoop], None]) -> None:
        """Call ``callback(loop)`` when the clock attaches to the test's loop (or now)."""
        self._on_attach.append(callback)
        if self._loop_patch is not None:
            callback(self._loop_patch.loop)

    def on_drive(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` at the start of every call that moves time."""
        self._on_drive.append(callback)

    @property
    def driving(self) -> bool:
        """Whether a clock call is moving time right now."""
        return self._driving

    def default_executor(self) -> _threads.JobThreads:
        """The executor of ``run_in_executor(None, ...)`` while the clock is attached."""
        if self._default_executor is None:
            self._default_executor = self.thread_executor("fastsched-thread")
        return self._default_executor

    def thread_executor(self, name: str, max_workers: int | None = None) -> _threads.JobThreads:
        """A :class:`~._threads.JobThreads` the watchdog watches, shut down with the clock."""
        executor = _threads.JobThreads(name, max_workers, on_change=self.poke)
        self._executors.append(executor)
        return executor

    def add_describer(self, describer: Callable[[], list[str]]) -> None:
        """Lines that describe pending work, shown when the watchdog fires."""
        self._describers.append(describer)

    def poke(self) -> None:
        """Wake a clock call that waits for busy work; safe from any thread."""
        patch = self._loop_patch
        if patch is None:
            return
        loop = patch.loop
        if self.on_loop_thread():
            self._wake_waiter()  # on the loop's own thread: no self-pipe write
        else:
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(self._wake_waiter)

    def on_loop_thread(self) -> bool:
        """Whether the caller runs on the thread where the clock's loop is running.

        Asked once per job event: the thread's identity costs no system call, where asking
        for the running loop does (a ``getpid()``, in case the process forked).
        """
        patch = self._loop_patch
        return patch is not None and patch.loop._thread_id == threading.get_ident()  # type: ignore[attr-defined]

    def _wake_waiter(self) -> None:
        waiter = self.inflight.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- moving time --------------------------------------------------------------------------

    def advance(
        self,
        delta: dt.timedelta | float | None = None,
        *,
        seconds: float = 0,
        minutes: float = 0,
        hours: float = 0,
        days: float = 0,
    ) -> Awaitable[None]:
        """Move time forward by ``delta`` (or the keyword amounts), firing everything due.

        Every deadline on the way (job fire times, ``asyncio.sleep`` inside jobs) is visited
        in order, and everything runnable settles at each instant before time moves on. A
        job exception is raised from here at the virtual instant it happened. Await it in an
        ``async def`` test; a ``def`` test calls it without await (it returns when done).
        """
        __tracebackhide__ = True
        step = _duration(delta, seconds=seconds, minutes=minutes, hours=hours, days=days)

        async def advance() -> None:
            __tracebackhide__ = True
            target = self._within_range(self.now_us + step, "advance")
            await self._drive(target, visit_deadlines=True)

        return self._in_world("advance", advance)

    def advance_to(self, instant: dt.datetime) -> Awaitable[None]:
        """Move time forward to the aware datetime ``instant``, firing everything due."""
        __tracebackhide__ = True

        async def advance_to() -> None:
            __tracebackhide__ = True
            await self._drive(self._target_of(instant, "advance_to"), visit_deadlines=True)

        return self._in_world("advance_to", advance_to)

    def jump(
        self,
        delta: dt.timedelta | float | None = None,
        *,
        seconds: float = 0,
        minutes: float = 0,
        hours: float = 0,
        days: float = 0,
    ) -> Awaitable[None]:
        """Move time forward at once, as when the process was suspended; then catch up.

        Nothing runs at the instants in between: jobs that fell due meanwhile are handled by
        APScheduler's own misfire and coalescing rules when the scheduler wakes up late.
        """
        __tracebackhide__ = True
        step = _duration(
            delta, seconds=seconds, minutes=minutes, hours=hours, days=days, method="jump"
        )

        async def jump() -> None:
            __tracebackhide__ = True
            target = self._within_range(self.now_us + step, "jump")
            await self._drive(target, visit_deadlines=False)

        return self._in_world("jump", jump)

    def run_until_idle(self) -> Awaitable[None]:
        """Run everything runnable at the current instant, without moving time."""
        __tracebackhide__ = True

        async def run_until_idle() -> None:
            __tracebackhide__ = True
            await self._drive(self.now_us, visit_deadlines=True)

        return self._in_world("run_until_idle", run_until_idle)

    def _in_world(
        self, method: str, make: Callable[[], Coroutine[Any, Any, None]]
    ) -> Awaitable[None]:
        """The coroutine of ``method`` to await, or, in a ``def`` test, the call made."""
        __tracebackhide__ = True
        return self.world.run(  # type: ignore[no-any-return]
            f"fastsched_clock.{method}()", make, ClockError
        )

    def _within_range(self, target_us: int, method: str) -> int:
        if target_us > _MAX_US:
            raise ClockError(
                f"{method}() would move time past {from_us(_MAX_US).isoformat()}, the last "
                f"instant a datetime can hold (now {self.now().isoformat()})"
            )
        return target_us

    def _target_of(self, instant: dt.datetime, method: str) -> int:
        if not isinstance(instant, dt.datetime):
            raise ClockError(f"{method}() takes an aware datetime, not {instant!r}")
        if instant.tzinfo is None or instant.utcoffset() is None:
            raise ClockError(
                f"{method}({instant.isoformat()!r}) got a naive datetime: give it a tzinfo, "
                f"e.g. {instant.isoformat()}+00:00 or tzinfo=timezone.utc"
            )
        target = to_us(instant)
        if target < self.now_us:
            raise ClockError(
                f"{method}({instant.isoformat()}) would move time backwards from "
                f"{self.now().isoformat()}: virtual time only moves forward"
            )
        return target

    async def drive_until(self, awaitable: Awaitable[_T]) -> _T:
        """Await ``awaitable`` (a client request), moving time as far as it needs.

        Its timers fire, and so does everything else that falls due meanwhile (jobs
        included), as on a real server. While another clock call moves time, that call
        runs the work too; this one takes over if the work is still pending when it returns.
        The watchdog limits the real time of the whole wait, so work that can never finish
        fails instead of moving time forever.
        """
        __tracebackhide__ = True
        future = asyncio.ensure_future(awaitable)
        try:
            while not future.done():
                if self._driving:
                    await self._until_drive_ends(future)
                else:
                    await self._moving_time(lambda watchdog: self._drive_until(future, watchdog))
            return future.result()
        finally:
            future.cancel()

    async def _until_drive_ends(self, future: asyncio.Future[Any]) -> None:
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drive_ended.append(ended)
        try:
            await asyncio.wait([future, ended], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._drive_ended.remove(ended)

    async def _drive(
        self,
        target_us: int,
        *,
        visit_deadlines: bool,
        until: asyncio.Future[Any] | None = None,
    ) -> None:
        __tracebackhide__ = True
        await self._moving_time(
            lambda watchdog: self._drive_to(target_us, visit_deadlines, watchdog, until)
        )

    async def _moving_time(self, drive: Callable[[Watchdog], Awaitable[None]]) -> None:
        __tracebackhide__ = True
        if not self._started:
            raise ClockError("the clock is closed: use fastsched_clock only inside its test")
        autodrive = self._autodrive
        if autodrive is not None and autodrive is not asyncio.current_task():
            # The test woke before the timer it slept on: that drive stops at this instant.
            await asyncio.wait([autodrive])
        if self._driving:
            raise ClockError(
                "a fastsched_clock call is already moving time: await one advance() at a time"
            )
        self.attach()
        assert self._io_counter is not None
        self._io_counter.install()
        self._raise_deferred()
        loop = asyncio.get_running_loop()
        watchdog = Watchdog(loop, self.watchdog_seconds, self._describe_task)
        self._driving = True
        try:
            for callback in self._on_drive:
                callback()
            await drive(watchdog)
        finally:
            self._driving = False
            watchdog.stop()
            for ended in self._drive_ended:
                if not ended.done():
                    ended.set_result(None)

    async def _drive_to(
        self,
        target_us: int,
        visit_deadlines: bool,
        watchdog: Watchdog,
        until: asyncio.Future[Any] | None = None,
    ) -> None:
        __tracebackhide__ = True
        if not visit_deadlines:
            # What is due now (a job due at the start instant, held until the first clock
            # call) runs before the suspension, as it would have on a real server.
            await self._settle(watchdog)
            self._set_now(target_us)
        if await self._step_through(target_us, watchdog, until) == "until":
            return  # the sleeping test was woken by something else: stop here
        if self.now_us < target_us:
            self._set_now(target_us)
            await self._settle(watchdog)

    async def _drive_until(self, future: asyncio.Future[Any], watchdog: Watchdog) -> None:
        __tracebackhide__ = True
        assert self._loop_patch is not None
        while not future.done():
            await self._step_through(None, watchdog, future)
            if not future.done():
                # Nothing virtual left to wait for: wait in real time (a watchdog tick).
                await self._wait_for_busy_work(self._loop_patch.loop, watchdog)

    async def _settle(self, watchdog: Watchdog) -> None:
        """Run everything runnable at this instant, wait for busy work, run the checks."""
        __tracebackhide__ = True
        await self._step_through(self.now_us, watchdog, None, move=False)

    async def _step_through(
        self,
        target_us: int | None,
        watchdog: Watchdog,
        until: asyncio.Future[Any] | None,
        *,
        move: bool = True,
    ) -> str:
        """Settle each instant and step to the next loop timer up to ``target_us``.

        ``None`` means no limit. Returns ``"until"`` when ``until`` is done, else ``"done"``
        (the next timer lies past the target, or there is none), with everything at the
        current instant settled and checked. See :meth:`_stepper` for the stepping itself.
        """
        __tracebackhide__ = True
        assert self._loop_patch is not None
        loop = self._loop_patch.loop
        while True:
            outcome = await self._stepper(target_us, watchdog, until, move)
            if outcome == "expired":
                self._raise_watchdog(watchdog)
            elif outcome == "busy":
                await self._wait_for_busy_work(loop, watchdog)
            else:
                return outcome

    def _stepper(
        self,
        target_us: int | None,
        watchdog: Watchdog,
        until: asyncio.Future[Any] | None,
        move: bool,
    ) -> asyncio.Future[str]:
        """A probe of the loop that settles instants and moves time, resolving a future when done.

        The probe runs each time the loop has run its ready queue and is about to wait for
        I/O (the loop patch's ``select``). While the ready queue holds anything, or a timer
        is due, the instant is not settled (the ready queue holds exactly what the loop runs
        next: call_soon, done-callbacks, call_soon_threadsafe from any thread). Empty, with
        no due timer, means quiescent at this instant unless counted work is in flight: then
        the loop waits in its ``select`` as it would anyway, woken by that work's end (a
        driver thread's ``call_soon_threadsafe``, a socket, a poke), a watchdog tick or the
        next timer's distance in real time (when a network call stops holding time), and the
        probe looks again. Quiescent: the checks run (a job error is raised through the
        future) and time steps to the next timer, whose callbacks the loop runs in the same
        iteration, without waking the driving coroutine and without a callback of the
        clock's own in the loop's queue. A loop whose ``select`` could not be patched runs
        the probe as a callback that queues itself again, and leaves the wait for work in
        flight to the caller (``"busy"``).
        """
        assert self._loop_patch is not None
        patch = self._loop_patch
        loop = patch.loop
        ready = loop._ready  # type: ignore[attr-defined]
        scheduled = loop._scheduled  # type: ignore[attr-defined]
        result: asyncio.Future[str] = loop.create_future()
        spins = 0

        def probe() -> bool:
            """Look at the instant: whether the loop must not wait (False once it is over)."""
            __tracebackhide__ = True
            nonlocal spins
            if result.done():  # set, or the driving coroutine was cancelled
                if patch.probe is probe:
                    patch.probe = None
                return False
            try:
                if watchdog.blocked is not None:  # a job blocked the loop and was interrupted
                    result.set_result("expired")
                elif ready or (scheduled and scheduled[0]._when < patch.loop_time):
                    spins += 1
                    # A job that never stops yielding keeps the queue busy: look at the
                    # watchdog now and then (a blocked loop is the watchdog thread's to find).
                    if not spins % _SPINS_PER_LOOK:
                        watchdog.alive()
                        if watchdog.expired():
                            result.set_result("expired")
                    return True
                else:
                    spins = 0
                    if not quiescent():
                        watchdog.attend()  # its ticks wake the loop to look again
                        return False  # work in flight: the loop waits for it
            except BaseException as error:  # raised at the clock call's await
                result.set_exception(error)
            if result.done() and patch.probe is probe:
                patch.probe = None
            return True

        def quiescent() -> bool:
            """Check and step at a settled instant; False while counted work is in flight."""
            __tracebackhide__ = True
            if self._busy():
                if not patch.watches_select:
                    result.set_result("busy")  # a queued probe cannot wait: the caller does
                elif watchdog.expired():
                    result.set_result("expired")
                else:
                    return False
                return True
            self._run_checks()
            if until is not None and until.done():
                result.set_result("until")
                return True
            deadline = self._next_deadline() if move else None
            if deadline is None or (target_us is not None and deadline[0] > target_us):
                result.set_result("done")
                return True
            if deadline[0] > self.now_us:
                watchdog.progress()  # the loop goes round too
            else:
                watchdog.alive()
            self._set_now(*deadline)
            return True

        if patch.watches_select:
            patch.probe = probe
        else:
            call_soon = loop.call_soon

            def queued() -> None:
                if probe() and not result.done():
                    call_soon(queued)

            call_soon(queued)
        return result

    def _set_now(self, now_us: int, timer_when: float | None = None) -> None:
        if now_us > self.now_us:
            self.now_us = now_us
            self._wall.move_to(self.now(), now_us)
        assert self._loop_patch is not None
        self._loop_patch.sync_to(self.now_us, timer_when)

    def _next_deadline(self) -> tuple[int, float] | None:
        assert self._loop_patch is not None
        scheduled = self._loop_patch.loop._scheduled  # type: ignore[attr-defined]
        # A heap ordered by ``when``: the head is the earliest timer. A cancelled head (the
        # loop drops those itself) means a scan; a cancelled handle deeper in the heap never
        # hides an earlier live one.
        if not scheduled:
            return None
        head = scheduled[0]
        if head._cancelled:  # the handles' attributes: their methods cost a call per fire
            whens = [handle.when() for handle in scheduled if not handle.cancelled()]
            if not whens:
                return None
            when = min(whens)
        else:
            when = head._when
        return self._loop_patch.us_of_loop_time(when), when

    def _next_timer_us(self) -> int | None:
        deadline = None if self._loop_patch is None else self._next_deadline()
        return None if deadline is None else deadline[0]

    def _busy(self) -> int:
        busy = self.inflight.count
        for executor in self._executors:
            busy += executor.pending
        for source in self._busy_sources:
            busy += source()
        return busy

    async def _wait_for_busy_work(
        self, loop: asyncio.AbstractEventLoop, watchdog: Watchdog
    ) -> None:
        __tracebackhide__ = True
        waiter: asyncio.Future[None] = loop.create_future()
        self.inflight.waiter = waiter
        watchdog.wake_on_tick(waiter)
        try:
            await waiter
        finally:
            self.inflight.waiter = None
        if watchdog.expired():
            self._raise_watchdog(watchdog)

    def _run_checks(self) -> None:
        __tracebackhide__ = True
        for check in self._checks:
            check()

    def _raise_watchdog(self, watchdog: Watchdog) -> None:
        __tracebackhide__ = True
        lines = [line for describe in self._describers for line in describe()]
        if not lines and watchdog.blocked is not None:
            # The interrupted job ended before the clock looked: it was running when found.
            lines = [watchdog.blocked.what]
        pending = "\n".join(f"  {line}" for line in lines) or "  (no job run is pending)"
        watchdog.stop()  # stopping threads blocks the loop: not a loop to interrupt
        blocked = watchdog.blocked.details() if watchdog.blocked is not None else []
        details = blocked + _watchdog.stop_threads(self._executors)
        raise WatchdogTimeout(
            f"fastsched watchdog: work did not finish within {watchdog.seconds:g} real "
            f"seconds at virtual {self.now().isoformat()}.\n"
            f"Still running:\n{pending}\n"
            + "".join(f"{line}\n" for line in details)
            + "A job that blocks its thread or loops without awaiting never lets time move. "
            "Raise the limit with fastsched_watchdog / --fastsched-watchdog if the work is "
            "only slow."
        )

    def _describe_task(self, task: asyncio.Task[Any] | None) -> str:
        return self.job_tasks.describe(task, self._test_task)

    # -- the test's own sleeps: virtual time ----------------------------------------------------

    def test_sleeps(self) -> bool:
        """Called by the loop before it waits: start moving time if the test sleeps.

        ``await asyncio.sleep(s)`` (or ``asyncio.wait_for``/``asyncio.timeout``) in the test
        itself waits on a loop timer, in virtual time: when nothing else can run and no real
        work is in flight, the clock advances to that timer as ``advance_to()`` would, firing
        everything due on the way. Errors of that drive are raised at the test's await.
        """
        task = self._test_task
        patch = self._loop_patch
        if self._driving or self._autodrive is not None or patch is None or task is None:
            return False
        waiter = getattr(task, "_fut_waiter", None)
        if task.done() or waiter is None or waiter.done() or self._busy():
            return False
        for handle in patch.loop._scheduled:  # type: ignore[attr-defined]
            if handle.cancelled():
                continue
            owner = getattr(getattr(handle, "_callback", None), "__self__", None)
            if waiter in (getattr(handle, "_args", None) or ()) or (
                getattr(owner, "_task", None) is task
            ):
                patch.loop.call_soon(self._start_autodrive, handle, waiter)
                return True
        return False

    def _start_autodrive(self, handle: asyncio.TimerHandle, waiter: asyncio.Future[Any]) -> None:
        if self._driving or self._autodrive is not None or self._loop_patch is None:
            return
        if handle.cancelled() or waiter.done():
            return
        target = max(self._loop_patch.us_of_loop_time(handle.when()), self.now_us)
        # The test wakes only when the drive is over, as after advance_to(): hold its timer's
        # callback (a plain TimerHandle attribute) and run it then.
        held: list[tuple[Any, tuple[Any, ...]]] = []
        timer: Any = handle
        callback, args = timer._callback, tuple(timer._args or ())
        timer._callback = lambda: held.append((callback, args))
        timer._args = ()
        self._autodrive = self._loop_patch.loop.create_task(
            self._autodrive_to(target, waiter, held)
        )

    async def _autodrive_to(
        self,
        target_us: int,
        waiter: asyncio.Future[Any],
        held: list[tuple[Any, tuple[Any, ...]]],
    ) -> None:
        __tracebackhide__ = True
        try:
            await self._drive(target_us, visit_deadlines=True, until=waiter)
        except BaseException as error:
            self._autodrive = None
            if not waiter.done():
                waiter.set_exception(error)  # raised at the test's await
            else:
                self._deferred_error = error  # raised by the next clock call or at the end
            return
        self._autodrive = None
        for callback, args in held:
            with contextlib.suppress(asyncio.InvalidStateError):
                callback(*args)

    def _raise_deferred(self) -> None:
        __tracebackhide__ = True
        error, self._deferred_error = self._deferred_error, None
        if error is not None:
            raise error

    # -- the end of the test ---------------------------------------------------------------------

    def end_of_test(self) -> LeftoverWorkError | None:
        """End what the test's jobs left running; the error that fails the test for it.

        The error is kept in ``leftovers`` too, for the test's report.
        Called after the test function returned (or raised), while its loop is not running.
        Job runs still in progress are cancelled quietly (as the app's shutdown would); a task
        that ignores cancellation, and a task a job started and left behind, are ended by
        force and named (see :mod:`._leftovers`). Job threads still running are stopped.
        """
        problems: list[str] = []
        deferred, self._deferred_error = self._deferred_error, None
        if deferred is not None:
            problems.append(f"{type(deferred).__name__}: {deferred}")
        patch = self._loop_patch
        if patch is not None and not patch.loop.is_closed() and not patch.loop.is_running():
            autodrive = [self._autodrive] if self._autodrive is not None else []
            problems += self.job_tasks.end(patch.loop, autodrive)
        _threads.stop_threads(self._executors, grace=_watchdog.STOP_GRACE)
        error = _leftovers.failure(problems)
        self.leftovers = [error] if error is not None else []
        return error

    # -- introspection -------------------------------------------------------------------------

    def timers(self) -> Iterator[dt.datetime]:
        """The virtual instants of the loop timers pending now (APScheduler's included)."""
        if self._loop_patch is None:
            return iter(())
        patch = self._loop_patch
        scheduled = patch.loop._scheduled  # type: ignore[attr-defined]
        whens = sorted(handle.when() for handle in scheduled if not handle.cancelled())
        return (from_us(patch.us_of_loop_time(when)) for when in whens)


@contextlib.contextmanager
def for_test(item: pytest.Item, settings: Settings, backend: str) -> Iterator[VirtualClock]:
    """The clock of one test (the body of ``fastsched_clock``).

    It starts at the marker's ``start`` or the ``fastsched_start`` setting, on the wall-clock
    ``backend``, and joins the test's loop when the test's coroutine starts.
    """
    clock = VirtualClock(
        start=marker_options(item).start or settings.start,
        backend=clock_backend(backend),
        watchdog=settings.watchdog,
        world=world_of(item),
    )
    clock.start()
    restore = clock.attach_on_test_start(item)
    try:
        yield clock
    finally:
        restore()
        clock.close()
        close_world(item)


def _duration(
    delta: dt.timedelta | float | None,
    *,
    seconds: float,
    minutes: float,
    hours: float,
    days: float,
    method: str = "advance",
) -> int:
    """The positive step, in microseconds, that ``method()`` was asked to move time by."""
    if delta is not None and (seconds or minutes or hours or days):
        raise ClockError(f"give {method}() either a timedelta or keyword amounts, not both")
    amounts = {"seconds": seconds, "minutes": minutes, "hours": hours, "days": days}
    number = isinstance(delta, (int, float)) and not isinstance(delta, bool)
    shown = (
        repr(delta)
        if number
        else ", ".join(f"{name}={amount!r}" for name, amount in amounts.items() if amount)
    )
    for amount in [delta] if number else amounts.values():
        if isinstance(amount, float) and not math.isfinite(amount):
            raise ClockError(f"{method}({shown}) needs a finite duration")
    try:
        if delta is None:
            delta = dt.timedelta(seconds=seconds, minutes=minutes, hours=hours, days=days)
        elif number:
            delta = dt.timedelta(seconds=delta)  # type: ignore[arg-type]
    except OverflowError:
        raise ClockError(f"{method}({shown}) is too long for a datetime") from None
    if not isinstance(delta, dt.timedelta):
        raise ClockError(f"{method}() takes a timedelta or a number of seconds, not {delta!r}")
    step = delta // dt.timedelta(microseconds=1)
    if step <= 0:
        raise ClockError(
            f"{method}() needs a positive duration, got {delta!r}: to run what is due now "
            f"without moving time, await run_until_idle()"
        )
    return step

"""The harness around the app's own APScheduler instance.

APScheduler's code runs unmodified: its trigger math, misfire grace, coalescing,
``max_instances`` and jitter decide what fires. The harness only

- re-attaches the scheduler to the test's event loop (APScheduler remembers the first loop it
  ran on) and starts it on virtual time;
- wakes it exactly at each fire instant, while APScheduler's own code reads the clock
  ``_WAKE_LAG_US`` late, as a production scheduler woken by a real timer does;
- listens to its events to keep a run log (``runs``) and to turn job exceptions, which
  APScheduler only logs, into test failures raised at the virtual instant they happened;
- restores the job stores after the test, so no next-run time leaks into the next test.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import datetime as dt
import functools
import inspect
import os
import re
import threading
import traceback
import types
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import pytest

from pytest_fastsched import _asserts, _background, _leftovers
from pytest_fastsched._clock import ClockError, VirtualClock
from pytest_fastsched._options import Settings, check_scheduler, marker_options, resolve
from pytest_fastsched._records import JobRun, JobRunError, RunRef, current_run, format_time
from pytest_fastsched._threads import JobStopped, JobThreads
from pytest_fastsched._wallclock import from_us, to_us

ReplicaFactory = Callable[["SchedulerHarness", int, Callable[[], Any]], "Replicas"]
"""Makes the replicas of a harness: ``(harness, count, engine)``; see :mod:`._replicas`."""


class Replicas(Protocol):
    """The replicas of a harness's scheduler, stopped with it."""

    def close(self) -> None: ...


# A production scheduler wakes up a little after each fire instant and asks its triggers (and
# checks misfires) with that later ``now``; the harness wakes it exactly on the instant. So
# APScheduler's own code reads the clock this many microseconds late (job code reads it
# exactly): with ``now == previous fire`` some triggers answer differently (a cron fire at a
# spring-forward gap instant is returned twice).
_WAKE_LAG_US = 1
_WAKE_LAG = dt.timedelta(microseconds=_WAKE_LAG_US)


class _LateDatetime:
    """Stands in for ``datetime`` in APScheduler's scheduler and executor modules.

    ``now()`` is the virtual instant plus ``_WAKE_LAG_US``, computed from the clock's own
    datetime of the instant (exact, and cheaper than a wall-clock backend's fake classes or
    a conversion from microseconds).
    """

    def __init__(self, wrapped: Any, clock: VirtualClock) -> None:
        self._wrapped = wrapped
        self._clock = clock
        self._at_us = -1
        self._by_zone: dict[dt.tzinfo | None, dt.datetime] = {}

    def now(self, tz: dt.tzinfo | None = None) -> dt.datetime:
        now_us = self._clock.now_us
        if now_us != self._at_us:
            self._at_us, self._by_zone = now_us, {}
        result = self._by_zone.get(tz)  # one fire asks several times; datetimes are immutable
        if result is None:
            late = self._clock.now() + _WAKE_LAG
            result = late.astimezone().replace(tzinfo=None) if tz is None else late.astimezone(tz)
            self._by_zone[tz] = result
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


class _LateExecutors:
    """APScheduler's executors check misfires as if they ran a little late (counted users)."""

    users = 0
    saved: Any = None

    @classmethod
    def acquire(cls, clock: VirtualClock) -> None:
        import apscheduler.executors.base as executors

        if cls.users == 0:
            cls.saved = executors.datetime
            executors.datetime = _LateDatetime(cls.saved, clock)
        cls.users += 1

    @classmethod
    def release(cls) -> None:
        import apscheduler.executors.base as executors

        cls.users -= 1
        if cls.users == 0:
            if isinstance(executors.datetime, _LateDatetime):
                executors.datetime = cls.saved
            cls.saved = None


class FastschedWarning(pytest.PytestWarning):
    """Something in the app's scheduler setup may not behave as it would in production."""


@dataclasses.dataclass
class _Expectation:
    exc_type: type[BaseException] | tuple[type[BaseException], ...]
    match: re.Pattern[str] | None
    job_id: str | None
    seen: list[JobRun] = dataclasses.field(default_factory=list)

    def accepts(self, run: JobRun) -> bool:
        if self.job_id is not None and run.job_id != self.job_id:
            return False
        if not isinstance(run.exception, self.exc_type):
            return False
        return self.match is None or bool(self.match.search(str(run.exception)))


def _copy_job(job: Any) -> Any:
    """A copy of an APScheduler ``Job`` (it has ``__slots__`` and a strict ``__getstate__``)."""
    from apscheduler.job import Job

    clone = Job.__new__(Job)
    for slot in Job.__slots__:
        if slot != "__weakref__" and hasattr(job, slot):
            object.__setattr__(clone, slot, getattr(job, slot))
    object.__setattr__(clone, "trigger", copy.copy(job.trigger))
    return clone


class _JobStores:
    """The scheduler's job stores during a test, and its jobs as they were before it.

    A persistent store (``SQLAlchemyJobStore``, Redis, MongoDB...) keeps its jobs in a
    database the test does not own: it is swapped for an empty memory store for the test, so
    that it is neither read nor written (nor created, when its table does not exist yet); so
    is a persistent store the app adds during the test. After the test the original stores
    are put back and the memory stores hold the jobs they held before it.
    """

    def __init__(self, scheduler: Any) -> None:
        from apscheduler.jobstores.memory import MemoryJobStore

        self._scheduler = scheduler
        self._stores = dict(scheduler._jobstores)
        for alias, store in self._stores.items():
            if not isinstance(store, MemoryJobStore):
                scheduler._jobstores[alias] = _memory_store(scheduler, alias)
        self._pending = [
            (_copy_job(job), alias, replace) for job, alias, replace in scheduler._pending_jobs
        ]
        self._stored = [
            (alias, _copy_job(job))
            for alias, store in scheduler._jobstores.items()
            for job in store.get_all_jobs()
        ]
        add_jobstore = scheduler.add_jobstore

        def in_memory(jobstore: Any, alias: str = "default", **options: Any) -> Any:
            if not isinstance(jobstore, MemoryJobStore):
                jobstore, options = MemoryJobStore(), {}
            return add_jobstore(jobstore, alias, **options)

        scheduler.add_jobstore = in_memory

    def restore(self) -> None:
        """Put the original stores back, the memory ones with their jobs of before the test."""
        scheduler = self._scheduler
        vars(scheduler).pop("add_jobstore", None)
        for store in scheduler._jobstores.values():
            store.remove_all_jobs()
        scheduler._jobstores.clear()
        scheduler._jobstores.update(self._stores)
        scheduler._pending_jobs = [
            (_copy_job(job), alias, replace) for job, alias, replace in self._pending
        ]
        for alias, job in self._stored:
            scheduler._jobstores[alias].add_job(_copy_job(job))


def _memory_store(scheduler: Any, alias: str) -> Any:
    from apscheduler.jobstores.memory import MemoryJobStore

    store = MemoryJobStore()
    store.start(scheduler, alias)
    return store


class SchedulerHarness:
    """The app's scheduler under virtual time (the ``fastsched_scheduler`` fixture).

    ``scheduler`` is the app's own ``AsyncIOScheduler``; ``runs`` is the run log. Job
    exceptions fail the test from the ``fastsched_clock`` call during which they happened,
    unless the test expects them (``expect_job_error``) or the marker says
    ``@pytest.mark.fastsched(job_errors="record")``.
    """

    def __init__(
        self,
        clock: VirtualClock,
        *,
        job_errors: str = "raise",
        replica: int = 0,
        replicas: ReplicaFactory | None = None,
    ) -> None:
        self.clock = clock
        self.job_errors = job_errors
        self.replica = replica
        self.replica_count = 1
        self._make_replicas = replicas
        self._replica_set: Replicas | None = None
        self._replica_engine: Callable[[], Any] | None = None
        self.runs: list[JobRun] = []
        # The runs still running, by (job id, scheduled instant, replica), oldest first: a
        # finished event finds its run here instead of scanning the run log. Runs that
        # became errors since the last check, in order: the check after each instant looks
        # only at these. Both shared by the replicas, as ``runs`` is.
        self._open: dict[tuple[str, dt.datetime, int], list[JobRun]] = {}
        self._new_errors: collections.deque[JobRun] = collections.deque()
        self._late_executors = False
        self.scheduler: Any = None
        self.autostart = True
        self._held = False
        self._lock = threading.Lock()
        self._raised: set[int] = set()
        self._expectations: list[_Expectation] = []
        self._stores: _JobStores | None = None
        self._thread_jobs = 0
        """Runs handed to a thread pool and not finished: work in flight for the clock."""
        self._thread_runs: collections.Counter[tuple[str, dt.datetime]] = collections.Counter()
        self._manual_submit = False
        self._internal_start = False
        self._labelled: list[Any] = []
        self._pools: list[tuple[Any, Any]] = []
        self._background: Callable[[], None] | None = None
        """Puts the app's ``BackgroundScheduler`` back off the loop (see :mod:`._background`)."""
        clock.add_check(self._raise_job_errors)
        clock.add_busy_source(lambda: self._thread_jobs)
        clock.add_describer(self._describe_running)
        clock.job_tasks.add_runs(self._job_tasks)

    # -- attaching --------------------------------------------------------------------------

    def attach(self, scheduler: Any) -> None:
        """Take ``scheduler`` (the app's ``AsyncIOScheduler``) under the harness.

        Call it from a fixture or at the start of the test when the app builds its scheduler
        in a function instead of at import (then leave ``fastsched_scheduler`` unset).
        """
        from apscheduler.events import EVENT_ALL, EVENT_JOB_SUBMITTED

        if self.scheduler is scheduler:
            return  # taken over when the app started it
        if self.scheduler is not None:
            raise ClockError("fastsched_scheduler is already attached to a scheduler")
        check_scheduler(scheduler, "fastsched_scheduler")
        if _background.is_background(scheduler):
            self._background, was_running = _background.on_the_loop(
                scheduler, self._background_start
            )
            if was_running:
                warnings.warn(FastschedWarning(_ran_in_real_time(scheduler)), stacklevel=2)
        self.scheduler = scheduler
        scheduler._fastsched_harness = self
        self._stores = _JobStores(scheduler)
        self._install_wakeups(scheduler)
        for job in self._all_jobs():
            self._check_job(job)
        self._reanchor_real_time_jobs()
        # Runs are opened when submitted (_label_runs): one listener call per fire less.
        scheduler.add_listener(self._on_event, EVENT_ALL & ~EVENT_JOB_SUBMITTED)
        self.clock.on_drive(self._release)
        self.clock.on_attach(self._on_loop)
        if self.clock.loop is None and self.autostart and scheduler.state == _stopped():
            # Fixtures run before the test's loop is known: start it now, paused at the
            # virtual start, so that set-up code sees it running (job.next_run_time).
            self._start_pending(app_paused=False)
        if self.replica_count > 1:
            self.use_replicas(self.replica_count, engine=self._replica_engine)

    def _install_wakeups(self, scheduler: Any) -> None:
        """Wake ``scheduler`` at exact instants, and let it read the clock a little late.

        ``AsyncIOScheduler`` sleeps ``call_later(next.timestamp() - now.timestamp())``: float
        timestamps near 2**31 s carry a quarter microsecond each, so a timer could round to
        the microsecond after the fire time (and the job read that as ``now``); two replicas
        due together would get timers a few ulps apart, and one would run its whole job
        before the other woke. The timer is set from the exact microsecond instead, and
        calls the body of ``wakeup()`` at once (it already runs on the loop). APScheduler's
        ``_process_jobs`` reads the clock ``_WAKE_LAG_US`` late; the wait it returns is
        measured from that late ``now``.
        """
        import apscheduler.schedulers.base as base_module

        clock = self.clock
        process_jobs = type(scheduler)._process_jobs.__get__(scheduler)
        wakeup = direct_wakeup(scheduler)

        late = _LateDatetime(base_module.datetime, clock)

        def late_process_jobs() -> Any:
            current = base_module.datetime
            base_module.datetime = late
            try:
                return process_jobs()
            finally:
                base_module.datetime = current

        def start_timer(wait_seconds: float | None) -> None:
            scheduler._stop_timer()
            if wait_seconds is None:
                return
            patch = clock._loop_patch
            loop = scheduler._eventloop
            if patch is None or patch.loop is not loop:
                scheduler._timeout = loop.call_later(wait_seconds, wakeup)
                return
            due_us = max(clock.now_us + _WAKE_LAG_US + round(wait_seconds * 1e6), clock.now_us)
            scheduler._timeout = loop.call_at(patch.loop_time_of(due_us), wakeup)

        scheduler._process_jobs = late_process_jobs
        scheduler._start_timer = start_timer
        _LateExecutors.acquire(clock)
        self._late_executors = True

    def use_replicas(self, count: int, *, engine: Callable[[], Any] | None = None) -> None:
        """Run ``count`` copies of the scheduler (this one included) on the virtual clock.

        The copies hold the same jobs (functions, triggers, arguments, ids) and fire at the
        same virtual instants, as the app's replicas do on several servers; each run is
        recorded with its replica index (``JobRun.replica``). Needs commit isolation, so that
        each replica's sessions get connections of their own; ``engine`` returns the engine
        whose pool the replicas' connections are opened in when they start (the plugin passes
        the test database's). See :mod:`._replicas`.
        """
        if self._make_replicas is None:
            raise ClockError(
                "this SchedulerHarness was made without replicas: use the fastsched_scheduler "
                "fixture, whose harness can run them"
            )
        self.replica_count = count
        self._replica_engine = engine
        if self.scheduler is not None and self._replica_set is None and count > 1:
            self._replica_set = self._make_replicas(self, count, engine or (lambda: None))

    def _all_jobs(self) -> list[Any]:
        return list(self.scheduler.get_jobs())

    def _on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        from apscheduler.schedulers.base import STATE_STOPPED

        scheduler = self.scheduler
        previous = scheduler._eventloop
        if isinstance(previous, _PendingLoop):
            # Started (paused) before the test's loop was known: move it onto that loop.
            for holder in [scheduler, *scheduler._executors.values()]:
                if getattr(holder, "_eventloop", None) is previous:
                    holder._eventloop = loop
            previous.hand_over(loop)
        elif scheduler.state != STATE_STOPPED and (previous is None or previous.is_closed()):
            # Left running by an earlier test whose loop is gone: reset it.
            scheduler.state = STATE_STOPPED
            scheduler._timeout = None
        if scheduler.state == STATE_STOPPED:
            scheduler._eventloop = loop
            if self.autostart:
                # Paused until the first clock call: a job due at the start instant fires
                # inside that call, not at whatever the test awaits first.
                self._held = not self.clock.driving
                self._start_internally(paused=self._held)
        self._label_runs()

    def _start_internally(self, *, paused: bool) -> None:
        self._internal_start = True
        try:
            self.scheduler.start(paused=paused)
        finally:
            self._internal_start = False

    def _start_pending(self, *, app_paused: bool) -> None:
        """Start the scheduler paused, on a stand-in loop until the test's loop attaches."""
        from apscheduler.schedulers.base import BaseScheduler

        self.scheduler._eventloop = _PendingLoop()
        # AsyncIOScheduler.start() would ask for the running loop: there is none yet.
        BaseScheduler.start(self.scheduler, paused=True)
        self._held = not app_paused

    def app_start(self, scheduler: Any, paused: bool, start: Callable[..., Any]) -> Any:
        """``scheduler.start(paused)`` called by the app (or a fixture) during the test.

        A scheduler started while the test runs is taken under the harness when the harness
        has none yet (an app that builds its scheduler in its lifespan). Until the first
        clock call it stays paused at the virtual start, as the harness's own start does;
        inside a clock call (the lifespan under ``fastsched_client``) it starts as asked.
        ``start`` is APScheduler's own ``AsyncIOScheduler.start``.
        """
        __tracebackhide__ = True
        if self._internal_start:
            return start(scheduler, paused)
        if self.scheduler is None:
            self.attach(scheduler)
            if self._background is not None:
                start = _background.loop_start
        elif scheduler is not self.scheduler:
            warnings.warn(
                FastschedWarning(_second_scheduler(scheduler, self.scheduler)), stacklevel=3
            )
            return start(scheduler, paused)
        if scheduler.state != _stopped():
            if self._held or isinstance(scheduler._eventloop, _PendingLoop):
                # The harness started it (paused at the virtual start): the app takes it over.
                self._held = self._held and not paused
                return None
            return start(scheduler, paused)  # APScheduler's own "already running" error
        if not _loop_running() and (
            scheduler._eventloop is None or scheduler._eventloop.is_closed()
        ):
            loop = self.clock.loop
            if loop is None or loop.is_closed():
                self._start_pending(app_paused=paused)  # a sync fixture: no loop yet
                return None
            scheduler._eventloop = loop  # a def test: the loop runs in its clock calls
            self._label_runs()
        if self.clock.driving or paused:
            return start(scheduler, paused)
        self._held = True
        return start(scheduler, True)

    def _background_start(self, scheduler: Any, paused: bool) -> Any:
        """``start()`` of the app's ``BackgroundScheduler`` while it runs on the loop."""
        __tracebackhide__ = True
        return self.app_start(scheduler, paused, _background.loop_start)

    def _release(self) -> None:
        from apscheduler.schedulers.base import STATE_PAUSED

        if self._held and self.scheduler is not None and self.scheduler.state == STATE_PAUSED:
            self.scheduler.resume()
        self._held = False

    def _label_runs(self) -> None:
        """Submit each job run with ``current_run`` set, so the run's task inherits it.

        The run is opened in the run log before its executor gets it (the harness does not
        listen to EVENT_JOB_SUBMITTED, which would cost a call per fire): a fast job's
        EVENT_JOB_EXECUTED, sent from a thread pool's thread, may come before the scheduler
        would send EVENT_JOB_SUBMITTED. A run given to a thread pool is counted as work in
        flight here unless the pool is a :class:`~._threads.JobThreads`, which counts its
        own (a job sleeping in it holds none).
        """
        from apscheduler.executors.asyncio import AsyncIOExecutor

        for alias, executor in self.scheduler._executors.items():
            self._watch_pool(alias, executor)
            if "_do_submit_job" in vars(executor):
                continue
            submit = executor._do_submit_job
            threaded = not isinstance(executor, AsyncIOExecutor)

            def labelled(
                job: Any,
                run_times: list[dt.datetime],
                submit: Any = submit,
                threaded: bool = threaded,
                executor: Any = executor,
            ) -> Any:
                keys = [(job.id, _utc(run_time)) for run_time in run_times]
                counted = threaded and not isinstance(getattr(executor, "_pool", None), JobThreads)
                opened = self._open_thread_runs(keys, counted=counted)
                token = current_run.set(RunRef(job.id, keys[0][1], self.replica))
                try:
                    return submit(job, run_times)
                except BaseException as error:
                    self._not_submitted(keys, opened, error)
                    raise
                finally:
                    current_run.reset(token)

            executor._do_submit_job = labelled
            self._labelled.append(executor)

    def _open_thread_runs(
        self, keys: list[tuple[str, dt.datetime]], *, counted: bool
    ) -> list[JobRun]:
        """Open the runs of one submission (to a thread pool or not); ``counted``: in flight."""
        now = self.clock.now()
        opened = []
        with self._lock:
            for key in keys:
                if counted:
                    self._thread_runs[key] += 1
                    self._thread_jobs += 1
                if not self._manual_submit:  # run_job() opened its run itself
                    opened.append(JobRun(key[0], key[1], now, replica=self.replica))
            for run in opened:
                self._add_open(run)
        return opened

    def _not_submitted(
        self, keys: list[tuple[str, dt.datetime]], opened: list[JobRun], error: BaseException
    ) -> None:
        """The executor refused the run: a job error, where APScheduler only logs it."""
        with self._lock:
            for key in keys:
                self._thread_jobs -= _decrement(self._thread_runs, key)
            for run in opened:
                self._drop_open(run)
                run.finished, run.outcome = self.clock.now(), "error"
                run.exception = JobRunError(
                    f"job {run.job_id!r} could not be given to its executor: "
                    f"{type(error).__name__}: {error}"
                )
                self._new_errors.append(run)

    def _watch_pool(self, alias: str, executor: Any) -> None:
        """Run an APScheduler thread pool's jobs on threads the watchdog can stop.

        A job thread of a ``concurrent.futures.ThreadPoolExecutor`` that never returns is
        joined at interpreter exit, so the session could never end. The pool is swapped for
        a :class:`~._threads.JobThreads` of the same size during the test, then put back; the
        app's own pool is never shut down by the test. A scheduler shut down and started again
        during the test (the app's lifespan under ``fastsched_client``) gets fresh threads:
        APScheduler's ``start()`` does not renew a pool its ``shutdown()`` closed.
        """
        import concurrent.futures

        from apscheduler.executors.pool import BasePoolExecutor

        pool: Any = getattr(executor, "_pool", None)
        if any(watched is executor for watched, _ in self._pools):
            if getattr(pool, "is_shut_down", False):  # the JobThreads given before
                executor._pool = self.clock.thread_executor(f"fastsched-{alias}", pool.max_workers)
            return
        if not isinstance(executor, BasePoolExecutor) or not isinstance(
            pool, concurrent.futures.ThreadPoolExecutor
        ):
            return
        executor._pool = self.clock.thread_executor(
            f"fastsched-{alias}", getattr(pool, "_max_workers", None)
        )
        self._pools.append((executor, pool))

    def _reanchor_real_time_jobs(self) -> None:
        """Re-anchor jobs whose schedule was computed from the real clock before the test.

        An ``interval`` job added at import time starts counting from the real ``now``; under
        virtual time it would fire at odd offsets, so it starts counting from the virtual
        start instead. A first run given from the real clock (``next_run_time=
        datetime.now()``, the "run once at start-up" idiom) is re-anchored too
        (:meth:`_first_run_from_real_clock`). Date jobs computed from the real clock are
        reported.
        """
        from apscheduler.triggers.date import DateTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        real_now = self.clock.real_start
        for job in self._all_jobs():
            trigger = job.trigger
            given = getattr(job, "next_run_time", None)
            if isinstance(trigger, IntervalTrigger):
                if _near(trigger.start_date, real_now, trigger.interval):
                    job.trigger = copy.copy(trigger)
                    job.trigger.start_date = self.clock.now() + trigger.interval
                    if given is not None:
                        job.modify(next_run_time=job.trigger.start_date)
                self._first_run_from_real_clock(job, given, trigger)
            elif isinstance(trigger, DateTrigger) and _near(
                trigger.run_date, real_now, dt.timedelta(days=1)
            ):
                warnings.warn(
                    FastschedWarning(
                        f"job {job.id!r} runs at {trigger.run_date.isoformat()}, a date computed "
                        f"from the real clock before the virtual clock started at "
                        f"{self.clock.now().isoformat()}; add the job inside the test (or set "
                        f"@pytest.mark.fastsched(start=...)) so that it fires in virtual time"
                    ),
                    stacklevel=2,
                )
            else:
                self._first_run_from_real_clock(job, given, trigger)

    def _first_run_from_real_clock(
        self, job: Any, given: dt.datetime | None, original_trigger: Any
    ) -> None:
        """Move a first run given from the real clock to the same offset from the virtual start.

        ``add_job(f, "interval", hours=1, next_run_time=datetime.now())`` at import runs
        once when the app starts, then hourly: it runs at the virtual start; ``datetime.now()
        + timedelta(minutes=5)`` runs five minutes after it. A paused job
        (``next_run_time=None``) stays paused.
        """
        real_now = self.clock.real_start
        if given is None or not _near(given, real_now, dt.timedelta(days=1)):
            return
        added = real_now
        interval = getattr(original_trigger, "interval", None)
        if interval is not None and _near(original_trigger.start_date, real_now, interval):
            added = original_trigger.start_date - interval  # when the job was added
        # To the second: the app's two now() calls (the first run, the trigger's start) are
        # microseconds apart.
        offset = dt.timedelta(seconds=max(0, round((given - added).total_seconds())))
        job.modify(next_run_time=self.clock.now() + offset)

    def _check_job(self, job: Any) -> None:
        from apscheduler.executors.asyncio import AsyncIOExecutor
        from apscheduler.util import iscoroutinefunction_partial

        if not iscoroutinefunction_partial(job.func):
            return
        executor = self.scheduler._executors.get(job.executor)
        if executor is not None and not isinstance(executor, AsyncIOExecutor):
            self._record_invalid(job.id, _async_on_thread_pool(job.id, job.executor))

    # -- events ------------------------------------------------------------------------------

    def _on_event(self, event: Any) -> None:
        ev = _EVENTS or _events()
        code = event.code
        with self._lock:
            if code & _FINISHED:
                self._on_finished(event, ev)
            elif code == ev.EVENT_JOB_MAX_INSTANCES:
                for scheduled in event.scheduled_run_times:
                    self.runs.append(
                        JobRun(
                            event.job_id,
                            _utc(scheduled),
                            None,
                            self.clock.now(),
                            "skipped",
                            replica=self.replica,
                        )
                    )
            elif code in (ev.EVENT_SCHEDULER_STARTED, ev.EVENT_EXECUTOR_ADDED):
                self._label_runs()
            elif code in (ev.EVENT_JOB_ADDED, ev.EVENT_JOB_MODIFIED):
                job = self.scheduler.get_job(event.job_id)
                if job is not None:
                    self._check_job(job)
        clock = self.clock
        # On the loop's own thread with no clock call waiting, a poke would do nothing.
        if clock.inflight.waiter is not None or not clock.on_loop_thread():
            clock.poke()

    def _add_open(self, run: JobRun) -> None:
        self.runs.append(run)
        self._open.setdefault((run.job_id, run.scheduled, run.replica), []).append(run)

    def _take_open(self, job_id: str, scheduled: dt.datetime) -> JobRun | None:
        """The oldest run of ``job_id`` at ``scheduled`` still running, now no longer open."""
        key = (job_id, scheduled, self.replica)
        queue = self._open.get(key)
        if queue is None:
            return None
        run = queue.pop(0)
        if not queue:
            del self._open[key]
        return run

    def _drop_open(self, run: JobRun) -> None:
        """Take ``run`` out of the runs still running (it never reached its executor)."""
        key = (run.job_id, run.scheduled, run.replica)
        queue = self._open.get(key, [])
        if run in queue:
            queue.remove(run)
        if not queue:
            self._open.pop(key, None)

    def _on_finished(self, event: Any, ev: Any) -> None:
        scheduled = _utc(event.scheduled_run_time)
        run = self._take_open(event.job_id, scheduled)
        if run is None:
            run = JobRun(event.job_id, scheduled, None, replica=self.replica)
            self.runs.append(run)
        if self._thread_runs:
            self._thread_jobs -= _decrement(self._thread_runs, (event.job_id, scheduled))
        run.finished = self.clock.now()
        code = event.code
        if code == ev.EVENT_JOB_EXECUTED and not isinstance(event.retval, types.CoroutineType):
            run.outcome, run.retval = "success", event.retval
        elif code == ev.EVENT_JOB_MISSED:
            run.outcome, run.started = "missed", None
        elif code == ev.EVENT_JOB_ERROR:
            run.outcome, run.exception, run.traceback = "error", event.exception, event.traceback
            self._new_errors.append(run)
        else:  # a coroutine returned by an async def job on a thread pool
            event.retval.close()
            run.outcome = "error"
            run.exception = JobRunError(_async_on_thread_pool(event.job_id, None))
            self._new_errors.append(run)

    def _record_invalid(self, job_id: str, message: str) -> None:
        now = self.clock.now()
        run = JobRun(job_id, now, None, now, "error", exception=JobRunError(message))
        self.runs.append(run)
        self._new_errors.append(run)

    # -- job errors --------------------------------------------------------------------------

    def _raise_job_errors(self) -> None:
        __tracebackhide__ = True
        errors = self._new_errors
        while errors:
            run = errors.popleft()
            if id(run) in self._raised:
                continue
            self._raised.add(id(run))
            if isinstance(run.exception, JobStopped):
                continue  # stopped by the watchdog, whose failure tells the story
            if self._expected(run) or self.job_errors == "record":
                continue
            raise JobRunError(
                f"job {run.job_id!r} (scheduled {run.scheduled.isoformat()}) raised "
                f"{type(run.exception).__name__}: {run.exception}\n"
                f"at virtual {(run.finished or self.clock.now()).isoformat()}\n"
                f"{run.traceback or ''}"
                f"If the test expects it, wrap the clock call in "
                f"`with fastsched_scheduler.expect_job_error({type(run.exception).__name__}):` "
                f'or mark the test @pytest.mark.fastsched(job_errors="record").'
            ) from run.exception

    def _expected(self, run: JobRun) -> bool:
        for expectation in self._expectations:
            if expectation.accepts(run):
                expectation.seen.append(run)
                return True
        return False

    @contextlib.contextmanager
    def expect_job_error(
        self,
        exc_type: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        *,
        match: str | None = None,
        job_id: str | None = None,
    ) -> Iterator[list[JobRun]]:
        """Inside the block, matching job exceptions are expected: recorded, not raised.

        The block fails if no job raised a matching exception. It yields the list of the
        matching runs, filled in as they happen.
        """
        __tracebackhide__ = True
        expectation = _Expectation(exc_type, None if match is None else re.compile(match), job_id)
        self._expectations.append(expectation)
        try:
            yield expectation.seen
        finally:
            self._expectations.remove(expectation)
        if not expectation.seen:
            name = getattr(exc_type, "__name__", repr(exc_type))
            raise AssertionError(
                f"expected a job to raise {name}"
                + (f" matching {match!r}" if match else "")
                + (f" in job {job_id!r}" if job_id else "")
                + " but none did.\nRun log:\n"
                + self.format_runs()
            )

    # -- the public API -----------------------------------------------------------------------

    def job(self, job_id: str) -> Any:
        """The APScheduler ``Job`` called ``job_id``; an unknown id lists the known ones."""
        __tracebackhide__ = True
        self._require_scheduler()
        job = self.scheduler.get_job(job_id)
        if job is None:
            known = ", ".join(repr(job.id) for job in self._all_jobs()) or "none"
            raise LookupError(f"no job with id {job_id!r}; the scheduler has: {known}")
        return job

    def runs_of(self, job_id: str) -> list[JobRun]:
        """The runs of one job (missed and skipped ones included), in order."""
        return [run for run in self.runs if run.job_id == job_id]

    def run_times(self, job_id: str) -> list[dt.datetime]:
        """The scheduled times of the runs of ``job_id`` that actually started."""
        return [run.scheduled for run in self.runs_of(job_id) if run.started is not None]

    def missed(self, job_id: str) -> list[JobRun]:
        """Runs that APScheduler reported as missed (beyond their misfire grace time)."""
        return [run for run in self.runs_of(job_id) if run.outcome == "missed"]

    def skipped(self, job_id: str) -> list[JobRun]:
        """Runs skipped because ``max_instances`` runs were already running."""
        return [run for run in self.runs_of(job_id) if run.outcome == "skipped"]

    def next_run_times(self, job_id: str, count: int = 1) -> list[dt.datetime]:
        """The next ``count`` fire times of ``job_id`` after now, from its own trigger."""
        job = self.job(job_id)
        fire_time = getattr(job, "next_run_time", None)
        if fire_time is None:
            fire_time = job.trigger.get_next_fire_time(None, self._aware_now())
        times: list[dt.datetime] = []
        while fire_time is not None and len(times) < count:
            times.append(fire_time)
            fire_time = job.trigger.get_next_fire_time(fire_time, fire_time)
        return times

    def run_job(self, job_id: str) -> Awaitable[JobRun]:
        """Fire ``job_id`` now, outside its schedule (as a manual trigger would), and wait.

        The job runs through its own executor, so ``max_instances`` applies; its schedule is
        left as it was. Returns the run (awaited in an ``async def`` test; a ``def`` test
        calls it without await and gets the run).
        """
        __tracebackhide__ = True
        return self.clock.world.run(  # type: ignore[no-any-return]
            f"fastsched_scheduler.run_job({job_id!r})", lambda: self._run_job(job_id), ClockError
        )

    async def _run_job(self, job_id: str) -> JobRun:
        __tracebackhide__ = True
        from apscheduler.executors.base import MaxInstancesReachedError

        self.clock.attach()
        job = self.job(job_id)
        self._label_runs()
        now = self._aware_now()
        run = JobRun(job_id, _utc(now), _utc(now), manual=True)
        with self._lock:
            self._add_open(run)
        self._manual_submit = True
        try:
            self.scheduler._lookup_executor(job.executor).submit_job(job, [now])
        except MaxInstancesReachedError:
            with self._lock:
                self.runs.remove(run)
                self._drop_open(run)
            raise JobRunError(
                f"run_job({job_id!r}): {job.max_instances} instance(s) of the job are already "
                f"running (max_instances={job.max_instances})"
            ) from None
        except BaseException:
            with self._lock:
                self.runs.remove(run)
                self._drop_open(run)
            raise
        finally:
            self._manual_submit = False
        await self.clock.run_until_idle()
        return run

    def assert_ran(
        self,
        job_id: str,
        times: int | None = None,
        *,
        at: list[dt.datetime] | None = None,
    ) -> None:
        """Assert that ``job_id`` started ``times`` times (any number > 0 if omitted).

        ``at`` checks the exact scheduled times. The failure shows the job's whole run log.
        """
        __tracebackhide__ = True
        self.job_if_known(job_id)
        started = self.run_times(job_id)
        expected_at = None if at is None else [_utc(instant) for instant in at]
        problem = None
        if times is None and at is None and not started:
            problem = ("at least one run", "no runs")
        elif times is not None and len(started) != times:
            problem = (_runs(times), _runs(len(started)))
        elif expected_at is not None and started != expected_at:
            problem = (_asserts.run_times(expected_at), _asserts.run_times(started))
        if problem is not None:
            now = format_time(self.clock.now())
            raise AssertionError(_asserts.ran_failure(job_id, problem, self.runs_of(job_id), now))

    def job_if_known(self, job_id: str) -> None:
        """Raise ``LookupError`` unless ``job_id`` is a job or appears in the run log."""
        __tracebackhide__ = True
        if any(run.job_id == job_id for run in self.runs):
            return
        self.job(job_id)

    def format_runs(self, job_id: str | None = None) -> str:
        """The run log (of one job, or all), one aligned line per run."""
        runs = self.runs if job_id is None else self.runs_of(job_id)
        return "\n".join(f"  {run.describe()}" for run in runs) or "  (no runs)"

    # -- internals ---------------------------------------------------------------------------

    def _aware_now(self) -> dt.datetime:
        return from_us(to_us(self.clock.now())).astimezone(self.scheduler.timezone)

    def _require_scheduler(self) -> None:
        if self.scheduler is None:
            raise pytest.UsageError(
                "fastsched_scheduler has no scheduler: set the ini option "
                "fastsched_scheduler = 'module:attr' (or --fastsched-scheduler), or call "
                "fastsched_scheduler.attach(scheduler) first"
            )

    def _describe_running(self) -> list[str]:
        lines = []
        for run in self.runs:
            if run.outcome == "running" and run.replica == self.replica:
                lines.append(RunRef(run.job_id, run.scheduled, run.replica).describe())
        for task in self._job_tasks():
            lines.append(f"  task {task.get_name()} awaits {_awaited(task)}")
        return lines

    def _job_tasks(self) -> list[asyncio.Task[Any]]:
        if self.scheduler is None:
            return []
        tasks = []
        for executor in self.scheduler._executors.values():
            for future in getattr(executor, "_pending_futures", ()):
                if isinstance(future, asyncio.Task) and not future.done():
                    tasks.append(future)
        return tasks

    def close(self) -> None:
        """Shut the scheduler down, cancel its job tasks and restore its jobs."""
        scheduler = self.scheduler
        if scheduler is None:
            return
        from apscheduler.schedulers.base import STATE_STOPPED, BaseScheduler

        if self._replica_set is not None:
            self._replica_set.close()
            self._replica_set = None
        tasks = self._job_tasks()
        loop = scheduler._eventloop
        if isinstance(loop, _PendingLoop):
            loop = None  # the test's loop never came
        if loop is None or loop.is_closed():
            # The test's loop is gone (and its tasks with it): nothing left to cancel there.
            for executor in scheduler._executors.values():
                getattr(executor, "_pending_futures", set()).clear()
        if scheduler.state != STATE_STOPPED:
            # AsyncIOScheduler.shutdown() defers to the loop; do its work synchronously.
            BaseScheduler.shutdown(scheduler, wait=False)
            scheduler._stop_timer()
        scheduler._eventloop = None
        _finish_tasks(loop, tasks)
        scheduler.remove_listener(self._on_event)
        if getattr(scheduler, "_fastsched_harness", None) is self:
            del scheduler._fastsched_harness
        vars(scheduler).pop("_process_jobs", None)
        vars(scheduler).pop("_start_timer", None)
        if self._late_executors:
            _LateExecutors.release()
            self._late_executors = False
        for executor in self._labelled:
            vars(executor).pop("_do_submit_job", None)
        self._labelled.clear()
        for executor, pool in self._pools:
            executor._pool.shutdown(wait=False)
            executor._pool = pool
        self._pools.clear()
        if self._stores is not None:
            self._stores.restore()
        if self._background is not None:
            self._background()
            self._background = None


@contextlib.contextmanager
def for_test(
    item: pytest.Item,
    settings: Settings,
    clock: VirtualClock,
    replicas: ReplicaFactory,
    engine: Callable[[], Any],
) -> Iterator[SchedulerHarness]:
    """The harness of one test (the body of ``fastsched_scheduler``).

    It drives the scheduler of the ``fastsched_scheduler`` setting, if any, and runs the
    replicas the marker asks for with ``replicas``; ``engine`` returns the test database's
    engine, whose pool the replicas warm. While it lives, the ``AsyncIOScheduler`` the app
    starts goes through it (:func:`watch_starts`).
    """
    marker = marker_options(item)
    harness = SchedulerHarness(clock, job_errors=marker.job_errors, replicas=replicas)
    # Under fastsched_client the app's lifespan starts the scheduler, as in production.
    harness.autostart = "fastsched_client" not in getattr(item, "fixturenames", ())
    if settings.scheduler is not None:
        harness.attach(resolve(settings.scheduler, "fastsched_scheduler"))
    if marker.replicas > 1:
        harness.use_replicas(marker.replicas, engine=engine)
    try:
        with watch_starts(harness):
            yield harness
    finally:
        harness.close()


class _PendingLoop:
    """Stands in for the test's event loop while fixtures run, before that loop is known.

    A scheduler started (paused) on it adds jobs and computes their next run times as in
    production; the calls it sends to its loop wait here and run on the test's loop when the
    clock attaches to it.
    """

    def __init__(self) -> None:
        self._calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any, **_: Any) -> None:
        self._calls.append((callback, args))

    call_soon = call_soon_threadsafe

    def is_closed(self) -> bool:
        return False

    def is_running(self) -> bool:
        return False

    def hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        calls, self._calls = self._calls, []
        for callback, args in calls:
            loop.call_soon(callback, *args)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"the app's scheduler is not on an event loop yet (its loop's {name} was used "
            f"from a sync fixture): it moves onto the test's loop when the test's coroutine "
            f"starts; use it from an async fixture or the test"
        )


_WATCHERS: list[SchedulerHarness] = []
_UNWATCHED_STARTS: list[tuple[Any, Callable[..., Any]]] = []


@contextlib.contextmanager
def watch_starts(harness: SchedulerHarness) -> Iterator[None]:
    """While the block runs, ``start()`` of an ``AsyncIOScheduler`` or a
    ``BackgroundScheduler`` goes through ``harness``.

    Watched at class level, so that a scheduler the app builds and starts itself (in its
    lifespan, with no module-level handle) is taken under the harness: see
    :meth:`SchedulerHarness.app_start`. A scheduler another harness owns (a replica) starts
    as APScheduler starts it.
    """
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.schedulers.background import BackgroundScheduler

    if not _WATCHERS:
        for cls in (AsyncIOScheduler, BackgroundScheduler):
            _UNWATCHED_STARTS.append((cls, cls.start))
            cls.start = _watched(cls.start)
    _WATCHERS.append(harness)
    try:
        yield
    finally:
        _WATCHERS.remove(harness)
        if not _WATCHERS:
            while _UNWATCHED_STARTS:
                cls, original = _UNWATCHED_STARTS.pop()
                cls.start = original


def _watched(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def start(scheduler: Any, paused: bool = False) -> Any:
        __tracebackhide__ = True
        watcher = _WATCHERS[-1] if _WATCHERS else None
        if watcher is not None and getattr(scheduler, "_fastsched_harness", watcher) is watcher:
            return watcher.app_start(scheduler, paused, original)
        return original(scheduler, paused)

    return start


def explain_start_without_loop(fixture: str, error: BaseException) -> None:
    """Fail the set-up of ``fixture`` with the fix when it started a scheduler with no loop.

    ``AsyncIOScheduler.start()`` in a sync fixture (there is no running loop yet) raises
    APScheduler's bare ``RuntimeError: no running event loop``. Returns for other errors.
    """
    __tracebackhide__ = True
    if not isinstance(error, RuntimeError) or "no running event loop" not in str(error):
        return
    frames = traceback.extract_tb(error.__traceback__)
    if not any(
        frame.name == "start" and frame.filename.endswith(_ASYNCIO_SCHEDULER) for frame in frames
    ):
        return
    raise pytest.fail.Exception(
        f"{fixture}: AsyncIOScheduler.start() was called with no running event loop (a sync "
        "fixture runs before the test's loop). An AsyncIOScheduler runs on an event loop. "
        f"Make {fixture} request fastsched_scheduler (or set fastsched_scheduler = "
        "'module:attr'): under it, the app's scheduler is started paused at the virtual start "
        "and moves onto the test's loop when the test starts. Or start it from an async "
        "fixture (@pytest_asyncio.fixture) or from the app's lifespan under fastsched_client.",
        pytrace=False,
    ) from None


_ASYNCIO_SCHEDULER = os.path.join("apscheduler", "schedulers", "asyncio.py")


def _stopped() -> int:
    from apscheduler.schedulers.base import STATE_STOPPED

    return int(STATE_STOPPED)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _second_scheduler(started: Any, attached: Any) -> str:
    return (
        f"a second {type(started).__name__} ({started!r}) was started during the test; "
        f"fastsched_scheduler drives only the first ({attached!r}): the second one's runs "
        f"are not recorded and its job errors are only logged. Drive the one the test is "
        f"about: set fastsched_scheduler = 'module:attr' to it, or call "
        f"fastsched_scheduler.attach(scheduler) before the app starts the other."
    )


def _ran_in_real_time(scheduler: Any) -> str:
    return (
        f"the app's {type(scheduler).__name__} ({scheduler!r}) was running in real time "
        f"before the test (started at import?): its thread is stopped and the test runs it in "
        f"virtual time, but what it ran before ran on the app's own database. Start it in "
        f"the app's lifespan (or a fixture), not at import."
    )


def _finish_tasks(loop: asyncio.AbstractEventLoop | None, tasks: list[asyncio.Task[Any]]) -> None:
    if loop is None or loop.is_closed():
        return
    for task in tasks:
        task.cancel()
    if tasks and not loop.is_running():
        # Bounded in real time: a task that swallows CancelledError would wait forever.
        stubborn = loop.run_until_complete(
            _leftovers.cancel_within(tasks, _leftovers.CANCEL_GRACE)
        )
        _leftovers.close_by_force(loop, stubborn)


def _decrement(counter: collections.Counter[Any], key: Any) -> bool:
    """Take one off ``counter[key]`` if it is positive; whether it was."""
    if counter[key] <= 0:
        return False
    counter[key] -= 1
    if not counter[key]:
        del counter[key]
    return True


def direct_wakeup(scheduler: Any) -> Callable[[], None]:
    """``scheduler.wakeup`` without its hop through ``call_soon_threadsafe``.

    ``AsyncIOScheduler.wakeup`` is wrapped to be callable from any thread: it only queues the
    real wake-up for the next loop iteration. Its own timer fires on the loop, so the timer can
    run the wake-up's body at once; a subclass that overrides ``wakeup`` keeps its own.
    """
    body = getattr(type(scheduler).wakeup, "__wrapped__", None)
    if body is None:
        return scheduler.wakeup  # type: ignore[no-any-return]
    return functools.partial(body, scheduler)


_EVENTS: Any = None
_FINISHED = 0


def _events() -> Any:
    """``apscheduler.events``, imported once (the listener runs for every event)."""
    global _EVENTS, _FINISHED
    if _EVENTS is None:
        from apscheduler import events

        _FINISHED = events.EVENT_JOB_EXECUTED | events.EVENT_JOB_ERROR | events.EVENT_JOB_MISSED
        _EVENTS = events
    return _EVENTS


def _runs(count: int) -> str:
    return f"{count} run" if count == 1 else f"{count} runs"


_LAST_UTC: tuple[dt.datetime | None, dt.datetime | None] = (None, None)


def _utc(instant: dt.datetime) -> dt.datetime:
    # Aware datetimes in one ZoneInfo compare and subtract by wall time, which is wrong at
    # the DST fall-back hour: the run log keeps every instant in UTC. One fire converts the
    # same run-time object three times (submit, its events): keep the last conversion (the
    # pair holds a reference to the instant, so the identity check is sound).
    global _LAST_UTC
    last, converted = _LAST_UTC
    if last is instant and converted is not None:
        return converted
    converted = instant.astimezone(dt.timezone.utc)
    _LAST_UTC = (instant, converted)
    return converted


def _near(instant: dt.datetime | None, reference: dt.datetime, slack: dt.timedelta) -> bool:
    if instant is None:
        return False
    margin = slack + dt.timedelta(minutes=1)
    return reference - dt.timedelta(days=1) <= instant <= reference + margin


def _async_on_thread_pool(job_id: str, executor: str | None) -> str:
    where = f"executor {executor!r}" if executor else "a thread-pool executor"
    return (
        f"job {job_id!r} is an async def function on {where}: APScheduler would call it "
        f"in a thread, get a coroutine back and report success without running it. Run it "
        f"on the AsyncIOScheduler's default executor (remove executor=...)."
    )


def _awaited(task: asyncio.Task[Any]) -> str:
    coro: Any = task.get_coro()
    location = ""
    while coro is not None:
        frame = getattr(coro, "cr_frame", None)
        if frame is not None:
            location = f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"
        awaited = getattr(coro, "cr_await", None)
        if awaited is None or not inspect.iscoroutine(awaited):
            return f"{awaited!r} in {location}" if awaited is not None else location
        coro = awaited
    return location

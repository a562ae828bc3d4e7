"""Replicas: several copies of the app's scheduler on one virtual clock.

A service deployed on N servers runs N copies of its scheduler: the same jobs, the same
triggers and arguments, firing at the same instants, each process with its own database
connections. ``@pytest.mark.fastsched(replicas=N)`` (or ``fastsched_scheduler.use_replicas(N)``)
reproduces that inside one test:

- the app's own scheduler is replica 0; replicas 1 to N-1 are fresh ``AsyncIOScheduler``
  instances with the same time zone, executors of the same kinds, and a copy of every job
  (function, trigger, arguments, id, name, misfire grace, coalescing, ``max_instances`` and
  next run time). Jobs added, modified or removed on the app's scheduler later (a ``setup_*()``
  function after ``start()``) are mirrored on every replica;
- each replica is a :class:`~pytest_fastsched._scheduler.SchedulerHarness` of its own on the
  test's clock and loop, sharing the run log of the app's harness: every ``JobRun`` says which
  ``replica`` ran it, and job errors fail the test as for the app's scheduler;
- the replicas start and stop with the app's scheduler.

Replicas fire at the same virtual instant and their jobs run as tasks on one loop: each
awaited database call lets the others go on, so their statements interleave as they would on
several servers. Under commit isolation (which ``replicas`` implies) the app's sessionmaker is
bound to the test engine, whose pool gives each session its own connection: real concurrent
transactions, real row locks, ``FOR UPDATE SKIP LOCKED`` that really skips.

What replicas can show depends on the database. PostgreSQL runs the transactions of the
replicas concurrently, with row locks and MVCC, as in production. SQLite has one writer at a
time and no ``FOR UPDATE``: it shows the races of separate sessions (the naive
select-then-update pattern processes rows twice there too), but not lock waits, ``SKIP
LOCKED``, or serialization failures. A session that read before another replica committed
fails its first write with ``database is locked`` (SQLite's busy snapshot), as it would in
production.

Which rows two racing replicas both take depends on how their statements interleave, which
depends on real I/O timing: a race is shown, not scripted. Assert what must hold whatever the
interleaving (every item processed once), not the exact rows a naive job loses.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pytest_fastsched._scheduler import SchedulerHarness

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

_JOB_OPTIONS = ("name", "misfire_grace_time", "coalesce", "max_instances", "executor")


class ReplicaSet:
    """The replicas 1 to ``count - 1`` of the scheduler of ``main`` (replica 0)."""

    def __init__(
        self,
        main: SchedulerHarness,
        count: int,
        engine: Callable[[], AsyncEngine | None] = lambda: None,
    ) -> None:
        from apscheduler import events as ev

        self.main = main
        self.count = count
        self.harnesses: list[SchedulerHarness] = []
        self._engine = engine
        self._warming: asyncio.Task[None] | None = None
        self._closed = False
        mask = (
            ev.EVENT_SCHEDULER_STARTED
            | ev.EVENT_SCHEDULER_SHUTDOWN
            | ev.EVENT_JOB_ADDED
            | ev.EVENT_JOB_MODIFIED
            | ev.EVENT_JOB_REMOVED
            | ev.EVENT_ALL_JOBS_REMOVED
        )
        main.scheduler.add_listener(self._on_main_event, mask)
        if main.scheduler.running:
            self._start()

    @property
    def schedulers(self) -> list[Any]:
        """The replicas' ``AsyncIOScheduler`` instances, replica 1 first."""
        return [harness.scheduler for harness in self.harnesses]

    def _on_main_event(self, event: Any) -> None:
        from apscheduler import events as ev

        code = event.code
        if code == ev.EVENT_SCHEDULER_STARTED:
            self._start()
        elif code == ev.EVENT_SCHEDULER_SHUTDOWN:
            self._stop()
        elif not self.harnesses:
            return  # not started yet: the replicas copy every job when they start
        elif code in (ev.EVENT_JOB_ADDED, ev.EVENT_JOB_MODIFIED):
            job = self.main.scheduler.get_job(event.job_id, event.jobstore)
            if job is not None:
                for scheduler in self.schedulers:
                    _add_copy(scheduler, job)
        elif code == ev.EVENT_JOB_REMOVED:
            for scheduler in self.schedulers:
                _remove_unless_due(scheduler, event.job_id)
        elif code == ev.EVENT_ALL_JOBS_REMOVED:
            for scheduler in self.schedulers:
                scheduler.remove_all_jobs()

    def _start(self) -> None:
        if self.harnesses or self._closed:
            return
        main = self.main
        for index in range(1, self.count):
            harness = SchedulerHarness(main.clock, job_errors=main.job_errors, replica=index)
            # One run log, one set of raised errors and expectations for all replicas.
            harness.runs = main.runs
            harness._raised = main._raised
            harness._expectations = main._expectations
            harness._open = main._open
            harness._new_errors = main._new_errors
            scheduler = _replica_of(main.scheduler)
            for job in main.scheduler.get_jobs():
                _add_copy(scheduler, job)
            harness.attach(scheduler)  # starts it, paused until the first clock call
            self.harnesses.append(harness)
        engine = self._engine()
        if engine is not None:
            # Started in a sync fixture, the replicas warm the pool once the loop is known.
            self.main.clock.on_attach(lambda loop: self._warm_on(loop, engine))

    def _warm_on(self, loop: asyncio.AbstractEventLoop, engine: AsyncEngine) -> None:
        if self._warming is None and self.harnesses and not self._closed:
            self._warming = loop.create_task(_warm(engine, self.count))

    def _stop(self) -> None:
        if self._warming is not None:
            self._warming.cancel()
            self._warming = None
        for harness in self.harnesses:
            harness.close()
        self.harnesses.clear()

    def close(self) -> None:
        """Stop the replicas and stop following the app's scheduler (end of the test)."""
        self._closed = True
        self._stop()
        self.main.scheduler.remove_listener(self._on_main_event)


async def _warm(engine: AsyncEngine, count: int) -> None:
    """Open ``count`` pooled connections at once, then give them back to the pool.

    A server's pool is warm when its jobs fire: without this, the replica whose session needs
    a new connection starts its job a connection's setup time (about 13 ms on PostgreSQL)
    after the others, and the race the replicas are there to show may not happen.
    """
    connections = await asyncio.gather(*(engine.connect() for _ in range(count)))
    for connection in connections:
        await connection.close()


def _replica_of(scheduler: Any) -> Any:
    """A new, stopped ``AsyncIOScheduler`` configured as ``scheduler`` is."""
    from apscheduler.executors.asyncio import AsyncIOExecutor
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    executors = {
        alias: AsyncIOExecutor() if isinstance(executor, AsyncIOExecutor) else type(executor)()
        for alias, executor in scheduler._executors.items()
    }
    return AsyncIOScheduler(
        timezone=scheduler.timezone,
        job_defaults=dict(scheduler._job_defaults),
        executors=executors,
    )


def _add_copy(scheduler: Any, job: Any) -> None:
    """Add (or replace) a copy of ``job`` to ``scheduler``, due when the original is."""
    options = {name: getattr(job, name) for name in _JOB_OPTIONS}
    next_run_time = getattr(job, "next_run_time", None)
    if next_run_time is not None:
        options["next_run_time"] = next_run_time
    scheduler.add_job(
        job.func,
        trigger=copy.copy(job.trigger),
        args=job.args,
        kwargs=job.kwargs,
        id=job.id,
        replace_existing=True,
        **options,
    )


def _remove_unless_due(scheduler: Any, job_id: str) -> None:
    """Remove the copy of a job the app's scheduler removed, unless the copy is due now.

    The app's scheduler removes a ``date`` job right after it fired; the replica's copy, due
    at the same instant, must still fire.
    """
    import datetime as dt

    job = scheduler.get_job(job_id)
    if job is None:
        return
    due = job.next_run_time
    if due is None or due > dt.datetime.now(dt.timezone.utc):
        scheduler.remove_job(job_id)


def report(runs: list[Any]) -> str:
    """The runs of each replica, for the report of a failing test: who ran what, and when."""
    lines = []
    for run in sorted(runs, key=lambda run: (run.replica, run.scheduled)):
        line = f"replica {run.replica}  {run.job_id}  scheduled {run.scheduled.isoformat()}"
        line += f"  {run.outcome}"
        if run.exception is not None:
            line += f"  {type(run.exception).__name__}: {run.exception}"
        elif run.retval is not None:
            line += f"  returned {run.retval!r}"
        lines.append(line)
    return "\n".join(lines) or "(no runs)"

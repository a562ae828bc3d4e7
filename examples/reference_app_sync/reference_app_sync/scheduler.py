"""The app's one APScheduler 3.x ``BackgroundScheduler`` and the jobs it runs.

The scheduler runs in a thread of its own and hands each due job to its thread pool
(``REFERENCE_APP_SYNC_THREADS`` threads): the jobs are sync ``def`` functions, and nothing of
them runs on the web server's event loop.

Jobs (ids are module constants, so tests can look a job up with ``scheduler.get_job(id)``):

- ``process_pending_items``: every ``REFERENCE_APP_SYNC_INTERVAL_SECONDS`` (300), runs
  :func:`~reference_app_sync.processing.process_pending_items` with ``limit`` =
  ``REFERENCE_APP_SYNC_BATCH_LIMIT``. ``max_instances=1`` skips a run while the previous one
  is still going; ``coalesce=True`` turns a backlog of missed runs into one.
- ``retry_failed_items``: every night at 00:00 in ``REFERENCE_APP_SYNC_TIMEZONE``, runs
  :func:`~reference_app_sync.processing.retry_failed_items` with ``max_attempts`` =
  ``REFERENCE_APP_SYNC_MAX_ATTEMPTS``.
- ``run_one_off:<item id>``: added by :func:`schedule_one_off`, runs
  :func:`~reference_app_sync.processing.run_one_off` once at the given instant.
"""

from __future__ import annotations

from datetime import datetime, timezone

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler

from reference_app_sync.processing import (
    process_pending_items,
    retry_failed_items,
    run_one_off,
)
from reference_app_sync.settings import settings

PROCESS_PENDING_JOB_ID = "process_pending_items"
RETRY_FAILED_JOB_ID = "retry_failed_items"
ONE_OFF_JOB_PREFIX = "run_one_off:"

NIGHTLY_MISFIRE_GRACE_SECONDS = 3600
"""How late the nightly retry may still run, e.g. after every pool thread was busy."""

scheduler = BackgroundScheduler(
    timezone=settings.timezone,
    executors={"default": ThreadPoolExecutor(settings.threads)},
)
"""The app's scheduler, created at import and started by the app's lifespan."""


def setup_scheduler() -> None:
    """Add the recurring jobs; calling it again replaces them rather than adding copies."""
    scheduler.add_job(
        process_pending_items,
        "interval",
        seconds=settings.interval_seconds,
        id=PROCESS_PENDING_JOB_ID,
        kwargs={"limit": settings.batch_limit},
        max_instances=1,
        coalesce=True,
        replace_existing=True,
    )
    scheduler.add_job(
        retry_failed_items,
        "cron",
        hour=0,
        minute=0,
        id=RETRY_FAILED_JOB_ID,
        kwargs={"max_attempts": settings.max_attempts},
        max_instances=1,
        coalesce=True,
        misfire_grace_time=NIGHTLY_MISFIRE_GRACE_SECONDS,
        replace_existing=True,
    )


def one_off_job_id(item_id: int) -> str:
    """Return the id of the one-off job of item ``item_id``."""
    return f"{ONE_OFF_JOB_PREFIX}{item_id}"


def schedule_one_off(item_id: int, run_at: datetime) -> Job:
    """Process item ``item_id`` once at ``run_at``, an aware datetime in the future.

    Raises ``ValueError`` for a naive or past ``run_at``. Scheduling the same item again
    replaces its previous one-off job. The job runs however late the pool gets to it
    (``misfire_grace_time=None``): a one-off run is never silently dropped.
    """
    _check_run_at(run_at)
    return scheduler.add_job(
        run_one_off,
        "date",
        run_date=run_at,
        id=one_off_job_id(item_id),
        kwargs={"item_id": item_id},
        misfire_grace_time=None,
        replace_existing=True,
    )


def _check_run_at(run_at: datetime) -> None:
    if run_at.tzinfo is None or run_at.utcoffset() is None:
        raise ValueError(
            f"run_at {run_at.isoformat()!r} has no UTC offset: give one, "
            f"e.g. '{run_at.isoformat()}+00:00' or '{run_at.isoformat()}Z'"
        )
    now = datetime.now(timezone.utc)
    if run_at <= now:
        raise ValueError(
            f"run_at {run_at.isoformat()!r} is not in the future (now is {now.isoformat()})"
        )


def shutdown_scheduler() -> None:
    """Shut the scheduler down if it is running, after the running jobs finish.

    It blocks until they do: call it from a thread (the lifespan does), not on an event loop.
    """
    if scheduler.running:
        scheduler.shutdown(wait=True)

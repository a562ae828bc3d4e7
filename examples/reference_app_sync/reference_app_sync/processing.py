"""The job bodies: process pending items, retry failed ones, process one item on demand.

They are plain sync functions: the scheduler runs them on its thread pool, the dev endpoint in
FastAPI's. One processing run goes through these steps, each in its own short
``with background_session()`` block opened in the running thread, so that no session is
shared between threads, no lock or transaction outlives a step, and every outcome is
committed as soon as it is known:

1. fetch a batch of ``pending`` ids, oldest first;
2. claim each one with a conditional update::

       UPDATE items SET status = 'processing', attempts = attempts + 1, updated_at = :now
       WHERE id = :id AND status = 'pending' RETURNING id

   No row back means another run (another replica, another thread of the pool, the one-off
   job, the dev endpoint) claimed it first: the item is skipped. On PostgreSQL the claim also
   locks the row with ``FOR UPDATE SKIP LOCKED``, so a competing claim returns at once instead
   of waiting;
3. load the payload and compute the result with :func:`enrich`;
4. store ``completed`` with ``data`` and ``processed_at``, or ``error`` with ``last_error``.

Failures are isolated per item: each one is logged and stored on its row, and the batch goes
on. ``last_error`` is written by :func:`format_error`: ``"<ExceptionClass>: <message>"``, for
example ``"ValueError: missing field 'name'"``, or the class name alone when the message is
empty. A failure while storing an error is logged too; that item then stays ``processing``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

from sqlalchemy import bindparam, select, text, update
from sqlalchemy.orm import aliased

from reference_app_sync.database import background_session
from reference_app_sync.models import (
    COMPLETED,
    ERROR,
    PENDING,
    PROCESSING,
    Item,
    UTCDateTime,
    utc_now,
)
from reference_app_sync.settings import settings

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ProcessReport:
    """What one run did, as lists of item ids in processing order.

    ``claimed`` holds every item this run moved to ``processing``; each of them then appears in
    ``completed`` or ``failed`` (stored as ``error``), unless its outcome could not be stored
    (logged). ``skipped`` holds items this run did not claim: another run claimed them first,
    they were not ``pending`` any more, or the claim itself failed (logged).
    """

    claimed: list[int] = dataclasses.field(default_factory=list)
    completed: list[int] = dataclasses.field(default_factory=list)
    failed: list[int] = dataclasses.field(default_factory=list)
    skipped: list[int] = dataclasses.field(default_factory=list)


def enrich(payload: object) -> dict[str, Any]:
    """Compute an item's result from its payload; a pure function.

    ``payload`` must be a JSON object or ``None`` (treated as ``{}``). The result lists the
    payload's fields, counts them, and adds a checksum of its canonical JSON. A payload
    ``{"fail": reason}`` raises ``ValueError(reason)``, which makes failures easy to provoke.

    Jobs call it through this module's global name, so tests can replace it with
    ``monkeypatch.setattr("reference_app_sync.processing.enrich", ...)``.
    """
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise ValueError(f"payload must be a JSON object, not {type(payload).__name__}")
    if "fail" in payload:
        raise ValueError(str(payload["fail"]))
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return {
        "fields": sorted(payload),
        "field_count": len(payload),
        "checksum": hashlib.sha256(canonical.encode()).hexdigest()[:16],
    }


def format_error(exc: BaseException) -> str:
    """Return the ``last_error`` text of ``exc``: ``"<ExceptionClass>: <message>"``.

    The class name alone when the message is empty, e.g. ``"TimeoutError"``.
    """
    message = str(exc)
    name = type(exc).__name__
    return f"{name}: {message}" if message else name


def process_pending_items(limit: int = 5) -> ProcessReport:
    """Claim up to ``limit`` pending items, oldest first, and process each one.

    The scheduled job. Safe to run from several threads or replicas at once: every item is
    processed by exactly one run.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    report = ProcessReport()
    for item_id in _fetch_pending_ids(limit):
        _process_item(item_id, report)
    logger.info(
        "processed pending items: claimed %s, completed %s, failed %s, skipped %s",
        report.claimed,
        report.completed,
        report.failed,
        report.skipped,
    )
    return report


def run_one_off(item_id: int) -> ProcessReport:
    """Process the one item ``item_id`` now, if it is still pending; the one-off date job."""
    report = ProcessReport()
    _process_item(item_id, report)
    return report


_RETRY_FAILED = text(
    """
    UPDATE items
    SET status = 'pending', updated_at = :now
    WHERE status = 'error' AND attempts < :max_attempts
    RETURNING id
    """
).bindparams(bindparam("now", type_=UTCDateTime()))


def retry_failed_items(max_attempts: int | None = None) -> int:
    """Move failed items with attempts left back to ``pending``; return how many moved.

    The nightly job. An item may be attempted ``max_attempts`` times in all (default
    ``REFERENCE_APP_SYNC_MAX_ATTEMPTS``); after that it stays ``error``. ``last_error`` is
    kept, so the reason of the previous failure stays visible until the next attempt
    overwrites it or succeeds (success clears it).
    """
    limit = settings.max_attempts if max_attempts is None else max_attempts
    with background_session() as session:
        result = session.execute(_RETRY_FAILED, {"now": utc_now(), "max_attempts": limit})
        retried = list(result.scalars())
    logger.info("moved failed items back to pending: %s", retried)
    return len(retried)


def _fetch_pending_ids(limit: int) -> list[int]:
    query = select(Item.id).where(Item.status == PENDING).order_by(Item.id).limit(limit)
    with background_session() as session:
        return list(session.scalars(query))


def _process_item(item_id: int, report: ProcessReport) -> None:
    if not _try_claim(item_id):
        report.skipped.append(item_id)
        return
    report.claimed.append(item_id)
    outcome = _run_claimed(item_id)
    if outcome == COMPLETED:
        report.completed.append(item_id)
    elif outcome == ERROR:
        report.failed.append(item_id)


def _try_claim(item_id: int) -> bool:
    try:
        return _claim(item_id)
    except Exception:
        logger.exception("could not claim item %s; it stays pending", item_id)
        return False


def _claim(item_id: int) -> bool:
    # SQLite compiles with_for_update() to nothing; there the whole UPDATE is atomic anyway.
    candidate = aliased(Item, name="candidate")
    locked = (
        select(candidate.id)
        .where(candidate.id == item_id, candidate.status == PENDING)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    claim = (
        update(Item)
        .where(Item.id == locked, Item.status == PENDING)
        .values(status=PROCESSING, attempts=Item.attempts + 1, updated_at=utc_now())
        .returning(Item.id)
        .execution_options(synchronize_session=False)
    )
    with background_session() as session:
        return session.execute(claim).first() is not None


def _run_claimed(item_id: int) -> str | None:
    """Process a claimed item; return the status stored, or ``None`` if none could be."""
    try:
        result = enrich(_load_payload(item_id))
        stored = _finish(item_id, status=COMPLETED, data=result, last_error=None)
        return COMPLETED if stored else None
    except Exception as exc:
        logger.exception("item %s failed", item_id)
        return _record_error(item_id, exc)


def _load_payload(item_id: int) -> dict[str, Any] | None:
    with background_session() as session:
        payload: dict[str, Any] | None = session.execute(
            select(Item.payload).where(Item.id == item_id)
        ).scalar_one()
    return payload


def _record_error(item_id: int, exc: Exception) -> str | None:
    try:
        stored = _finish(item_id, status=ERROR, last_error=format_error(exc))
    except Exception:
        logger.exception("could not store the error of item %s; it stays processing", item_id)
        return None
    return ERROR if stored else None


def _finish(item_id: int, status: str, **values: Any) -> bool:
    """Store an outcome on an item that is still ``processing``; ``False`` if it is not."""
    now = utc_now()
    if status == COMPLETED:
        values["processed_at"] = now
    finish = (
        update(Item)
        .where(Item.id == item_id, Item.status == PROCESSING)
        .values(status=status, updated_at=now, **values)
        .returning(Item.id)
        .execution_options(synchronize_session=False)
    )
    with background_session() as session:
        stored = session.execute(finish).first() is not None
    if not stored:
        logger.warning("item %s is no longer processing; its outcome was not stored", item_id)
    return stored

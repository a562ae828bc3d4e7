"""HTTP endpoints: create and read items, run the processing job now, schedule a one-off run.

Every endpoint is a sync ``def``: FastAPI runs it on its thread pool, so a blocking database
call never stalls the event loop. Each request gets its own session from
``Depends(get_db)``, in the tutorial's way.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from reference_app_sync.database import get_db
from reference_app_sync.models import PENDING, Item, ItemStatus
from reference_app_sync.processing import process_pending_items
from reference_app_sync.scheduler import schedule_one_off
from reference_app_sync.settings import settings

router = APIRouter()
"""Every endpoint of the app."""


class ItemCreate(BaseModel):
    """Body of ``POST /items``."""

    payload: dict[str, Any] | None = None


class ItemOut(BaseModel):
    """One item as the API shows it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    status: ItemStatus
    payload: dict[str, Any] | None
    data: dict[str, Any] | None
    last_error: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    processed_at: datetime | None


class ProcessReportOut(BaseModel):
    """What one processing run did, by item id (see ``ProcessReport``)."""

    claimed: list[int]
    completed: list[int]
    failed: list[int]
    skipped: list[int]


class ScheduledJobOut(BaseModel):
    """The one-off job scheduled for an item."""

    job_id: str
    item_id: int
    run_at: datetime


SessionDep = Annotated[Session, Depends(get_db)]


@router.post("/api/v3/dev/process-data")
def process_data(
    limit: Annotated[int, Query(ge=1, le=1000)] = settings.batch_limit,
) -> ProcessReportOut:
    """Run the processing job once, now, and return its report (a manual trigger).

    It runs in the request's thread with sessions of its own, exactly as a scheduled run does
    in a pool thread; the claim keeps the two apart if they overlap.
    """
    report = process_pending_items(limit=limit)
    return ProcessReportOut(**dataclasses.asdict(report))


@router.post("/items", status_code=201)
def create_item(body: ItemCreate, db: SessionDep) -> ItemOut:
    """Create a pending item; the next processing run picks it up."""
    item = Item(payload=body.payload)
    db.add(item)
    db.commit()
    db.refresh(item)
    return ItemOut.model_validate(item)


@router.get("/items/{item_id}")
def read_item(item_id: int, db: SessionDep) -> ItemOut:
    """Return one item, or 404."""
    return ItemOut.model_validate(_get_item(db, item_id))


@router.get("/items")
def list_items(
    db: SessionDep,
    status: ItemStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[ItemOut]:
    """List items by id, optionally only those with one ``status``."""
    query = select(Item).order_by(Item.id).limit(limit)
    if status is not None:
        query = query.where(Item.status == status)
    return [ItemOut.model_validate(item) for item in db.scalars(query)]


@router.post("/items/{item_id}/schedule", status_code=202)
def schedule_item(
    item_id: int,
    run_at: Annotated[
        datetime,
        Query(description="when to process the item: ISO 8601 with an offset, e.g. ...Z"),
    ],
    db: SessionDep,
) -> ScheduledJobOut:
    """Schedule a one-off processing run of a pending item at ``run_at``.

    404 if the item does not exist, 409 if it is not pending, 422 if ``run_at`` is naive or
    not in the future.
    """
    item = _get_item(db, item_id)
    if item.status != PENDING:
        raise HTTPException(
            409, detail=f"item {item_id} is {item.status}: only pending items can be scheduled"
        )
    try:
        job = schedule_one_off(item_id, run_at)
    except ValueError as exc:
        raise HTTPException(422, detail=str(exc)) from None
    return ScheduledJobOut(job_id=job.id, item_id=item_id, run_at=run_at)


def _get_item(db: Session, item_id: int) -> Item:
    item = db.get(Item, item_id)
    if item is None:
        raise HTTPException(404, detail=f"item {item_id} not found")
    return item

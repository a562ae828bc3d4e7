"""The common, naive processing job: kept for the replicas demo, never scheduled by the app.

It reads the ``pending`` ids in one session, then moves each item to ``processing`` in a later
session with an unconditional update::

    SELECT id FROM items WHERE status = 'pending' ORDER BY id LIMIT :limit
    UPDATE items SET status = 'processing', attempts = attempts + 1 WHERE id = :id

Between the two, another thread or replica reads the same ids: both process every item. With
one thread it looks correct; with two runs at once each item is processed twice (its
``attempts`` reaches 2 and ``fastsched_history`` sees ``processing -> processing``). Compare
:func:`reference_app_sync.processing.process_pending_items`, whose claim is conditional.
"""

from __future__ import annotations

import time

from sqlalchemy import select, update

from reference_app_sync.database import background_session
from reference_app_sync.models import COMPLETED, PENDING, PROCESSING, Item, utc_now
from reference_app_sync.processing import enrich

UPSTREAM_LATENCY_SECONDS = 0.2
"""The wait for an upstream service between reading the batch and working on it."""


def process_pending_items_naively(limit: int = 5) -> list[int]:
    """Process up to ``limit`` pending items, without claiming them; return their ids."""
    query = select(Item.id).where(Item.status == PENDING).order_by(Item.id).limit(limit)
    with background_session() as session:
        ids = list(session.scalars(query))
    time.sleep(UPSTREAM_LATENCY_SECONDS)
    for item_id in ids:
        with background_session() as session:
            session.execute(
                update(Item)
                .where(Item.id == item_id)
                .values(status=PROCESSING, attempts=Item.attempts + 1, updated_at=utc_now())
            )
        with background_session() as session:
            payload = session.scalar(select(Item.payload).where(Item.id == item_id))
        with background_session() as session:
            session.execute(
                update(Item)
                .where(Item.id == item_id)
                .values(status=COMPLETED, data=enrich(payload), processed_at=utc_now())
            )
    return ids

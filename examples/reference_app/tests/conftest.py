"""The reference app's tests run on the plugin: virtual time, the test database, its jobs.

The scheduler runs in Europe/Berlin so that the nightly job meets a DST change; the plugin
builds the schema, so the app must not create tables itself.
"""

from __future__ import annotations

import os

os.environ.setdefault("REFERENCE_APP_TIMEZONE", "Europe/Berlin")
os.environ["REFERENCE_APP_CREATE_TABLES"] = "0"

import pytest
from reference_app.models import Item
from reference_app.scheduler import setup_scheduler


@pytest.fixture
def jobs(fastsched_scheduler, fastsched_db):
    """The app's jobs, added as its lifespan adds them, on the test database."""
    setup_scheduler()
    return fastsched_scheduler


@pytest.fixture
def add_items(fastsched_db):
    """Insert items through the app's own models; returns their ids."""

    async def add(*payloads):
        async with fastsched_db.background_session() as session:
            items = [Item(payload=payload) for payload in payloads]
            session.add_all(items)
            await session.flush()
            return [item.id for item in items]

    return add

"""The sync reference app's tests run on the plugin: virtual time, the test database, its jobs.

The job tests are plain ``def`` tests, as the app's code is sync: ``fastsched_clock.advance()``
and ``fastsched_db``'s helpers return when done, and the app's own ``SessionLocal`` works in
the test body. The API tests are ``async def`` tests, since ``fastsched_client`` is an httpx
``AsyncClient``.

The scheduler runs in Europe/Berlin so that the nightly job meets a DST change; the plugin
builds the schema, so the app must not create tables itself.
"""

from __future__ import annotations

import os

os.environ.setdefault("REFERENCE_APP_SYNC_TIMEZONE", "Europe/Berlin")
os.environ["REFERENCE_APP_SYNC_CREATE_TABLES"] = "0"

import pytest
from reference_app_sync.database import background_session
from reference_app_sync.models import Item
from reference_app_sync.scheduler import setup_scheduler


@pytest.fixture
def jobs(fastsched_scheduler, fastsched_db):
    """The app's jobs, added as its lifespan adds them, on the test database."""
    setup_scheduler()
    return fastsched_scheduler


@pytest.fixture
def add_items(fastsched_db):
    """Insert items through the app's own models and session; returns their ids."""

    def add(*payloads):
        with background_session() as session:
            items = [Item(payload=payload) for payload in payloads]
            session.add_all(items)
            session.flush()
            return [item.id for item in items]

    return add

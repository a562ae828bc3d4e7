"""The app over HTTP, with its lifespan running its scheduler in virtual time.

``async def`` tests: ``fastsched_client`` is an httpx ``AsyncClient`` over the app, and the
app's sync ``def`` routes run on FastAPI's thread pool as in production.
"""

from __future__ import annotations

import datetime as dt

import pytest
from reference_app_sync.scheduler import PROCESS_PENDING_JOB_ID, scheduler


async def create(client, payload):
    response = await client.post("/items", json={"payload": payload})
    assert response.status_code == 201
    return response.json()["id"]


async def test_items_created_over_http_complete_on_schedule(
    fastsched_db, fastsched_client, fastsched_clock, fastsched_scheduler
):
    ids = [await create(fastsched_client, {"name": name}) for name in ("Ada", "Grace")]
    pending = await fastsched_client.get("/items", params={"status": "pending"})
    assert [item["id"] for item in pending.json()] == ids
    await fastsched_clock.advance(minutes=5)
    for item_id in ids:
        item = (await fastsched_client.get(f"/items/{item_id}")).json()
        assert item["status"] == "completed"
        assert item["data"] is not None
    fastsched_scheduler.assert_ran(PROCESS_PENDING_JOB_ID, times=1)


async def test_the_manual_trigger_runs_the_job_outside_the_schedule(
    fastsched_db, fastsched_client, fastsched_clock, fastsched_scheduler
):
    item_id = await create(fastsched_client, {"name": "now"})
    failing_id = await create(fastsched_client, {"fail": "rejected"})
    await fastsched_clock.advance(minutes=1)
    response = await fastsched_client.post("/api/v3/dev/process-data", params={"limit": 5})
    assert response.status_code == 200
    assert response.json() == {
        "claimed": [item_id, failing_id],
        "completed": [item_id],
        "failed": [failing_id],
        "skipped": [],
    }
    assert await fastsched_db.status_of("items", item_id) == "completed"
    failed = (await fastsched_client.get(f"/items/{failing_id}")).json()
    assert (failed["status"], failed["last_error"]) == ("error", "ValueError: rejected")
    fastsched_scheduler.assert_ran(PROCESS_PENDING_JOB_ID, times=0)


async def test_a_one_off_job_scheduled_over_http_fires_once(
    fastsched_db, fastsched_client, fastsched_clock, fastsched_scheduler
):
    item_id = await create(fastsched_client, {"name": "later"})
    run_at = fastsched_clock.now() + dt.timedelta(minutes=2, seconds=30)
    response = await fastsched_client.post(
        f"/items/{item_id}/schedule", params={"run_at": run_at.isoformat()}
    )
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    await fastsched_clock.advance(minutes=3)
    fastsched_scheduler.assert_ran(job_id, times=1, at=[run_at])
    assert await fastsched_db.status_of("items", item_id) == "completed"


@pytest.mark.parametrize(
    ("item", "run_at", "status", "detail"),
    [
        (None, "2030-01-01T01:00:00Z", 404, "item 999 not found"),
        ({}, "2030-01-01T01:00:00", 422, "run_at '2030-01-01T01:00:00' has no UTC offset"),
        ({}, "2029-12-31T23:00:00Z", 422, "run_at '2029-12-31T23:00:00+00:00' is not in the"),
    ],
)
async def test_scheduling_refuses_what_it_cannot_run(
    fastsched_db, fastsched_client, fastsched_clock, item, run_at, status, detail
):
    item_id = 999 if item is None else await create(fastsched_client, item)
    response = await fastsched_client.post(f"/items/{item_id}/schedule", params={"run_at": run_at})
    assert response.status_code == status
    assert response.json()["detail"].startswith(detail)


async def test_a_completed_item_cannot_be_scheduled(
    fastsched_db, fastsched_client, fastsched_clock, fastsched_scheduler
):
    item_id = await create(fastsched_client, {"name": "done"})
    await fastsched_clock.advance(minutes=5)
    response = await fastsched_client.post(
        f"/items/{item_id}/schedule", params={"run_at": "2030-01-02T00:00:00Z"}
    )
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"item {item_id} is completed: only pending items can be scheduled"
    )


async def test_lifespan_shutdown_stops_the_scheduler(
    fastsched_db, fastsched_client, fastsched_clock, fastsched_scheduler
):
    await fastsched_clock.advance(minutes=5)
    fastsched_scheduler.assert_ran(PROCESS_PENDING_JOB_ID, times=1)
    await fastsched_client.aclose()
    assert not scheduler.running
    await fastsched_clock.advance(hours=1)
    fastsched_scheduler.assert_ran(PROCESS_PENDING_JOB_ID, times=1)

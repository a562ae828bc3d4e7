"""The app over HTTP, with its lifespan running its scheduler in virtual time."""

from __future__ import annotations

import datetime as dt

from reference_app.scheduler import PROCESS_PENDING_JOB_ID, scheduler


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


async def test_the_dev_endpoint_runs_the_job_outside_the_schedule(
    fastsched_db, fastsched_client, fastsched_clock, fastsched_scheduler
):
    item_id = await create(fastsched_client, {"name": "now"})
    await fastsched_clock.advance(minutes=1)
    response = await fastsched_client.get("/api/v3/dev/process-data", params={"limit": 5})
    assert response.status_code == 200
    assert response.json()["completed"] == [item_id]
    assert await fastsched_db.status_of("items", item_id) == "completed"
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


async def test_lifespan_shutdown_stops_the_scheduler(
    fastsched_db, fastsched_client, fastsched_clock, fastsched_scheduler
):
    await fastsched_clock.advance(minutes=5)
    fastsched_scheduler.assert_ran(PROCESS_PENDING_JOB_ID, times=1)
    await fastsched_client.aclose()
    assert not scheduler.running
    await fastsched_clock.advance(hours=1)
    fastsched_scheduler.assert_ran(PROCESS_PENDING_JOB_ID, times=1)

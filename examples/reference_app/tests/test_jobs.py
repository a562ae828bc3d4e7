"""The scheduled-job pattern, tested through virtual time and the test database."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from reference_app import processing
from reference_app.scheduler import PROCESS_PENDING_JOB_ID, RETRY_FAILED_JOB_ID, schedule_one_off

BERLIN = ZoneInfo("Europe/Berlin")


async def statuses(fastsched_db, ids):
    return [await fastsched_db.status_of("items", item_id) for item_id in ids]


async def test_pending_items_complete_at_the_first_run(
    fastsched_clock, fastsched_db, jobs, add_items
):
    ids = await add_items({"name": "Ada"}, {"name": "Grace"})
    await fastsched_clock.advance(minutes=4, seconds=59)
    assert await statuses(fastsched_db, ids) == ["pending", "pending"]
    await fastsched_clock.advance(seconds=1)
    assert await statuses(fastsched_db, ids) == ["completed", "completed"]
    jobs.assert_ran(PROCESS_PENDING_JOB_ID, times=1)
    (row,) = await fastsched_db.fetch("items", id=ids[0])
    assert row["data"] is not None
    assert row["last_error"] is None


async def test_one_bad_row_ends_in_error_and_the_batch_goes_on(
    fastsched_clock, fastsched_db, fastsched_history, jobs, add_items, monkeypatch
):
    real_enrich = processing.enrich

    def enrich(payload):
        if payload.get("name") == "broken":
            raise RuntimeError("upstream said no")
        return real_enrich(payload)

    monkeypatch.setattr(processing, "enrich", enrich)
    ids = await add_items({"name": "a"}, {"name": "broken"}, {"name": "c"})
    await fastsched_clock.advance(minutes=5)
    assert await statuses(fastsched_db, ids) == ["completed", "error", "completed"]
    assert await fastsched_db.value_of("items", ids[1], "last_error") == (
        "RuntimeError: upstream said no"
    )
    assert jobs.runs_of(PROCESS_PENDING_JOB_ID)[0].outcome == "success"
    fastsched_history.assert_transitions("items", ids[1], ["pending", "processing", "error"])
    fastsched_history.assert_status(
        "items", ids[1], "error", last_error="RuntimeError: upstream said no"
    )
    fastsched_history.assert_status("items", ids[0], "completed", last_error=None)


async def test_twelve_items_with_limit_five_need_three_runs(
    fastsched_clock, fastsched_db, jobs, add_items
):
    ids = await add_items(*({"n": n} for n in range(12)))
    await fastsched_clock.advance(minutes=10)
    assert (await statuses(fastsched_db, ids)).count("completed") == 10
    await fastsched_clock.advance(minutes=5)
    assert await statuses(fastsched_db, ids) == ["completed"] * 12
    jobs.assert_ran(PROCESS_PENDING_JOB_ID, times=3)


# At midnight the 5-minute job and the nightly job run at the same instant, each with its own
# sessions: they need connections of their own, so these tests commit for real.
@pytest.mark.fastsched(start="2030-10-26T12:00:00+00:00", isolation="commit")
async def test_nightly_retry_fires_at_midnight_across_the_dst_change(
    fastsched_clock, fastsched_db, jobs
):
    await fastsched_clock.advance_to(dt.datetime(2030, 10, 26, 23, 59, tzinfo=BERLIN))
    jobs.assert_ran(RETRY_FAILED_JOB_ID, times=0)
    await fastsched_clock.advance(days=2)
    fired = [t.astimezone(BERLIN).isoformat() for t in jobs.run_times(RETRY_FAILED_JOB_ID)]
    assert fired == ["2030-10-27T00:00:00+02:00", "2030-10-28T00:00:00+01:00"]


@pytest.mark.fastsched(isolation="commit")
async def test_failed_item_is_retried_by_the_nightly_job(
    fastsched_clock, fastsched_db, fastsched_history, jobs, add_items
):
    ids = await add_items({"fail": "bad input"})
    await fastsched_clock.advance(minutes=5)
    assert await statuses(fastsched_db, ids) == ["error"]
    assert await fastsched_db.value_of("items", ids[0], "last_error") == "ValueError: bad input"
    midnight = dt.datetime(2030, 1, 2, tzinfo=BERLIN)
    await fastsched_clock.advance_to(midnight)
    assert RETRY_FAILED_JOB_ID in [run.job_id for run in jobs.runs if run.scheduled == midnight]
    back_to_pending = fastsched_history.timeline("items", ids[0])[3]
    assert (back_to_pending.status, back_to_pending.job_id) == ("pending", RETRY_FAILED_JOB_ID)
    fastsched_history.assert_processed_once("items")


async def test_one_off_job_fires_once_at_its_time(fastsched_clock, fastsched_db, jobs, add_items):
    (item_id,) = await add_items({"name": "soon"})
    run_at = fastsched_clock.now() + dt.timedelta(minutes=2)
    job = schedule_one_off(item_id, run_at)
    await fastsched_clock.advance(minutes=1, seconds=59)
    assert await fastsched_db.status_of("items", item_id) == "pending"
    await fastsched_clock.advance(seconds=1)
    assert await fastsched_db.status_of("items", item_id) == "completed"
    jobs.assert_ran(job.id, times=1, at=[run_at])
    assert jobs.scheduler.get_job(job.id) is None

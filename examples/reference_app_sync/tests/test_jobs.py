"""The scheduled-job pattern, tested through virtual time and the test database.

Sync tests, as the app is sync: each clock call returns once every job it fired has finished
on the scheduler's thread pool.
"""

from __future__ import annotations

import datetime as dt
import time
from zoneinfo import ZoneInfo

import pytest
from reference_app_sync import processing
from reference_app_sync.scheduler import (
    PROCESS_PENDING_JOB_ID,
    RETRY_FAILED_JOB_ID,
    schedule_one_off,
)

BERLIN = ZoneInfo("Europe/Berlin")
START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def statuses(fastsched_db, ids):
    return [fastsched_db.status_of("items", item_id) for item_id in ids]


def test_pending_items_complete_at_the_first_run(fastsched_clock, fastsched_db, jobs, add_items):
    ids = add_items({"name": "Ada"}, {"name": "Grace"})
    fastsched_clock.advance(minutes=4, seconds=59)
    assert statuses(fastsched_db, ids) == ["pending", "pending"]
    fastsched_clock.advance(seconds=1)
    assert statuses(fastsched_db, ids) == ["completed", "completed"]
    jobs.assert_ran(PROCESS_PENDING_JOB_ID, times=1)
    (row,) = fastsched_db.fetch("items", id=ids[0])
    assert row["data"] is not None
    assert row["last_error"] is None


def test_one_bad_row_ends_in_error_and_the_batch_goes_on(
    fastsched_clock, fastsched_db, fastsched_history, jobs, add_items, monkeypatch
):
    real_enrich = processing.enrich

    def enrich(payload):
        if payload.get("name") == "broken":
            raise RuntimeError("upstream said no")
        return real_enrich(payload)

    monkeypatch.setattr(processing, "enrich", enrich)
    ids = add_items({"name": "a"}, {"name": "broken"}, {"name": "c"})
    fastsched_clock.advance(minutes=5)
    assert statuses(fastsched_db, ids) == ["completed", "error", "completed"]
    assert fastsched_db.value_of("items", ids[1], "last_error") == (
        "RuntimeError: upstream said no"
    )
    assert jobs.runs_of(PROCESS_PENDING_JOB_ID)[0].outcome == "success"
    fastsched_history.assert_transitions("items", ids[1], ["pending", "processing", "error"])
    fastsched_history.assert_status(
        "items", ids[1], "error", last_error="RuntimeError: upstream said no"
    )
    fastsched_history.assert_status("items", ids[0], "completed", last_error=None)


def test_twelve_items_with_limit_five_need_three_runs(
    fastsched_clock, fastsched_db, jobs, add_items
):
    ids = add_items(*({"n": n} for n in range(12)))
    fastsched_clock.advance(minutes=10)
    assert statuses(fastsched_db, ids).count("completed") == 10
    fastsched_clock.advance(minutes=5)
    assert statuses(fastsched_db, ids) == ["completed"] * 12
    jobs.assert_ran(PROCESS_PENDING_JOB_ID, times=3)


def test_the_manual_trigger_runs_the_job_outside_the_schedule(
    fastsched_clock, fastsched_db, jobs, add_items
):
    ids = add_items({"name": "now"}, {"fail": "not now"})
    fastsched_clock.advance(minutes=1)
    run = jobs.run_job(PROCESS_PENDING_JOB_ID)
    assert run.outcome == "success"
    assert (run.retval.completed, run.retval.failed) == ([ids[0]], [ids[1]])
    assert statuses(fastsched_db, ids) == ["completed", "error"]
    # The schedule is untouched: the next run is still due at 00:05.
    assert jobs.next_run_times(PROCESS_PENDING_JOB_ID, 1) == [START + dt.timedelta(minutes=5)]


# A run that takes 7 minutes (time.sleep in the job's thread passes in virtual time) holds
# the job's one instance: the 00:10 run is skipped, the 00:15 one goes ahead.
def test_a_slow_run_makes_the_next_one_skip(
    fastsched_clock, fastsched_db, jobs, add_items, monkeypatch
):
    real_enrich = processing.enrich

    def slow_enrich(payload):
        time.sleep(7 * 60)
        return real_enrich(payload)

    monkeypatch.setattr(processing, "enrich", slow_enrich)
    (item_id,) = add_items({"name": "slow"})
    fastsched_clock.advance(minutes=15)
    assert fastsched_db.status_of("items", item_id) == "completed"
    assert fastsched_db.value_of("items", item_id, "processed_at") == START + dt.timedelta(
        minutes=12
    )
    assert jobs.run_times(PROCESS_PENDING_JOB_ID) == [
        START + dt.timedelta(minutes=5),
        START + dt.timedelta(minutes=15),
    ]
    skipped = [run.scheduled for run in jobs.skipped(PROCESS_PENDING_JOB_ID)]
    assert skipped == [START + dt.timedelta(minutes=10)]


# A process suspended for an hour (a laptop asleep, a paused container) wakes up to twelve
# due runs: coalesce=True makes them one, at the wake-up instant. Without it, the eleven
# late ones would each be reported missed (past APScheduler's default one-second grace).
def test_after_a_suspension_one_coalesced_run_catches_up(
    fastsched_clock, fastsched_db, jobs, add_items
):
    ids = add_items({"n": 1}, {"n": 2})
    fastsched_clock.jump(hours=1)
    runs = jobs.runs_of(PROCESS_PENDING_JOB_ID)
    assert [(run.scheduled, run.outcome) for run in runs] == [
        (START + dt.timedelta(hours=1), "success")
    ]
    assert statuses(fastsched_db, ids) == ["completed", "completed"]


# At midnight the 5-minute job and the nightly job run at the same instant, each in its own
# pool thread with its own sessions: they need connections of their own, so these tests
# commit for real.
@pytest.mark.fastsched(start="2030-10-26T12:00:00+00:00", isolation="commit")
def test_nightly_retry_fires_at_midnight_across_the_dst_change(
    fastsched_clock, fastsched_db, jobs
):
    fastsched_clock.advance_to(dt.datetime(2030, 10, 26, 23, 59, tzinfo=BERLIN))
    jobs.assert_ran(RETRY_FAILED_JOB_ID, times=0)
    fastsched_clock.advance(days=2)
    fired = [t.astimezone(BERLIN).isoformat() for t in jobs.run_times(RETRY_FAILED_JOB_ID)]
    assert fired == ["2030-10-27T00:00:00+02:00", "2030-10-28T00:00:00+01:00"]


@pytest.mark.fastsched(isolation="commit")
def test_failed_item_is_retried_by_the_nightly_job(
    fastsched_clock, fastsched_db, fastsched_history, jobs, add_items
):
    ids = add_items({"fail": "bad input"})
    fastsched_clock.advance(minutes=5)
    assert statuses(fastsched_db, ids) == ["error"]
    assert fastsched_db.value_of("items", ids[0], "last_error") == "ValueError: bad input"
    midnight = dt.datetime(2030, 1, 2, tzinfo=BERLIN)
    fastsched_clock.advance_to(midnight)
    assert RETRY_FAILED_JOB_ID in [run.job_id for run in jobs.runs if run.scheduled == midnight]
    back_to_pending = fastsched_history.timeline("items", ids[0])[3]
    assert (back_to_pending.status, back_to_pending.job_id) == ("pending", RETRY_FAILED_JOB_ID)
    fastsched_history.assert_processed_once("items")


def test_one_off_job_fires_once_at_its_time(fastsched_clock, fastsched_db, jobs, add_items):
    (item_id,) = add_items({"name": "soon"})
    run_at = fastsched_clock.now() + dt.timedelta(minutes=2)
    job = schedule_one_off(item_id, run_at)
    fastsched_clock.advance(minutes=1, seconds=59)
    assert fastsched_db.status_of("items", item_id) == "pending"
    fastsched_clock.advance(seconds=1)
    assert fastsched_db.status_of("items", item_id) == "completed"
    jobs.assert_ran(job.id, times=1, at=[run_at])
    assert jobs.scheduler.get_job(job.id) is None


def test_a_one_off_run_at_in_the_past_is_refused(fastsched_clock):
    fastsched_clock.advance(minutes=1)
    with pytest.raises(ValueError, match=r"is not in the future \(now is 2030-01-01T00:01:00"):
        schedule_one_off(1, START)

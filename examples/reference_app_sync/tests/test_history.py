"""What each item went through, and when: the status history of the jobs' writes."""

from __future__ import annotations

import datetime as dt
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from reference_app_sync import processing
from reference_app_sync.scheduler import PROCESS_PENDING_JOB_ID, RETRY_FAILED_JOB_ID

from pytest_fastsched import assert_all, assert_processed_once, assert_status

START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def test_every_item_completes_once(fastsched_clock, fastsched_history, jobs, add_items):
    ids = add_items(*({"n": n} for n in range(7)))
    fastsched_clock.advance(minutes=10)
    assert_all("items", "completed")
    assert_processed_once("items")
    for item_id in ids:
        fastsched_history.assert_transitions(
            "items", item_id, ["pending", "processing", "completed"]
        )
    # Batches of five: the last two items wait for the second run.
    finished = [fastsched_history.timeline("items", item_id)[-1].at for item_id in ids]
    assert (
        finished == [START + dt.timedelta(minutes=5)] * 5 + [START + dt.timedelta(minutes=10)] * 2
    )


def test_a_failure_stores_its_reason(
    fastsched_clock, fastsched_history, jobs, add_items, monkeypatch
):
    def timeout(payload):
        raise TimeoutError

    monkeypatch.setattr(processing, "enrich", timeout)
    (item_id,) = add_items({"name": "slow"})
    fastsched_clock.advance(minutes=5)
    assert_status("items", item_id, "error", last_error="TimeoutError")
    assert_status("items", item_id, "error", last_error=re.compile("^Timeout"))
    failed = fastsched_history.timeline("items", item_id)[-1]
    assert (failed.job_id, failed.scheduled) == (PROCESS_PENDING_JOB_ID, failed.at)


# A failed item is retried nightly until it runs out of attempts: error -> pending ->
# processing is a retry, never a second worker on the same row.
@pytest.mark.fastsched(isolation="commit")
def test_retries_until_the_attempts_run_out(fastsched_clock, fastsched_history, jobs, add_items):
    (item_id,) = add_items({"fail": "bad input"})
    fastsched_clock.advance(days=3)
    fastsched_history.assert_transitions(
        "items",
        item_id,
        ["pending", *["processing", "error", "pending"] * 2, "processing", "error"],
    )
    fastsched_history.assert_status("items", item_id, "error", last_error="ValueError: bad input")
    retries = [
        record
        for record in fastsched_history.timeline("items", item_id)
        if record.status == "pending"
    ][1:]
    assert {record.job_id for record in retries} == {RETRY_FAILED_JOB_ID}
    assert_processed_once("items")


# Two pool threads (or the scheduled run and the manual trigger) processing at once: the
# atomic claim gives each item to exactly one of them. They need connections of their own.
@pytest.mark.fastsched(isolation="commit")
def test_two_threads_never_process_the_same_item(fastsched_history, fastsched_db, add_items):
    ids = add_items(*({"n": n} for n in range(4)))
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(processing.process_pending_items, 4) for _ in range(2)]
        reports = [run.result() for run in runs]
    assert sorted(reports[0].claimed + reports[1].claimed) == ids
    assert_processed_once("items")
    assert_all("items", "completed")

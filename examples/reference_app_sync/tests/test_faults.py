"""Database faults: the jobs' error paths, with the driver's own errors."""

from __future__ import annotations

import re

import pytest
from reference_app_sync.scheduler import PROCESS_PENDING_JOB_ID
from sqlalchemy.exc import DBAPIError

from pytest_fastsched import assert_processed_once

# _finish's UPDATE of a completed item (the only one that sets processed_at), and the UPDATE
# of its outcome, completed or error.
STORE_COMPLETED = r"^UPDATE items SET .*processed_at"
STORE_OUTCOME = r"^UPDATE items SET status=\S+, (data|last_error)="
# The read of the batch of pending ids, the first statement of a processing run.
FETCH_PENDING = r"^SELECT items\.id\s+FROM items\s+WHERE items\.status"

DRIVER_ERRORS = {
    ("sqlite", "operational"): "OperationalError: (sqlite3.OperationalError) database is locked",
    ("sqlite", "disconnect"): (
        "ProgrammingError: (sqlite3.ProgrammingError) Cannot operate on a closed database."
    ),
    ("postgresql", "operational"): (
        "OperationalError: (psycopg.errors.QueryCanceled) canceling statement due to "
        "statement timeout"
    ),
    ("postgresql", "serialization"): (
        "OperationalError: (psycopg.errors.SerializationFailure) could not serialize access "
        "due to concurrent update"
    ),
    ("postgresql", "disconnect"): (
        "OperationalError: (psycopg.OperationalError) the connection is closed"
    ),
}


def statuses(fastsched_db, ids):
    return [fastsched_db.status_of("items", item_id) for item_id in ids]


@pytest.mark.fastsched(isolation="commit")
@pytest.mark.parametrize("error", ["operational", "serialization", "disconnect"])
def test_a_failed_store_ends_in_error_and_the_batch_goes_on(
    fastsched_clock, fastsched_db, fastsched_faults, fastsched_history, jobs, add_items, error
):
    expected = DRIVER_ERRORS.get((fastsched_db.dialect, error))
    if expected is None:
        pytest.skip(f"no {error} error on {fastsched_db.dialect}")
    ids = add_items({"n": 1}, {"n": 2}, {"n": 3})
    fault = fastsched_faults.fail(STORE_COMPLETED, nth=2, error=error)
    fastsched_clock.advance(minutes=5)
    assert statuses(fastsched_db, ids) == ["completed", "error", "completed"]
    last_error = fastsched_db.value_of("items", ids[1], "last_error")
    # Older SQLAlchemy releases also name the driver's exception class in the message.
    assert re.sub(r"<class '[^']+'>: ", "", last_error.splitlines()[0]) == expected
    assert fault.fired == 1
    assert jobs.runs_of(PROCESS_PENDING_JOB_ID)[0].outcome == "success"
    fastsched_history.assert_transitions("items", ids[1], ["pending", "processing", "error"])
    assert_processed_once("items")


def test_when_the_error_cannot_be_stored_the_item_stays_processing(
    fastsched_clock, fastsched_db, fastsched_faults, jobs, add_items
):
    ids = add_items({"n": 1}, {"n": 2})
    fastsched_faults.fail(STORE_OUTCOME, nth=1, times=2)
    fastsched_clock.advance(minutes=5)
    # The app logs it and goes on: the item is stuck, and nothing in the app recovers it.
    assert statuses(fastsched_db, ids) == ["processing", "completed"]
    assert fastsched_db.value_of("items", ids[0], "last_error") is None


def test_the_next_test_has_no_fault(fastsched_clock, fastsched_db, jobs, add_items):
    ids = add_items({"n": 1}, {"n": 2})
    fastsched_clock.advance(minutes=5)
    assert statuses(fastsched_db, ids) == ["completed", "completed"]


# A failure before any item is claimed is the run's own: APScheduler logs it and goes on,
# the plugin fails the test unless the test expects it. The items wait for the next run.
def test_a_failed_batch_read_fails_the_run_and_the_next_run_catches_up(
    fastsched_clock, fastsched_db, fastsched_faults, jobs, add_items
):
    ids = add_items({"n": 1}, {"n": 2})
    fault = fastsched_faults.fail(FETCH_PENDING)
    with jobs.expect_job_error(DBAPIError, job_id=PROCESS_PENDING_JOB_ID):
        fastsched_clock.advance(minutes=5)
    assert statuses(fastsched_db, ids) == ["pending", "pending"]
    assert fault.fired == 1
    fastsched_clock.advance(minutes=5)
    assert statuses(fastsched_db, ids) == ["completed", "completed"]
    assert [run.outcome for run in jobs.runs_of(PROCESS_PENDING_JOB_ID)] == ["error", "success"]

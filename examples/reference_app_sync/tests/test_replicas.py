"""Several replicas of the app, one virtual clock: each item must be processed once."""

from __future__ import annotations

import pytest
from reference_app_sync.naive import process_pending_items_naively
from reference_app_sync.scheduler import PROCESS_PENDING_JOB_ID

from pytest_fastsched import assert_all, assert_processed_once

NAIVE_JOB_ID = "naive_processing"


@pytest.mark.parametrize(
    "replicas", [pytest.param(n, marks=pytest.mark.fastsched(replicas=n)) for n in (2, 4)]
)
def test_the_claim_gives_each_item_to_one_replica(
    fastsched_clock, fastsched_db, fastsched_history, jobs, add_items, replicas
):
    ids = add_items(*({"n": n} for n in range(12)))
    fastsched_clock.advance(minutes=15)
    assert_all("items", "completed")
    assert_processed_once("items")
    attempts = [fastsched_db.value_of("items", item_id, "attempts") for item_id in ids]
    assert attempts == [1] * len(ids)
    ran = {run.replica for run in jobs.runs_of(PROCESS_PENDING_JOB_ID)}
    assert ran == set(range(replicas))


# The naive pattern: the replicas start together and read the same pending ids; while they
# wait on the upstream service, neither has updated anything, so both process every item.
@pytest.mark.fastsched(replicas=2)
def test_the_naive_job_processes_items_twice(
    fastsched_clock, fastsched_db, fastsched_history, fastsched_scheduler, add_items
):
    fastsched_scheduler.scheduler.add_job(
        process_pending_items_naively, "interval", minutes=5, id=NAIVE_JOB_ID
    )
    ids = add_items({"n": 1}, {"n": 2}, {"n": 3})
    fastsched_clock.advance(minutes=5, seconds=1)
    attempts = [fastsched_db.value_of("items", item_id, "attempts") for item_id in ids]
    twice = [item_id for item_id, count in zip(ids, attempts, strict=True) if count == 2]
    assert twice == ids, attempts
    for item_id in twice:
        claims = [
            record
            for record in fastsched_history.timeline("items", item_id)
            if record.status == "processing"
        ]
        assert [record.job_id for record in claims] == [NAIVE_JOB_ID] * 2
    runs = fastsched_scheduler.runs_of(NAIVE_JOB_ID)
    assert sorted(run.replica for run in runs) == [0, 1]
    assert all(set(twice) <= set(run.retval) for run in runs)

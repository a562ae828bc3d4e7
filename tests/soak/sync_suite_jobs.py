"""Sync soak tests that pass: jobs write rows, sleep, run in threads; the clock ends anywhere."""

import datetime as dt

import app
import pytest

START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
CASES = range(21)


def expected_status(item_id):
    return "error" if item_id % 7 == 0 else "completed"


@pytest.mark.parametrize("n", CASES)
def test_process(n, fastsched_clock, fastsched_scheduler, fastsched_db):
    ids = [n * 10 + k for k in range(1, 2 + n % 4)]
    fastsched_db.insert("items", [{"id": item_id} for item_id in ids])
    fastsched_clock.advance(minutes=6)
    rows = fastsched_db.fetch("items")
    assert [(row["id"], row["status"]) for row in rows] == [
        (item_id, expected_status(item_id)) for item_id in ids
    ]
    fastsched_clock.advance(seconds=n * 37 + 1)
    assert fastsched_clock.now() == START + dt.timedelta(minutes=6, seconds=n * 37 + 1)
    assert dt.datetime.now(dt.timezone.utc) == fastsched_clock.now()


@pytest.mark.parametrize("n", CASES)
def test_in_flight(n, fastsched_clock, fastsched_scheduler, fastsched_db):
    fastsched_db.insert("items", [{"id": n + 1}, {"id": n + 2}])
    fastsched_clock.advance(minutes=47, seconds=n + 1)
    ticks = fastsched_db.fetch("ticks")
    assert [tick["job"] for tick in ticks] == ["report-start", "report-end", "report-start"]
    assert fastsched_db.status_of("items", n + 2) == expected_status(n + 2)
    # The second report sleeps until 00:48:30; a new item waits for the 00:50 run.
    fastsched_db.insert("items", {"id": 100 + n})


@pytest.mark.parametrize("n", CASES)
def test_process_left_in_flight(n, fastsched_clock, fastsched_scheduler, fastsched_db):
    fastsched_db.insert("items", [{"id": n + 1}, {"id": n + 2}])
    fastsched_clock.advance(minutes=5, seconds=0.5)
    assert fastsched_db.status_of("items", n + 1) == "processing"
    assert fastsched_db.status_of("items", n + 2) == "pending"


@pytest.mark.parametrize("n", CASES)
def test_thread_job(n, fastsched_clock, fastsched_scheduler, fastsched_db):
    app.beats.clear()
    runs = 1 + n % 3
    fastsched_clock.advance(minutes=10 * runs, seconds=n)
    assert app.beats == [START + dt.timedelta(minutes=10 * k) for k in range(1, runs + 1)]
    fastsched_scheduler.assert_ran("beat", times=runs)


@pytest.mark.parametrize("n", CASES)
@pytest.mark.fastsched(isolation="commit")
def test_commit(n, fastsched_clock, fastsched_scheduler, fastsched_db):
    ids = [7 * (n + 1), 7 * (n + 1) + 1]
    fastsched_db.insert("items", [{"id": item_id} for item_id in ids])
    fastsched_clock.advance(minutes=6)
    rows = fastsched_db.fetch("items")
    assert [(row["id"], row["status"]) for row in rows] == [
        (item_id, expected_status(item_id)) for item_id in ids
    ]
    fastsched_clock.jump(hours=n + 1, seconds=n)

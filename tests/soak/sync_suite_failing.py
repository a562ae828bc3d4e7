"""Sync soak tests that fail on purpose, every time, with work and the clock left anywhere."""

import datetime as dt

import app
import pytest

CASES = range(21)


@pytest.mark.parametrize("n", CASES)
def test_assertion_fails(n, fastsched_clock, fastsched_scheduler, fastsched_db):
    fastsched_db.insert("items", [{"id": 7 * (n + 1)}])
    fastsched_clock.advance(minutes=6, seconds=n)
    assert fastsched_db.status_of("items", 7 * (n + 1)) == "completed", "on purpose"


@pytest.mark.parametrize("n", CASES)
def test_raises_with_a_job_in_flight(n, fastsched_clock, fastsched_scheduler, fastsched_db):
    fastsched_db.insert("items", [{"id": n + 1}, {"id": n + 2}])
    fastsched_clock.advance(minutes=5, seconds=0.5)
    raise RuntimeError("raised on purpose")


@pytest.mark.parametrize("n", CASES)
def test_unexpected_job_error(n, fastsched_clock, fastsched_scheduler, fastsched_db):
    fire_at = fastsched_clock.now() + dt.timedelta(seconds=n + 1)
    fastsched_scheduler.scheduler.add_job(app.explode, "date", run_date=fire_at, id="explode")
    fastsched_db.insert("items", [{"id": n + 1}])
    fastsched_clock.advance(minutes=1)

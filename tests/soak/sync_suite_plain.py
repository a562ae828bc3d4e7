"""Sync soak tests that pass: the database without the clock, and expected job errors."""

import datetime as dt

import app
import pytest

CASES = range(21)


@pytest.mark.parametrize("n", CASES)
def test_no_clock(n, fastsched_db):
    fastsched_db.insert("items", [{"id": n, "status": "pending"}])
    fastsched_db.insert("ticks", [{"job": "test", "at": dt.datetime.now().isoformat()}])
    assert dt.datetime.now().year < 2030
    assert not app.scheduler.running
    assert len(fastsched_db.fetch("items")) == 1
    with app.SessionLocal() as session:  # the app's own sessions, in the test body
        assert session.get(app.Item, n).status == "pending"


@pytest.mark.parametrize("n", CASES)
def test_expected_job_error(n, fastsched_clock, fastsched_scheduler, fastsched_db):
    fire_at = fastsched_clock.now() + dt.timedelta(seconds=n + 1)
    fastsched_scheduler.scheduler.add_job(app.explode, "date", run_date=fire_at, id="explode")
    with fastsched_scheduler.expect_job_error(RuntimeError, match="on purpose"):
        fastsched_clock.advance(seconds=n + 2)
    assert [tick["job"] for tick in fastsched_db.fetch("ticks", job="explode")] == ["explode"]

"""A ``BackgroundScheduler`` app with sync SQLAlchemy, tested from ``def`` tests.

The tutorial shape: a ``BackgroundScheduler`` with ``def`` jobs on its thread pool, a sync
``SessionLocal``, FastAPI ``def`` routes through ``Depends(get_db)``. Its suite below drives
virtual time and reads the database from plain ``def`` tests (the sync face of the
fixtures), and the API from an ``async def`` test under ``fastsched_client``; it runs on
SQLite and PostgreSQL, on both clock backends, both isolations.
"""

from __future__ import annotations

import pytest
from conftest import Canaries

BACKGROUND_APP = """
import datetime as dt
import os
import threading
import time
from contextlib import asynccontextmanager

from apscheduler.schedulers.background import BackgroundScheduler
from fastapi import Depends, FastAPI
from sqlalchemy import String, create_engine, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    last_error: Mapped[str | None] = mapped_column(String(200))


# The production engine, on the suite's canary: the tests must never reach it.
PRODUCTION = os.environ["FASTSCHED_CANARY_URL"].replace("+aiosqlite", "").replace(
    "+asyncpg", "+psycopg"
)
engine = create_engine(PRODUCTION)
SessionLocal = sessionmaker(bind=engine, autoflush=False)
scheduler = BackgroundScheduler(timezone="UTC")
SEEN = []


def process_pending():
    SEEN.append((dt.datetime.now(dt.timezone.utc), threading.current_thread().name))
    with SessionLocal() as session:
        query = select(Item.id).where(Item.status == "pending").order_by(Item.id)
        ids = list(session.scalars(query))
    for item_id in ids:
        with SessionLocal() as session:
            claimed = session.execute(
                update(Item)
                .where(Item.id == item_id, Item.status == "pending")
                .values(status="processing")
            ).rowcount
            session.commit()
        if not claimed:
            continue
        time.sleep(90)  # the work: virtual time passes for the job
        with SessionLocal() as session:
            item = session.get(Item, item_id)
            if item_id % 2:
                item.status = "completed"
            else:
                item.status, item.last_error = "error", f"item {item_id} failed"
            session.commit()


scheduler.add_job(process_pending, "interval", minutes=5, id="process")


@asynccontextmanager
async def lifespan(app):
    scheduler.start()
    yield
    scheduler.shutdown()


app = FastAPI(lifespan=lifespan)


def get_db():
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


@app.post("/items", status_code=201)
def create_item(db: Session = Depends(get_db)):
    item = Item()
    db.add(item)
    db.commit()
    return {"id": item.id, "status": item.status}


@app.get("/items/{item_id}")
def read_item(item_id: int, db: Session = Depends(get_db)):
    item = db.get(Item, item_id)
    return {"id": item.id, "status": item.status, "last_error": item.last_error}


@app.post("/process")
def process_now():
    scheduler.get_job("process").modify(next_run_time=dt.datetime.now(dt.timezone.utc))
    return {}
"""

BACKGROUND_TESTS = """
import datetime as dt
import threading
import time

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
import sqlite3

import psycopg
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError

import app
from pytest_fastsched import JobRunError, NotAwaitedError
from pytest_fastsched._clock import ClockError, WatchdogTimeout

UTC = dt.timezone.utc
START = dt.datetime(2030, 1, 1, tzinfo=UTC)
ISOLATIONS = [
    pytest.param("rollback", id="rollback"),
    pytest.param("commit", id="commit", marks=pytest.mark.fastsched(isolation="commit")),
]


@pytest.fixture(autouse=True)
def forget_what_jobs_saw():
    app.SEEN.clear()


def test_jobs_fire_at_their_instants_on_the_thread_pool(fastsched_clock, fastsched_scheduler):
    assert isinstance(fastsched_scheduler.scheduler, BackgroundScheduler)
    fastsched_clock.advance(hours=1)
    expected = [START + dt.timedelta(minutes=5 * n) for n in range(1, 13)]
    fastsched_scheduler.assert_ran("process", times=12, at=expected)
    assert [instant for instant, _ in app.SEEN] == expected
    assert all(name != threading.current_thread().name for _, name in app.SEEN)
    assert dt.datetime.now(UTC) == fastsched_clock.now() == START + dt.timedelta(hours=1)
    assert [t for t in threading.enumerate() if t.name == "APScheduler"] == []


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_items_go_through_their_statuses(
    isolation, fastsched_db, fastsched_clock, fastsched_scheduler, fastsched_history
):
    fastsched_db.insert("items", [{"id": 1}, {"id": 2}])
    with app.SessionLocal() as session:  # the app's own sessions, in the test itself
        assert session.scalar(select(func.count()).select_from(app.Item)) == 2
    fastsched_clock.advance(minutes=5)
    assert fastsched_db.status_of("items", 1) == "processing"
    fastsched_clock.advance(minutes=3)
    assert fastsched_db.status_of("items", 1) == "completed"
    assert fastsched_db.value_of("items", 2, "last_error") == "item 2 failed"
    fastsched_history.assert_transitions("items", 1, ["pending", "processing", "completed"])
    fastsched_history.assert_transitions("items", 2, ["pending", "processing", "error"])
    writes = [r for r in fastsched_history.timeline("items", 2) if r.kind == "status"]
    assert [(r.job_id, r.scheduled, r.at) for r in writes] == [
        ("process", START + dt.timedelta(minutes=5), START + dt.timedelta(minutes=6, seconds=30)),
        ("process", START + dt.timedelta(minutes=5), START + dt.timedelta(minutes=8)),
    ]
    with app.SessionLocal() as session:
        assert session.get(app.Item, 2).status == "error"


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_nothing_is_left(isolation, fastsched_db):
    assert fastsched_db.fetch("items") == []
    with app.SessionLocal() as session:
        assert session.scalar(select(func.count()).select_from(app.Item)) == 0


def never_closed(status):
    session = app.SessionLocal()  # never committed nor closed: the pool would roll it back
    session.execute(update(app.Item).where(app.Item.id == 1).values(status=status))
    session.execute(select(app.Item.id)).all()


def test_a_session_a_job_never_closes_is_rolled_back(
    fastsched_db, fastsched_clock, fastsched_scheduler
):
    fastsched_db.insert("items", [{"id": 1, "status": "completed"}])
    first = START + dt.timedelta(minutes=2, seconds=30)
    app.scheduler.add_job(
        never_closed, "interval", minutes=5, next_run_time=first, id="leaky", args=["lost"]
    )
    fastsched_clock.advance(minutes=15)
    fastsched_scheduler.assert_ran("leaky", times=3)
    assert fastsched_db.status_of("items", 1) == "completed"


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_database_errors_are_the_apps_drivers(isolation, fastsched_db):
    with pytest.raises(IntegrityError) as excinfo, app.SessionLocal() as session:
        session.add_all([app.Item(id=1), app.Item(id=1)])
        session.commit()
    if fastsched_db.dialect == "sqlite":
        assert type(excinfo.value.orig) is sqlite3.IntegrityError
        return
    assert type(excinfo.value.orig) is psycopg.errors.UniqueViolation
    assert str(excinfo.value.orig) == (
        'duplicate key value violates unique constraint "items_pkey"\\n'
        "DETAIL:  Key (id)=(1) already exists."
    )
    with pytest.raises(OperationalError) as excinfo, app.SessionLocal() as session:
        session.execute(text("SET LOCAL statement_timeout = 10"))
        session.execute(text("SELECT pg_sleep(1)"))
    assert type(excinfo.value.orig) is psycopg.errors.QueryCanceled
    assert str(excinfo.value.orig) == "canceling statement due to statement timeout"


def test_a_slow_job_meets_max_instances_as_in_production(fastsched_clock, fastsched_scheduler):
    def slow():
        time.sleep(7 * 60)

    app.scheduler.add_job(slow, "interval", minutes=5, id="slow")
    fastsched_clock.advance(minutes=30)
    runs = fastsched_scheduler.runs_of("slow")
    assert [(run.scheduled.minute, run.outcome) for run in runs] == [
        (5, "success"), (10, "skipped"), (15, "success"), (20, "skipped"), (25, "running"),
        (30, "skipped"),
    ]


def test_a_jump_misses_what_apscheduler_misses(fastsched_clock, fastsched_scheduler):
    app.scheduler.get_job("process").modify(misfire_grace_time=180, coalesce=False)
    fastsched_clock.jump(minutes=12)
    assert [run.scheduled.minute for run in fastsched_scheduler.missed("process")] == [5]
    fastsched_scheduler.assert_ran("process", times=1, at=[START + dt.timedelta(minutes=10)])


def test_run_job_returns_the_run(fastsched_clock, fastsched_scheduler):
    run = fastsched_scheduler.run_job("process")
    assert (run.job_id, run.manual, run.outcome) == ("process", True, "success")
    assert run.scheduled == START


def test_a_job_error_fails_the_clock_call(fastsched_clock, fastsched_scheduler):
    def broken():
        raise ValueError("boom")

    app.scheduler.add_job(broken, "date", run_date=START + dt.timedelta(minutes=3), id="broken")
    with pytest.raises(JobRunError, match="job 'broken' .* raised ValueError: boom"):
        fastsched_clock.advance(minutes=4)
    with fastsched_scheduler.expect_job_error(ValueError):
        app.scheduler.add_job(broken, "date", run_date=START + dt.timedelta(minutes=6), id="again")
        fastsched_clock.advance(minutes=4)


def test_a_stuck_job_is_stopped_by_the_watchdog(fastsched_clock, fastsched_scheduler):
    release = threading.Event()
    app.scheduler.add_job(lambda: release.wait(10), "date", run_date=START, id="stuck")
    fastsched_clock.watchdog_seconds = 0.3
    try:
        with pytest.raises(WatchdogTimeout, match="job 'stuck'"):
            fastsched_clock.advance(minutes=1)
    finally:
        release.set()


def test_the_async_background_session_names_the_sync_one_in_a_def_test(fastsched_db):
    with pytest.raises(TypeError) as excinfo, fastsched_db.background_session():
        pass
    assert str(excinfo.value) == (
        "fastsched_db.background_session() is an async session: use it with `async with` in "
        "an async def test; a def test opens the app's own sync sessions (with SessionLocal() "
        "as session:)"
    )


async def test_the_background_session_of_a_sync_app_is_async(fastsched_db):
    async with fastsched_db.background_session() as session:
        session.add(app.Item(id=5))
    assert await fastsched_db.status_of("items", 5) == "pending"


def test_the_public_name_of_the_error():
    from pytest_fastsched._worlds import NotAwaitedError as home

    assert NotAwaitedError is home


def test_the_clock_is_for_the_test_thread(fastsched_clock):
    errors = []

    def elsewhere():
        try:
            fastsched_clock.advance(minutes=1)
        except ClockError as error:
            errors.append(str(error))

    thread = threading.Thread(target=elsewhere, name="elsewhere")
    thread.start()
    thread.join()
    assert errors == [
        "fastsched_clock.advance() was called from the thread 'elsewhere': call it from the "
        "test itself (its thread is 'MainThread')"
    ]


async def test_the_api_and_the_lifespan(fastsched_client, fastsched_clock, fastsched_scheduler):
    created = await fastsched_client.post("/items")
    item = created.json()["id"]
    assert (await fastsched_client.get(f"/items/{item}")).json()["status"] == "pending"
    await fastsched_client.post("/process")
    await fastsched_clock.advance(minutes=2)
    expected = "completed" if item % 2 else "error"  # sequences are not rolled back
    assert (await fastsched_client.get(f"/items/{item}")).json()["status"] == expected
    fastsched_scheduler.assert_ran("process", times=1, at=[START])


def test_fails_the_async_client_in_a_def_test(fastsched_client):
    pass


async def test_a_shutdown_on_the_loop_leaves_a_sleeping_job_to_finish(
    fastsched_clock, fastsched_scheduler
):
    def slow():
        time.sleep(60)

    app.scheduler.add_job(slow, "date", run_date=START + dt.timedelta(minutes=1), id="slow")
    await fastsched_clock.advance(minutes=1, seconds=1)
    app.scheduler.shutdown()  # wait=True, on the loop's thread, as a lifespan calls it
    await fastsched_clock.advance(minutes=1)
    assert [run.outcome for run in fastsched_scheduler.runs_of("slow")] == ["success"]


def test_fails_with_a_job_error_at_the_tests_line(fastsched_clock, fastsched_scheduler):
    def broken():
        raise ValueError("shown at the test's line")

    app.scheduler.add_job(broken, "date", run_date=START + dt.timedelta(minutes=3), id="broken")
    fastsched_clock.advance(minutes=4)


async def test_fails_an_advance_never_awaited(fastsched_clock):
    fastsched_clock.advance(minutes=5)


async def test_fails_an_insert_never_awaited(fastsched_db):
    fastsched_db.insert("items", [{"id": 9}])


@pytest.fixture
def moved_in_a_sync_fixture(fastsched_clock):
    fastsched_clock.advance(minutes=1)


async def test_fails_an_advance_in_a_sync_fixture_of_an_async_test(moved_in_a_sync_fixture):
    pass
"""


@pytest.fixture(params=["time-machine", "freezegun"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_a_background_scheduler_app_under_def_tests(
    pytester: pytest.Pytester, database: str, backend: str, canaries: Canaries
) -> None:
    pytester.makepyfile(app=BACKGROUND_APP, test_background=BACKGROUND_TESTS)
    pytester.makeini(
        f"""
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
        filterwarnings = error
        fastsched_database = {database}
        fastsched_scheduler = app:scheduler
        fastsched_sessionmaker = app:SessionLocal
        fastsched_metadata = app:Base.metadata
        fastsched_app = app:app
        fastsched_clock_backend = {backend}
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", timeout=120)
    result.assert_outcomes(passed=19, failed=3, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_fails_with_a_job_error_at_the_tests_line _*",
            ">       fastsched_clock.advance(minutes=4)",
            "E       pytest_fastsched.JobRunError: job 'broken' (scheduled "
            "2030-01-01T00:03:00+00:00) raised ValueError: shown at the test's line",
        ]
    )
    section = result.stdout.str().split("test_fails_with_a_job_error_at_the_tests_line _")[1]
    section = section.split("_ test_fails_an_advance_never_awaited _")[0]
    assert "base_events.py" not in section
    assert "_worlds.py" not in section
    result.stdout.fnmatch_lines(
        [
            "*_ test_fails_an_advance_never_awaited _*",
            "E *NotAwaitedError: fastsched: fastsched_clock.advance() returned a coroutine that "
            "the test never awaited: it did nothing. In an async def test write `await "
            "fastsched_clock.advance(...)`.",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ test_fails_an_insert_never_awaited _*",
            "E *NotAwaitedError: fastsched: fastsched_db.insert() returned a coroutine that the "
            "test never awaited: it did nothing. In an async def test write `await "
            "fastsched_db.insert(...)`.",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at setup of test_fails_the_async_client_in_a_def_test _*",
            "fastsched_client is an httpx.AsyncClient: a def test cannot await it. Make the "
            "test async def (the other fastsched fixtures work in both).",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at setup of test_fails_an_advance_in_a_sync_fixture_of_an_async_test _*",
            "E *ClockError: fastsched_clock.advance() was called without await, outside a "
            "running event loop, in an async test: await it from the test or from an async "
            "fixture (@pytest_asyncio.fixture). A def test calls it without await.",
        ]
    )
    canaries.assert_untouched()


STARTED_AT_IMPORT = """
from apscheduler.schedulers.background import BackgroundScheduler

TICKS = []
scheduler = BackgroundScheduler(timezone="UTC")
scheduler.add_job(TICKS.append, "interval", minutes=5, id="tick", args=[1])
scheduler.start()
"""

STARTED_AT_IMPORT_TESTS = """
import threading

import started


def test_runs_in_virtual_time(fastsched_clock, fastsched_scheduler):
    assert [t for t in threading.enumerate() if t.name == "APScheduler"] == []
    fastsched_clock.advance(minutes=10)
    fastsched_scheduler.assert_ran("tick", times=2)
    assert started.TICKS == [1, 1]
"""


def test_a_scheduler_started_at_import_is_stopped_with_a_warning(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(started=STARTED_AT_IMPORT, test_started=STARTED_AT_IMPORT_TESTS)
    pytester.makeini(
        """
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
        fastsched_scheduler = started:scheduler
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-W", "default")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*FastschedWarning: the app's BackgroundScheduler (<apscheduler.schedulers."
            "background.BackgroundScheduler object at *>) was running in real time before the "
            "test (started at import?): its thread is stopped and the test runs it in virtual "
            "time, but what it ran before ran on the app's own database. Start it in the app's "
            "lifespan (or a fixture), not at import.",
        ]
    )

"""Sync SQLAlchemy in the app (``sessionmaker``, ``scoped_session``, ``Engine``) under the
plugin's async tests: thread-pool jobs, ``asyncio.to_thread``, FastAPI ``def`` routes."""

from __future__ import annotations

import pytest
from conftest import Canaries

from pytest_fastsched._isolation import SYNC_ON_LOOP
from pytest_fastsched._postgres import EphemeralPostgres

# A user's app in the tutorial shape, inside an AsyncIOScheduler: a sync `SessionLocal` on a
# sync engine, used by a sync `def` job on a thread pool, by an async job through
# `asyncio.to_thread`, and by FastAPI `def` routes through `Depends(get_db)`.
SYNC_APP = """
import asyncio
import os
from contextlib import asynccontextmanager

from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from fastapi import Depends, FastAPI
from sqlalchemy import String, create_engine, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, scoped_session
from sqlalchemy.orm import sessionmaker


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    last_error: Mapped[str | None] = mapped_column(String(200))


# The production engines, on the suite's canary: the tests must never reach them.
PRODUCTION = os.environ["FASTSCHED_CANARY_URL"].replace("+aiosqlite", "").replace(
    "+asyncpg", "+psycopg"
)
engine = create_engine(PRODUCTION)
SessionLocal = sessionmaker(bind=engine, autoflush=False)
ScopedSession = scoped_session(sessionmaker())
RequestScoped = scoped_session(sessionmaker(), scopefunc=lambda: "the one scope")
reports_engine = create_engine(PRODUCTION)  # named nowhere: the seal refuses it
audit_engine = create_engine(PRODUCTION)  # named in fastsched_engine
scheduler = AsyncIOScheduler(
    timezone="UTC", executors={"default": AsyncIOExecutor(), "threadpool": ThreadPoolExecutor(2)}
)


def process_pending(maker=SessionLocal):
    with maker() as session:
        query = select(Item.id).where(Item.status == "pending").order_by(Item.id)
        ids = list(session.scalars(query).all())
    for item_id in ids:
        with maker() as session:
            session.execute(update(Item).where(Item.id == item_id).values(status="processing"))
            session.commit()
        with maker() as session:
            if item_id % 2:
                session.get(Item, item_id).status = "completed"
            else:
                session.execute(
                    text("UPDATE items SET status = 'error', last_error = :error WHERE id = :id"),
                    {"error": f"boom {item_id}", "id": item_id},
                )
            session.commit()


def process_scoped():
    process_pending(ScopedSession)
    ScopedSession.remove()


async def process_in_a_thread():
    await asyncio.to_thread(process_pending)


async def process_on_the_loop():
    process_pending()


def hold(started, release):
    with SessionLocal() as session:
        session.execute(select(Item.id)).all()
        started.set()
        release.wait(timeout=10)
        session.commit()


def intrude(started, release):
    started.wait(timeout=10)
    try:
        with SessionLocal() as session:
            session.execute(select(Item.id)).all()
    finally:
        release.set()


def roll_back_a_write():
    with SessionLocal() as session:
        session.execute(update(Item).where(Item.id == 1).values(status="processing"))
        session.rollback()


def audit(item_id):
    with audit_engine.connect() as connection:
        connection.execute(text("INSERT INTO items (id, status) VALUES (:id, 'audited')"),
                           {"id": item_id})
        connection.commit()


def write_engine_directly():
    with engine.begin() as connection:
        connection.execute(text("UPDATE items SET status = 'completed' WHERE id = 1"))


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
    return {"id": item.id, "status": item.status}
"""

SYNC_TESTS = """
import asyncio
import datetime as dt
import threading

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

import app

ISOLATIONS = [
    pytest.param("rollback", id="rollback"),
    pytest.param("commit", id="commit", marks=pytest.mark.fastsched(isolation="commit")),
]
JOBS = {
    "threadpool": dict(func=app.process_pending, executor="threadpool"),
    "to_thread": dict(func=app.process_in_a_thread),
    "scoped": dict(func=app.process_scoped, executor="threadpool"),
}


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("job", JOBS)
async def test_sync_sessions_of_jobs_reach_the_test_database(
    isolation, job, fastsched_db, fastsched_clock, fastsched_scheduler, fastsched_history
):
    assert fastsched_db.isolation == isolation
    await fastsched_db.insert("items", [{"id": 1}, {"id": 2}])
    app.scheduler.add_job(id="process", trigger="interval", minutes=5, **JOBS[job])
    await fastsched_clock.advance(minutes=5)
    fastsched_scheduler.assert_ran("process", times=1)
    fastsched_history.assert_transitions("items", 1, ["pending", "processing", "completed"])
    fastsched_history.assert_transitions("items", 2, ["pending", "processing", "error"])
    fastsched_history.assert_status("items", 2, "error", last_error="boom 2")
    jobs = {record.job_id for record in fastsched_history.timeline("items", 1)[1:]}
    assert jobs == {"process"}
    assert await fastsched_db.status_of("items", 1) == "completed"


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_the_sync_engine_reaches_the_test_database(isolation, fastsched_db):
    await fastsched_db.insert("items", [{"id": 1}])
    await asyncio.to_thread(app.write_engine_directly)
    assert await fastsched_db.status_of("items", 1) == "completed"
    if isolation == "commit":
        driver = {"sqlite": "sqlite+pysqlite", "postgresql": "postgresql+psycopg"}
        assert fastsched_db.sync_engine.url.drivername == driver[fastsched_db.dialect]


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_an_engine_named_in_fastsched_engine(isolation, fastsched_db, fastsched_history):
    await asyncio.to_thread(app.audit, 7)
    assert await fastsched_db.status_of("items", 7) == "audited"
    fastsched_history.assert_transitions("items", 7, ["audited"])


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_a_rolled_back_sync_write_stays_in_the_history_as_such(
    isolation, fastsched_db, fastsched_history
):
    await fastsched_db.insert("items", [{"id": 1}])
    await asyncio.to_thread(app.roll_back_a_write)
    timeline = fastsched_history.timeline("items", 1)
    assert [(each.status, each.rolled_back) for each in timeline] == [
        ("pending", False), ("processing", True)
    ]
    fastsched_history.assert_status("items", 1, "pending")
    assert await fastsched_db.status_of("items", 1) == "pending"


MESSAGES = {
    "operational": "database is locked|canceling statement due to statement timeout",
    "serialization": "could not serialize access due to concurrent update",
}


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_faults_fail_sync_statements_as_the_driver_would(
    isolation, fastsched_db, fastsched_faults
):
    await fastsched_db.insert("items", [{"id": 1}])
    kinds = ["operational"] + (["serialization"] if fastsched_db.dialect == "postgresql" else [])
    for kind in kinds:
        fault = fastsched_faults.fail(r"^UPDATE items SET status", error=kind)
        with pytest.raises(DBAPIError, match=MESSAGES[kind]):
            await asyncio.to_thread(app.roll_back_a_write)
        assert fault.fired == 1
    assert await fastsched_db.status_of("items", 1) == "pending"


@pytest.mark.fastsched(isolation="commit")
async def test_a_disconnect_fault_fails_a_sync_statement(fastsched_db, fastsched_faults):
    await fastsched_db.insert("items", [{"id": 1}])
    fastsched_faults.fail(r"^UPDATE items SET status", error="disconnect")
    with pytest.raises(DBAPIError) as raised:
        await asyncio.to_thread(app.roll_back_a_write)
    assert raised.value.connection_invalidated
    await asyncio.to_thread(app.roll_back_a_write)  # a new connection


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_def_routes_with_depends_get_db(
    isolation, fastsched_client, fastsched_db, fastsched_clock, fastsched_scheduler,
    fastsched_history,
):
    created = (await fastsched_client.post("/items")).json()
    item_id = created["id"]  # PostgreSQL's sequences move on whatever is rolled back
    assert created["status"] == "pending"
    assert await fastsched_db.status_of("items", item_id) == "pending"
    app.scheduler.add_job(app.process_pending, "interval", minutes=5, id="process",
                          executor="threadpool")
    await fastsched_clock.advance(minutes=5)
    final = "completed" if item_id % 2 else "error"
    read = await fastsched_client.get(f"/items/{item_id}")
    assert read.json() == {"id": item_id, "status": final}
    fastsched_history.assert_transitions("items", item_id, ["pending", "processing", final])


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_the_database_clock_reads_virtual_time(isolation, fastsched_db, fastsched_clock):
    def database_now():
        with app.SessionLocal() as session:
            value = session.execute(text("SELECT CURRENT_TIMESTAMP")).scalar_one()
        if isinstance(value, str):  # SQLite: UTC, as text
            return dt.datetime.fromisoformat(value).replace(tzinfo=dt.timezone.utc)
        return value

    await fastsched_clock.advance(minutes=5)
    assert await asyncio.to_thread(database_now) == fastsched_clock.now()


SEEN = []


@pytest.mark.parametrize("isolation", ISOLATIONS * 2)
async def test_a_scoped_session_never_serves_the_next_test(isolation, fastsched_db):
    def count():
        session = app.RequestScoped()
        SEEN.append(session)
        return session.query(app.Item).count()

    await fastsched_db.insert("items", [{"id": 1}])
    assert await asyncio.to_thread(count) == 1
    assert len(set(map(id, SEEN))) == len(SEEN)


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_nothing_is_left(isolation, fastsched_db):
    assert await fastsched_db.fetch("items") == []


@pytest.mark.fastsched(isolation="commit")
async def test_a_sync_session_on_the_loop_under_commit_isolation(
    fastsched_db, fastsched_clock, fastsched_scheduler, fastsched_history
):
    await fastsched_db.insert("items", [{"id": 1}])
    app.scheduler.add_job(app.process_on_the_loop, "interval", minutes=5, id="on_loop")
    await fastsched_clock.advance(minutes=5)
    fastsched_history.assert_transitions("items", 1, ["pending", "processing", "completed"])
    assert fastsched_history.timeline("items", 1)[-1].job_id == "on_loop"


async def test_fails_a_sync_session_on_the_loop_under_rollback(fastsched_db):
    await fastsched_db.insert("items", [{"id": 1}])
    app.process_pending()


async def test_fails_two_sync_jobs_that_overlap_under_rollback(
    fastsched_db, fastsched_clock, fastsched_scheduler
):
    started, release = threading.Event(), threading.Event()
    for job in (app.hold, app.intrude):
        app.scheduler.add_job(job, "interval", minutes=5, id=job.__name__,
                              executor="threadpool", args=(started, release))
    await fastsched_clock.advance(minutes=5)


async def test_fails_a_sync_engine_named_nowhere(fastsched_db):
    def report():
        with app.reports_engine.begin() as connection:
            connection.exec_driver_sql("SELECT 1")

    await asyncio.to_thread(report)
"""


@pytest.fixture(params=["time-machine", "freezegun"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_sync_sessions_engines_and_def_routes(
    pytester: pytest.Pytester, database: str, backend: str, canaries: Canaries
) -> None:
    pytester.makepyfile(app=SYNC_APP, test_sync=SYNC_TESTS)
    pytester.makeini(
        f"""
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
        filterwarnings = error
        fastsched_database = {database}
        fastsched_scheduler = app:scheduler
        fastsched_sessionmaker = app:SessionLocal app:ScopedSession app:RequestScoped
        fastsched_engine = app:audit_engine
        fastsched_metadata = app:Base.metadata
        fastsched_app = app:app
        fastsched_clock_backend = {backend}
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=26, failed=3)
    result.stdout.fnmatch_lines(
        [
            "*_ test_fails_a_sync_session_on_the_loop_under_rollback _*",
            f"E *DatabaseGuardError: {SYNC_ON_LOOP}",
            "*_ test_fails_two_sync_jobs_that_overlap_under_rollback _*",
            "*fastsched_db: two jobs used the shared test connection at the same time: job "
            "'hold' (scheduled 2030-01-01T00:05:00+00:00) still had a session transaction open "
            "when job 'intrude' (scheduled 2030-01-01T00:05:00+00:00) used the connection. Both "
            "were due at 2030-01-01T00:05:00+00:00: jobs due at the same instant run at once.*",
            "*_ test_fails_a_sync_engine_named_nowhere _*",
            "E *DatabaseGuardError: fastsched: database access not allowed: *, by code in the "
            "thread *, through the SQLAlchemy engine *. A test that uses the plugin reaches "
            "only its test database (*). Add that engine to fastsched_engine (or its "
            "sessionmaker to fastsched_sessionmaker) so that each test points it at the test "
            "database, or allow this database with *",
        ]
    )
    canaries.assert_untouched()


NO_PSYCOPG_APP = """
import sys

sys.modules["psycopg"] = None  # as if psycopg 3 were not installed

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")


SessionLocal = sessionmaker()  # bound to nothing: bound for each test
"""

NO_PSYCOPG_TESTS = """
import asyncio

import pytest

import app


async def test_rollback_needs_no_sync_driver(fastsched_db):
    await fastsched_db.insert("items", [{"id": 1}])
    count = await asyncio.to_thread(lambda: app.SessionLocal().query(app.Item).count())
    assert count == 1


@pytest.mark.fastsched(isolation="commit")
async def test_commit_needs_psycopg(fastsched_db):
    pass
"""


def test_commit_isolation_on_postgresql_names_the_missing_sync_driver(
    pytester: pytest.Pytester, postgres_server: EphemeralPostgres
) -> None:
    pytester.makepyfile(app=NO_PSYCOPG_APP, test_no_psycopg=NO_PSYCOPG_TESTS)
    pytester.makeini(
        f"""
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
        filterwarnings = error
        fastsched_database = {postgres_server.url()}
        fastsched_sessionmaker = app:SessionLocal
        fastsched_metadata = app:Base.metadata
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "fastsched_db: the app's sync SQLAlchemy (commit isolation) needs a sync driver for "
            "the test database, postgresql+psycopg, which does not import (import of psycopg "
            "halted; None in sys.modules). Install it: pip install 'psycopg[binary]'."
        ]
    )

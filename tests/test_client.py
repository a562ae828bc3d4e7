"""``fastsched_client``: the app's lifespan and requests on the test's loop, in virtual time."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from conftest import Canaries
from fastapi import APIRouter, FastAPI, Request

from pytest_fastsched import SchedulerHarness, VirtualClock
from pytest_fastsched._client import LifespanError, open_client
from pytest_fastsched._clock import WatchdogTimeout
from pytest_fastsched._options import DOCS

UTC = dt.timezone.utc
START = dt.datetime(2030, 1, 1, tzinfo=UTC)
LIFESPAN_STYLES = ["unconditional", "guarded", "unmanaged"]


# A user's app: its startup, its requests and its 5-minute job use one sessionmaker; the
# lifespan starts and shuts down the scheduler unconditionally.
WEB_APP = """
import os
from contextlib import asynccontextmanager

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from fastapi import FastAPI
from sqlalchemy import String, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")


engine = create_async_engine(os.environ["FASTSCHED_CANARY_URL"])
async_session_factory = async_sessionmaker(engine, expire_on_commit=False)
scheduler = AsyncIOScheduler(timezone="UTC")


async def process_pending():
    async with async_session_factory() as session:
        await session.execute(update(Item).values(status="completed"))
        await session.commit()


@asynccontextmanager
async def lifespan(app):
    async with async_session_factory() as session:
        await session.scalars(select(Item.id).limit(1))
    scheduler.add_job(process_pending, "interval", minutes=5, id="process")
    scheduler.start()
    yield
    scheduler.shutdown()


app = FastAPI(lifespan=lifespan)


@app.post("/items", status_code=201)
async def create_item():
    async with async_session_factory() as session:
        item = Item()
        session.add(item)
        await session.commit()
        return {"id": item.id, "status": item.status}


@app.get("/items/{item_id}")
async def read_item(item_id: int):
    async with async_session_factory() as session:
        item = await session.get(Item, item_id)
        return {"id": item.id, "status": item.status}
"""

WEB_TESTS = """
async def test_requests_and_jobs_share_the_test_database(
    fastsched_client, fastsched_db, fastsched_clock, fastsched_scheduler
):
    created = await fastsched_client.post("/items")
    assert created.json() == {"id": 1, "status": "pending"}
    assert await fastsched_db.status_of("items", 1) == "pending"
    await fastsched_clock.advance(minutes=5)
    fastsched_scheduler.assert_ran("process", times=1)
    assert (await fastsched_client.get("/items/1")).json() == {"id": 1, "status": "completed"}


async def test_the_commits_are_rolled_back(fastsched_db):
    assert await fastsched_db.fetch("items") == []


async def test_needs_the_app(fastsched_client):
    pass
"""


def at(seconds: float) -> dt.datetime:
    return START + dt.timedelta(seconds=seconds)


async def tick() -> None:
    pass


# Built at import, as apps usually are: FastAPI imports pydantic.v1 when it builds the first
# route, and that import fails under freezegun's fake ``datetime.date``.
router = APIRouter()


@router.get("/sleep/{seconds}")
async def sleep(seconds: float, request: Request) -> dict[str, Any]:
    started = dt.datetime.now(UTC)
    await asyncio.sleep(seconds)
    return {
        "started": started.isoformat(),
        "finished": dt.datetime.now(UTC).isoformat(),
        "loop": id(asyncio.get_running_loop()),
        "greeting": request.state.greeting,
    }


@router.get("/hang")
async def hang() -> None:
    await asyncio.Event().wait()


@router.get("/blocking")
def blocking() -> str:
    time.sleep(0.05)
    return dt.datetime.now(UTC).isoformat()


def make_app(scheduler: AsyncIOScheduler, lifespan_style: str) -> FastAPI:
    """An app whose lifespan adds a 10-second job and starts and stops the scheduler.

    ``lifespan_style``: ``unconditional`` calls ``start()`` and ``shutdown()`` as the seed
    does, ``guarded`` checks ``scheduler.running`` first, ``unmanaged`` calls neither.
    """

    def manages(running: bool) -> bool:
        return lifespan_style == "unconditional" or (
            lifespan_style == "guarded" and scheduler.running == running
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        scheduler.add_job(tick, "interval", seconds=10, id="tick")
        if manages(running=False):
            scheduler.start()
        yield {"greeting": "hello"}
        if manages(running=True):
            scheduler.shutdown()

    app = FastAPI(lifespan=lifespan)
    app.include_router(router)
    return app


@pytest.fixture(params=["freezegun", "time-machine"])
def fastsched_clock_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def lifespan_style() -> str:
    return "unconditional"


@pytest.fixture
def scheduler(fastsched_scheduler: SchedulerHarness) -> AsyncIOScheduler:
    app_scheduler = AsyncIOScheduler(timezone="UTC")
    fastsched_scheduler.attach(app_scheduler)
    return app_scheduler


@pytest.fixture
def fastsched_app(scheduler: AsyncIOScheduler, lifespan_style: str) -> FastAPI:
    """The app of this module, built by a factory, instead of the ``fastsched_app`` setting."""
    return make_app(scheduler, lifespan_style)


@pytest.mark.asyncio
@pytest.mark.parametrize("lifespan_style", LIFESPAN_STYLES)
async def test_the_lifespan_starts_the_scheduler_and_its_job_fires_on_advance(
    fastsched_client: httpx.AsyncClient,
    fastsched_clock: VirtualClock,
    fastsched_scheduler: SchedulerHarness,
    scheduler: AsyncIOScheduler,
) -> None:
    assert scheduler.running
    await fastsched_clock.advance(seconds=30)
    assert fastsched_scheduler.run_times("tick") == [at(10), at(20), at(30)]


@pytest.mark.asyncio
async def test_a_sleeping_request_returns_while_time_moves_and_jobs_fire(
    fastsched_client: httpx.AsyncClient,
    fastsched_clock: VirtualClock,
    fastsched_scheduler: SchedulerHarness,
) -> None:
    response = await fastsched_client.get("/sleep/30")
    assert response.json() == {
        "started": START.isoformat(),
        "finished": at(30).isoformat(),
        "loop": id(asyncio.get_running_loop()),
        "greeting": "hello",
    }
    assert fastsched_clock.now() == at(30)
    assert fastsched_scheduler.run_times("tick") == [at(10), at(20), at(30)]


@pytest.mark.asyncio
async def test_concurrent_requests_and_a_concurrent_advance_all_complete(
    fastsched_client: httpx.AsyncClient, fastsched_clock: VirtualClock
) -> None:
    _, long, short = await asyncio.gather(
        fastsched_clock.advance(seconds=10),
        fastsched_client.get("/sleep/45"),
        fastsched_client.get("/sleep/5"),
    )
    assert (short.json()["finished"], long.json()["finished"]) == (
        at(5).isoformat(),
        at(45).isoformat(),
    )
    assert fastsched_clock.now() == at(45)


@pytest.mark.asyncio
async def test_time_holds_while_a_sync_endpoint_runs_in_a_worker_thread(
    fastsched_client: httpx.AsyncClient, fastsched_clock: VirtualClock
) -> None:
    response = await fastsched_client.get("/blocking")
    assert response.json() == START.isoformat()
    assert fastsched_clock.now() == START


@pytest.mark.asyncio
@pytest.mark.parametrize("lifespan_style", LIFESPAN_STYLES)
async def test_no_job_runs_after_the_client_closes(
    fastsched_client: httpx.AsyncClient,
    fastsched_clock: VirtualClock,
    fastsched_scheduler: SchedulerHarness,
    scheduler: AsyncIOScheduler,
) -> None:
    await fastsched_clock.advance(seconds=10)
    await fastsched_client.aclose()
    assert not scheduler.running
    await fastsched_clock.advance(minutes=5)
    assert fastsched_scheduler.run_times("tick") == [at(10)]


@pytest.mark.asyncio
async def test_the_app_takes_over_a_scheduler_the_harness_started(
    fastsched_clock: VirtualClock,
    fastsched_scheduler: SchedulerHarness,
    scheduler: AsyncIOScheduler,
) -> None:
    assert scheduler.running  # started when the clock attached to the test's loop
    app = make_app(scheduler, "unconditional")
    async with open_client(app, fastsched_clock, fastsched_scheduler):
        await fastsched_clock.advance(seconds=10)
    await fastsched_clock.advance(seconds=10)
    assert fastsched_scheduler.run_times("tick") == [at(10)]


@pytest.mark.asyncio
@pytest.mark.parametrize("fastsched_clock_backend", ["freezegun"])
async def test_the_watchdog_names_a_request_that_never_completes(
    fastsched_client: httpx.AsyncClient,
    fastsched_clock: VirtualClock,
    scheduler: AsyncIOScheduler,
) -> None:
    scheduler.remove_job("tick")
    await fastsched_clock.advance(seconds=10)  # past the scheduler's last wake-up
    fastsched_clock.watchdog_seconds = 0.3
    with pytest.raises(WatchdogTimeout) as excinfo:
        await fastsched_client.get("/hang")
    assert str(excinfo.value).startswith(
        "fastsched watchdog: work did not finish within 0.3 real seconds at virtual "
        "2030-01-01T00:00:10+00:00.\n"
        "Still running:\n"
        "  request GET http://testserver/hang (sent at virtual 2030-01-01T00:00:10+00:00)\n"
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("fastsched_clock_backend", ["freezegun"])
@pytest.mark.parametrize("phase", ["startup", "shutdown"])
async def test_a_failing_lifespan_names_the_app_and_its_exception(
    fastsched_clock: VirtualClock, phase: str
) -> None:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.sleep(1)
        if phase == "startup":
            raise RuntimeError("no database configured")
        yield
        raise RuntimeError("cannot close the pool")

    with pytest.raises(LifespanError) as excinfo:
        async with open_client(FastAPI(lifespan=lifespan), fastsched_clock, name="'web:app'"):
            pass
    error = "no database configured" if phase == "startup" else "cannot close the pool"
    assert excinfo.value.args == (
        f"fastsched_client: the lifespan {phase} of the app 'web:app' failed: "
        f"RuntimeError: {error}",
    )
    assert isinstance(excinfo.value.__cause__, RuntimeError)


def test_the_user_suite_shares_the_test_database_and_needs_the_app(
    pytester: pytest.Pytester, canaries: Canaries
) -> None:
    pytester.makepyfile(web=WEB_APP, test_web=WEB_TESTS)
    pytester.makeini(
        """
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
        filterwarnings = error
        fastsched_scheduler = web:scheduler
        fastsched_sessionmaker = web:async_session_factory
        fastsched_metadata = web:Base.metadata
        fastsched_app = web:app
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-k", "not needs_the_app")
    result.assert_outcomes(passed=2, deselected=1)
    canaries.assert_untouched()

    result = pytester.runpytest_subprocess(
        "-o", "fastsched_app=", "-o", "fastsched_scheduler=", "-k", "needs_the_app"
    )
    result.assert_outcomes(errors=1, deselected=2)
    result.stdout.fnmatch_lines(
        [
            "E *UsageError: fastsched_client needs the app: set the ini option "
            "fastsched_app = 'module:attr' (e.g. 'app.main:app') or pass "
            f"--fastsched-app module:attr. See {DOCS}",
        ]
    )


FROZEN_IMPORT = """
import pytest


@pytest.fixture
def fastsched_app(fastsched_clock):
    from late_app import create_app  # imported while the virtual clock runs

    return create_app()


async def test_request(fastsched_client):
    pass
"""

LATE_APP = """
import datetime as dt

from fastapi import FastAPI
from pydantic import BaseModel


class Stamp(BaseModel):
    at: dt.datetime


def create_app():
    return FastAPI()
"""


@pytest.mark.parametrize(
    ("backend", "outcome"), [("freezegun", {"errors": 1}), ("time-machine", {"passed": 1})]
)
def test_an_app_imported_under_freezegun_names_the_fix(
    pytester: pytest.Pytester, backend: str, outcome: dict[str, int]
) -> None:
    pytester.makepyfile(late_app=LATE_APP, test_frozen=FROZEN_IMPORT)
    pytester.makeini(
        f"""
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
        fastsched_clock_backend = {backend}
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(**outcome)
    if backend == "freezegun":
        result.stdout.fnmatch_lines(
            [
                "fastsched_app: the app was imported or built while the virtual clock runs on "
                "freezegun, which then replaces datetime.datetime and datetime.date with fake "
                "classes in every module, so building classes from them fails (here: "
                "PydanticSchemaGenerationError: Unable to generate pydantic-core schema for "
                "*). Import the app's modules before the clock starts (at the top of "
                "conftest.py or the test module, and only call the factory in the fixture), or "
                "use the time-machine backend (fastsched_clock_backend = time-machine)."
            ]
        )

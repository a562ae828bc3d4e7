"""Network I/O a job awaits holds virtual time, at real pace, on both wall-clock backends.

A real local HTTP server (its own event loop in a thread) answers after 0.3 real seconds,
or never; the jobs call it with httpx, aiohttp and asyncio's streams.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Iterator

import aiohttp
import httpx
import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from pytest_fastsched import SchedulerHarness, VirtualClock
from pytest_fastsched._clock import WatchdogTimeout

pytestmark = pytest.mark.asyncio
UTC = dt.timezone.utc
AT = dt.datetime(2030, 1, 1, 0, 1, tzinfo=UTC)
LATENCY = 0.3
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class Server:
    """An HTTP server on 127.0.0.1 that answers after ``delay`` real seconds (never: None)."""

    def __init__(self, delay: float | None) -> None:
        self.delay = delay
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._thread.start()
        self._ready.wait(10)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if self.delay is None:
            await self._stop
        else:
            await asyncio.sleep(self.delay)
            writer.write(RESPONSE)
            await writer.drain()
        writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)


@pytest.fixture(params=["freezegun", "time-machine"])
def fastsched_clock_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def scheduler(fastsched_scheduler: SchedulerHarness) -> AsyncIOScheduler:
    app_scheduler = AsyncIOScheduler(timezone="UTC")
    fastsched_scheduler.attach(app_scheduler)
    return app_scheduler


@pytest.fixture
def slow_server() -> Iterator[Server]:
    server = Server(LATENCY)
    yield server
    server.close()


@pytest.fixture
def silent_server() -> Iterator[Server]:
    server = Server(None)
    yield server
    server.close()


def add_ticks(scheduler: AsyncIOScheduler, ticks: list[dt.datetime]) -> None:
    """Timers keep coming due while the job waits: an interval job every 5 virtual seconds."""

    async def tick() -> None:
        ticks.append(dt.datetime.now(UTC))

    scheduler.add_job(tick, "interval", seconds=5, id="tick")


async def httpx_get(url: str) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(url)).text


async def aiohttp_get(url: str) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        response = await session.get(url)
        return await response.text()


HTTP_CLIENTS = {"httpx": httpx_get, "aiohttp": aiohttp_get}


@pytest.mark.parametrize("client", sorted(HTTP_CLIENTS))
async def test_an_http_call_with_a_timeout_gets_its_answer(
    fastsched_clock: VirtualClock,
    fastsched_scheduler: SchedulerHarness,
    scheduler,
    slow_server,
    client: str,
) -> None:
    ticks: list[dt.datetime] = []

    async def call() -> str:
        return await HTTP_CLIENTS[client](slow_server.url)

    scheduler.add_job(call, "date", run_date=AT + dt.timedelta(seconds=1), id="call")
    add_ticks(scheduler, ticks)
    await fastsched_clock.advance(minutes=2)
    (run,) = fastsched_scheduler.runs_of("call")
    assert (run.outcome, run.retval) == ("success", "ok")
    assert run.finished == run.started == AT + dt.timedelta(seconds=1)  # time held
    assert ticks == [AT + dt.timedelta(seconds=5 * n) for n in range(-11, 13)]


async def test_an_asyncio_stream_read_gets_its_answer(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler, slow_server
) -> None:
    ticks: list[dt.datetime] = []

    async def call() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", slow_server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
        return answer

    scheduler.add_job(call, "date", run_date=AT + dt.timedelta(seconds=1), id="call")
    add_ticks(scheduler, ticks)
    await fastsched_clock.advance(minutes=2)
    (run,) = fastsched_scheduler.runs_of("call")
    assert (run.outcome, run.retval) == ("success", RESPONSE)
    assert run.finished == run.started


@pytest.mark.fastsched(job_errors="record")
async def test_a_server_that_never_answers_times_out_in_real_seconds(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler, silent_server
) -> None:
    ticks: list[dt.datetime] = []

    async def call() -> str:
        async with httpx.AsyncClient(timeout=1.5) as client:
            return (await client.get(silent_server.url)).text

    scheduler.add_job(call, "date", run_date=AT + dt.timedelta(seconds=1), id="call")
    scheduler.add_job(
        lambda: ticks.append(dt.datetime.now(UTC)), "interval", seconds=0.5, id="tick"
    )
    await fastsched_clock.advance(minutes=2)
    (run,) = fastsched_scheduler.runs_of("call")
    assert (run.outcome, type(run.exception)) == ("error", httpx.ReadTimeout)
    # The timeout fires where production's would: 1.5 s after the request, while the jobs
    # due meanwhile ran at their instants.
    assert run.finished == AT + dt.timedelta(seconds=2.5)
    assert ticks == [AT + dt.timedelta(seconds=n / 2) for n in range(-119, 121)]


async def test_a_call_with_no_timeout_that_never_ends_is_ended_by_the_watchdog(
    fastsched_clock: VirtualClock, fastsched_scheduler: SchedulerHarness, scheduler, silent_server
) -> None:
    async def call() -> str:
        async with httpx.AsyncClient(timeout=None) as client:
            return (await client.get(silent_server.url)).text

    scheduler.add_job(call, "date", run_date=AT, id="call")
    fastsched_clock.watchdog_seconds = 1
    with pytest.raises(WatchdogTimeout) as excinfo:
        await fastsched_clock.advance(minutes=2)
    assert str(excinfo.value).splitlines()[:3] == [
        "fastsched watchdog: work did not finish within 1 real seconds at virtual "
        "2030-01-01T00:01:00+00:00.",
        "Still running:",
        "  job 'call' (scheduled 2030-01-01T00:01:00+00:00)",
    ]

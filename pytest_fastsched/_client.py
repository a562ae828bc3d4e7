"""The app served on the test's own event loop, under virtual time (``fastsched_client``).

What a server does for the app, done on the test's loop so that requests, the app's jobs and
the test database all share it:

- the app's lifespan runs through the ASGI lifespan protocol in a task on that loop (httpx's
  ``ASGITransport`` does not run it; starlette's ``TestClient`` would run the app on a loop of
  its own); the lifespan state is handed to each request, as servers do;
- each request goes through httpx's ``ASGITransport`` and is awaited with
  :meth:`VirtualClock.drive_until`: virtual time moves as far as the request needs, and the
  jobs that fall due meanwhile fire, as on a real server;
- the app's own lifespan starts and shuts down its scheduler: the harness does not start it
  first; it only starts what the startup left stopped and stops what the shutdown left running.
  Closing the client is the app's shutdown: no job runs after it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import pytest

from pytest_fastsched import _options
from pytest_fastsched._clock import VirtualClock
from pytest_fastsched._records import current_request
from pytest_fastsched._scheduler import SchedulerHarness

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

BASE_URL = "http://testserver"
"""The base URL of the client: relative URLs such as ``/items`` go to the app."""


class LifespanError(Exception):
    """The app's lifespan startup or shutdown failed; the app's own exception is the cause."""


def resolve_app(path: str | None) -> Any:
    """Import the app of the ``fastsched_app`` setting; an unset or wrong one says how to fix."""
    __tracebackhide__ = True
    if path is None:
        raise pytest.UsageError(
            "fastsched_client needs the app: set the ini option fastsched_app = 'module:attr' "
            "(e.g. 'app.main:app') or pass --fastsched-app module:attr. "
            f"See {_options.DOCS}"
        )
    app = _options.resolve(path, "fastsched_app")
    if not callable(app):
        raise pytest.UsageError(
            f"fastsched_app = {path!r} is a {type(app).__name__}, not an ASGI application: "
            f"point it at the FastAPI instance, e.g. 'app.main:app'"
        )
    return app


@contextlib.asynccontextmanager
async def open_client(
    app: Any,
    clock: VirtualClock,
    harness: SchedulerHarness | None = None,
    *,
    name: str = "under test",
) -> AsyncIterator[httpx.AsyncClient]:
    """Start ``app`` on the running loop under ``clock`` and yield an httpx client on it.

    Call it on the test's loop (an async fixture of the test's loop scope), before the test
    moves time. ``harness`` is the ``fastsched_scheduler`` of the test, if any. On exit, or
    when the test closes the client, the app shuts down. ``name`` names the app in errors.
    """
    __tracebackhide__ = True
    server = _Server(app, clock, harness, name)
    await server.start()
    transport = _VirtualTimeTransport(server.app, clock, server.stop)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        yield client


class _Server:
    """The app, its lifespan, and the hand-over of its scheduler from the harness to the app."""

    def __init__(
        self, app: ASGIApp, clock: VirtualClock, harness: SchedulerHarness | None, name: str
    ) -> None:
        self._clock = clock
        self._harness = harness
        self._lifespan = _Lifespan(app, clock, name)
        self.app = _with_lifespan_state(app, self._lifespan.state)
        self._stopped = False

    async def start(self) -> None:
        __tracebackhide__ = True
        if self._harness is not None:
            self._harness.autostart = False
        self._clock.attach()
        self._clock.add_busy_source(_worker_threads)
        await self._stop_scheduler()
        await self._lifespan.startup()
        scheduler = self._scheduler()
        if scheduler is not None and not scheduler.running:
            scheduler.start()

    async def stop(self) -> None:
        """Run the app's shutdown once; then no job runs any more."""
        __tracebackhide__ = True
        if self._stopped:
            return
        self._stopped = True
        try:
            await self._lifespan.shutdown()
        finally:
            await self._stop_scheduler()

    def _scheduler(self) -> Any:
        return None if self._harness is None else self._harness.scheduler

    async def _stop_scheduler(self) -> None:
        scheduler = self._scheduler()
        if scheduler is not None and scheduler.running:
            scheduler.shutdown(wait=False)
            # AsyncIOScheduler.shutdown() defers its work to the loop: let it run.
            await self._clock.run_until_idle()


class _Lifespan:
    """The app's lifespan, run through the ASGI lifespan protocol in a task on the test's loop."""

    def __init__(self, app: ASGIApp, clock: VirtualClock, name: str) -> None:
        self.state: dict[str, Any] = {}
        self._app = app
        self._clock = clock
        self._name = name
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._phase: str | None = None
        clock.add_describer(self._describe)

    async def startup(self) -> None:
        """Run the app's startup; its failure is a :class:`LifespanError`."""
        __tracebackhide__ = True
        scope: Scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        token = current_request.set(f"the lifespan of the app {self._name}")
        try:
            self._task = asyncio.get_running_loop().create_task(
                _run(self._app(scope, self._inbox.get, self._outbox.put)),
                name="fastsched lifespan",
            )
        finally:
            current_request.reset(token)
        try:
            reply = await self._exchange("startup")
        except BaseException:
            self._task.cancel()  # e.g. the watchdog stopped a startup that never finishes
            raise
        if reply is not None and reply["type"] == "lifespan.startup.complete":
            return
        task, self._task = self._task, None
        if reply is not None or _error_of(task) is not None:
            raise self._failure(task, "startup", reply)
        # The app returned at once: it has no lifespan to run.

    async def shutdown(self) -> None:
        """Run the app's shutdown; its failure is a :class:`LifespanError`."""
        __tracebackhide__ = True
        task = self._task
        if task is None or task.done():
            return
        reply = await self._exchange("shutdown")
        if reply is not None and reply["type"] == "lifespan.shutdown.complete":
            return
        if reply is not None or _error_of(task) is not None:
            raise self._failure(task, "shutdown", reply)

    async def _exchange(self, phase: str) -> Message | None:
        """Send ``lifespan.<phase>`` and wait for the reply (``None``: the app returned)."""
        __tracebackhide__ = True
        self._phase = phase
        self._inbox.put_nowait({"type": f"lifespan.{phase}"})
        try:
            return await self._clock.drive_until(self._reply())
        finally:
            self._phase = None

    async def _reply(self) -> Message | None:
        assert self._task is not None
        reply = asyncio.ensure_future(self._outbox.get())
        try:
            await asyncio.wait([reply, self._task], return_when=asyncio.FIRST_COMPLETED)
            return reply.result() if reply.done() else None
        finally:
            reply.cancel()

    def _failure(
        self, task: asyncio.Task[None], phase: str, reply: Message | None
    ) -> LifespanError:
        error = _error_of(task) if task.done() else None
        if error is not None:
            detail = f"{type(error).__name__}: {error}"
        elif reply is not None and reply["type"] == f"lifespan.{phase}.failed":
            detail = str(reply.get("message") or f"the app sent lifespan.{phase}.failed")
        else:
            detail = f"the app replied {reply!r}"
        failure = LifespanError(
            f"fastsched_client: the lifespan {phase} of the app {self._name} failed: {detail}"
        )
        failure.__cause__ = error
        return failure

    def _describe(self) -> list[str]:
        if self._phase is None:
            return []
        return [f"the lifespan {self._phase} of the app {self._name}"]


async def _run(app_call: Awaitable[None]) -> None:
    await app_call


def _error_of(task: asyncio.Task[None]) -> BaseException | None:
    return None if task.cancelled() else task.exception()


def _with_lifespan_state(app: ASGIApp, state: dict[str, Any]) -> ASGIApp:
    """``app`` with a copy of the lifespan state in each request's scope, as servers do."""

    async def app_with_state(
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "state": dict(state)}
        await app(scope, receive, send)

    return app_with_state


def _worker_threads() -> int:
    """Sync endpoints and dependencies running in anyio's worker threads (FastAPI ``def``)."""
    import anyio.to_thread

    return int(anyio.to_thread.current_default_thread_limiter().borrowed_tokens)


class _VirtualTimeTransport(httpx.AsyncBaseTransport):
    """httpx's ASGI transport, each request awaited while the clock moves time for it."""

    def __init__(
        self, app: ASGIApp, clock: VirtualClock, on_close: Callable[[], Awaitable[None]]
    ) -> None:
        self._asgi = httpx.ASGITransport(app=app)
        self._clock = clock
        self._on_close = on_close
        self._pending: list[str] = []
        clock.add_describer(lambda: list(self._pending))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` to the app; time moves until its response is complete."""
        __tracebackhide__ = True
        sent = self._clock.now().isoformat()
        label = f"request {request.method} {request.url} (sent at virtual {sent})"
        self._pending.append(label)
        token = current_request.set(label)
        try:
            return await self._clock.drive_until(self._asgi.handle_async_request(request))
        finally:
            current_request.reset(token)
            self._pending.remove(label)

    async def aclose(self) -> None:
        """Shut the app down: closing the client is the app's shutdown."""
        __tracebackhide__ = True
        await self._on_close()

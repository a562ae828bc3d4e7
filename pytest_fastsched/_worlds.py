"""The two worlds a test lives in: ``async def`` tests await the fixtures' calls, ``def``
tests make the same calls and get their result.

A ``def`` test has no running event loop. The plugin's async work (moving virtual time, the
database helpers, the app's sync sessions on the test connection) then runs on the loop of
the test's async fixtures (pytest-asyncio runs ``fastsched_db`` on one even for a ``def``
test), or on a loop of the test's own when it has none, each call run to completion before
it returns. In an ``async def`` test (or an async fixture) the same call returns an
awaitable, as it always did.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import types
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

_T = TypeVar("_T")


class WorldError(Exception):
    """A fixture's call made where it cannot run (no loop to run it on, a foreign thread)."""


class NotAwaitedError(AssertionError):
    """An ``async def`` test called a fixture's coroutine and never awaited it."""


class World:
    """Whether one test is a ``def`` test, and the loop its async work runs on then."""

    def __init__(self, sync_test: bool) -> None:
        self.sync_test = sync_test
        self.thread = threading.current_thread()
        """The thread that runs the test (and its fixtures)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._owned = False
        self._calls: list[tuple[str, Coroutine[Any, Any, Any]]] = []
        self._not_awaited: list[NotAwaitedError] = []

    def adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the test's async fixtures run on: a ``def`` test's calls run there."""
        if self._loop is None:
            self._loop = loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop of a ``def`` test's calls, once known."""
        return self._loop

    def loop_of_sync_test(self) -> asyncio.AbstractEventLoop:
        """The loop a ``def`` test's calls run on: its async fixtures' loop, else its own."""
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
            self._owned = True
        return self._loop

    def run(
        self,
        what: str,
        make: Callable[[], Coroutine[Any, Any, _T]],
        error: type[Exception] = WorldError,
    ) -> Any:
        """``make()``'s coroutine to await, or, in a ``def`` test, its result.

        ``what`` names the call in the errors (``fastsched_clock.advance()``), raised as
        ``error``.
        """
        __tracebackhide__ = True
        if _running_loop() is not None:
            return self._note(what, make())
        if not self.sync_test:
            raise error(
                f"{what} was called without await, outside a running event loop, in an async "
                f"test: await it from the test or from an async fixture "
                f"(@pytest_asyncio.fixture). A def test calls it without await."
            )
        if threading.current_thread() is not self.thread:
            raise error(
                f"{what} was called from the thread {threading.current_thread().name!r}: call "
                f"it from the test itself (its thread is {self.thread.name!r})"
            )
        loop = self.loop_of_sync_test()
        if loop.is_running():  # e.g. called from a callback the loop runs in another thread
            raise error(f"{what} was called while the test's loop runs: call it from the test")
        try:
            return loop.run_until_complete(make())
        except BaseException as failed:
            # As in an async test, the failure shows the test's line, not the loop's frames
            # (the same error, its causes kept).
            raise failed.with_traceback(_without_asyncio(failed.__traceback__))  # noqa: B904

    def _note(self, what: str, coro: Coroutine[Any, Any, _T]) -> Coroutine[Any, Any, _T]:
        """Keep ``coro`` until the end of the test, when one never awaited fails it."""
        if len(self._calls) >= _PRUNE_AT:
            self._calls = [(name, call) for name, call in self._calls if _never_started(call)]
        self._calls.append((what, coro))
        return coro

    def never_awaited(self) -> list[NotAwaitedError]:
        """The error that fails the test for the calls it never awaited (none: empty).

        The check that finds them closes those coroutines (Python would only warn when it
        collects them); later checks return the same error.
        """
        names = [name for name, call in self._calls if _never_started(call)]
        if names:
            for _, call in self._calls:
                if _never_started(call):
                    call.close()
            self._calls.clear()
            self._not_awaited.append(NotAwaitedError(_not_awaited(names)))
        return list(self._not_awaited)

    def close(self) -> None:
        """Close the loop the world made for a ``def`` test with no async fixture."""
        if self._owned and self._loop is not None and not self._loop.is_closed():
            loop, self._loop = self._loop, None
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
        self._owned = False


_WORLD_KEY: pytest.StashKey[World] = pytest.StashKey()


_PRUNE_AT = 32
"""Calls kept before those already awaited are forgotten."""


def _never_started(call: Coroutine[Any, Any, Any]) -> bool:
    return inspect.getcoroutinestate(call) == inspect.CORO_CREATED


def _not_awaited(names: list[str]) -> str:
    calls = ", ".join(dict.fromkeys(names))
    return (
        f"fastsched: {calls} returned a coroutine that the test never awaited: it did "
        f"nothing. In an async def test write `await {names[0].removesuffix('()')}(...)`."
    )


def world_of(item: pytest.Item) -> World:
    """The world of ``item``'s test, made on first use."""
    world = item.stash.get(_WORLD_KEY, None)
    if world is None:
        test = getattr(item, "obj", None)
        world = item.stash[_WORLD_KEY] = World(sync_test=not _is_async(test))
    return world


def refuse_in_def_test(item: pytest.Item, fixture: str, use: str) -> None:
    """Fail the set-up of ``fixture`` in a ``def`` test: it can only be ``use``d awaited."""
    if world_of(item).sync_test:
        raise pytest.fail.Exception(
            f"{fixture} is {use}: a def test cannot await it. Make the test async def "
            f"(the other fastsched fixtures work in both).",
            pytrace=False,
        )


def never_awaited(item: pytest.Item) -> list[NotAwaitedError]:
    """The error for the calls ``item``'s test never awaited, if any (see :class:`World`)."""
    world = item.stash.get(_WORLD_KEY, None)
    return [] if world is None else world.never_awaited()


def close_world(item: pytest.Item) -> None:
    """Close ``item``'s world (the loop it made), if it has one."""
    world = item.stash.get(_WORLD_KEY, None)
    if world is not None:
        world.close()


def _is_async(function: Any) -> bool:
    function = inspect.unwrap(function) if function is not None else None
    return function is None or inspect.iscoroutinefunction(function)


_ASYNCIO = os.path.dirname(asyncio.__file__)


def _without_asyncio(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` without the frames of asyncio's own modules (the loop running the call)."""
    kept = []
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_ASYNCIO):
            kept.append(tb)
        tb = tb.tb_next
    result = None
    for entry in reversed(kept):
        result = types.TracebackType(result, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return result


def _running_loop() -> asyncio.AbstractEventLoop | None:
    return asyncio._get_running_loop()

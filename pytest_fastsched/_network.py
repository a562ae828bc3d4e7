"""Network I/O in flight: socket calls awaited on the test's loop hold virtual time.

A job that awaits a response from another service waits in real time; if virtual time
jumped meanwhile, its own timeout (a loop timer) would fire long before the answer came:
``httpx.ReadTimeout`` at a virtual instant minutes later. So while a network call is in
flight, the clock holds virtual time at most as long, in real time, as the distance to the
next loop timer: virtual time moves no faster than real time, exactly as in production. A
response that takes 0.3 s arrives at the same virtual instant unless a timer was due within
0.3 s; a server that never answers makes the call's timeout fire after its length in real
seconds, at the virtual instant production would show; a call with no timeout holds the
clock until the watchdog ends the clock call.

The calls are async functions that wait for a socket (see ``_NETWORK_TARGETS`` in
:mod:`._clock`), counted only when they run on the test's loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

_US = 1_000_000
# Bound at import: inside job runs time.monotonic reads virtual time (see _jobtime).
_REAL_MONOTONIC = time.monotonic


class NetworkCalls:
    """Counts network calls in flight and says whether they still hold virtual time."""

    def __init__(
        self,
        loop: Callable[[], asyncio.AbstractEventLoop | None],
        now_us: Callable[[], int],
        next_timer_us: Callable[[], int | None],
        wake: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._now_us = now_us
        self._next_timer_us = next_timer_us
        self._wake = wake
        self.count = 0
        self._held_at_us = 0
        self._held_since = 0.0

    def enter(self) -> bool:
        """A call starts; ``False`` when it does not run on the test's loop (not counted)."""
        if asyncio.get_running_loop() is not self._loop():
            return False
        if self.count == 0:
            self._held_at_us, self._held_since = self._now_us(), _REAL_MONOTONIC()
        self.count += 1
        return True

    def exit(self) -> None:
        """A counted call ended."""
        self.count -= 1
        self._wake()

    def holding(self) -> int:
        """The calls in flight while they hold virtual time, else 0 (a busy source)."""
        if self.count == 0:
            return 0
        now_us, real_now = self._now_us(), _REAL_MONOTONIC()
        if now_us != self._held_at_us:
            self._held_at_us, self._held_since = now_us, real_now
        next_us = self._next_timer_us()
        if next_us is None or (real_now - self._held_since) * _US < next_us - now_us:
            return self.count
        return 0

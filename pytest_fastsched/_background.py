"""An app's ``BackgroundScheduler`` on the test's event loop, for the length of one test.

A ``BackgroundScheduler`` runs ``_process_jobs()`` in a thread of its own that sleeps on a
``threading.Event`` until the next fire time, and gives each run to its thread pool. Under
virtual time that thread would sleep in real time. While the harness holds it, the
scheduler's class is a subclass of the app's class whose start, wake-up and timer are
``AsyncIOScheduler``'s: ``_process_jobs()`` (APScheduler's own: misfire grace, coalescing,
``max_instances``) runs on the test's loop at the exact instants the triggers give, and the
runs still go to the scheduler's own executors, its thread pool included, as in production.
The instance stays an instance of the app's class (``isinstance`` holds) and gets its own
class back when the test ends; its real thread, if the app started it before the test, is
stopped first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

_STOP_WAIT = 5.0
"""Real seconds to wait for the app's scheduler thread to leave its loop."""


class SchedulerThreadError(RuntimeError):
    """The app's scheduler thread did not stop (it is running a long ``_process_jobs``)."""


def is_background(scheduler: object) -> bool:
    """Whether ``scheduler`` is an APScheduler ``BackgroundScheduler``."""
    from apscheduler.schedulers.background import BackgroundScheduler

    return isinstance(scheduler, BackgroundScheduler)


def on_the_loop(
    scheduler: Any, start: Callable[[Any, bool], Any]
) -> tuple[Callable[[], None], bool]:
    """Run ``scheduler`` (a ``BackgroundScheduler``) on the event loop until the returned
    function puts it back; and whether its real thread was running.

    ``start(scheduler, paused)`` is what the scheduler's ``start()`` does meanwhile (the
    harness routes the app's start through itself). A scheduler whose thread runs (started
    at import) has that thread stopped and is left stopped, with its jobs: the harness
    starts it on the loop.
    """
    original = type(scheduler)
    was_running = stop_thread(scheduler)
    scheduler.__class__ = _loop_class(original)
    scheduler._fastsched_start = start

    def restore() -> None:
        scheduler.__class__ = original
        for name in ("_eventloop", "_timeout", "_fastsched_start"):
            vars(scheduler).pop(name, None)

    return restore, was_running


def loop_start(scheduler: Any, paused: bool = False) -> None:
    """``AsyncIOScheduler.start`` for a ``BackgroundScheduler`` on the loop."""
    from apscheduler.schedulers.base import BaseScheduler

    if not scheduler._eventloop:
        scheduler._eventloop = asyncio.get_running_loop()
    BaseScheduler.start(scheduler, paused)


def stop_thread(scheduler: Any) -> bool:
    """Stop the real thread of a running ``BackgroundScheduler`` and leave it stopped;
    whether it was running.

    Its executors and job stores stay as they are (a shutdown would close its thread pool).
    """
    from apscheduler.schedulers.base import STATE_STOPPED

    thread = vars(scheduler).get("_thread")
    if thread is None or not thread.is_alive():
        return False
    scheduler.state = STATE_STOPPED
    scheduler._event.set()
    thread.join(_STOP_WAIT)
    if thread.is_alive():
        raise SchedulerThreadError(
            f"the thread of {scheduler!r} did not stop within {_STOP_WAIT:g} s: a job "
            f"submission or a listener blocks it. Start the scheduler in the app's lifespan "
            f"(or a fixture) instead of at import, so that the test starts it in virtual time."
        )
    del scheduler._thread
    return True


_CLASSES: dict[type, type] = {}


def _loop_class(original: type) -> type:
    """The subclass of ``original`` (a ``BackgroundScheduler`` class) that runs on a loop:
    ``AsyncIOScheduler``'s own wake-up and timer, a start the harness routes, a shutdown
    made on the loop."""
    from apscheduler.schedulers.asyncio import AsyncIOScheduler, run_in_event_loop

    cls = _CLASSES.get(original)
    if cls is None:
        namespace = {
            "__module__": original.__module__,
            "__qualname__": original.__qualname__,
            "__doc__": original.__doc__,
            "_eventloop": None,
            "_timeout": None,
            "start": _start,
            "shutdown": run_in_event_loop(_shutdown),
            "wakeup": AsyncIOScheduler.wakeup,
            "_start_timer": AsyncIOScheduler._start_timer,
            "_stop_timer": AsyncIOScheduler._stop_timer,
        }
        cls = _CLASSES[original] = type(original.__name__, (original,), namespace)
    return cls


def _start(self: Any, paused: bool = False) -> Any:
    return self._fastsched_start(self, paused)


def _shutdown(self: Any, wait: bool = True) -> None:
    from apscheduler.schedulers.base import BaseScheduler

    BaseScheduler.shutdown(self, wait)
    self._stop_timer()

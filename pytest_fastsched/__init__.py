"""pytest-fastsched: deterministic tests of APScheduler jobs in FastAPI services.

The fixtures (``fastsched_clock``, ``fastsched_scheduler``, ...) come from the plugin; this
module exports the types to annotate them with and the plain assertion helpers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = [
    "Database",
    "DatabaseGuardError",
    "History",
    "HistoryRecord",
    "JobRun",
    "JobRunError",
    "PreparedStatementLeak",
    "SchedulerHarness",
    "VirtualClock",
    "assert_all",
    "assert_processed_once",
    "assert_status",
    "assert_transitions",
    "timeline",
]

if TYPE_CHECKING:
    from pytest_fastsched._asserts import (
        assert_all,
        assert_processed_once,
        assert_status,
        assert_transitions,
        timeline,
    )
    from pytest_fastsched._clock import VirtualClock
    from pytest_fastsched._db import Database, DatabaseGuardError
    from pytest_fastsched._history import History, HistoryRecord
    from pytest_fastsched._prepared import PreparedStatementLeak
    from pytest_fastsched._scheduler import JobRun, JobRunError, SchedulerHarness


def __getattr__(name: str) -> object:
    # Lazy, so that importing the plugin does not import APScheduler or SQLAlchemy.
    if name == "VirtualClock":
        from pytest_fastsched._clock import VirtualClock

        return VirtualClock
    if name in ("JobRun", "JobRunError", "SchedulerHarness"):
        from pytest_fastsched import _scheduler

        return getattr(_scheduler, name)
    if name in ("Database", "DatabaseGuardError"):
        from pytest_fastsched import _db

        return getattr(_db, name)
    if name in ("History", "HistoryRecord"):
        from pytest_fastsched import _history

        return getattr(_history, name)
    if name == "PreparedStatementLeak":
        from pytest_fastsched._prepared import PreparedStatementLeak

        return PreparedStatementLeak
    if name in _ASSERTIONS:
        from pytest_fastsched import _asserts

        return getattr(_asserts, name)
    raise AttributeError(f"module 'pytest_fastsched' has no attribute {name!r}")


_ASSERTIONS = (
    "assert_all",
    "assert_processed_once",
    "assert_status",
    "assert_transitions",
    "timeline",
)

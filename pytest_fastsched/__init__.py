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
    "NotAwaitedError",
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
    from pytest_fastsched._clock import VirtualClock
    from pytest_fastsched._db import Database
    from pytest_fastsched._history import (
        History,
        assert_all,
        assert_processed_once,
        assert_status,
        assert_transitions,
        timeline,
    )
    from pytest_fastsched._isolation import DatabaseGuardError
    from pytest_fastsched._prepared import PreparedStatementLeak
    from pytest_fastsched._records import HistoryRecord, JobRun, JobRunError
    from pytest_fastsched._scheduler import SchedulerHarness
    from pytest_fastsched._worlds import NotAwaitedError

# Where each public name lives. Imported on first use, so that importing the plugin does not
# import APScheduler or SQLAlchemy.
_HOMES = {
    "Database": "_db",
    "DatabaseGuardError": "_isolation",
    "History": "_history",
    "HistoryRecord": "_records",
    "JobRun": "_records",
    "JobRunError": "_records",
    "NotAwaitedError": "_worlds",
    "PreparedStatementLeak": "_prepared",
    "SchedulerHarness": "_scheduler",
    "VirtualClock": "_clock",
    "assert_all": "_history",
    "assert_processed_once": "_history",
    "assert_status": "_history",
    "assert_transitions": "_history",
    "timeline": "_history",
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module 'pytest_fastsched' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"pytest_fastsched.{_HOMES[name]}"), name)

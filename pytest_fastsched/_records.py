"""The plain records the rooms share: the job-run context, the run log and the row history.

Nothing here does anything but hold and describe values, and nothing here imports another
module of the plugin: the scheduler harness writes :class:`JobRun` entries and sets
:data:`current_run` for each job run, the history stamps each :class:`HistoryRecord` with the
run that wrote it, the prepared-statement check names the run of each transaction, and the
assertions read all of them.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime as dt
from typing import Any, Literal, NamedTuple

Outcome = Literal["running", "success", "error", "missed", "skipped"]
Kind = Literal["existing", "insert", "status", "columns"]


def format_time(instant: dt.datetime | None) -> str:
    """A virtual instant as the failures show it: ``2030-01-01 00:05:00+00:00`` (UTC)."""
    if instant is None:
        return "-"
    return instant.astimezone(dt.timezone.utc).isoformat(sep=" ")


# -- the job-run context ---------------------------------------------------------------------


class RunRef(NamedTuple):
    """The job run some code runs in: the job's id, the run's scheduled time, the replica.

    A named tuple: one is made for every fire, and a tuple is the cheapest immutable record.
    """

    job_id: str
    scheduled: dt.datetime
    replica: int = 0

    def describe(self) -> str:
        """``job 'x' (scheduled 2030-01-01T00:05:00+00:00)``, and `` on replica N`` on one."""
        replica = f" on replica {self.replica}" if self.replica else ""
        return f"job {self.job_id!r} (scheduled {self.scheduled.isoformat()}){replica}"


current_run: contextvars.ContextVar[RunRef | None] = contextvars.ContextVar(
    "fastsched_current_run", default=None
)
"""The job run of the running code: set in each job's task (and the executor threads it
starts), ``None`` in the test itself. ``fastsched_history`` stamps each write with it."""

current_request: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fastsched_current_request", default=None
)
"""What of the app ``fastsched_client`` runs: ``"request GET http://testserver/items"`` or
``"the app's lifespan startup"``; ``None`` outside requests and the lifespan."""


# -- the run log -----------------------------------------------------------------------------


class JobRunError(AssertionError):
    """A job raised an exception (or could not run) while the clock was moving time."""


JobRunError.__module__ = "pytest_fastsched"  # shown by its public name


@dataclasses.dataclass(slots=True)
class JobRun:
    """One run (or missed / skipped run) of a job, in virtual time."""

    job_id: str
    scheduled: dt.datetime
    started: dt.datetime | None
    finished: dt.datetime | None = None
    outcome: Outcome = "running"
    exception: BaseException | None = None
    traceback: str | None = None
    retval: Any = None
    manual: bool = False
    replica: int = 0
    """Which copy of the app's scheduler ran it: 0 is the app's own, 1... its replicas."""

    def describe(self) -> str:
        """One aligned line of the run log."""
        where = "manual" if self.manual else "scheduled"
        replica = f"  replica {self.replica}" if self.replica else ""
        line = f"{self.job_id}{replica}  {where} {self.scheduled.isoformat()}  {self.outcome}"
        if self.finished is not None and self.started is not None:
            line += f"  ({(self.finished - self.started).total_seconds():g}s)"
        if self.exception is not None:
            line += f"  {type(self.exception).__name__}: {self.exception}"
        return line


# -- the row history -------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class HistoryRecord:
    """One recorded write to a tracked row, in virtual time.

    ``kind`` is ``"insert"`` (the row was inserted), ``"status"`` (its status column was
    written, possibly with the value it already had: then ``same_value``), ``"columns"`` (only
    its error column or other recorded columns changed) or ``"existing"`` (the row was there
    when recording started). ``status`` and ``last_error`` (the error column) and ``values``
    (the other recorded columns) are the row's values after the write; ``old_status`` is the
    status before it (``None`` for an insert). ``job_id`` and ``scheduled`` name the job run
    that wrote it, ``None`` when the test (a fixture, a request of the test client) did;
    ``replica`` which copy of the scheduler ran it (0: the app's own). ``rolled_back`` is true
    when the transaction or savepoint of the write was rolled back.
    """

    table: str
    key: Any
    kind: Kind
    at: dt.datetime
    old_status: Any
    status: Any
    last_error: Any
    values: dict[str, Any]
    job_id: str | None
    scheduled: dt.datetime | None
    rolled_back: bool = False
    seq: int = 0
    replica: int = 0

    @property
    def same_value(self) -> bool:
        """The status was written with the value it already had."""
        return self.kind == "status" and self.old_status == self.status

    @property
    def by(self) -> str:
        """``"test"``, or the job run: ``"<job id> (scheduled <time>)"``."""
        if self.job_id is None:
            return "test"
        replica = f", replica {self.replica}" if self.replica else ""
        return f"{self.job_id} (scheduled {format_time(self.scheduled)}{replica})"

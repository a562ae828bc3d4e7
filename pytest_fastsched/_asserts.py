"""The assertions of pytest-fastsched and their failure messages, all in one style.

A failure says in one line what went wrong (pytest puts ``AssertionError:`` before it and
shows it in the short summary), then what was expected and what happened, aligned under each
other, then the whole story in virtual time as an aligned table::

    items[1] went through other statuses than expected
    items[1]: expected pending -> processing -> completed
              got      pending -> processing -> error   (at 2030-01-01 00:05:00+00:00, ...)
    items[1] in virtual time:
      at                         status      last_error  note      by
      2030-01-01 00:00:00+00:00  pending     None        inserted  test
      ...

The row assertions work on the records of ``fastsched_history`` (:mod:`._history`); the plain
functions exported from ``pytest_fastsched`` use the history of the running test. The job run
assertion of ``fastsched_scheduler`` and the ``--fastsched-timeline`` report use the same
helpers. This module imports nothing heavy: the scheduler harness imports it.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_fastsched._history import History, HistoryRecord, Tracked
    from pytest_fastsched._scheduler import JobRun


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""The default of ``last_error=``: the error column is not checked."""

_SHOWN_ROWS = 10  # timelines shown in one failure
_SHOWN_RUNS = 5  # scheduled times listed in one line of assert_ran's failure


# -- formatting ----------------------------------------------------------------------------


def format_time(instant: dt.datetime | None) -> str:
    """A virtual instant as the failures show it: ``2030-01-01 00:05:00+00:00`` (UTC)."""
    if instant is None:
        return "-"
    return instant.astimezone(dt.timezone.utc).isoformat(sep=" ")


def mismatch(subject: str, expected: str, got: str, detail: str | None = None) -> list[str]:
    """The first two lines of a failure: what was expected, and under it what happened."""
    second = f"{' ' * (len(subject) + 2)}got      {got}"
    if detail:
        second += f"   ({detail})"
    return [f"{subject}: expected {expected}", second]


def aligned(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """``rows`` as lines of left-aligned columns, two spaces apart; empty columns dropped."""
    columns = range(max((len(row) for row in rows), default=0))
    used = [i for i in columns if any(i < len(row) and row[i] for row in rows[1:])]
    widths = {i: max(len(row[i]) if i < len(row) else 0 for row in rows) for i in used}
    return [
        (
            indent + "  ".join((row[i] if i < len(row) else "").ljust(widths[i]) for i in used)
        ).rstrip()
        for row in rows
    ]


def show_key(table: str, key: Any) -> str:
    """``items[1]``, ``pairs[1, 'a']``, ``docs['6f1c...']``: a row as the failures name it."""
    parts = key if isinstance(key, tuple) else (key,)
    return f"{table}[{', '.join(_show_key_part(part) for part in parts)}]"


def _show_key_part(part: Any) -> str:
    if isinstance(part, (int, float)) and not isinstance(part, bool):
        return str(part)
    return repr(str(part)) if type(part).__name__ == "UUID" else repr(part)


def _show_status(status: Any) -> str:
    return status if isinstance(status, str) else repr(status)


def _statuses(statuses: Iterable[Any]) -> str:
    shown = " -> ".join(_show_status(status) for status in statuses)
    return shown or "(no status written)"


def _note(record: HistoryRecord) -> str:
    notes = {
        "existing": "before recording",
        "insert": "inserted",
        "columns": "status not written",
        "status": "same value" if record.same_value else "",
    }
    note = notes[record.kind]
    if record.rolled_back:
        note = f"{note}, rolled back" if note else "rolled back"
    return note


def row_timeline(tracked: Tracked, key: Any, records: Sequence[HistoryRecord]) -> list[str]:
    """The aligned timeline of one row: each write, its values, its note and its job run."""
    header = ["at", "status", *([tracked.error] if tracked.error else []), *tracked.others]
    rows = [[*header, "note", "by"]]
    for record in records:
        values = [repr(record.last_error)] if tracked.error else []
        values += [repr(record.values.get(name)) for name in tracked.others]
        rows.append(
            [
                format_time(record.at),
                _show_status(record.status),
                *values,
                _note(record),
                record.by,
            ]
        )
    return [f"{show_key(tracked.name, key)} in virtual time:", *aligned(rows)]


def _timelines(
    tracked: Tracked, rows: dict[Any, list[HistoryRecord]], keys: list[Any]
) -> list[str]:
    lines: list[str] = []
    for key in keys[:_SHOWN_ROWS]:
        lines += row_timeline(tracked, key, rows[key])
    if len(keys) > _SHOWN_ROWS:
        lines.append(f"... and {len(keys) - _SHOWN_ROWS} more rows")
    return lines


def _fail(summary: str, lines: list[str]) -> AssertionError:
    return AssertionError("\n".join([summary, *lines]))


# -- what the records say ------------------------------------------------------------------


def effective(records: Iterable[HistoryRecord]) -> list[HistoryRecord]:
    """The records whose writes stayed: those not rolled back."""
    return [record for record in records if not record.rolled_back]


def status_sequence(records: Iterable[HistoryRecord]) -> list[Any]:
    """The statuses a row went through: its first known status, then each status write."""
    sequence: list[Any] = []
    for record in effective(records):
        if record.kind in ("existing", "insert"):
            sequence.append(record.status)
        elif record.kind == "status":
            if not sequence:
                sequence.append(record.old_status)
            sequence.append(record.status)
    return sequence


def same_status(recorded: Any, expected: Any) -> bool:
    """``recorded`` is ``expected``; an ``Enum`` member also matches its name or value."""
    if recorded == expected:
        return True
    return isinstance(expected, enum.Enum) and recorded in (expected.name, expected.value)


def _last(records: Sequence[HistoryRecord]) -> HistoryRecord | None:
    stayed = effective(records)
    return stayed[-1] if stayed else None


def _where(tracked: Tracked, record: HistoryRecord | None) -> str | None:
    if record is None:
        return None
    detail = f"at {format_time(record.at)}"
    if tracked.error:
        detail += f", {tracked.error}={record.last_error!r}"
    return detail


# -- the row assertions --------------------------------------------------------------------


def check_transitions(history: History, table: str, key: Any, statuses: Sequence[Any]) -> None:
    """The row went through exactly ``statuses``, in order (see ``History``)."""
    __tracebackhide__ = True
    if isinstance(statuses, (str, bytes)) or not isinstance(statuses, Sequence):
        raise TypeError(
            f"assert_transitions() takes the statuses as a list, e.g. "
            f"['pending', 'processing', 'completed'], not {statuses!r}"
        )
    tracked, row_key, records = history.row(table, key)
    sequence = status_sequence(records)
    if len(sequence) == len(statuses) and all(map(same_status, sequence, statuses)):
        return
    label = show_key(tracked.name, row_key)
    raise _fail(
        f"{label} went through other statuses than expected",
        [
            *mismatch(
                label,
                _statuses(statuses),
                _statuses(sequence),
                _where(tracked, _last(records)),
            ),
            *row_timeline(tracked, row_key, records),
        ],
    )


def check_status(
    history: History,
    table: str,
    key: Any,
    status: Any,
    last_error: Any = UNSET,
    last_error_match: str | None = None,
) -> None:
    """The row ended in ``status`` (and its error column as ``last_error`` says)."""
    __tracebackhide__ = True
    expected_error = _error_check(last_error, last_error_match)
    tracked = history.table(table)
    if expected_error is not UNSET and tracked.error is None:
        raise TypeError(
            f"{tracked.name} has no error column recorded, so last_error cannot be checked: "
            f"name it with fastsched_track = {tracked.name}:{tracked.status}:ERROR_COLUMN or "
            f"@pytest.mark.fastsched(track={{{tracked.name!r}: "
            f"({tracked.status!r}, 'ERROR_COLUMN')}})"
        )
    tracked, row_key, records = history.row(table, key)
    last = _last(records)
    expected = _show_status(status)
    got = "(no status written)" if last is None else _show_status(last.status)
    matches = last is not None and same_status(last.status, status)
    if expected_error is not UNSET:
        expected += f", {tracked.error}{_describe_error_check(expected_error)}"
        if last is not None:
            got += f", {tracked.error}={last.last_error!r}"
            matches = matches and _error_matches(last.last_error, expected_error)
    if matches:
        return
    detail = None if last is None else f"at {format_time(last.at)}, by {last.by}"
    label = show_key(tracked.name, row_key)
    raise _fail(
        f"{label} did not end as expected",
        [
            *mismatch(label, expected, got, detail),
            *row_timeline(tracked, row_key, records),
        ],
    )


def _error_check(last_error: Any, last_error_match: str | None) -> Any:
    __tracebackhide__ = True
    if last_error_match is not None:
        if last_error is not UNSET:
            raise TypeError("give last_error= or last_error_match=, not both")
        if not isinstance(last_error_match, str):
            raise TypeError(
                f"last_error_match= takes a regular expression as a str, not {last_error_match!r}"
            )
        try:
            return re.compile(last_error_match)
        except re.error as error:
            raise ValueError(
                f"last_error_match={last_error_match!r} is not a valid regular expression: {error}"
            ) from None
    if isinstance(last_error, re.Pattern) and not isinstance(last_error.pattern, str):
        raise TypeError(
            f"last_error={last_error!r} is a bytes pattern; the error column holds text: "
            f"compile a str, e.g. re.compile({last_error.pattern.decode(errors='replace')!r})"
        )
    if last_error is UNSET or last_error is None or isinstance(last_error, (str, re.Pattern)):
        return last_error
    raise TypeError(
        f"last_error= takes the exact text (a str), a compiled regular expression "
        f"(re.compile(...), matched with search) or None (no error), not {last_error!r}"
    )


def _describe_error_check(expected: Any) -> str:
    if isinstance(expected, re.Pattern):
        return f" matching {expected.pattern!r}"
    return f"={expected!r}"


def _error_matches(value: Any, expected: Any) -> bool:
    if isinstance(expected, re.Pattern):
        return isinstance(value, str) and expected.search(value) is not None
    return bool(value == expected)


def check_all(history: History, table: str, status: Any) -> None:
    """Every row of ``table`` the history saw ended in ``status``."""
    __tracebackhide__ = True
    tracked, rows = history.rows(table)
    finals = {key: _last(records) for key, records in rows.items()}
    elsewhere = [
        key for key, last in finals.items() if last is None or not same_status(last.status, status)
    ]
    if rows and not elsewhere:
        return
    if not rows:
        got = f"no rows (this test wrote none to {tracked.name})"
    else:
        where = ", ".join(
            f"{show_key(tracked.name, key)} in {_final_status(finals[key])}"
            for key in elsewhere[:_SHOWN_ROWS]
        )
        got = f"{len(elsewhere)} of {len(rows)} rows elsewhere: {where}"
    raise _fail(
        f"not every row of {tracked.name} ended in {_show_status(status)}",
        [
            *mismatch(tracked.name, f"every row to end in {_show_status(status)}", got),
            *_timelines(tracked, rows, elsewhere),
        ],
    )


def _final_status(last: HistoryRecord | None) -> str:
    return "(no status)" if last is None else _show_status(last.status)


def check_processed_once(history: History, table: str) -> None:
    """No row of ``table`` had its status set to the value it already had."""
    __tracebackhide__ = True
    tracked, rows = history.rows(table)
    twice = {
        key: [record for record in effective(records) if record.same_value]
        for key, records in rows.items()
    }
    offending = [key for key, writes in twice.items() if writes]
    if not offending:
        return
    shown = ", ".join(
        f"{show_key(tracked.name, key)} ({_statuses([twice[key][0].status] * 2)})"
        for key in offending[:_SHOWN_ROWS]
    )
    many = len(offending) > 1
    count = f"{len(offending)} row{'s' if many else ''}"
    raise _fail(
        f"{count} of {tracked.name} had {'their' if many else 'its'} status set to the value "
        f"{'they' if many else 'it'} already had",
        [
            *mismatch(
                tracked.name,
                "no row to have its status set to the value it already had",
                f"{count} written again with the same status "
                f"(two workers processing the same row?): {shown}",
            ),
            *_timelines(tracked, rows, offending),
        ],
    )


# -- the plain functions: the history of the running test -----------------------------------

_ACTIVE: list[History] = []


def activate(history: History) -> None:
    """Make ``history`` the one the plain functions use (the fixture calls this)."""
    _ACTIVE.append(history)


def deactivate(history: History) -> None:
    """Stop using ``history`` (the fixture calls this at the end of its test)."""
    if history in _ACTIVE:
        _ACTIVE.remove(history)


def _active(function: str) -> History:
    __tracebackhide__ = True
    if not _ACTIVE:
        raise pytest.UsageError(
            f"pytest_fastsched.{function}() checks the history of the running test: request "
            f"the fastsched_history fixture in the test (or in a fixture it uses)"
        )
    return _ACTIVE[-1]


def assert_transitions(table: str, key: Any, statuses: Sequence[Any]) -> None:
    """Assert that the row ``key`` of ``table`` went through exactly ``statuses``.

    The history of the running test (``fastsched_history``); see
    :meth:`History.assert_transitions`.
    """
    __tracebackhide__ = True
    check_transitions(_active("assert_transitions"), table, key, statuses)


def assert_status(
    table: str,
    key: Any,
    status: Any,
    *,
    last_error: Any = UNSET,
    last_error_match: str | None = None,
) -> None:
    """Assert that the row ``key`` of ``table`` ended in ``status``; see
    :meth:`History.assert_status`."""
    __tracebackhide__ = True
    check_status(_active("assert_status"), table, key, status, last_error, last_error_match)


def assert_all(table: str, status: Any) -> None:
    """Assert that every row of ``table`` ended in ``status``; see :meth:`History.assert_all`."""
    __tracebackhide__ = True
    check_all(_active("assert_all"), table, status)


def assert_processed_once(table: str) -> None:
    """Assert that no row of ``table`` had its status set to the value it already had; see
    :meth:`History.assert_processed_once`."""
    __tracebackhide__ = True
    check_processed_once(_active("assert_processed_once"), table)


def timeline(table: str, key: Any) -> list[HistoryRecord]:
    """The records of the row ``key`` of ``table``; see :meth:`History.timeline`."""
    __tracebackhide__ = True
    return _active("timeline").timeline(table, key)


# -- fastsched_scheduler.assert_ran --------------------------------------------------------


def ran_failure(job_id: str, problem: tuple[str, str], runs: Sequence[JobRun], now: str) -> str:
    """The failure of ``assert_ran``: expected and got, then the job's runs in virtual time."""
    return "\n".join(
        [
            f"job {job_id!r} did not run as expected",
            *mismatch(f"job {job_id!r}", *problem),
            f"runs of {job_id!r} in virtual time (now {now}):",
            *run_table(runs),
        ]
    )


def run_times(times: Sequence[dt.datetime]) -> str:
    """Scheduled times, the first few of them: ``runs at 00:05, 00:10, ... (12 in all)``."""
    if not times:
        return "no runs"
    shown = ", ".join(format_time(instant) for instant in times[:_SHOWN_RUNS])
    more = f", ... ({len(times)} in all)" if len(times) > _SHOWN_RUNS else ""
    return f"runs at {shown}{more}"


def run_table(runs: Sequence[JobRun]) -> list[str]:
    """The aligned run log: scheduled, started and finished times, and the outcome."""
    if not runs:
        return ["  (no runs)"]
    rows = [["scheduled", "started", "finished", "outcome"]]
    for run in runs:
        rows.append(
            [
                format_time(run.scheduled),
                format_time(run.started),
                format_time(run.finished),
                _outcome(run),
            ]
        )
    return aligned(rows)


def _outcome(run: JobRun) -> str:
    outcome = f"{run.outcome} (manual)" if run.manual else run.outcome
    if run.exception is not None:
        outcome += f": {type(run.exception).__name__}: {run.exception}"
    return outcome


# -- the --fastsched-timeline report -------------------------------------------------------


def timeline_report(history: History | None, runs: Sequence[JobRun]) -> str | None:
    """The compact timeline of one test: its job runs and row writes in virtual time.

    Consecutive runs of a job that succeeded without writing a tracked row are one line.
    ``None`` when the test has neither runs nor writes.
    """
    records = history.all_records() if history is not None else []
    error_columns = {} if history is None else {n: t.error for n, t in history.tracked.items()}
    wrote = {(record.job_id, record.scheduled, record.replica) for record in records}
    numbers = _run_numbers(runs)
    events: list[_Event] = []
    for index, run in enumerate(runs):
        name = f"{run.job_id} #{numbers[id(run)]}"
        if run.started is not None:
            quiet = _quiet(run, wrote)
            started = "started manually" if run.manual else "started"
            events.append((run.started, 0, index, run if quiet else [name, started, ""]))
            if quiet:
                continue
        if run.finished is not None and run.outcome != "running":
            events.append((run.finished, 2, index, [name, _run_end(run), ""]))
    for record in records:
        error_column = error_columns[record.table]
        by = "test" if record.job_id is None else _run_name(record, runs, numbers)
        what = show_key(record.table, record.key)
        events.append((record.at, 1, record.seq, [what, _write(record, error_column), by]))
    if not events:
        return None
    events.sort(key=lambda event: event[:3])
    rows = [["at", "what", "event", "by"]]
    rows += [[format_time(at), *cells] for at, cells in _fold_quiet_runs(events, numbers)]
    return "\n".join(aligned(rows, indent=""))


_Event = tuple[dt.datetime, int, int, "list[str] | JobRun"]


def _quiet(run: JobRun, wrote: set[tuple[str | None, dt.datetime | None, int]]) -> bool:
    """A scheduled run that succeeded and wrote no tracked row."""
    ran = (run.job_id, run.scheduled, getattr(run, "replica", 0))
    return run.outcome == "success" and not run.manual and ran not in wrote


def _fold_quiet_runs(
    events: list[_Event], numbers: dict[int, int]
) -> list[tuple[dt.datetime, list[str]]]:
    """The events' lines, with each stretch of quiet runs of one job as one line."""
    lines: list[tuple[dt.datetime, list[str]]] = []
    stretch: list[tuple[dt.datetime, JobRun]] = []

    def close_stretch() -> None:
        if not stretch:
            return
        (at, first), last = stretch[0], stretch[-1][1]
        name, text = f"{first.job_id} #{numbers[id(first)]}", "succeeded, wrote nothing"
        if len(stretch) > 1:
            name += f"-#{numbers[id(last)]}"
            text = f"{len(stretch)} runs succeeded, wrote nothing"
        lines.append((at, [name, text, ""]))
        stretch.clear()

    for at, _, _, item in events:
        if isinstance(item, list):
            close_stretch()
            lines.append((at, item))
            continue
        if stretch and stretch[0][1].job_id != item.job_id:
            close_stretch()
        stretch.append((at, item))
    close_stretch()
    return lines


def _run_numbers(runs: Sequence[JobRun]) -> dict[int, int]:
    counts: dict[str, int] = {}
    numbers = {}
    for run in runs:
        counts[run.job_id] = counts.get(run.job_id, 0) + 1
        numbers[id(run)] = counts[run.job_id]
    return numbers


def _run_end(run: JobRun) -> str:
    scheduled = f"(scheduled {format_time(run.scheduled)})"
    if run.outcome == "missed":
        return f"missed {scheduled}"
    if run.outcome == "skipped":
        return f"skipped: max_instances reached {scheduled}"
    return _outcome(run)


def _run_name(record: HistoryRecord, runs: Sequence[JobRun], numbers: dict[int, int]) -> str:
    for run in runs:
        ran = (run.job_id, run.scheduled, getattr(run, "replica", 0))
        if ran == (record.job_id, record.scheduled, record.replica) and run.started is not None:
            return f"{run.job_id} #{numbers[id(run)]}"
    return record.by


def _write(record: HistoryRecord, error_column: str | None) -> str:
    if record.kind == "insert":
        text = f"inserted {_show_status(record.status)}"
    elif record.kind == "existing":
        text = f"{_show_status(record.status)} (before recording)"
    elif record.kind == "columns":
        text = "status not written"
    else:
        text = _statuses([record.old_status, record.status])
        if record.same_value:
            text += " (same value)"
    if error_column and record.last_error is not None:
        text += f", {error_column}={record.last_error!r}"
    if record.rolled_back:
        text += " (rolled back)"
    return text

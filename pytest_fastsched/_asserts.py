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

Every function here works on plain records (:mod:`._records`) and the columns of a tracked
table (:class:`~._options.TrackSpec`), and returns or raises: ``fastsched_history`` looks the
rows up and calls the row assertions, ``fastsched_scheduler`` calls the run-log assertion, and
the ``--fastsched-timeline`` report is built from both. Nothing here calls back into them, and
nothing heavy is imported: the scheduler harness imports this module.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pytest_fastsched._options import TrackSpec
from pytest_fastsched._records import HistoryRecord, JobRun, format_time


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""The default of ``last_error=``: the error column is not checked."""

_SHOWN_ROWS = 10  # timelines shown in one failure
_SHOWN_RUNS = 5  # scheduled times listed in one line of assert_ran's failure


# -- formatting ----------------------------------------------------------------------------


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


def row_timeline(columns: TrackSpec, key: Any, records: Sequence[HistoryRecord]) -> list[str]:
    """The aligned timeline of one row: each write, its values, its note and its job run."""
    header = ["at", "status", *([columns.error] if columns.error else []), *columns.others]
    rows = [[*header, "note", "by"]]
    for record in records:
        values = [repr(record.last_error)] if columns.error else []
        values += [repr(record.values.get(name)) for name in columns.others]
        rows.append(
            [
                format_time(record.at),
                _show_status(record.status),
                *values,
                _note(record),
                record.by,
            ]
        )
    return [f"{show_key(columns.table, key)} in virtual time:", *aligned(rows)]


def _timelines(
    columns: TrackSpec, rows: Mapping[Any, Sequence[HistoryRecord]], keys: list[Any]
) -> list[str]:
    lines: list[str] = []
    for key in keys[:_SHOWN_ROWS]:
        lines += row_timeline(columns, key, rows[key])
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


def _where(columns: TrackSpec, record: HistoryRecord | None) -> str | None:
    if record is None:
        return None
    detail = f"at {format_time(record.at)}"
    if columns.error:
        detail += f", {columns.error}={record.last_error!r}"
    return detail


# -- the row assertions --------------------------------------------------------------------
# Each takes the columns of the tracked table and the records of the rows concerned, looked
# up by fastsched_history; the argument checks come first, so a wrong call fails as such
# before any lookup.


def check_statuses_argument(statuses: object) -> None:
    """``assert_transitions()`` takes a list of statuses."""
    __tracebackhide__ = True
    if isinstance(statuses, (str, bytes)) or not isinstance(statuses, Sequence):
        raise TypeError(
            f"assert_transitions() takes the statuses as a list, e.g. "
            f"['pending', 'processing', 'completed'], not {statuses!r}"
        )


def check_transitions(
    columns: TrackSpec, key: Any, records: Sequence[HistoryRecord], statuses: Sequence[Any]
) -> None:
    """The row went through exactly ``statuses``, in order (see ``History``)."""
    __tracebackhide__ = True
    sequence = status_sequence(records)
    if len(sequence) == len(statuses) and all(map(same_status, sequence, statuses)):
        return
    label = show_key(columns.table, key)
    raise _fail(
        f"{label} went through other statuses than expected",
        [
            *mismatch(
                label,
                _statuses(statuses),
                _statuses(sequence),
                _where(columns, _last(records)),
            ),
            *row_timeline(columns, key, records),
        ],
    )


def error_check(last_error: Any, last_error_match: str | None) -> Any:
    """What ``last_error=`` / ``last_error_match=`` ask for: ``UNSET``, a text, a pattern."""
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


def check_error_column(columns: TrackSpec, expected_error: Any) -> None:
    """An error check needs the table's error column."""
    __tracebackhide__ = True
    if expected_error is not UNSET and columns.error is None:
        raise TypeError(
            f"{columns.table} has no error column recorded, so last_error cannot be checked: "
            f"name it with fastsched_track = {columns.table}:{columns.status}:ERROR_COLUMN or "
            f"@pytest.mark.fastsched(track={{{columns.table!r}: "
            f"({columns.status!r}, 'ERROR_COLUMN')}})"
        )


def check_status(
    columns: TrackSpec,
    key: Any,
    records: Sequence[HistoryRecord],
    status: Any,
    expected_error: Any = UNSET,
) -> None:
    """The row ended in ``status``, and its error column as ``expected_error`` (from
    :func:`error_check`) says."""
    __tracebackhide__ = True
    last = _last(records)
    expected = _show_status(status)
    got = "(no status written)" if last is None else _show_status(last.status)
    matches = last is not None and same_status(last.status, status)
    if expected_error is not UNSET:
        expected += f", {columns.error}{_describe_error_check(expected_error)}"
        if last is not None:
            got += f", {columns.error}={last.last_error!r}"
            matches = matches and _error_matches(last.last_error, expected_error)
    if matches:
        return
    detail = None if last is None else f"at {format_time(last.at)}, by {last.by}"
    label = show_key(columns.table, key)
    raise _fail(
        f"{label} did not end as expected",
        [
            *mismatch(label, expected, got, detail),
            *row_timeline(columns, key, records),
        ],
    )


def _describe_error_check(expected: Any) -> str:
    if isinstance(expected, re.Pattern):
        return f" matching {expected.pattern!r}"
    return f"={expected!r}"


def _error_matches(value: Any, expected: Any) -> bool:
    if isinstance(expected, re.Pattern):
        return isinstance(value, str) and expected.search(value) is not None
    return bool(value == expected)


def check_all(
    columns: TrackSpec, rows: Mapping[Any, Sequence[HistoryRecord]], status: Any
) -> None:
    """Every row of the table the history saw (``rows``, by key) ended in ``status``."""
    __tracebackhide__ = True
    finals = {key: _last(records) for key, records in rows.items()}
    elsewhere = [
        key for key, last in finals.items() if last is None or not same_status(last.status, status)
    ]
    if rows and not elsewhere:
        return
    if not rows:
        got = f"no rows (this test wrote none to {columns.table})"
    else:
        where = ", ".join(
            f"{show_key(columns.table, key)} in {_final_status(finals[key])}"
            for key in elsewhere[:_SHOWN_ROWS]
        )
        got = f"{len(elsewhere)} of {len(rows)} rows elsewhere: {where}"
    raise _fail(
        f"not every row of {columns.table} ended in {_show_status(status)}",
        [
            *mismatch(columns.table, f"every row to end in {_show_status(status)}", got),
            *_timelines(columns, rows, elsewhere),
        ],
    )


def _final_status(last: HistoryRecord | None) -> str:
    return "(no status)" if last is None else _show_status(last.status)


def check_processed_once(columns: TrackSpec, rows: Mapping[Any, Sequence[HistoryRecord]]) -> None:
    """No row of the table (``rows``, by key) had its status set to the value it already had."""
    __tracebackhide__ = True
    twice = {
        key: [record for record in effective(records) if record.same_value]
        for key, records in rows.items()
    }
    offending = [key for key, writes in twice.items() if writes]
    if not offending:
        return
    shown = ", ".join(
        f"{show_key(columns.table, key)} ({_statuses([twice[key][0].status] * 2)})"
        for key in offending[:_SHOWN_ROWS]
    )
    many = len(offending) > 1
    count = f"{len(offending)} row{'s' if many else ''}"
    raise _fail(
        f"{count} of {columns.table} had {'their' if many else 'its'} status set to the value "
        f"{'they' if many else 'it'} already had",
        [
            *mismatch(
                columns.table,
                "no row to have its status set to the value it already had",
                f"{count} written again with the same status "
                f"(two workers processing the same row?): {shown}",
            ),
            *_timelines(columns, rows, offending),
        ],
    )


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


def timeline_report(
    records: Sequence[HistoryRecord],
    error_columns: Mapping[str, str | None],
    runs: Sequence[JobRun],
) -> str | None:
    """The compact timeline of one test: its job runs and row writes in virtual time.

    ``records`` are the test's history records, ``error_columns`` the error column of each
    tracked table. Consecutive runs of a job that succeeded without writing a tracked row are
    one line. ``None`` when the test has neither runs nor writes.
    """
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

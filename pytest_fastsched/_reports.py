"""What the plugin adds to pytest's reports of a test, and to the end of the session.

- Sections of a failing test's report: the database guard errors a job swallowed, the work
  its jobs left running when it failed for another reason, a hint for SQLAlchemy's
  ``MissingGreenlet``, the timeline of job runs and row writes
  (``--fastsched-timeline``, every test with ``-v``), and which replica ran which job run.
- The timelines of the tests that passed, with ``--fastsched-timeline -v``, at the end.
- A fixture's failure that the plugin can explain (:func:`explain_fixture_error`).

Each is built from what the fixtures left on the test (its ``fastsched_db``, its
``fastsched_scheduler`` and ``fastsched_history``) and the seal's refusals.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from pytest_fastsched import _asserts, _options, _wallclock
from pytest_fastsched._leftovers import LeftoverWorkError

TIMELINE_SECTION = "fastsched timeline"
REPLICAS_SECTION = "fastsched replicas"
GUARD_SECTION = "fastsched_db guard"
LEFTOVERS_SECTION = "fastsched leftovers"
HINT_SECTION = "pytest-fastsched hint"

MISSING_GREENLET_HINT = (
    "MissingGreenlet: SQLAlchemy had to do database I/O where it could not be awaited. "
    "Usual causes:\n"
    "- an attribute read after commit(): commit expires the loaded objects "
    "(expire_on_commit=True, the default), so the next read reloads it implicitly; read the "
    "values before the commit, `await session.refresh(obj)`, or build the sessionmaker with "
    "expire_on_commit=False;\n"
    "- a lazy-loaded relationship: load it eagerly (`selectinload(...)`) or read it with "
    "`await obj.awaitable_attrs.<name>`;\n"
    "- a synchronous Session or engine call made from async code.\n"
    "pytest-fastsched keeps the app's session settings as the app set them: this fails in "
    "production too."
)


def add_sections(
    report: pytest.TestReport,
    item: pytest.Item,
    call: pytest.CallInfo[None],
    settings: _options.Settings,
    guard_errors: Sequence[BaseException],
) -> None:
    """Add the plugin's sections to the report of one phase of a test.

    ``guard_errors`` are the errors of the seal, of the database guards and of the work left
    running (``LeftoverWorkError``) that this report is the first to see.
    """
    if call.excinfo is not None:
        _failure_sections(report, call.excinfo.value, guard_errors)
    if report.when != "call":
        return
    values: dict[str, Any] = getattr(item, "funcargs", {})
    history = values.get("fastsched_history")
    harness = values.get("fastsched_scheduler")
    shown = report.failed or item.config.get_verbosity() > 0
    if settings.timeline and shown and (history is not None or harness is not None):
        records = history.all_records() if history is not None else []
        error_columns = history.error_columns() if history is not None else {}
        runs = harness.runs if harness is not None else []
        text = _asserts.timeline_report(records, error_columns, runs)
        if text is not None:
            report.sections.append((TIMELINE_SECTION, text))
    if report.failed and harness is not None and harness.replica_count > 1:
        from pytest_fastsched import _replicas

        report.sections.append((REPLICAS_SECTION, _replicas.report(harness.runs)))


def _failure_sections(
    report: pytest.TestReport, failure: BaseException, guard_errors: Sequence[BaseException]
) -> None:
    addsection = getattr(report.longrepr, "addsection", None)
    if addsection is None:
        return
    chain = list(exception_chain(failure))
    reported = {id(link) for link in chain}
    for error in guard_errors:
        if id(error) not in reported:
            leftovers = isinstance(error, LeftoverWorkError)
            addsection(LEFTOVERS_SECTION if leftovers else GUARD_SECTION, str(error))
    if any(type(link).__name__ == "MissingGreenlet" for link in chain):
        addsection(HINT_SECTION, MISSING_GREENLET_HINT)


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, its causes and contexts, and the members of exception groups, once each."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        link = pending.pop()
        if id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        pending.extend(getattr(link, "exceptions", ()))
        pending.extend(cause for cause in (link.__cause__, link.__context__) if cause)


def terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config, settings: _options.Settings
) -> None:
    """With ``--fastsched-timeline -v``, the timelines of the tests that passed."""
    if not settings.timeline or config.get_verbosity() <= 0:
        return
    shown = [
        (report.nodeid, content)
        for report in terminalreporter.stats.get("passed", [])
        for name, content in getattr(report, "sections", [])
        if name == TIMELINE_SECTION
    ]
    if not shown:
        return
    terminalreporter.write_sep("=", TIMELINE_SECTION)
    for nodeid, content in shown:
        terminalreporter.write_sep("-", nodeid)
        terminalreporter.write_line(content)


def explain_fixture_error(fixture: str, error: BaseException) -> None:
    """Fail the set-up of ``fixture`` with what to do, when the plugin knows the cause.

    The app imported while freezegun runs (:func:`._wallclock.explain_frozen_import`), or an
    ``AsyncIOScheduler`` started with no running loop
    (:func:`._scheduler.explain_start_without_loop`). Returns for other errors.
    """
    __tracebackhide__ = True
    _wallclock.explain_frozen_import(fixture, error)
    if "no running event loop" in str(error):
        from pytest_fastsched import _scheduler

        _scheduler.explain_start_without_loop(fixture, error)

"""What a failing history assertion prints, and the ``--fastsched-timeline`` report.

The user suite (``conftest.DB_APP`` plus ``test_history.HISTORY_MODELS``) runs in a
subprocess, as users run it, on SQLite and on PostgreSQL; its output is checked line by line.
"""

from __future__ import annotations

import re

import pytest
from test_history import HISTORY_MODELS

FAILING = """
import re

import pytest
from sqlalchemy import text

import app


async def run(statement):
    async with app.get_background_session() as session:
        await session.execute(text(statement))


@pytest.fixture
def process(fastsched_scheduler):
    app.scheduler.add_job(
        app.process_pending, "interval", minutes=5, id="process", kwargs={"fail": {2}}
    )
    return fastsched_scheduler


@pytest.fixture
async def processed(fastsched_clock, process, fastsched_db, fastsched_history):
    await fastsched_db.insert("items", [{"id": 1}, {"id": 2}])
    await fastsched_clock.advance(minutes=5)
    return fastsched_history


async def test_transitions(processed):
    processed.assert_transitions("items", 1, ["pending", "processing", "completed"])
    processed.assert_transitions("items", 2, ["pending", "processing", "completed"])


async def test_status(processed):
    processed.assert_status("items", 2, "error", last_error="boom")


async def test_status_pattern(processed):
    processed.assert_status("items", 2, "error", last_error=re.compile("^boom$"))


async def test_all(processed):
    processed.assert_all("items", "completed")


async def test_processed_once(fastsched_clock, fastsched_db, fastsched_history):
    await fastsched_db.insert("items", [{"id": 1}, {"id": 2}])
    await run("UPDATE items SET status = 'processing'")
    await fastsched_clock.advance(minutes=1)
    await run("UPDATE items SET status = 'processing' WHERE id = 1")
    fastsched_history.assert_processed_once("items")


async def test_ran(fastsched_clock, process, fastsched_db):
    await fastsched_clock.advance(minutes=12)
    process.assert_ran("process", times=3)
"""

BY = "process (scheduled 2030-01-01 00:05:00+00:00)"

TRANSITIONS = [
    "E       AssertionError: items[2] went through other statuses than expected",
    "E       items[2]: expected pending -> processing -> completed",
    "E                 got      pending -> processing -> error   "
    "(at 2030-01-01 00:05:00+00:00, last_error='boom 2')",
    "E       items[2] in virtual time:",
    "E         at                         status      last_error  note         by",
    "E         2030-01-01 00:00:00+00:00  pending     None        inserted     test",
    f"E         2030-01-01 00:05:00+00:00  processing  None                     {BY}",
    f"E         2030-01-01 00:05:00+00:00  completed   None        rolled back  {BY}",
    f"E         2030-01-01 00:05:00+00:00  error       'boom 2'                 {BY}",
]


def _row_timeline() -> list[str]:
    return TRANSITIONS[3:]


STATUS = [
    "E       AssertionError: items[2] did not end as expected",
    "E       items[2]: expected error, last_error='boom'",
    "E                 got      error, last_error='boom 2'   "
    f"(at 2030-01-01 00:05:00+00:00, by {BY})",
    *_row_timeline(),
]

STATUS_PATTERN = [
    "E       AssertionError: items[2] did not end as expected",
    "E       items[2]: expected error, last_error matching '^boom$'",
    "E                 got      error, last_error='boom 2'   "
    f"(at 2030-01-01 00:05:00+00:00, by {BY})",
    *_row_timeline(),
]

ALL = [
    "E       AssertionError: not every row of items ended in completed",
    "E       items: expected every row to end in completed",
    "E              got      1 of 2 rows elsewhere: items[2] in error",
    *_row_timeline(),
]

PROCESSED_ONCE = [
    "E       AssertionError: 1 row of items had its status set to the value it already had",
    "E       items: expected no row to have its status set to the value it already had",
    "E              got      1 row written again with the same status (two workers "
    "processing the same row?): items[1] (processing -> processing)",
    "E       items[1] in virtual time:",
    "E         at                         status      last_error  note        by",
    "E         2030-01-01 00:00:00+00:00  pending     None        inserted    test",
    "E         2030-01-01 00:00:00+00:00  processing  None                    test",
    "E         2030-01-01 00:01:00+00:00  processing  None        same value  test",
]

RAN = [
    "E       AssertionError: job 'process' did not run as expected",
    "E       job 'process': expected 3 runs",
    "E                      got      2 runs",
    "E       runs of 'process' in virtual time (now 2030-01-01 00:12:00+00:00):",
    "E         scheduled                  started                    finished"
    "                   outcome",
    "E         2030-01-01 00:05:00+00:00  2030-01-01 00:05:00+00:00  2030-01-01 00:05:00+00:00"
    "  success",
    "E         2030-01-01 00:10:00+00:00  2030-01-01 00:10:00+00:00  2030-01-01 00:10:00+00:00"
    "  success",
]


@pytest.fixture
def report_suite(db_suite: pytest.Pytester) -> pytest.Pytester:
    """The user project of ``db_suite`` with the tables and the scheduler of the history tests."""
    app = db_suite.path.joinpath("app.py")
    app.write_text(app.read_text() + HISTORY_MODELS)
    return db_suite


OPTIONS = ("-p", "no:randomly", "-o", "asyncio_mode=auto", "--fastsched-scheduler=app:scheduler")


EXPECTED = {
    "test_transitions": TRANSITIONS,
    "test_status": STATUS,
    "test_status_pattern": STATUS_PATTERN,
    "test_all": ALL,
    "test_processed_once": PROCESSED_ONCE,
    "test_ran": RAN,
}


def failure_of(result: pytest.RunResult, test: str) -> pytest.LineMatcher:
    """The lines of the failure report of ``test``, from its ``___ test ___`` heading on."""
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if re.fullmatch(f"_+ {test} _+", line))
    end = next(
        (i for i in range(start + 1, len(lines)) if re.fullmatch(r"[_=]+ .+ [_=]+", lines[i])),
        len(lines),
    )
    return pytest.LineMatcher(lines[start:end])


def test_failures_show_expected_got_and_the_rows_timeline(report_suite: pytest.Pytester) -> None:
    report_suite.makepyfile(test_failing=FAILING)
    result = report_suite.runpytest_subprocess(*OPTIONS)
    result.assert_outcomes(failed=6)
    for test, lines in EXPECTED.items():
        failure_of(result, test).fnmatch_lines(lines, consecutive=True)
    for plugin_module in ("_asserts.py", "_history.py", "_scheduler.py"):
        result.stdout.no_fnmatch_line(f"*{plugin_module}*")
    result.stdout.no_fnmatch_line("*fastsched timeline*")  # not without --fastsched-timeline
    # The first line of a failure is its summary (cut to the terminal's width).
    result.stdout.fnmatch_lines(
        ["FAILED test_failing.py::test_transitions - AssertionError: items[[]2] went thro*"]
    )


TIMELINE = """
import pytest

import app


@pytest.fixture
def process(fastsched_scheduler):
    app.scheduler.add_job(
        app.process_pending, "interval", minutes=5, id="process", kwargs={"fail": {2}}
    )
    return fastsched_scheduler


async def test_fails(fastsched_clock, process, fastsched_db, fastsched_history):
    await fastsched_db.insert("items", [{"id": 1}, {"id": 2}])
    await fastsched_clock.advance(minutes=5)
    fastsched_history.assert_all("items", "completed")


async def test_passes(fastsched_clock, process, fastsched_db):
    await fastsched_clock.advance(minutes=20)
"""

FAILING_TIMELINE = [
    "*- fastsched timeline -*",
    "at                         what        event                                     by",
    "2030-01-01 00:00:00+00:00  items[1]    inserted pending                          test",
    "2030-01-01 00:00:00+00:00  items[2]    inserted pending                          test",
    "2030-01-01 00:05:00+00:00  process #1  started",
    "2030-01-01 00:05:00+00:00  items[1]    pending -> processing                     process #1",
    "2030-01-01 00:05:00+00:00  items[1]    processing -> completed                   process #1",
    "2030-01-01 00:05:00+00:00  items[2]    pending -> processing                     process #1",
    "2030-01-01 00:05:00+00:00  items[2]    processing -> completed (rolled back)     process #1",
    "2030-01-01 00:05:00+00:00  items[2]    processing -> error, last_error='boom 2'  process #1",
    "2030-01-01 00:05:00+00:00  process #1  success",
]


def test_the_timeline_report_of_a_failing_test(report_suite: pytest.Pytester) -> None:
    report_suite.makepyfile(test_timeline=TIMELINE)
    result = report_suite.runpytest_subprocess(*OPTIONS, "--fastsched-timeline")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(FAILING_TIMELINE, consecutive=True)
    result.stdout.no_fnmatch_line("*test_passes*")


def test_with_v_the_timeline_of_every_test(report_suite: pytest.Pytester) -> None:
    report_suite.makepyfile(test_timeline=TIMELINE)
    result = report_suite.runpytest_subprocess(*OPTIONS, "-o", "fastsched_timeline=true", "-v")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(FAILING_TIMELINE, consecutive=True)
    result.stdout.fnmatch_lines(
        [
            "*= fastsched timeline =*",
            "*- test_timeline.py::test_passes -*",
            "at                         what           event",
            "2030-01-01 00:05:00+00:00  process #1-#4  4 runs succeeded, wrote nothing",
        ],
        consecutive=True,
    )

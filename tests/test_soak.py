"""Isolation soak: 210 user-style tests, in random order on two xdist workers, three times.

The suite in ``tests/soak/`` writes rows, fires the app's jobs with ``fastsched_clock``,
leaves the clock, jobs in flight and thread jobs anywhere, and fails on purpose in
``suite_failing.py``. It runs for two apps: ``app.py``, an ``AsyncIOScheduler`` with async
sessions, tested by ``async def`` tests, and ``sync_app.py``, a ``BackgroundScheduler`` whose
``def`` jobs use a sync ``SessionLocal``, tested by the same tests written as ``def`` tests
(the ``sync_*.py`` files). Its conftest checks, before and after every test, that the database
holds no rows, the wall clock is real, the scheduler is stopped with its own jobs, and no
thread or task of an earlier test is alive. Each run must give exactly the same outcomes:
the deliberate failures fail, everything else passes, no setup or teardown errors.

Select these tests with ``-m soak`` (or leave them out with ``-m "not soak"``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytestmark = pytest.mark.soak

SOAK = Path(__file__).parent / "soak"
SUITES = {"test_jobs.py": "suite_jobs.py", "test_plain.py": "suite_plain.py"}
FAILING_SUITES = {"test_failing.py": "suite_failing.py"}
TESTS_PER_FUNCTION = 21
RUNS = 3
# A safety net against a hung inner run, not a speed requirement.
RUN_TIMEOUT = 600

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
asyncio_default_test_loop_scope = function
filterwarnings = error
fastsched_database = {database}
fastsched_scheduler = app:scheduler
fastsched_sessionmaker = app:{sessionmaker}
fastsched_metadata = app:Base.metadata
"""


# The prefix of each kind's source files, and the app's sessionmaker.
KINDS = {"async": ("", "async_session_factory"), "sync": ("sync_", "SessionLocal")}


def _write_suite(pytester: pytest.Pytester, database: str, kind: str) -> dict[str, str]:
    """Write the soak project; return the outcome each test must have, by node id."""
    prefix, sessionmaker = KINDS[kind]
    pytester.makeini(INI.format(database=database, sessionmaker=sessionmaker))
    pytester.makepyfile(
        app=(SOAK / f"{prefix}app.py").read_text(),
        conftest=(SOAK / "inner_conftest.py").read_text(),
    )
    expected = {}
    for files, outcome in ((SUITES, "passed"), (FAILING_SUITES, "failed")):
        for name, source in files.items():
            text = (SOAK / f"{prefix}{source}").read_text()
            (pytester.path / name).write_text(text)
            for function in _test_functions(text):
                for case in range(TESTS_PER_FUNCTION):
                    expected[f"{name}::{function}[{case}]"] = outcome
    return expected


def _test_functions(source: str) -> list[str]:
    return [
        line.split("(")[0].removeprefix("async ").removeprefix("def ")
        for line in source.splitlines()
        if line.startswith(("async def test_", "def test_"))
    ]


def _run(pytester: pytest.Pytester, seed: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Run the suite once on two workers in the order of ``seed``; the outcome of each test.

    A failed setup or teardown shows as ``<when> <outcome>`` next to the call's outcome.
    """
    outcomes_file = pytester.path / f"outcomes-{seed}.jsonl"
    monkeypatch.setenv("SOAK_OUTCOMES", str(outcomes_file))
    result = pytester.runpytest_subprocess(
        "-p", "xdist", "-n", "2", f"--randomly-seed={seed}", timeout=RUN_TIMEOUT
    )
    result.stdout.fnmatch_lines([f"Using --randomly-seed={seed}"])
    outcomes: dict[str, str] = {}
    for line in outcomes_file.read_text().splitlines():
        report = json.loads(line)
        shown = report["outcome"] if report["when"] == "call" else " ".join(report.values())
        nodeid = report["nodeid"]
        outcomes[nodeid] = f"{outcomes[nodeid]}, {shown}" if nodeid in outcomes else shown
    return outcomes


@pytest.mark.parametrize("kind", KINDS)
def test_outcomes_are_the_same_in_every_random_order(
    pytester: pytest.Pytester, database: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `database` also makes the suite's temporary directory (user_tmpdir) and checks that
    # the runs leave nothing in it, nor on the shared server.
    expected = _write_suite(pytester, database, kind)
    assert len(expected) == 210
    # pytest-randomly seeds `random` per test: rerun with the outer seed to repeat the seeds.
    seeds = random.sample(range(1, 10**6), RUNS)
    for seed in seeds:
        assert (seed, _run(pytester, seed, monkeypatch)) == (seed, expected)

"""Replicas on PostgreSQL: a virtual day of the reference app's 5-minute job over 500 items.

Runs the reference app's processing job (batches of 5, every 5 minutes) for one virtual day
on the plugin's ephemeral PostgreSQL server, with 1 and with 4 replicas, and prints the wall
time of ``advance(days=1)`` (median of ``ROUNDS``) and the ratio of 4 replicas to one.

Run with ``python benchmarks/bench_replicas.py`` (from the repository, with the reference app
installed: ``pip install -e examples/reference_app``); prints rows of a markdown table.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROUNDS = 3
ITEMS = 500
APP = Path(__file__).resolve().parent.parent / "examples" / "reference_app"

SUITE = f"""
import time

import pytest
from reference_app.scheduler import PROCESS_PENDING_JOB_ID

from pytest_fastsched import assert_processed_once


@pytest.mark.parametrize(
    "replicas",
    [pytest.param(n, marks=pytest.mark.fastsched(replicas=n, isolation="commit")) for n in (1, 4)],
)
@pytest.mark.parametrize("round_", range({ROUNDS}))
async def test_day(fastsched_clock, fastsched_db, fastsched_history, jobs, replicas, round_):
    rows = [{{"id": n, "payload": {{"n": n}}}} for n in range(1, {ITEMS + 1})]
    await fastsched_db.insert("items", rows)
    began = time.perf_counter()
    await fastsched_clock.advance(days=1)
    elapsed = time.perf_counter() - began
    assert len(await fastsched_db.fetch("items", status="completed")) == {ITEMS}
    assert_processed_once("items")
    runs = len(jobs.runs_of(PROCESS_PENDING_JOB_ID))
    print(f"\\nBENCH replicas={{replicas}} runs={{runs}} seconds={{elapsed:.3f}}")
"""


def main() -> None:
    """Run the suite once in a scratch copy of the reference app's test set-up."""
    directory = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    directory.chmod(0o755)
    try:
        shutil.copy(APP / "pyproject.toml", directory / "pyproject.toml")
        (directory / "tests").mkdir()
        shutil.copy(APP / "tests" / "conftest.py", directory / "tests" / "conftest.py")
        (directory / "tests" / "test_bench.py").write_text(SUITE)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-s",
                "-p",
                "no:randomly",
                "-p",
                "no:cacheprovider",
                "--fastsched-database=postgresql",
            ],
            cwd=directory,
            capture_output=True,
            text=True,
            check=False,
            timeout=1800,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if result.returncode != 0:
        raise SystemExit(result.stdout + result.stderr)
    times: dict[int, list[float]] = {1: [], 4: []}
    runs: dict[int, int] = {}
    for replicas, count, seconds in re.findall(
        r"BENCH replicas=(\d+) runs=(\d+) seconds=([\d.]+)", result.stdout
    ):
        times[int(replicas)].append(float(seconds))
        runs[int(replicas)] = int(count)
    one, four = (statistics.median(times[n]) for n in (1, 4))
    print("| benchmark | median | ratio |")
    print("|---|---|---|")
    print(
        f"| virtual day, 5-minute job, {ITEMS} items, PostgreSQL, 1 replica "
        f"({runs[1]} runs) | {one * 1000:.0f} ms | 1.00x |"
    )
    print(f"| same, 4 replicas ({runs[4]} runs) | {four * 1000:.0f} ms | {four / one:.2f}x |")


if __name__ == "__main__":
    main()

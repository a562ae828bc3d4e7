"""Replicas on PostgreSQL: a virtual day of the reference app's 5-minute job over 500 items.

Runs the reference app's processing job (batches of 5, every 5 minutes) for one virtual day
on the plugin's ephemeral PostgreSQL server, with 1 and with 4 replicas, and prints the wall
time of ``advance(days=1)`` (median of ``ROUNDS``) and the ratio of 4 replicas to one.

Run with ``python benchmarks/bench_replicas.py`` (from the repository, with the reference app
installed: ``pip install -e examples/reference_app``); prints rows of a markdown table.
"""

from __future__ import annotations

import re
import statistics

import reference_suite

ROUNDS = 3
ITEMS = 500

SUITE = f"""
import time

import pytest
from reference_app.scheduler import PROCESS_PENDING_JOB_ID

from pytest_fastsched import assert_processed_once


# The prepared-statement check the reference app turns on is measured by bench_prepared.py.
@pytest.mark.fastsched(isolation="commit", prepared_statements="ignore")
@pytest.mark.parametrize(
    "replicas", [pytest.param(n, marks=pytest.mark.fastsched(replicas=n)) for n in (1, 4)]
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
    output = reference_suite.run(SUITE)
    times: dict[int, list[float]] = {1: [], 4: []}
    runs: dict[int, int] = {}
    for replicas, count, seconds in re.findall(
        r"BENCH replicas=(\d+) runs=(\d+) seconds=([\d.]+)", output
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

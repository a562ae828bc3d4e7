"""Replicas on PostgreSQL: a virtual day of the reference app's 5-minute job over 500 items.

Runs the reference app's processing job (batches of 5, every 5 minutes) for one virtual day
on the plugin's ephemeral PostgreSQL server, with 1 and with 4 replicas, and prints the wall
time of ``advance(days=1)``: the medians of ``ROUNDS`` rounds, the sides alternated A B B A
(``abba.py``), and the median and range of the per-round ratios of 4 replicas to one.

Run with ``python benchmarks/bench_replicas.py`` (from the repository, with the reference app
installed: ``pip install -e examples/reference_app``); prints rows of a markdown table.
"""

from __future__ import annotations

import re

import abba
import reference_suite

ROUNDS = 2
ITEMS = 500
ORDER = [(index, n) for index, order in enumerate(abba.orders((1, 4), ROUNDS)) for n in order]

SUITE = f"""
import time

import pytest
from reference_app.scheduler import PROCESS_PENDING_JOB_ID

from pytest_fastsched import assert_processed_once


# The prepared-statement check the reference app turns on is measured by bench_prepared.py.
@pytest.mark.fastsched(isolation="commit", prepared_statements="ignore")
@pytest.mark.parametrize(
    ("round_", "replicas"),
    [
        pytest.param(round_, n, marks=pytest.mark.fastsched(replicas=n))
        for round_, n in {ORDER!r}
    ],
)
async def test_day(fastsched_clock, fastsched_db, fastsched_history, jobs, round_, replicas):
    rows = [{{"id": n, "payload": {{"n": n}}}} for n in range(1, {ITEMS + 1})]
    await fastsched_db.insert("items", rows)
    began = time.perf_counter()
    await fastsched_clock.advance(days=1)
    elapsed = time.perf_counter() - began
    assert len(await fastsched_db.fetch("items", status="completed")) == {ITEMS}
    assert_processed_once("items")
    runs = len(jobs.runs_of(PROCESS_PENDING_JOB_ID))
    print(f"\\nBENCH round={{round_}} replicas={{replicas}} runs={{runs}} seconds={{elapsed:.3f}}")
"""


def main() -> None:
    """Run the suite once in a scratch copy of the reference app's test set-up."""
    abba.header(f"bench_replicas: a virtual day on PostgreSQL, 1 and 4 replicas, {ROUNDS} rounds")
    output = reference_suite.run(SUITE)
    times: dict[int, dict[int, float]] = {1: {}, 4: {}}
    runs: dict[int, int] = {}
    for round_, replicas, count, seconds in re.findall(
        r"BENCH round=(\d+) replicas=(\d+) runs=(\d+) seconds=([\d.]+)", output
    ):
        times[int(replicas)][int(round_)] = float(seconds)
        runs[int(replicas)] = int(count)
    one, four = ([times[n][r] for r in range(ROUNDS)] for n in (1, 4))
    print("| benchmark | median (range) | ratio: median (range) |")
    print("|---|---|---|")
    print(
        f"| virtual day, 5-minute job, {ITEMS} items, PostgreSQL, 1 replica "
        f"({runs[1]} runs) | {abba.ms(one, 0)} | |"
    )
    print(f"| same, 4 replicas ({runs[4]} runs) | {abba.ms(four, 0)} | {abba.ratio(four, one)} |")
    abba.footer()


if __name__ == "__main__":
    main()

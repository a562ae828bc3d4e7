"""Cost of the prepared-statement check: a virtual day of the reference app's 5-minute job.

Runs the reference app's processing job over 500 items for one virtual day on the plugin's
ephemeral PostgreSQL server (without the nightly retry job, which would meet it at midnight on
the one connection of rollback isolation), under rollback and commit isolation, with
``prepared_statements="ignore"`` and ``"check"`` (one ``COPY`` of ``pg_prepared_statements``
as each of the app's transactions begins), and prints the wall time of ``advance(days=1)``:
the medians of ``ROUNDS`` rounds, the cases alternated A B B A (``abba.py``), and the median
and range of the per-round ratios of check to ignore.

Run with ``python benchmarks/bench_prepared.py`` (from the repository, with the reference app
installed: ``pip install -e examples/reference_app``); prints rows of a markdown table.
"""

from __future__ import annotations

import re

import abba
import reference_suite

ROUNDS = 2
ITEMS = 500
TARGET = 1.3
SIDES = [(isolation, mode) for isolation in ("rollback", "commit") for mode in ("ignore", "check")]
ORDER = [
    (index, *side) for index, order in enumerate(abba.orders(SIDES, ROUNDS)) for side in order
]

SUITE = f"""
import time

import pytest
from reference_app.scheduler import RETRY_FAILED_JOB_ID

CASES = [
    pytest.param(round_, isolation, mode, marks=pytest.mark.fastsched(
        isolation=isolation, prepared_statements=mode
    ))
    for round_, isolation, mode in {ORDER!r}
]


@pytest.mark.parametrize(("round_", "isolation", "mode"), CASES)
async def test_day(fastsched_clock, jobs, fastsched_db, round_, isolation, mode):
    jobs.scheduler.remove_job(RETRY_FAILED_JOB_ID)  # it meets the 5-minute job at midnight
    rows = [{{"id": n, "payload": {{"n": n}}}} for n in range(1, {ITEMS + 1})]
    await fastsched_db.insert("items", rows)
    began = time.perf_counter()
    await fastsched_clock.advance(days=1)
    elapsed = time.perf_counter() - began
    assert len(await fastsched_db.fetch("items", status="completed")) == {ITEMS}
    print(f"\\nBENCH round={{round_}} isolation={{isolation}} mode={{mode}}", end=" ")
    print(f"seconds={{elapsed:.3f}}")
"""


def main() -> None:
    """Run the suite once in a scratch copy of the reference app's test set-up."""
    abba.header(f"bench_prepared: a virtual day on PostgreSQL, ignore / check, {ROUNDS} rounds")
    output = reference_suite.run(SUITE)
    times: dict[tuple[str, str], dict[int, float]] = {}
    for round_, isolation, mode, seconds in re.findall(
        r"BENCH round=(\d+) isolation=(\w+) mode=(\w+) seconds=([\d.]+)", output
    ):
        times.setdefault((isolation, mode), {})[int(round_)] = float(seconds)
    print("| benchmark | ignored | checked | checked/ignored: median (range) | target |")
    print("|---|---|---|---|---|")
    for isolation in ("rollback", "commit"):
        ignored, checked = (
            [times[isolation, mode][r] for r in range(ROUNDS)] for mode in ("ignore", "check")
        )
        print(
            f"| virtual day, 5-minute job, {ITEMS} items, PostgreSQL, {isolation} isolation "
            f"| {abba.ms(ignored, 0)} | {abba.ms(checked, 0)} | {abba.ratio(checked, ignored)} "
            f"| <= {TARGET}x |"
        )
    abba.footer()


if __name__ == "__main__":
    main()

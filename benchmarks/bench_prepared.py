"""Cost of the prepared-statement check: a virtual day of the reference app's 5-minute job.

Runs the reference app's processing job over 500 items for one virtual day on the plugin's
ephemeral PostgreSQL server (without the nightly retry job, which would meet it at midnight on
the one connection of rollback isolation), under rollback and commit isolation, with
``prepared_statements="ignore"`` and ``"check"`` (one ``COPY`` of ``pg_prepared_statements``
as each of the app's transactions begins), and prints the wall time of ``advance(days=1)``
(median of ``ROUNDS``) and the ratio of check to ignore.

Run with ``python benchmarks/bench_prepared.py`` (from the repository, with the reference app
installed: ``pip install -e examples/reference_app``); prints rows of a markdown table.
"""

from __future__ import annotations

import re
import statistics

import reference_suite

ROUNDS = 3
ITEMS = 500
TARGET = 1.3

SUITE = f"""
import time

import pytest
from reference_app.scheduler import RETRY_FAILED_JOB_ID

CASES = [
    pytest.param(isolation, mode, marks=pytest.mark.fastsched(
        isolation=isolation, prepared_statements=mode
    ))
    for isolation in ("rollback", "commit")
    for mode in ("ignore", "check")
]


@pytest.mark.parametrize(("isolation", "mode"), CASES)
@pytest.mark.parametrize("round_", range({ROUNDS}))
async def test_day(fastsched_clock, jobs, fastsched_db, isolation, mode, round_):
    jobs.scheduler.remove_job(RETRY_FAILED_JOB_ID)  # it meets the 5-minute job at midnight
    rows = [{{"id": n, "payload": {{"n": n}}}} for n in range(1, {ITEMS + 1})]
    await fastsched_db.insert("items", rows)
    began = time.perf_counter()
    await fastsched_clock.advance(days=1)
    elapsed = time.perf_counter() - began
    assert len(await fastsched_db.fetch("items", status="completed")) == {ITEMS}
    print(f"\\nBENCH isolation={{isolation}} mode={{mode}} seconds={{elapsed:.3f}}")
"""


def main() -> None:
    """Run the suite once in a scratch copy of the reference app's test set-up."""
    output = reference_suite.run(SUITE)
    times: dict[tuple[str, str], list[float]] = {}
    for isolation, mode, seconds in re.findall(
        r"BENCH isolation=(\w+) mode=(\w+) seconds=([\d.]+)", output
    ):
        times.setdefault((isolation, mode), []).append(float(seconds))
    print("| benchmark | median | ratio | target |")
    print("|---|---|---|---|")
    for isolation in ("rollback", "commit"):
        ignored, checked = (statistics.median(times[isolation, m]) for m in ("ignore", "check"))
        print(
            f"| virtual day, 5-minute job, {ITEMS} items, PostgreSQL, {isolation} isolation, "
            f"prepared statements ignored / checked | {ignored * 1000:.0f} ms / "
            f"{checked * 1000:.0f} ms | {checked / ignored:.2f}x | <= {TARGET}x |"
        )


if __name__ == "__main__":
    main()

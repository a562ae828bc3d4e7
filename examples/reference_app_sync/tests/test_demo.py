"""The standalone demo, run as its README says, in a process of its own."""

from __future__ import annotations

import re
import subprocess
import sys


def test_two_concurrent_runs_share_the_items_out():
    result = subprocess.run(
        [sys.executable, "-m", "reference_app_sync.demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = result.stdout.splitlines()
    claimed = [
        [int(n) for n in re.findall(r"\d+", line.split("claimed", 1)[1].split("skipped")[0])]
        for line in lines
        if line.startswith("run ")
    ]
    assert len(claimed) == 2
    assert sorted(claimed[0] + claimed[1]) == [1, 2, 3, 4, 5, 6]
    items = [line.split()[:4] for line in lines if line.startswith("item ")]
    assert items == [
        ["item", "1:", "completed", "attempts=1"],
        ["item", "2:", "error", "attempts=1"],
        *[["item", f"{n}:", "completed", "attempts=1"] for n in range(3, 7)],
    ]
    assert "last_error='ValueError: payload rejected: no name'" in lines[3]
    assert "ValueError: payload rejected: no name" in result.stderr

"""The reference apps' own suites, run end to end as their users run them, on both databases.

The sync app's suite runs on two xdist workers, as a user's suite of plain ``def`` tests would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
XDIST = {"reference_app": [], "reference_app_sync": ["-p", "xdist", "-n", "2"]}


@pytest.mark.parametrize("backend", ["freezegun", "time-machine"])
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
@pytest.mark.parametrize("app", ["reference_app", "reference_app_sync"])
def test_reference_app_suite_passes(app: str, database: str, backend: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            *XDIST[app],
            f"--fastsched-database={database}",
            f"--fastsched-clock-backend={backend}",
        ],
        cwd=EXAMPLES / app,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " failed" not in result.stdout
    assert "passed" in result.stdout.splitlines()[-1]

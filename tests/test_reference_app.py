"""The reference app's own suite, run end to end as its users run it, on both databases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "examples" / "reference_app"


@pytest.mark.parametrize("backend", ["freezegun", "time-machine"])
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_reference_app_suite_passes(database: str, backend: str) -> None:
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
            f"--fastsched-database={database}",
            f"--fastsched-clock-backend={backend}",
        ],
        cwd=APP,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " failed" not in result.stdout
    assert "passed" in result.stdout.splitlines()[-1]

"""Run a benchmark suite in a scratch copy of the reference app's test set-up.

The suite gets the reference app's ``pyproject.toml`` (its pytest-fastsched settings) and
``tests/conftest.py`` (its ``jobs`` and ``add_items`` fixtures), and runs on the plugin's
ephemeral PostgreSQL server. Needs the reference app installed
(``pip install -e examples/reference_app``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "examples" / "reference_app"


def run(suite: str) -> str:
    """Run ``suite`` (the text of a test module) with ``-s``; its output, or exit on failure."""
    directory = Path(tempfile.mkdtemp(prefix="bench-reference-"))
    directory.chmod(0o755)  # the server's unprivileged user passes through it
    try:
        shutil.copy(APP / "pyproject.toml", directory / "pyproject.toml")
        (directory / "tests").mkdir()
        shutil.copy(APP / "tests" / "conftest.py", directory / "tests" / "conftest.py")
        (directory / "tests" / "test_bench.py").write_text(suite)
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
    return result.stdout

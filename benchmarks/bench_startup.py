"""Start-up cost of the plugin for a suite that never uses it: python benchmarks/bench_startup.py

Times ``pytest --collect-only -q`` on a generated 500-test suite, with the plugin loaded (as
installed) and with it disabled (``-p no:fastsched``), alternating the two, and prints the
medians and their difference (target: under 30 ms added).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 40


def _make_suite(root: Path) -> None:
    for module in range(10):
        tests = "\n".join(f"def test_{n}():\n    assert {n} == {n}\n" for n in range(50))
        (root / f"test_module_{module}.py").write_text(tests)
    (root / "pytest.ini").write_text("[pytest]\n")


def _collect(root: Path, *extra: str) -> float:
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly"]
    began = time.perf_counter()
    subprocess.run([*command, *extra], cwd=root, check=True, capture_output=True)
    return time.perf_counter() - began


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        _make_suite(root)
        _collect(root)
        with_plugin, without_plugin = [], []
        for _ in range(RUNS):
            with_plugin.append(_collect(root))
            without_plugin.append(_collect(root, "-p", "no:fastsched"))
    loaded = statistics.median(with_plugin) * 1000
    disabled = statistics.median(without_plugin) * 1000
    print(f"| collect 500 tests, plugin loaded | {loaded:.0f} ms |")
    print(f"| collect 500 tests, plugin disabled | {disabled:.0f} ms |")
    print(f"| added by the plugin | {loaded - disabled:.0f} ms |")


if __name__ == "__main__":
    main()

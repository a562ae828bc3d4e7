"""Start-up cost of the plugin for a suite that never uses it: python benchmarks/bench_startup.py

Times ``pytest --collect-only -q`` on a generated 500-test suite with the plugin loaded (as
installed) and with it disabled (``-p no:fastsched``), in alternating pairs, and prints the
medians and the median of the paired differences (target: under 30 ms added).

Wall time on a shared machine moves by more than the plugin costs, so when valgrind is
installed the same two commands are also run once each under callgrind, which counts
instructions (the same count run after run, whatever else the machine does). The instructions
the plugin adds, at the plugin-disabled run's wall time per instruction, give its cost in
milliseconds without the noise.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAIRS = 60
COMMAND = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly"]
DISABLED = ("-p", "no:fastsched")


def _make_suite(root: Path) -> None:
    for module in range(10):
        tests = "\n".join(f"def test_{n}():\n    assert {n} == {n}\n" for n in range(50))
        (root / f"test_module_{module}.py").write_text(tests)
    (root / "pytest.ini").write_text("[pytest]\n")


def _collect(root: Path, *extra: str) -> float:
    began = time.perf_counter()
    subprocess.run([*COMMAND, *extra], cwd=root, check=True, capture_output=True)
    return time.perf_counter() - began


def _instructions(root: Path, *extra: str) -> int:
    """Instructions one collection executes, counted by callgrind."""
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *COMMAND, *extra],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    found = re.search(r"Collected\s*:\s*(\d+)", result.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no instruction count:\n{result.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        _make_suite(root)
        _collect(root)
        _collect(root, *DISABLED)
        with_plugin, without_plugin, added = [], [], []
        for _ in range(PAIRS):
            loaded, disabled = _collect(root), _collect(root, *DISABLED)
            with_plugin.append(loaded)
            without_plugin.append(disabled)
            added.append(loaded - disabled)
        counted = None
        if shutil.which("valgrind") is not None:
            counted = (_instructions(root), _instructions(root, *DISABLED))
    disabled_ms = statistics.median(without_plugin) * 1000
    print(
        f"| collect 500 tests, plugin loaded (median of {PAIRS}) "
        f"| {statistics.median(with_plugin) * 1000:.0f} ms |"
    )
    print(f"| collect 500 tests, plugin disabled (median of {PAIRS}) | {disabled_ms:.0f} ms |")
    print(
        f"| added by the plugin, median of paired differences | "
        f"{statistics.median(added) * 1000:+.0f} ms |"
    )
    if counted is not None:
        loaded_count, disabled_count = counted
        extra = loaded_count - disabled_count
        print(
            f"| instructions, plugin loaded / disabled (callgrind) "
            f"| {loaded_count / 1e6:.0f} M / {disabled_count / 1e6:.0f} M |"
        )
        print(
            f"| added by the plugin, from instructions | {extra / 1e6:+.1f} M "
            f"({extra / disabled_count:+.2%}), {disabled_ms * extra / disabled_count:+.1f} ms |"
        )


if __name__ == "__main__":
    main()

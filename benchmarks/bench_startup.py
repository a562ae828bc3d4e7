"""Start-up cost of the plugin for a suite that never uses it.

Run: ``python benchmarks/bench_startup.py [--pairs 10] [--no-callgrind]``

Times ``pytest --collect-only -q`` on a generated 500-test suite with the plugin loaded (as
installed) and with it disabled (``-p no:fastsched``), alternated A B B A (``abba.py``), and
prints the medians, the median and range of the paired ratios, and the median of the paired
differences (target: under 30 ms added).

Wall time on a shared machine moves by more than the plugin costs, so when valgrind is
installed the same two commands are also run once each under callgrind, which counts
instructions (the same count run after run, whatever else the machine does). The instructions
the plugin adds, at the plugin-disabled run's wall time per instruction, give its cost in
milliseconds without the noise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import abba

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--no-callgrind", action="store_true")
    arguments = parser.parse_args()
    abba.header(f"bench_startup: pytest --collect-only of 500 tests, {arguments.pairs} pairs")
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        _make_suite(root)
        _collect(root)
        _collect(root, *DISABLED)
        sides = {"loaded": (), "disabled": DISABLED}
        times = abba.alternate(lambda side: _collect(root, *sides[side]), sides, arguments.pairs)
        counted = None
        if shutil.which("valgrind") is not None and not arguments.no_callgrind:
            counted = (_instructions(root), _instructions(root, *DISABLED))
    loaded, disabled = times["loaded"], times["disabled"]
    added = [a - b for a, b in zip(loaded, disabled, strict=True)]
    disabled_ms = statistics.median(disabled) * 1000
    print("| measure | figure |")
    print("|---|---|")
    print(f"| collect 500 tests, plugin loaded | {abba.ms(loaded, 0)} |")
    print(f"| collect 500 tests, plugin disabled | {abba.ms(disabled, 0)} |")
    print(f"| loaded / disabled | {abba.ratio(loaded, disabled)} |")
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
    abba.footer()


if __name__ == "__main__":
    main()

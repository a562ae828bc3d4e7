"""What every benchmark shares: sides alternated A B B A, ratios with their range, the load.

A shared 2-core machine drifts while a benchmark runs, so the sides a benchmark compares run
in turn, the order reversed every other round (A B, B A, A B, ...: with three sides A B C,
C B A, ...), and each ratio is taken within a round, where both sides met the same load. The
report gives the median of those per-round ratios and their range, and the load average
(1, 5 and 15 minutes) at the start and end of the benchmark.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Awaitable, Callable, Iterator, Sequence


def load() -> str:
    """The load average: 1, 5 and 15 minutes."""
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def orders(sides: Sequence[str], rounds: int) -> Iterator[list[str]]:
    """The order of the sides in each of ``rounds`` rounds: forward, then reversed, ..."""
    for index in range(rounds):
        yield list(sides) if index % 2 == 0 else list(reversed(sides))


def alternate(
    measure: Callable[[str], float], sides: Sequence[str], rounds: int
) -> dict[str, list[float]]:
    """``measure(side)`` for every side, ``rounds`` times in A B B A order; by side."""
    results: dict[str, list[float]] = {side: [] for side in sides}
    for order in orders(sides, rounds):
        for side in order:
            results[side].append(measure(side))
    return results


async def alternate_async(
    measure: Callable[[str], Awaitable[float]], sides: Sequence[str], rounds: int
) -> dict[str, list[float]]:
    """:func:`alternate` for a coroutine function."""
    results: dict[str, list[float]] = {side: [] for side in sides}
    for order in orders(sides, rounds):
        for side in order:
            results[side].append(await measure(side))
    return results


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """The ratio of each round."""
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


def ratio(numerators: Sequence[float], denominators: Sequence[float]) -> str:
    """The median and range of the per-round ratios: ``1.23x (1.10-1.40)``."""
    return spread(ratios(numerators, denominators))


def spread(values: Sequence[float]) -> str:
    """The median and range of ratios: ``1.23x (1.10-1.40)``."""
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def ms(samples: Sequence[float], digits: int = 2) -> str:
    """The median of ``samples`` (seconds) in milliseconds, with their range."""
    scaled = [sample * 1000 for sample in samples]
    median, low, high = statistics.median(scaled), min(scaled), max(scaled)
    return f"{median:.{digits}f} ms ({low:.{digits}f}-{high:.{digits}f})"


def header(title: str) -> None:
    """Print the benchmark's title and the load average at its start."""
    print(f"{title}\nload average at start: {load()}\n")


def footer() -> None:
    """Print the load average at the benchmark's end."""
    print(f"\nload average at end: {load()}")

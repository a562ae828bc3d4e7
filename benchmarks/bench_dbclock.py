"""What the database's clock costs: python benchmarks/bench_dbclock.py [--rounds 6] [--backend B]

Two test databases made as ``fastsched_db`` makes them, one with ``fastsched_database_clock =
real`` (A: nothing installed), one with ``virtual`` (B: the keyword rewriting, the clock's
functions, the instant published to PostgreSQL), each following a virtual clock, measured
alternately A B B A, ``--rounds`` times, on SQLite and on a PostgreSQL server started here.
First the clock's own work is timed alone (timeit, best of 5): the statement listener, and
SQLite's ``datetime()`` for ``'now'`` (computed in Python) and with a modifier (SQLite's own).
Then, in wall time:

1. per statement, on one connection in a transaction (rollback isolation's test connection),
   ``STATEMENTS`` times each: a statement without time functions; one with ``now()``
   (SQLite: ``datetime('now')``); one with ``CURRENT_TIMESTAMP``; on SQLite one with a
   modifier (``datetime('now', '-15 minutes')``, which SQLite's own function computes); and
   the statement without time functions with the virtual clock moved before each one (B
   publishes the instant every time: on PostgreSQL one more round trip);
2. a new connection of a test engine (a test on a loop of its own makes one): on SQLite the
   date functions are registered on it, a hand-off to aiosqlite's thread each;
3. the virtual day of ``bench_clock.py`` (a 1-minute job doing one round trip, ``select 1``,
   1,440 fires) on each test engine: on PostgreSQL B publishes 1,440 instants.

Prints, for each measure, in wall time and in this process's CPU time (its threads included,
the PostgreSQL server's not; the machine's other load moves it far less), the median and range
of each side, the difference of the medians, and the median and range of the per-round ratio
B / A (each round's two B samples over its two A samples), and the load average before and
after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import os
import statistics
import time
import timeit
from collections.abc import Awaitable, Callable, Iterator

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, func, text
from sqlalchemy.ext.asyncio import AsyncEngine

from pytest_fastsched import _db, _dbclock, _options
from pytest_fastsched._clock import VirtualClock
from pytest_fastsched._postgres import EphemeralPostgres
from pytest_fastsched._scheduler import SchedulerHarness
from pytest_fastsched._wallclock import to_us

START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
STATEMENTS = 2000
CONNECTIONS = 20
SECOND_US = 1_000_000

metadata = MetaData()
Table(
    "tasks",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("status", String(20), nullable=False),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
    Column("processed_at", DateTime(timezone=True)),
)

MEASURES = {
    "sqlite": {
        "no time function": "UPDATE tasks SET status = 'x' WHERE id = 1",
        "datetime('now')": "UPDATE tasks SET processed_at = datetime('now') WHERE id = 1",
        "CURRENT_TIMESTAMP": "UPDATE tasks SET processed_at = CURRENT_TIMESTAMP WHERE id = 1",
        "datetime('now', '-15 minutes')": (
            "UPDATE tasks SET processed_at = datetime('now', '-15 minutes') WHERE id = 1"
        ),
    },
    "postgresql": {
        "no time function": "UPDATE tasks SET status = 'x' WHERE id = 1",
        "now()": "UPDATE tasks SET processed_at = now() WHERE id = 1",
        "CURRENT_TIMESTAMP": "UPDATE tasks SET processed_at = CURRENT_TIMESTAMP WHERE id = 1",
    },
}
PUBLISH = "no time function, clock moved before each"


@dataclasses.dataclass(frozen=True)
class Sample:
    """What one measure took: wall time, and the CPU time of this process (its threads too;
    not the PostgreSQL server's), which the machine's other load moves far less."""

    wall: float
    cpu: float

    def scaled(self, factor: float) -> Sample:
        return Sample(self.wall * factor, self.cpu * factor)


class _Timer:
    """What :func:`timed` measured, once its block has ended."""

    sample = Sample(0.0, 0.0)


@contextlib.contextmanager
def timed() -> Iterator[_Timer]:
    """Wall and CPU time of the block."""
    timer = _Timer()
    wall, cpu = time.perf_counter(), time.process_time()
    yield timer
    timer.sample = Sample(time.perf_counter() - wall, time.process_time() - cpu)


@dataclasses.dataclass
class Instant:
    """The virtual instant the database's clock follows in the per-statement measures."""

    now_us: int = to_us(START)


def settings(database: str, clock: str) -> _options.Settings:
    return _options.Settings(
        scheduler=None,
        sessionmaker=None,
        metadata="__main__:metadata",
        app=None,
        database=database,
        clock_backend="time-machine",
        start=START,
        watchdog=30.0,
        database_clock=clock,  # type: ignore[arg-type]
    )


async def per_statement(databases: _db.Databases, *, sql: str, moved: bool) -> Sample:
    """Microseconds per execution of ``sql`` on the test connection of a rollback-isolated
    test, opened as ``fastsched_db`` opens it."""
    instant = Instant()
    async with databases.open_test("rollback", clock=instant) as database:  # type: ignore[arg-type]
        connection = database._connection
        assert connection is not None
        statement = text(sql)
        await connection.execute(statement)
        with timed() as timer:
            for _ in range(STATEMENTS):
                if moved:
                    instant.now_us += SECOND_US
                await connection.execute(statement)
    return timer.sample.scaled(1e6 / STATEMENTS)


async def virtual_day(databases: _db.Databases) -> Sample:
    """Milliseconds of one virtual day of a 1-minute job doing one round trip on the test
    engine (commit isolation: a pooled connection each fire, as ``bench_clock.py`` does)."""
    clock = VirtualClock(start=START, backend="time-machine")
    clock.start()
    harness = SchedulerHarness(clock)
    scheduler = AsyncIOScheduler(timezone="UTC")
    async with databases.open_test("commit", clock=clock) as database:
        engine: AsyncEngine = database.engine

        async def job() -> None:
            async with engine.connect() as connection:
                await connection.execute(text("select 1"))

        scheduler.add_job(job, "interval", minutes=1, id="job")
        harness.attach(scheduler)
        clock.attach()
        with timed() as timer:
            await clock.advance(days=1)
    assert len(harness.run_times("job")) == 1440
    harness.close()
    clock.close()
    return timer.sample.scaled(1000)


async def new_connection(databases: _db.Databases) -> Sample:
    """Milliseconds to open a test engine's first connection and run ``select 1`` on it, as a
    test on a loop of its own does (SQLite: the date functions are registered on it)."""
    samples = []
    for _ in range(CONNECTIONS):
        engine = databases.testdb._create_test_engine(databases.testdb.engine_options)
        with timed() as timer:
            async with engine.connect() as connection:
                await connection.execute(text("select 1"))
        samples.append(timer.sample)
        await engine.dispose()
    return Sample(
        statistics.median(each.wall for each in samples) * 1000,
        statistics.median(each.cpu for each in samples) * 1000,
    )


Measure = Callable[[_db.Databases], Awaitable[Sample]]


async def abba(
    real: _db.Databases, virtual: _db.Databases, measure: Measure, rounds: int
) -> list[str]:
    """The measure's wall and CPU rows: each side's median (range), the difference of the
    medians, and the median (range) of the per-round ratios."""
    a: list[Sample] = []
    b: list[Sample] = []
    for _ in range(rounds):
        first_a = await measure(real)
        b += [await measure(virtual), await measure(virtual)]
        a += [first_a, await measure(real)]
    rows = []
    for kind in ("wall", "cpu"):
        side_a = [getattr(sample, kind) for sample in a]
        side_b = [getattr(sample, kind) for sample in b]
        ratios = [
            (side_b[i] + side_b[i + 1]) / (side_a[i] + side_a[i + 1])
            for i in range(0, len(side_a), 2)
        ]
        rows.append(
            f"{kind} | {_shown(side_a)} | {_shown(side_b)} | "
            f"{statistics.median(side_b) - statistics.median(side_a):+.1f} | "
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
        )
    return rows


def _shown(samples: list[float]) -> str:
    return f"{statistics.median(samples):.1f} ({min(samples):.1f}-{max(samples):.1f})"


async def run(backend: str, database: str, rounds: int) -> None:
    real = _db.Databases(settings(database, "real"), worker="real")
    virtual = _db.Databases(settings(database, "virtual"), worker="virtual")
    try:
        for databases in (real, virtual):
            await databases.setup()
            async with (await databases.engine()).begin() as connection:
                await connection.execute(text("INSERT INTO tasks (id, status) VALUES (1, 'p')"))
        plain = MEASURES[backend]["no time function"]
        for label, sql in [*MEASURES[backend].items(), (PUBLISH, plain)]:
            measure = functools.partial(per_statement, sql=sql, moved=label == PUBLISH)
            for row in await abba(real, virtual, measure, rounds):
                print(f"| {backend} | per statement, {label} (µs) | {row} |")
        for row in await abba(real, virtual, new_connection, rounds):
            print(f"| {backend} | a new connection, select 1 (ms) | {row} |")
        for row in await abba(real, virtual, virtual_day, max(2, rounds // 2)):
            print(f"| {backend} | virtual day, 1-minute job + round trip (ms) | {row} |")
    finally:
        for databases in (real, virtual):
            await (await databases.engine()).dispose()
            databases.close()


def intrinsic() -> None:
    """The clock's own work per statement, timed alone (best of 5 timeit runs)."""
    postgresql = _dbclock.DatabaseClock("postgresql")
    postgresql._published = None  # nothing to publish: the listener only rewrites
    sqlite = _dbclock.DatabaseClock("sqlite")
    sqlite.following = Instant()
    datetime = sqlite._sqlite_function("datetime", (0,))
    rows = {
        "PostgreSQL listener, statement without keywords": lambda: postgresql._on_postgresql(
            None, None, MEASURES["postgresql"]["now()"], {}, None, False
        ),
        "PostgreSQL listener, statement with CURRENT_TIMESTAMP (cached rewrite)": lambda: (
            postgresql._on_postgresql(
                None, None, MEASURES["postgresql"]["CURRENT_TIMESTAMP"], {}, None, False
            )
        ),
        "SQLite listener, statement with CURRENT_TIMESTAMP (cached rewrite)": lambda: (
            sqlite._on_sqlite(None, None, MEASURES["sqlite"]["CURRENT_TIMESTAMP"], {}, None, False)
        ),
        "SQLite datetime('now'), computed in Python": lambda: datetime("now"),
        "SQLite datetime('now', '-15 minutes'), through SQLite's own function": lambda: datetime(
            "now", "-15 minutes"
        ),
    }
    for label, call in rows.items():
        best = min(timeit.repeat(call, number=20000, repeat=5)) / 20000 * 1e6
        print(f"| {label} | {best:.2f} µs |")
    sqlite.close()


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    arguments = parser.parse_args()
    print(f"load average before: {_load()}")
    print("| the clock's own work | per call |\n|---|---|")
    intrinsic()
    print(
        "| backend | measure | time | A: real, median (range) | B: virtual, median (range) | "
        "B - A | B / A per round, median (range) |"
    )
    print("|---|---|---|---|---|---|---|")
    if arguments.backend in ("sqlite", "both"):
        await run("sqlite", "sqlite", arguments.rounds)
    if arguments.backend in ("postgresql", "both"):
        server = EphemeralPostgres.start()
        try:
            await run("postgresql", server.url(), arguments.rounds)
        finally:
            server.stop()
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    asyncio.run(main())

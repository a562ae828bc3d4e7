"""Overhead of ``fastsched_history``: a job that updates 1,000 rows one at a time.

Run: ``python benchmarks/bench_history.py [--rounds 7] [--backend sqlite|postgresql]``

The job is the app pattern: one short session per row (``async with session: UPDATE items SET
status = 'processing' WHERE id = :id``, which commits: a savepoint release under rollback
isolation, a real commit under commit isolation). Each round opens a test database as
``fastsched_db`` does, inserts 1,000 pending rows (not timed), and times the job with
recording off, then with recording on (``fastsched_history``: the trigger of each row hands
the write to Python, which stamps it with the time and the job run and keeps it in its
savepoint). The figure is the median over the rounds; the ratio compares medians of one run.

Results on the development machine (2 cores shared with other work, load about 2; Python
3.11, SQLAlchemy 2.1, aiosqlite 0.22, asyncpg 0.32, PostgreSQL 15; 5 rounds). Under a load of
7-8 the same script gave ratios between 0.8x and 1.3x: the noise then exceeds the overhead.

=========================  ==========  ==========  =======
backend, isolation         off         on          ratio
=========================  ==========  ==========  =======
sqlite, rollback           1320 ms     1413 ms     1.07x
sqlite, commit             1044 ms     1091 ms     1.05x
postgresql, rollback       1456 ms     1652 ms     1.13x
postgresql, commit         911 ms      1017 ms     1.12x
=========================  ==========  ==========  =======

Target: at most 1.3x.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import time

from sqlalchemy import Column, Integer, MetaData, String, Table, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from pytest_fastsched import _db, _history, _options

ROWS = 1000

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("status", String(20), nullable=False),
    Column("last_error", String(500)),
)
sessionmaker = async_sessionmaker(expire_on_commit=False)


def settings(database: str) -> _options.Settings:
    """Settings as the plugin reads them, pointing at this module's app objects."""
    return _options.Settings(
        scheduler=None,
        sessionmaker="__main__:sessionmaker",
        metadata="__main__:metadata",
        app=None,
        database=database,
        clock_backend="freezegun",
        start=dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc),
        watchdog=30.0,
    )


async def job() -> None:
    """The job: each row moved to ``processing`` in a short session of its own."""
    for row_id in range(1, ROWS + 1):
        async with sessionmaker() as session, session.begin():
            await session.execute(
                update(items).where(items.c.id == row_id).values(status="processing")
            )


async def timed_job(database: _db.Database) -> float:
    await database.insert(items, [{"id": i, "status": "pending"} for i in range(1, ROWS + 1)])
    start = time.perf_counter()
    await job()
    return time.perf_counter() - start


async def one_round(databases: _db.Databases, isolation: _options.IsolationMode) -> list[float]:
    """The job's duration with recording off, then on (seconds)."""
    async with databases.open_test(isolation) as database:
        off = await timed_job(database)
    async with databases.open_test(isolation) as database:
        async with _history.record(database, [], None) as history:
            on = await timed_job(database)
        assert len(history.all_records()) == 2 * ROWS
    return [off, on]


async def measure(
    databases: _db.Databases, isolation: _options.IsolationMode, rounds: int
) -> tuple[float, float]:
    """Median durations (ms) of the job with recording off and on."""
    await one_round(databases, isolation)  # warm-up: engine, triggers, caches
    results = [await one_round(databases, isolation) for _ in range(rounds)]
    off = statistics.median(result[0] for result in results) * 1000
    on = statistics.median(result[1] for result in results) * 1000
    return off, on


def run(database: str, rounds: int) -> dict[str, tuple[float, float]]:
    databases = _db.Databases(settings(database))
    loop = asyncio.new_event_loop()
    try:
        figures = {
            isolation: loop.run_until_complete(measure(databases, isolation, rounds))
            for isolation in _options.ISOLATION_MODES
        }
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
        databases.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), action="append")
    arguments = parser.parse_args()
    print(f"{'backend, isolation':<24} {'off':>10} {'on':>10} {'ratio':>7}")
    for backend in arguments.backend or ["sqlite", "postgresql"]:
        for isolation, (off, on) in run(backend, arguments.rounds).items():
            name = f"{backend}, {isolation}"
            print(f"{name:<24} {off:>7.0f} ms {on:>7.0f} ms {on / off:>6.2f}x")


if __name__ == "__main__":
    main()

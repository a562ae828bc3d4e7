"""Overhead of ``fastsched_history``: a job that updates 250 rows one at a time.

Run: ``python benchmarks/bench_history.py [--rounds 12] [--backend sqlite|postgresql]``

The job is the app pattern: one short session per row (``async with session: UPDATE items SET
status = 'processing' WHERE id = :id``, which commits: a savepoint release under rollback
isolation, a real commit under commit isolation). Each side opens a test database as
``fastsched_db`` does, inserts 250 pending rows (not timed), and times the job with
recording off or on (``fastsched_history``: the trigger of each row hands
the write to Python, which stamps it with the time and the job run and keeps it in its
savepoint).

The two sides alternate A B B A (``abba.py``); the report gives the median of each side and
the median and range of the per-round ratios on/off. The figures and the load average of the
last run are in benchmarks/README.md.

Target: at most 1.3x.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import time

import abba
from sqlalchemy import Column, Integer, MetaData, String, Table, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from pytest_fastsched import _db, _history, _options

ROWS = 250

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


async def one_side(
    databases: _db.Databases, isolation: _options.IsolationMode, side: str
) -> float:
    """The job's duration (seconds) with recording ``off`` or ``on``."""
    async with databases.open_test(isolation) as database:
        if side == "off":
            return await timed_job(database)
        async with _history.record(database, [], None) as history:
            on = await timed_job(database)
        assert len(history.all_records()) == 2 * ROWS
        return on


async def measure(
    databases: _db.Databases, isolation: _options.IsolationMode, rounds: int
) -> dict[str, list[float]]:
    """The job's durations with recording off and on, ``rounds`` times in A B B A order."""

    async def side(name: str) -> float:
        return await one_side(databases, isolation, name)

    await side("off")  # warm-up: engine, triggers, caches
    await side("on")
    return await abba.alternate_async(side, ("off", "on"), rounds)


def run(database: str, rounds: int) -> dict[str, dict[str, list[float]]]:
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
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), action="append")
    arguments = parser.parse_args()
    abba.header(f"bench_history: 250 single-row updates, {arguments.rounds} rounds")
    print("| backend, isolation | off | on | on/off: median (range) |")
    print("|---|---|---|---|")
    for backend in arguments.backend or ["sqlite", "postgresql"]:
        for isolation, sides in run(backend, arguments.rounds).items():
            off, on = sides["off"], sides["on"]
            print(
                f"| {backend}, {isolation} | {abba.ms(off, 0)} | {abba.ms(on, 0)} | "
                f"{abba.ratio(on, off)} |"
            )
    abba.footer()


if __name__ == "__main__":
    main()

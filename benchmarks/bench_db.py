"""Per-test overhead of database isolation: ``fastsched_db`` against the usual alternatives.

Run: ``python benchmarks/bench_db.py [--rounds 8] [--tests 25] [--backend sqlite|postgresql]``

Each side is one test's database setup plus teardown, with nothing in the test body, over a
small app schema (three tables, foreign keys, an index); a round measures ``--tests`` tests
of each side (their median), the sides in A B B A order (see ``abba.py``):

- rollback: ``fastsched_db`` (the code path of the fixture) on one event loop (a session-scoped
  loop): check out the loop's pooled connection, BEGIN, re-bind the app's sessionmaker; then
  restore it and ROLLBACK.
- rollback, new loop per test: the same with pytest-asyncio's default function-scoped loops
  (each test on a new loop, ended by ``loop.shutdown_asyncgens()`` as pytest-asyncio does).
  One test engine serves every loop; SQLite's pooled connection passes to the next loop,
  asyncpg's belongs to its loop, so each test connects.
- commit: ``@pytest.mark.fastsched(isolation="commit")``, tables emptied with DELETE.
- create_all/drop_all: the schema created and dropped around each test.
- TRUNCATE: the tables emptied after each test, on a pooled connection of one loop (SQLite
  has no TRUNCATE: DELETE FROM each).
- TRUNCATE, new loop per test: the same in pytest-asyncio's default configuration, as a suite
  without the plugin does it: a new loop per test, whose asyncpg connection is its own
  (a ``NullPool`` engine: a new connection to the server in each test).

The ratios: TRUNCATE on one loop against rollback with a new loop per test (the plugin's
default configuration against the cheapest TRUNCATE), and TRUNCATE against rollback each in
the default configuration (both with a new loop per test).

PostgreSQL is the plugin's ephemeral server (unix socket, fsync off). The figures and the
load average of the last run are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import time
from collections.abc import Awaitable, Callable

import abba
from sqlalchemy import Column, DateTime, ForeignKey, Index, Integer, MetaData, String, Table
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from pytest_fastsched import _db, _options

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("status", String(20), nullable=False),
    Column("last_error", String(500)),
    Column("updated_at", DateTime(timezone=True)),
    Index("ix_items_status", "status"),
)
runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("item_id", ForeignKey("items.id"), nullable=False),
    Column("outcome", String(20)),
)
events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", ForeignKey("runs.id"), nullable=False),
    Column("message", String(200)),
)
sessionmaker = async_sessionmaker(expire_on_commit=False)

Step = Callable[[], Awaitable[None]]


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


SIDES = (
    "rollback",
    "rollback, new loop per test",
    "commit (DELETE)",
    "create_all/drop_all",
    "TRUNCATE (SQLite: DELETE)",
    "TRUNCATE, new loop per test",
)


async def median_of(step: Step, tests: int) -> float:
    """The median duration of ``step`` in seconds over ``tests`` runs."""
    durations = []
    for _ in range(tests):
        start = time.perf_counter()
        await step()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def isolated(databases: _db.Databases, isolation: _options.IsolationMode) -> Step:
    async def step() -> None:
        async with databases.open_test(isolation):
            pass

    return step


def create_and_drop(engine: AsyncEngine) -> Step:
    async def step() -> None:
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
        async with engine.begin() as connection:
            await connection.run_sync(metadata.drop_all)

    return step


def truncate(engine: AsyncEngine) -> Step:
    names = ", ".join(table.name for table in metadata.sorted_tables)

    async def step() -> None:
        async with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                await connection.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
            else:
                for table in reversed(metadata.sorted_tables):
                    await connection.execute(table.delete())

    return step


class Bench:
    """The sides of one backend: one event loop for those that share it, new ones for the
    side with a loop per test."""

    def __init__(self, database: str, tests: int) -> None:
        self.databases = _db.Databases(settings(database))
        self.tests = tests
        self.loop = asyncio.new_event_loop()
        self.engine = self.loop.run_until_complete(self._setup())
        self.own_connections = create_async_engine(self.engine.url, poolclass=NullPool)

    async def _setup(self) -> AsyncEngine:
        await self.databases.setup()
        return await self.databases.engine()

    def measure(self, side: str) -> float:
        """The median of one round's tests of ``side``, in seconds."""
        if side == "rollback, new loop per test":
            return self._new_loop_per_test(isolated(self.databases, "rollback"))
        if side == "TRUNCATE, new loop per test":
            return self._new_loop_per_test(truncate(self.own_connections))
        return self.loop.run_until_complete(self._in_one_loop(side))

    async def _in_one_loop(self, side: str) -> float:
        if side == "create_all/drop_all":
            async with self.engine.begin() as connection:
                await connection.run_sync(metadata.drop_all)
            try:
                return await median_of(create_and_drop(self.engine), self.tests)
            finally:
                async with self.engine.begin() as connection:
                    await connection.run_sync(metadata.create_all)
        steps = {
            "rollback": isolated(self.databases, "rollback"),
            "commit (DELETE)": isolated(self.databases, "commit"),
            "TRUNCATE (SQLite: DELETE)": truncate(self.engine),
        }
        return await median_of(steps[side], self.tests)

    def _new_loop_per_test(self, step: Step) -> float:
        durations = []
        for _ in range(self.tests):
            loop = asyncio.new_event_loop()
            try:
                start = time.perf_counter()
                loop.run_until_complete(step())
                loop.run_until_complete(loop.shutdown_asyncgens())  # ends the loop's pool share
                durations.append(time.perf_counter() - start)
            finally:
                loop.close()
        return statistics.median(durations)

    def close(self) -> None:
        self.loop.run_until_complete(self.own_connections.dispose())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()
        self.databases.close()


def measure(database: str, rounds: int, tests: int) -> dict[str, list[float]]:
    """Every side of one backend, ``rounds`` times in A B B A order, after a warm-up round."""
    bench = Bench(database, tests)
    try:
        for side in SIDES:
            bench.measure(side)
        return abba.alternate(bench.measure, SIDES, rounds)
    finally:
        bench.close()


def report(name: str, results: dict[str, list[float]]) -> None:
    """The medians of one backend, and the ratios the issue sets targets for."""
    print(f"| {name} | median (range of the rounds' medians) |")
    print("|---|---|")
    for side in SIDES:
        print(f"| {side} | {abba.ms(results[side])} |")
    rollback, new_loop = results["rollback"], results["rollback, new loop per test"]
    truncate = results["TRUNCATE (SQLite: DELETE)"]
    truncate_new_loop = results["TRUNCATE, new loop per test"]
    print(f"| TRUNCATE / rollback, new loop per test | {abba.ratio(truncate, new_loop)} |")
    print(
        "| TRUNCATE / rollback, both with a new loop per test | "
        f"{abba.ratio(truncate_new_loop, new_loop)} |"
    )
    print(f"| TRUNCATE / rollback | {abba.ratio(truncate, rollback)} |")
    print(
        "| create_all/drop_all / rollback | "
        f"{abba.ratio(results['create_all/drop_all'], rollback)} |\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tests", type=int, default=25)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), action="append")
    arguments = parser.parse_args()
    abba.header(f"bench_db: per-test isolation, {arguments.rounds} rounds of {arguments.tests}")
    for name in arguments.backend or ["sqlite", "postgresql"]:
        report(name, measure(name, arguments.rounds, arguments.tests))
    abba.footer()


if __name__ == "__main__":
    main()

"""How long the ephemeral PostgreSQL server takes: start-up, stop, one database per worker.

Run with ``python benchmarks/bench_postgres.py``; prints rows of a markdown table: the median
and range of each operation (nothing is compared, so nothing alternates) and the load
average at the start and end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import abba

from pytest_fastsched._postgres import EphemeralPostgres, find_bindir

STARTS = 5
CLONES = 20
TEMPLATE_SCHEMA = """
CREATE TYPE item_status AS ENUM ('pending', 'processing', 'completed', 'error');
CREATE TABLE items (
    id integer PRIMARY KEY,
    status item_status NOT NULL DEFAULT 'pending',
    last_error text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX items_status ON items (status);
"""


def _timed(action: Callable[[], object]) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def _measure_start_and_stop() -> tuple[list[float], list[float]]:
    starts, stops = [], []
    for _ in range(STARTS):
        began = time.perf_counter()
        server = EphemeralPostgres.start()
        starts.append(time.perf_counter() - began)
        stops.append(_timed(server.stop))
    return starts, stops


def _measure_databases() -> tuple[list[float], list[float]]:
    import asyncio

    import asyncpg

    async def create_schema(dsn: str) -> None:
        connection = await asyncpg.connect(dsn)
        try:
            await connection.execute(TEMPLATE_SCHEMA)
        finally:
            await connection.close()

    with EphemeralPostgres.start() as server:
        server.create_database("template_app")
        asyncio.run(create_schema(server.dsn("template_app")))
        names = [f"worker_{index}" for index in range(CLONES)]
        creates = [_timed(partial(server.create_database, name, "template_app")) for name in names]
        drops = [_timed(partial(server.drop_database, name)) for name in names]
    return creates, drops


def _row(what: str, samples: list[float]) -> str:
    return f"| {what} | {len(samples)} | {abba.ms(samples, 0)} |"


def main() -> None:
    """Measure and print the table."""
    abba.header(f"bench_postgres: the ephemeral server ({find_bindir()})")
    starts, stops = _measure_start_and_stop()
    creates, drops = _measure_databases()
    print("| operation | runs | median (range) |")
    print("|---|---|---|")
    print(_row("server start (initdb + pg_ctl start, ready)", starts))
    print(_row("server stop and directory removal", stops))
    print(_row("CREATE DATABASE from a template (1 table, 1 enum)", creates))
    print(_row("DROP DATABASE ... WITH (FORCE)", drops))
    abba.footer()


if __name__ == "__main__":
    main()

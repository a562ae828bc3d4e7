"""Schema build per test session: a 20-revision Alembic history against create_all().

Run: ``python benchmarks/bench_schema.py [--rounds 4] [--sqlite-only]``

The schema: 20 tables, each with a foreign key to the one before, a string, a timestamp and
an indexed status. The Alembic history creates one table per revision; ``create_all()`` makes
the same tables from a ``MetaData``. Alembic runs with both kinds of ``env.py``: one that takes
the plugin's connection (``config.attributes["connection"]``, inside
``AsyncConnection.run_sync``) and Alembic's async template, which builds its own engine from
``sqlalchemy.url`` and calls ``asyncio.run()`` (in a thread). Figures are medians:

- build: the schema step alone (``Schema.build``) on an empty database;
- first worker, PostgreSQL: ``Databases.setup()`` of the first xdist worker, from nothing to a
  database ready for the first test: the template database made and built under the
  advisory lock, then this worker's database cloned from it (``CREATE DATABASE ...
  TEMPLATE``). On SQLite each worker builds its own file: its set-up is the build;
- further worker, PostgreSQL: ``Databases.setup()`` of each other worker: the clone only.

The three ways alternate A B C, C B A, ... (``abba.py``); the report gives each median with
its range, and per step the median and range of the per-round ratios to ``create_all()``. The
figures and the load average of the last run are in benchmarks/README.md.

The 20 revisions are paid once per session. An ``env.py`` with its own engine commits each
DDL statement on its own connection (on SQLite, five times faster once the plugin has put the
file in WAL mode).
A further xdist worker pays only the clone, whatever built the template.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import tempfile
import time
from pathlib import Path

import abba
from sqlalchemy import Column, DateTime, ForeignKey, Index, Integer, MetaData, String, Table
from sqlalchemy.pool import NullPool

from pytest_fastsched import _db, _options, _postgres, _schema, _testdb

TABLES = 20

metadata = MetaData()
for number in range(1, TABLES + 1):
    Table(
        f"t{number:02}",
        metadata,
        Column("id", Integer, primary_key=True),
        *([Column("parent_id", ForeignKey(f"t{number - 1:02}.id"))] if number > 1 else []),
        Column("name", String(50), nullable=False),
        Column("status", String(20), nullable=False),
        Column("created_at", DateTime(timezone=True)),
        Index(f"ix_t{number:02}_status", "status"),
    )

ALEMBIC_INI = """
[alembic]
script_location = %(here)s/migrations
path_separator = os
sqlalchemy.url = sqlite+aiosqlite:///never-used.db
"""

ENV_TAKES_CONNECTION = """
import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import async_engine_from_config

config = context.config


def do_run_migrations(connection):
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations():
    engine = async_engine_from_config(
        config.get_section(config.config_ini_section, {}), poolclass=pool.NullPool
    )
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await engine.dispose()


connection = config.attributes.get("connection", None)
if connection is None:
    asyncio.run(run_async_migrations())
else:
    do_run_migrations(connection)
"""

ENV_OWN_ENGINE = ENV_TAKES_CONNECTION.split("connection = config.attributes")[0] + (
    "asyncio.run(run_async_migrations())\n"
)

REVISION = '''
"""Table t{number:02}."""

import sqlalchemy as sa
from alembic import op

revision = "{number:04}"
down_revision = {down!r}


def upgrade():
    op.create_table(
        "t{number:02}",
        sa.Column("id", sa.Integer, primary_key=True),
        {parent}
        sa.Column("name", sa.String(50), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_t{number:02}_status", "t{number:02}", ["status"])
'''


def write_project(directory: Path, env_py: str) -> Path:
    """A 20-revision Alembic project in ``directory``; returns its ``alembic.ini``."""
    versions = directory / "migrations" / "versions"
    versions.mkdir(parents=True)
    (directory / "alembic.ini").write_text(ALEMBIC_INI)
    (directory / "migrations" / "env.py").write_text(env_py)
    for number in range(1, TABLES + 1):
        parent = (
            f'sa.Column("parent_id", sa.Integer, sa.ForeignKey("t{number - 1:02}.id")),'
            if number > 1
            else ""
        )
        down = f"{number - 1:04}" if number > 1 else None
        source = REVISION.format(number=number, down=down, parent=parent)
        (versions / f"{number:04}_t{number:02}.py").write_text(source)
    return directory / "alembic.ini"


def settings(database: str, alembic: Path | None) -> _options.Settings:
    """Settings as the plugin reads them: ``create_all()`` of this module's metadata, or the
    Alembic project at ``alembic``."""
    return _options.Settings(
        scheduler=None,
        sessionmaker=None,
        metadata=None if alembic else "__main__:metadata",
        app=None,
        database=database,
        clock_backend="freezegun",
        start=dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc),
        watchdog=30.0,
        alembic=str(alembic) if alembic else None,
    )


COLUMNS = (
    "build, SQLite",
    "build, PostgreSQL",
    "first worker, PostgreSQL",
    "further worker, PostgreSQL",
)
Durations = dict[str, list[float]]


def schema_of(alembic: Path | None) -> _schema.Schema:
    if alembic is None:
        return _schema.Schema(metadata=metadata, metadata_path="__main__:metadata")
    return _schema.Schema(alembic=str(alembic))


def timed_build(url: str, alembic: Path | None) -> float:
    """The schema step alone, on an empty database."""

    async def build() -> float:
        engine = _testdb.create_engine(url, poolclass=NullPool)
        try:
            began = time.perf_counter()
            await schema_of(alembic).build(engine)
            return time.perf_counter() - began
        finally:
            await engine.dispose()

    return asyncio.run(build())


def timed_setup(databases: _db.Databases) -> float:
    began = time.perf_counter()
    asyncio.run(databases.setup())
    return time.perf_counter() - began


def sqlite_round(alembic: Path | None, durations: Durations) -> None:
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite+aiosqlite:///{directory}/test.db"
        durations["build, SQLite"].append(timed_build(url, alembic))


def postgres_round(
    server: _postgres.EphemeralPostgres, alembic: Path | None, durations: Durations
) -> None:
    server.create_database("bench_build")
    try:
        durations["build, PostgreSQL"].append(timed_build(server.url("bench_build"), alembic))
    finally:
        server.drop_database("bench_build")
    # Two xdist workers: the first builds the template and clones it, the second clones it.
    controller = _testdb.Controller(server.url())
    workers = [
        _db.Databases(
            settings(server.url(), alembic), worker=name, workerinput=controller.workerinput()
        )
        for name in ("gw0", "gw1")
    ]
    try:
        durations["first worker, PostgreSQL"].append(timed_setup(workers[0]))
        durations["further worker, PostgreSQL"].append(timed_setup(workers[1]))
    finally:
        for databases in workers:
            databases.close()
        controller.close()


def measure(
    projects: dict[str, Path | None],
    server: _postgres.EphemeralPostgres | None,
    rounds: int,
) -> dict[str, Durations]:
    """Each way to build the schema in turn, A B C then C B A, ``rounds`` rounds after one of
    warm-up (imports, the server's caches)."""
    results = {name: {column: [] for column in COLUMNS} for name in projects}

    def one(name: str) -> float:
        sqlite_round(projects[name], results[name])
        if server is not None:
            postgres_round(server, projects[name], results[name])
        return 0.0

    abba.alternate(one, list(projects), 1)
    for durations in results.values():
        for values in durations.values():
            values.clear()
    abba.alternate(one, list(projects), rounds)
    return results


def report(results: dict[str, Durations]) -> None:
    """One row per way to build the schema and step; ratios to ``create_all()``."""
    base = results["create_all()"]
    print("| way, step | median (range) | ratio to create_all(): median (range) |")
    print("|---|---|---|")
    for name, durations in results.items():
        for column in COLUMNS:
            if not durations[column]:
                continue
            ratio = "" if name == "create_all()" else abba.ratio(durations[column], base[column])
            print(f"| {name}, {column} | {abba.ms(durations[column], 0)} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sqlite-only", action="store_true")
    arguments = parser.parse_args()
    abba.header(f"bench_schema: 20 tables, three ways, {arguments.rounds} rounds")
    with tempfile.TemporaryDirectory() as directory:
        projects: dict[str, Path | None] = {
            "create_all()": None,
            "alembic, env.py takes the connection": write_project(
                Path(directory, "shared"), ENV_TAKES_CONNECTION
            ),
            "alembic, env.py with its own engine (thread)": write_project(
                Path(directory, "own"), ENV_OWN_ENGINE
            ),
        }
        server = None if arguments.sqlite_only else _postgres.EphemeralPostgres.start()
        try:
            results = measure(projects, server, arguments.rounds)
        finally:
            if server is not None:
                server.stop()
    report(results)
    abba.footer()


if __name__ == "__main__":
    main()

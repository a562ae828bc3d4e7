"""The schema of ``fastsched_metadata`` and of the ``pytest_fastsched_create_schema`` hook.

Each test runs a user project whose models need help to create (see :data:`MODELS`) on
SQLite and on PostgreSQL, but for the extensions, which only PostgreSQL has.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from test_db import NO_RANDOM_ORDER
from test_db_errors import TWO_TESTS

README = Path(__file__).resolve().parent.parent / "README.md"

SuiteMaker = Callable[[], pytest.Pytester]

MODELS = """
import os

from sqlalchemy import (
    Column, ForeignKey, Index, Integer, MetaData, String, Table, TypeDecorator, Uuid, select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, CITEXT, ENUM
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# In production a migration creates the type: create_all() leaves it out.
JOB_STATUS = ENUM(
    "pending", "processing", "completed", "error", name="job_status", create_type=False
)


class Base(DeclarativeBase):
    pass


class Domain(Base):
    __tablename__ = "domains"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id"))
    status: Mapped[str] = mapped_column(JOB_STATUS, default="pending", index=True)
    last_error: Mapped[str | None] = mapped_column(String(200))


# The production engine: the tests must never reach it.
engine = create_async_engine(os.environ["FASTSCHED_CANARY_URL"])
async_session_factory = async_sessionmaker(engine, expire_on_commit=False)


async def complete_pending():
    async with async_session_factory() as session:
        jobs = (await session.scalars(select(Job).where(Job.status == "pending"))).all()
        for job in jobs:
            job.status = "completed"
        await session.commit()
        return sorted(job.id for job in jobs)


# The models and a legacy table that contradicts them: the whole does not create.
everything = MetaData()
for table in Base.metadata.sorted_tables:
    table.to_metadata(everything)
Table(
    "legacy_runs",
    everything,
    Column("id", Integer, primary_key=True),
    Column("job_ref", String(20), ForeignKey("jobs.id")),  # PostgreSQL: not an integer
    Column("status", String(20)),
    Index("ix_jobs_status", "status"),  # copied from jobs: SQLite has the name already
)

class Plan(TypeDecorator):
    impl = ENUM("free", "pro", name="account_plan", create_type=False)
    cache_ok = True


# Types only PostgreSQL has: of extensions, enum types in an array and a type decorator.
accounts = MetaData()
Table(
    "accounts",
    accounts,
    Column("id", Integer, primary_key=True),
    Column("token", Uuid, server_default=text("uuid_generate_v4()")),
    Column("email", CITEXT),
    Column("roles", ARRAY(ENUM("admin", "member", name="account_role", create_type=False))),
    Column("plan", Plan),
)
"""


def _readme_block(language: str) -> str:
    section = README.read_text().split("#### Schema\n", 1)[1].split("\n## ", 1)[0]
    section = section.split("\n### ", 1)[0]  # the next fixture's section begins there
    (block,) = re.findall(rf"```{language}\n(.+?)```", section, flags=re.DOTALL)
    return str(block)


@pytest.fixture
def schema_suite(make_db_suite: Callable[[str], pytest.Pytester], database: str) -> SuiteMaker:
    """Make a user project with the package ``app`` (``app.models``: :data:`MODELS`).

    Its ``pyproject.toml`` is the README's example with the settings of the test run added;
    tests change them on the command line.
    """

    def make() -> pytest.Pytester:
        pytester = make_db_suite(database)
        pytester.path.joinpath("app.py").unlink()
        pytester.makepyfile(**{"app/__init__.py": "", "app/models.py": MODELS})
        settings = [
            f'fastsched_database = "{database}"',
            'fastsched_sessionmaker = "app.models:async_session_factory"',
            'asyncio_mode = "strict"',
            'asyncio_default_fixture_loop_scope = "function"',
            'filterwarnings = ["error"]',
        ]
        pytester.makepyprojecttoml(_readme_block("toml") + "\n".join(settings))
        return pytester

    return make


def dialect_of(database: str) -> str:
    """The dialect name of a ``database`` fixture value."""
    return "sqlite" if database == "sqlite" else "postgresql"


# -- the README's example: an enum type declared create_type=False, a hook, seed rows

SEEDED = """
import pytest
from sqlalchemy import text

from app import models


async def scalar(fastsched_db, sql):
    async with fastsched_db.background_session() as session:
        return await session.scalar(text(sql))


async def run_the_job(fastsched_db):
    assert await fastsched_db.fetch("domains") == [{"id": 1, "name": "default"}]
    await fastsched_db.insert("domains", {"id": 2, "name": "second"})
    await fastsched_db.insert("jobs", [{"id": 1, "domain_id": 1}, {"id": 2, "domain_id": 2}])
    assert await models.complete_pending() == [1, 2]
    assert await fastsched_db.status_of("jobs", 2) == "completed"
    # The column the hook added, which the models do not map, took its default.
    assert await scalar(fastsched_db, "SELECT priority FROM jobs WHERE id = 2") == 0
    async with fastsched_db.background_session() as session:
        await session.execute(text("UPDATE domains SET name = 'renamed' WHERE id = 1"))


ISOLATION = pytest.mark.parametrize(
    "isolation",
    ["rollback", pytest.param("commit", marks=pytest.mark.fastsched(isolation="commit"))],
)


@pytest.mark.asyncio
@ISOLATION
async def test_a_job_on_the_seed_rows(fastsched_db, isolation):
    assert fastsched_db.isolation == isolation
    await run_the_job(fastsched_db)


@pytest.mark.asyncio
@ISOLATION
async def test_seed_rows_stay_and_test_rows_go(fastsched_db, isolation):
    assert await fastsched_db.fetch("domains") == [{"id": 1, "name": "default"}]
    assert await fastsched_db.fetch("jobs") == []
"""


def test_the_readme_example_seeds_rows_that_stay_across_tests(schema_suite: SuiteMaker) -> None:
    pytester = schema_suite()
    pytester.makeconftest(_readme_block("python"))
    pytester.makepyfile(test_seeded=SEEDED)
    pytester.runpytest_inprocess(*NO_RANDOM_ORDER).assert_outcomes(passed=4)


# -- fastsched_tables


SUBSET = """
import pytest
from sqlalchemy import inspect

from app import models


@pytest.mark.asyncio
async def test_the_named_tables_and_the_tables_they_reach(fastsched_db):
    async with fastsched_db.background_session() as session:
        names = await session.run_sync(
            lambda sync: inspect(sync.connection()).get_table_names()
        )
    assert sorted(names) == ["domains", "jobs"]


@pytest.mark.asyncio
@pytest.mark.fastsched(isolation="commit")
async def test_commit_isolation_empties_only_those(fastsched_db):
    await fastsched_db.insert("domains", {"id": 1, "name": "default"})
    await fastsched_db.insert("jobs", {"id": 1, "domain_id": 1})
    assert await models.complete_pending() == [1]


@pytest.mark.asyncio
async def test_the_next_test_starts_empty(fastsched_db):
    assert await fastsched_db.fetch("jobs") == []
"""


def test_a_subset_creates_where_the_full_metadata_fails(schema_suite: SuiteMaker) -> None:
    pytester = schema_suite()
    pytester.makepyfile(test_subset=SUBSET)
    result = pytester.runpytest_inprocess(
        "--fastsched-metadata=app.models:everything", "--fastsched-tables=jobs", *NO_RANDOM_ORDER
    )
    result.assert_outcomes(passed=3)


LEGACY_FAILURE = {
    "sqlite": [
        "OperationalError: (sqlite3.OperationalError) index ix_jobs_status already exists. "
        "Fix the model (or the DDL it emits) so that the schema can be created on this "
        "database.",
        "statement: CREATE INDEX ix_jobs_status ON legacy_runs (status)",
    ],
    "postgresql": [
        "ProgrammingError: (sqlalchemy.dialects.postgresql.asyncpg.ProgrammingError) "
        '*foreign key constraint "legacy_runs_job_ref_fkey" cannot be implemented. Fix the '
        "model (or the DDL it emits) so that the schema can be created on this database.",
        "statement: CREATE TABLE legacy_runs ( id SERIAL NOT NULL, job_ref VARCHAR(20), "
        "status VARCHAR(20), PRIMARY KEY (id), FOREIGN KEY(job_ref) REFERENCES jobs (id) )",
    ],
}
SUGGESTION = (
    "Models that do not create as a whole: list the tables the tests need in fastsched_tables "
    "(the tables their foreign keys reach come along), build the schema with the app's "
    "migrations (fastsched_alembic), or create what is missing in a "
    "pytest_fastsched_create_schema(connection, dialect) hook."
)


@pytest.mark.parametrize("tables", ["", "jobs legacy_runs"], ids=["all tables", "a subset"])
def test_a_failing_create_all_names_the_table_and_suggests_a_subset(
    schema_suite: SuiteMaker, database: str, tables: str
) -> None:
    pytester = schema_suite()
    pytester.makepyfile(test_two=TWO_TESTS)
    result = pytester.runpytest_inprocess(
        "--fastsched-metadata=app.models:everything", f"--fastsched-tables={tables}"
    )
    result.assert_outcomes(errors=2)
    source = "fastsched_metadata = 'app.models:everything'"
    if tables:
        source += f", fastsched_tables = '{tables}'"
    first, statement = LEGACY_FAILURE[dialect_of(database)]
    message = [f"{source}: create_all() failed on {dialect_of(database)}: {first}", statement]
    if not tables:
        message.append(SUGGESTION)
    result.stdout.fnmatch_lines([*message, "*", *message], consecutive=True)


def test_each_xdist_worker_gets_the_full_schema(schema_suite: SuiteMaker) -> None:
    pytester = schema_suite()
    pytester.makeconftest(_readme_block("python"))
    pytester.makepyfile(test_seeded=SEEDED)
    result = pytester.runpytest_subprocess("-p", "xdist", "-n", "2", "--dist", "each")
    result.assert_outcomes(passed=8)


# -- types only PostgreSQL has

POSTGRESQL_TYPES = """
import pytest


@pytest.mark.asyncio
async def test_extension_and_enum_types(fastsched_db):
    await fastsched_db.insert(
        "accounts",
        {"id": 1, "email": "Alice@Example.com", "roles": ["admin", "member"], "plan": "pro"},
    )
    (account,) = await fastsched_db.fetch("accounts", email="alice@example.com")
    assert account["token"] is not None
    assert (account["roles"], account["plan"]) == (["admin", "member"], "pro")
"""

ACCOUNTS = ("--fastsched-metadata=app.models:accounts", "--fastsched-seed-tables=")


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_extensions_and_enum_types_are_created_before_the_tables(
    schema_suite: SuiteMaker,
) -> None:
    pytester = schema_suite()
    pytester.makepyfile(test_postgresql_types=POSTGRESQL_TYPES)
    result = pytester.runpytest_inprocess(*ACCOUNTS, "--fastsched-extensions=uuid-ossp, citext")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_missing_extension_is_named(schema_suite: SuiteMaker) -> None:
    pytester = schema_suite()
    pytester.makepyfile(test_two=TWO_TESTS)
    result = pytester.runpytest_inprocess(*ACCOUNTS, "--fastsched-extensions=no_such_extension")
    result.assert_outcomes(errors=2)
    message = (
        'fastsched_extensions: CREATE EXTENSION IF NOT EXISTS "no_such_extension" failed: '
        "*Error: (sqlalchemy.dialects.postgresql.asyncpg.*Error) *extension "
        '"no_such_extension" is not available. Install the extension on the PostgreSQL '
        "server, or remove it from fastsched_extensions."
    )
    result.stdout.fnmatch_lines([message, message])


# -- what the build cannot do, named

FAILING_HOOK = """from sqlalchemy import text


def pytest_fastsched_create_schema(connection, dialect):
    connection.execute(text("INSERT INTO tenants (id)   VALUES (1)"))
"""
ASYNC_HOOK = """async def pytest_fastsched_create_schema(connection, dialect):
    pass
"""
NO_TENANTS = {
    "sqlite": "OperationalError: (sqlite3.OperationalError) no such table: tenants",
    # Older SQLAlchemy versions put the asyncpg exception class before the message.
    "postgresql": "ProgrammingError: (sqlalchemy.dialects.postgresql.asyncpg.ProgrammingError) "
    '*relation "tenants" does not exist',
}
BUILD_ERRORS = {
    "unknown table": (
        "",
        ["--fastsched-tables=jobs, nope"],
        [
            "fastsched_tables names 'nope', which is not in fastsched_metadata = "
            "'app.models:Base.metadata' (its tables: domains, jobs)."
        ],
    ),
    "missing seed table": (
        "",
        ["--fastsched-seed-tables=tenants"],
        [
            "fastsched_seed_tables names 'tenants', which the test database does not have "
            "(its tables: domains, jobs)."
        ],
    ),
    "failing hook": (
        FAILING_HOOK,
        [],
        [
            "pytest_fastsched_create_schema (conftest.py, line 5) failed on {dialect}: "
            "{no_tenants}",
            "statement: INSERT INTO tenants (id) VALUES (1)",
            "The hook runs once per test database, after the schema of fastsched_alembic or "
            "fastsched_metadata is built.",
        ],
    ),
    "async hook": (
        ASYNC_HOOK,
        [],
        [
            "pytest_fastsched_create_schema (conftest.py, line 1) is a coroutine function: the "
            "hook is called synchronously, with a sqlalchemy Connection. Write it as a plain "
            "def; connection.execute(...) needs no await."
        ],
    ),
}


@pytest.mark.parametrize(
    ("conftest", "options", "message"), BUILD_ERRORS.values(), ids=BUILD_ERRORS.keys()
)
def test_what_the_build_cannot_do_fails_each_test_with_its_cause(
    schema_suite: SuiteMaker, database: str, conftest: str, options: list[str], message: list[str]
) -> None:
    pytester = schema_suite()
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_two=TWO_TESTS)
    result = pytester.runpytest_inprocess(*options)
    result.assert_outcomes(errors=2)
    dialect = dialect_of(database)
    lines = [line.format(dialect=dialect, no_tenants=NO_TENANTS[dialect]) for line in message]
    result.stdout.fnmatch_lines([*lines, "*", *lines], consecutive=True)


# -- settings that cannot work together

LOOP_SCOPE = "asyncio_default_fixture_loop_scope = function"

USAGE_ERRORS = {
    "tables without metadata": (
        ["fastsched_tables = jobs"],
        "ERROR: fastsched_tables = 'jobs' needs fastsched_metadata: it names tables of the "
        "app's MetaData to create. See "
        "https://github.com/pytest-fastsched/pytest-fastsched#configuration",
    ),
    "tables and alembic": (
        ["fastsched_metadata = app:Base.metadata", "fastsched_tables = jobs"],
        "ERROR: fastsched_tables and fastsched_alembic exclude each other: the migrations build "
        "the whole schema. Remove fastsched_tables, or remove fastsched_alembic to build the "
        "schema with create_all(). See "
        "https://github.com/pytest-fastsched/pytest-fastsched#configuration",
    ),
}


@pytest.mark.parametrize(("lines", "message"), USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_schema_settings_that_cannot_work_together(
    pytester: pytest.Pytester, lines: list[str], message: str
) -> None:
    pytester.makefile(".ini", alembic="[alembic]\n")
    alembic = ["fastsched_alembic = alembic.ini"] if "alembic" in message else []
    pytester.makeini("\n".join(["[pytest]", LOOP_SCOPE, *lines, *alembic]))
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_missing_alembic_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "\n".join(["[pytest]", LOOP_SCOPE, "fastsched_alembic = migrations/alembic.ini"])
    )
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: fastsched_alembic = 'migrations/alembic.ini': no such file "
            f"{pytester.path}/migrations/alembic.ini. Give the path of the app's alembic.ini, "
            f"relative to the rootdir ({pytester.path}). See "
            "https://github.com/pytest-fastsched/pytest-fastsched#configuration"
        ]
    )

"""``fastsched_alembic``: the schema of the app's own migrations, with its own env.py.

Each test runs a user project made from ``tests/alembic_project`` (two revisions: tenants and
jobs with a PostgreSQL enum type, then a column the models do not map and the default tenant)
on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_db import NO_RANDOM_ORDER
from test_db_errors import TWO_TESTS
from test_schema import dialect_of

pytest.importorskip("alembic", reason="the alembic extra is not installed")

PROJECT = Path(__file__).parent / "alembic_project"

SuiteMaker = Callable[..., pytest.Pytester]

MIGRATED = """
import logging
from pathlib import Path

import pytest
from sqlalchemy import text

import app

# Made before the schema is built: the fileConfig() of env.py must not silence it.
LOG = logging.getLogger("app.jobs")


async def scalar(fastsched_db, sql):
    async with fastsched_db.background_session() as session:
        return await session.scalar(text(sql))


@pytest.mark.asyncio
async def test_the_migrations_built_the_schema(fastsched_db):
    assert await fastsched_db.fetch("tenants") == [{"id": 1, "name": "default"}]
    await fastsched_db.insert("jobs", [{"id": 1, "tenant_id": 1}, {"id": 2, "tenant_id": 1}])
    assert await app.complete_pending() == [1, 2]
    assert await fastsched_db.status_of("jobs", 2) == app.JobStatus.completed
    assert await scalar(fastsched_db, "SELECT priority FROM jobs WHERE id = 1") == 0


@pytest.mark.asyncio
@pytest.mark.fastsched(isolation="commit")
async def test_commit_isolation(fastsched_db):
    await fastsched_db.insert("tenants", {"id": 2, "name": "second"})
    await fastsched_db.insert("jobs", {"id": 3, "tenant_id": 2})
    assert await app.complete_pending() == [3]


@pytest.mark.asyncio
async def test_seed_rows_and_the_version_stay_and_test_rows_go(fastsched_db, caplog):
    assert await fastsched_db.fetch("tenants") == [{"id": 1, "name": "default"}]
    assert await fastsched_db.fetch("jobs") == []
    assert await scalar(fastsched_db, "SELECT version_num FROM alembic_version") == "0002"
    LOG.warning("still heard")
    assert caplog.messages == ["still heard"]
"""


@pytest.fixture
def alembic_suite(make_db_suite: Callable[[str], pytest.Pytester], database: str) -> SuiteMaker:
    """Make a user project from ``tests/alembic_project`` on the ``database`` of the test."""

    def make(*ini_lines: str, env_py: str | None = None) -> pytest.Pytester:
        pytester = make_db_suite(database)
        shutil.copytree(PROJECT, pytester.path, dirs_exist_ok=True)
        if env_py is not None:
            shutil.copy(PROJECT / "env_variants" / env_py, pytester.path / "migrations" / "env.py")
        pytester.makeini(
            "\n".join(
                [
                    "[pytest]",
                    "asyncio_mode = strict",
                    "asyncio_default_fixture_loop_scope = function",
                    "filterwarnings = error",
                    f"fastsched_database = {database}",
                    "fastsched_sessionmaker = app:async_session_factory",
                    "fastsched_metadata = app:Base.metadata",
                    "fastsched_alembic = alembic.ini",
                    *ini_lines,
                ]
            )
        )
        return pytester

    return make


ENV_PY = {
    "async env.py that takes the connection": None,
    "async env.py with its own engine": "async_reads_url.py",
    "sync env.py with its own engine": "sync_reads_url.py",
}


@pytest.mark.parametrize("env_py", ENV_PY.values(), ids=ENV_PY.keys())
def test_the_migrations_build_the_schema_and_seed_rows_stay(
    alembic_suite: SuiteMaker, env_py: str | None
) -> None:
    pytester = alembic_suite("fastsched_seed_tables = tenants", env_py=env_py)
    pytester.makepyfile(test_migrated=MIGRATED)
    result = pytester.runpytest_inprocess(*NO_RANDOM_ORDER)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        ["fastsched schema: alembic=alembic.ini, tables=-, extensions=-, seed_tables=tenants"]
    )


BROKEN_REVISION = '''
"""A migration that fails on every database.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.execute("UPDATE nope   SET x = 1")
'''

UNDEFINED_TABLE = {
    "sqlite": "OperationalError: (sqlite3.OperationalError) no such table: nope",
    # Older SQLAlchemy versions put the asyncpg exception class before the message.
    "postgresql": "ProgrammingError: (sqlalchemy.dialects.postgresql.asyncpg.ProgrammingError) "
    '*relation "nope" does not exist',
}


@pytest.mark.parametrize("env_py", ENV_PY.values(), ids=ENV_PY.keys())
def test_a_failing_migration_names_its_revision_and_statement(
    alembic_suite: SuiteMaker, database: str, env_py: str | None
) -> None:
    pytester = alembic_suite(env_py=env_py)
    pytester.path.joinpath("migrations", "versions", "0003_broken.py").write_text(BROKEN_REVISION)
    pytester.makepyfile(test_two=TWO_TESTS)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=2)
    dialect = dialect_of(database)
    message = [
        f"fastsched_alembic = 'alembic.ini': alembic upgrade heads failed on {dialect} in "
        "revision '0003' (migrations/versions/0003_broken.py, line 15): "
        + UNDEFINED_TABLE[dialect],
        "statement: UPDATE nope SET x = 1",
        "The test database starts empty: every revision runs, from the first.",
    ]
    result.stdout.fnmatch_lines(message + message, consecutive=False)


def test_a_failing_env_py_is_named(alembic_suite: SuiteMaker, database: str) -> None:
    pytester = alembic_suite()
    env_py = pytester.path / "migrations" / "env.py"
    env_py.write_text(env_py.read_text().replace("config = context.config", "config = None"))
    pytester.makepyfile(test_two=TWO_TESTS)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=2)
    message = (
        f"fastsched_alembic = 'alembic.ini': alembic upgrade heads failed on "
        f"{dialect_of(database)} in env.py (migrations/env.py, line 12): AttributeError: "
        "'NoneType' object has no attribute 'config_file_name'"
    )
    result.stdout.fnmatch_lines([message, "The test database starts empty: *"] * 2)


def test_a_broken_alembic_ini_is_named(alembic_suite: SuiteMaker, database: str) -> None:
    pytester = alembic_suite()
    ini = pytester.path / "alembic.ini"
    ini.write_text(ini.read_text().replace("/migrations", "/nowhere"))
    pytester.makepyfile(test_two=TWO_TESTS)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=2)
    message = (
        f"fastsched_alembic = 'alembic.ini': alembic upgrade heads failed on "
        f"{dialect_of(database)}: CommandError: Path doesn't exist: "
        f"*{pytester.path}/nowhere*"
    )
    result.stdout.fnmatch_lines([message, "The test database starts empty: *"] * 2)


ANOTHER_DATABASE = (
    "fastsched_alembic = 'alembic.ini': env.py connected to another database than the "
    "test database (sqlite:///{directory}/elsewhere.db), and the plugin stopped it there: a test "
    "run never migrates the app's own database. Let env.py use the connection in "
    "config.attributes['connection'] when it is set (Alembic's cookbook recipe 'Sharing "
    "a Connection across one or more programmatic migration commands'), or the "
    "sqlalchemy.url the plugin sets, instead of a URL of its own."
)
NOTHING_MIGRATED = (
    "fastsched_alembic = 'alembic.ini': alembic upgrade heads ran, but the test database "
    "is still empty (not even an alembic_version table): env.py migrated another "
    "database. Let env.py use the connection in config.attributes['connection'] when it "
    "is set (Alembic's cookbook recipe 'Sharing a Connection across one or more "
    "programmatic migration commands'), or the sqlalchemy.url the plugin sets, instead "
    "of a URL of its own."
)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite+aiosqlite:///elsewhere.db", ANOTHER_DATABASE),
        ("sqlite+aiosqlite:///:memory:", NOTHING_MIGRATED),
    ],
    ids=["a file: refused", "in memory"],
)
def test_an_env_py_that_migrates_another_database_is_named(
    alembic_suite: SuiteMaker, url: str, message: str
) -> None:
    pytester = alembic_suite(env_py="async_reads_url.py")
    env_py = pytester.path / "migrations" / "env.py"
    env_py.write_text(
        env_py.read_text().replace(
            "config = context.config\n",
            f'config = context.config\nconfig.set_main_option("sqlalchemy.url", "{url}")\n',
        )
    )
    pytester.makepyfile(test_two=TWO_TESTS)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=2)
    message = message.format(directory=os.path.realpath(pytester.path))
    result.stdout.fnmatch_lines([message, message])
    assert not pytester.path.joinpath("elsewhere.db").exists()


def test_a_missing_alembic_names_the_extra(
    alembic_suite: SuiteMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester = alembic_suite()
    pytester.makepyfile(test_two=TWO_TESTS)
    monkeypatch.setitem(sys.modules, "alembic", None)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=2)
    message = (
        "fastsched_alembic = 'alembic.ini' needs Alembic, which is not installed: "
        "pip install 'pytest-fastsched[alembic]'."
    )
    result.stdout.fnmatch_lines([message, message])


def test_each_xdist_worker_gets_the_full_schema(alembic_suite: SuiteMaker) -> None:
    pytester = alembic_suite("fastsched_seed_tables = tenants")
    pytester.makepyfile(test_migrated=MIGRATED)
    result = pytester.runpytest_subprocess(
        "-p", "xdist", "-n", "2", "--dist", "each", *NO_RANDOM_ORDER
    )
    result.assert_outcomes(passed=6)

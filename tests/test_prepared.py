"""Named prepared statements that break behind transaction-mode poolers, and the test engine's
options (``fastsched_engine_options``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from pytest_fastsched import _prepared
from pytest_fastsched._postgres import EphemeralPostgres

NO_RANDOM_ORDER = ("-p", "no:randomly")
LOOP_SCOPE = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
CHECK = "fastsched_prepared_statements = check"
POOLER_SAFE = "fastsched_engine_options = pooling:pooler_safe"

# The user's app, next to tests/conftest.py's DB_APP: a job that reads the pending items, and
# the engine options SQLAlchemy documents for PgBouncer.
POOLING = """
import uuid

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import select

from app import Item, get_background_session

scheduler = AsyncIOScheduler(timezone="UTC")


async def count_pending():
    async with get_background_session() as session:
        query = select(Item.id).where(Item.status == "pending")
        return len((await session.scalars(query)).all())


def pooler_safe(url):
    if not url.startswith("postgresql+asyncpg"):
        return {"execution_options": {"seen_url": url}}
    return {
        "execution_options": {"seen_url": url},
        "connect_args": {
            "statement_cache_size": 0,
            "prepared_statement_cache_size": 0,
            "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
        },
    }


NOT_OPTIONS = "pool_pre_ping=True"
AUTOCOMMIT = {"isolation_level": "AUTOCOMMIT"}
CREATOR = {"async_creator": None}
UNKNOWN = {"pool_sizes": 3}


def broken(url):
    raise RuntimeError("no settings file")
"""

JOB_SUITE = """
import pytest

from pooling import count_pending, scheduler


@pytest.fixture
def job(fastsched_scheduler):
    scheduler.add_job(count_pending, "interval", minutes=5, id="count_pending")
    return fastsched_scheduler


@pytest.mark.asyncio
async def test_rollback(fastsched_clock, fastsched_db, job):
    await fastsched_db.insert("items", [{"id": 1}, {"id": 2}])
    await fastsched_clock.advance(minutes=15)
    assert [run.retval for run in job.runs] == [2, 2, 2]


@pytest.mark.asyncio
@pytest.mark.fastsched(isolation="commit")
async def test_commit(fastsched_clock, fastsched_db, job):
    await fastsched_db.insert("items", [{"id": 1}, {"id": 2}])
    await fastsched_clock.advance(minutes=15)
    assert [run.retval for run in job.runs] == [2, 2, 2]


@pytest.mark.asyncio
@pytest.mark.fastsched(replicas=2)
async def test_replicas(fastsched_clock, fastsched_db, job):
    await fastsched_db.insert("items", [{"id": 1}, {"id": 2}])
    await fastsched_clock.advance(minutes=10)
    assert sorted(run.replica for run in job.runs) == [0, 0, 1, 1]
"""


def _suite(
    make_db_suite: Callable[[str], pytest.Pytester], database: str, *extra: str
) -> pytest.Pytester:
    suite = make_db_suite(database)
    suite.makepyfile(pooling=POOLING)
    settings = [
        "[pytest]",
        "asyncio_mode = strict",
        "asyncio_default_fixture_loop_scope = function",
        "filterwarnings = error",
        f"fastsched_database = {database}",
        "fastsched_sessionmaker = app:async_session_factory",
        "fastsched_metadata = app:Base.metadata",
        "fastsched_scheduler = pooling:scheduler",
        *extra,
    ]
    suite.makeini("\n".join(settings))
    return suite


@pytest.fixture
def pg_suite(
    make_db_suite: Callable[[str], pytest.Pytester], postgres_server: EphemeralPostgres
) -> Callable[..., pytest.Pytester]:
    """A user project on the shared PostgreSQL server, with these extra ini lines."""
    return functools.partial(_suite, make_db_suite, postgres_server.url())


def test_the_drivers_defaults_fail_the_check_naming_each_statement(
    pg_suite: Callable[..., pytest.Pytester],
) -> None:
    suite = pg_suite(CHECK)
    suite.makepyfile(test_jobs=JOB_SUITE)
    result = suite.runpytest_inprocess(*NO_RANDOM_ORDER, "-q")
    result.assert_outcomes(passed=3, errors=3)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_rollback*",
            "fastsched_db: 1 named prepared statement of the app would break behind a "
            "transaction-mode pooler (PgBouncer, Supavisor, RDS Proxy), which gives each "
            'transaction to any server connection: there a reused statement "does not exist" '
            'and a shared name "already exists".',
            "  __asyncpg_stmt_*__  SELECT items.id FROM items WHERE items.status = $1::VARCHAR",
            "      left behind by job 'count_pending' (run of 2030-01-01T00:05:00+00:00), named "
            "by asyncpg's per-connection counter: every connection of the app makes this name",
            "      reused by job 'count_pending' (run of 2030-01-01T00:10:00+00:00): prepared in "
            "an earlier transaction",
            "Fix it in the app's engine: turn both statement caches off and give statements "
            "unique names, as SQLAlchemy documents for PgBouncer:",
            "    create_async_engine(url, connect_args={",
            '        "statement_cache_size": 0,  # asyncpg\'s cache',
            '        "prepared_statement_cache_size": 0,  # the SQLAlchemy dialect\'s cache',
            '        "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",',
            "    })",
            "The test engine was made with SQLAlchemy's and asyncpg's defaults, not the app's "
            "engine options: set fastsched_engine_options to the app's options (a dict, or a "
            "function of the database URL that returns one) to check the app's own settings.",
        ],
        consecutive=True,
    )
    for test in ("test_commit", "test_replicas"):
        result.stdout.fnmatch_lines([f"*ERROR at teardown of {test}*"])
    # Which replica's session gets which pooled connection at 00:10 depends on the order the
    # sessions of 00:05 gave theirs back (their round trips): the replica is named either way.
    result.stdout.fnmatch_lines(
        [
            "      left behind by job 'count_pending' (run of 2030-01-01T00:05:00+00:00, "
            "replica 1), named by asyncpg's per-connection counter*"
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "      reused by job 'count_pending' (run of 2030-01-01T00:10:00+00:00*): "
            "prepared in an earlier transaction"
        ]
    )


def test_the_documented_engine_options_pass_the_check(
    pg_suite: Callable[..., pytest.Pytester],
) -> None:
    suite = pg_suite(CHECK, POOLER_SAFE)
    suite.makepyfile(test_jobs=JOB_SUITE)
    result = suite.runpytest_inprocess(*NO_RANDOM_ORDER)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        ["fastsched engine: engine_options=pooling:pooler_safe, prepared_statements=check"]
    )


PLUGIN_ONLY = """
import pytest


@pytest.mark.asyncio
async def test_the_plugins_own_statements(fastsched_db, fastsched_history):
    await fastsched_db.insert("items", [{"id": 1, "status": "pending"}])
    assert await fastsched_db.status_of("items", 1) == "pending"
    assert await fastsched_db.fetch("items", status="pending") != []
    fastsched_history.assert_status("items", 1, "pending")
"""


@pytest.mark.parametrize("isolation", ["rollback", "commit"])
def test_the_plugins_own_statements_are_not_the_apps(
    pg_suite: Callable[..., pytest.Pytester], isolation: str
) -> None:
    suite = pg_suite(CHECK, f"fastsched_isolation = {isolation}")
    suite.makepyfile(test_plugin_only=PLUGIN_ONLY)
    result = suite.runpytest_inprocess(*NO_RANDOM_ORDER)
    result.assert_outcomes(passed=1)


OVERLAP = """
import pytest

from pooling import count_pending, scheduler


@pytest.mark.asyncio
@pytest.mark.fastsched(job_errors="record")
async def test_two_jobs_at_one_instant(fastsched_clock, fastsched_db, fastsched_scheduler):
    for job_id in ("first", "second"):
        scheduler.add_job(count_pending, "interval", minutes=5, id=job_id)
    await fastsched_clock.advance(minutes=5)
    errors = [type(run.exception).__name__ for run in fastsched_scheduler.runs if run.exception]
    assert errors == ["DatabaseGuardError"]
"""


def test_a_busy_test_connection_is_the_guards_to_report(
    pg_suite: Callable[..., pytest.Pytester],
) -> None:
    # Two jobs at one instant overlap on the one connection of rollback isolation: the guard
    # fails the test (job_errors="record" keeps it from failing the clock call). A reading
    # waits for the other task's statement instead of colliding with it in the driver, which
    # would fail that statement, or the reading, with "another operation is in progress".
    suite = pg_suite(CHECK, POOLER_SAFE)
    suite.makepyfile(test_overlap=OVERLAP)
    result = suite.runpytest_inprocess(*NO_RANDOM_ORDER, "-q")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*fastsched_db: two jobs used the shared test connection*"])
    result.stdout.no_fnmatch_line("*could not read the prepared statements*")


RECORDED = """
import pytest
from sqlalchemy import text

from pytest_fastsched import PreparedStatementLeak


@pytest.mark.asyncio
@pytest.mark.fastsched(prepared_statements="record")
async def test_sql_prepare_reused_in_a_later_transaction(fastsched_db):
    async with fastsched_db.background_session() as session:
        await session.execute(text("PREPARE kept AS SELECT count(*) FROM items"))
    assert await fastsched_db.prepared_statement_leaks() == []
    async with fastsched_db.background_session() as session:
        await session.execute(text("EXECUTE kept"))
    leaks = await fastsched_db.prepared_statement_leaks()
    assert leaks == [
        PreparedStatementLeak(
            name="kept",
            statement="PREPARE kept AS SELECT count(*) FROM items",
            reason="reused",
            where="code outside job runs (the test, a fixture or a request)",
        )
    ]
    with pytest.raises(AssertionError) as failure:
        await fastsched_db.assert_no_prepared_statement_leaks()
    print("ASSERTED", " | ".join(str(failure.value).splitlines()[1:3]))
    async with fastsched_db.background_session() as session:
        await session.execute(text("DEALLOCATE kept"))


@pytest.mark.asyncio
@pytest.mark.fastsched(prepared_statements="record", isolation="commit")
async def test_one_name_on_two_connections(fastsched_db):
    async with fastsched_db.engine.connect() as one, fastsched_db.engine.connect() as two:
        for connection in (one, two):
            await connection.execute(text("PREPARE same_name AS SELECT 1"))
            await connection.commit()
        for connection in (one, two):
            await connection.execute(text("SELECT 1"))
            await connection.commit()
    leaks = await fastsched_db.prepared_statement_leaks()
    assert [(leak.name, leak.reason) for leak in leaks] == [("same_name", "shared name")]
    print("SHARED", leaks[0].describe())


@pytest.mark.asyncio
@pytest.mark.fastsched(prepared_statements="check")
async def test_unique_names_used_once_pass(fastsched_db):
    for _ in range(3):
        await fastsched_db.insert("items", {"id": _})
        assert len(await fastsched_db.fetch("items")) == _ + 1
    await fastsched_db.assert_no_prepared_statement_leaks()


@pytest.mark.asyncio
async def test_not_recorded(fastsched_db):
    await fastsched_db.prepared_statement_leaks()
"""


def test_recorded_leaks_can_be_asserted_in_the_test(
    pg_suite: Callable[..., pytest.Pytester],
) -> None:
    suite = pg_suite(POOLER_SAFE)
    suite.makepyfile(test_recorded=RECORDED)
    result = suite.runpytest_inprocess(*NO_RANDOM_ORDER, "-q", "-s")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*ASSERTED   kept  PREPARE kept AS SELECT count(*) FROM items |       reused by "
            "code outside job runs (the test, a fixture or a request): prepared in an earlier "
            "transaction",
            "*SHARED left behind by code outside job runs (the test, a fixture or a "
            "request), under a name another connection made too",
            "*fastsched_db: the prepared statements were not recorded in this test: mark it "
            "@pytest.mark.fastsched(prepared_statements='record') (or 'check', which also "
            "fails the test on a leak), or set fastsched_prepared_statements for the suite.",
        ]
    )


ON_SQLITE = """
import pytest


@pytest.mark.asyncio
async def test_the_check_has_nothing_to_do(fastsched_db):
    await fastsched_db.insert("items", {"id": 1})
    assert fastsched_db.engine.get_execution_options()["seen_url"].startswith("sqlite")


@pytest.mark.asyncio
async def test_asking_names_postgresql(fastsched_db):
    await fastsched_db.prepared_statement_leaks()
"""


def test_on_sqlite_the_check_is_off_and_asking_names_postgresql(
    make_db_suite: Callable[[str], pytest.Pytester],
) -> None:
    suite = _suite(make_db_suite, "sqlite", CHECK, POOLER_SAFE)
    suite.makepyfile(test_sqlite=ON_SQLITE)
    result = suite.runpytest_inprocess(*NO_RANDOM_ORDER, "-q")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*fastsched_db: named prepared statements are a PostgreSQL matter (SQLite has "
            "none): run this test with fastsched_database = postgresql (or a PostgreSQL URL) "
            "to check them."
        ]
    )


ANY_DB_TEST = """
import pytest


@pytest.mark.asyncio
async def test_uses_the_database(fastsched_db):
    await fastsched_db.insert("items", {"id": 1})
"""


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            "pooling:NOT_OPTIONS",
            "fastsched_engine_options = 'pooling:NOT_OPTIONS' gave a builtins.str: give a dict "
            "of create_async_engine() keyword arguments, or a function of the database URL "
            "that returns one, e.g. {'connect_args': {'statement_cache_size': 0}}.",
        ),
        (
            "pooling:broken",
            "fastsched_engine_options = 'pooling:broken': calling it with the test database's "
            "URL raised RuntimeError: no settings file",
        ),
        (
            "pooling:AUTOCOMMIT",
            "fastsched_engine_options = 'pooling:AUTOCOMMIT' sets isolation_level='AUTOCOMMIT': "
            "every statement would commit at once, out of reach of the test's isolation. Leave "
            "it out of the options the tests get, and use an AUTOCOMMIT connection only where "
            "the app needs one.",
        ),
        (
            "pooling:CREATOR",
            "fastsched_engine_options = 'pooling:CREATOR' sets 'async_creator': its connections "
            "would not go to the test database. Leave it out of the options the tests get; the "
            "plugin connects to the test database itself.",
        ),
        (
            "pooling:UNKNOWN",
            "fastsched_engine_options = 'pooling:UNKNOWN': create_async_engine() rejected the "
            "options: *pool_sizes*",
        ),
        (
            "pooling:missing",
            "fastsched_engine_options = 'pooling:missing': module 'pooling' has no attribute "
            "'missing'. Check the name after the ':'.",
        ),
    ],
)
def test_bad_engine_options_name_the_fix(
    make_db_suite: Callable[[str], pytest.Pytester], options: str, message: str
) -> None:
    suite = _suite(make_db_suite, "sqlite", f"fastsched_engine_options = {options}")
    suite.makepyfile(test_any=ANY_DB_TEST)
    result = suite.runpytest_inprocess(*NO_RANDOM_ORDER, "-q")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*{message}"])


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "--fastsched-prepared-statements=always",
            "ERROR: fastsched_prepared_statements = 'always' is not valid: use one of 'ignore', "
            "'check', 'record' (ini option fastsched_prepared_statements or "
            "--fastsched-prepared-statements). See *",
        ),
        (
            "--fastsched-engine-options=pooling",
            "ERROR: fastsched_engine_options = 'pooling' is not a 'module:attr' path: write it "
            "like 'app.services.scheduler:scheduler'. See *",
        ),
    ],
)
def test_bad_settings_are_usage_errors(
    pytester: pytest.Pytester, setting: str, message: str
) -> None:
    pytester.makeini(LOOP_SCOPE)
    result = pytester.runpytest_inprocess(setting)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_bad_marker_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini(LOOP_SCOPE)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.fastsched(prepared_statements="yes")
        def test_marked(fastsched_clock):
            pass
        """
    )
    result = pytester.runpytest_inprocess("-q")
    result.stdout.fnmatch_lines(
        [
            "*@pytest.mark.fastsched(prepared_statements='yes') is not valid: use one of "
            "'ignore', 'check', 'record'"
        ]
    )
    result.assert_outcomes(errors=1)


@pytest.mark.asyncio
async def test_a_server_older_than_14_is_named() -> None:
    # The one path no local server can take: the version gate before the query.
    driver = SimpleNamespace(get_server_version=lambda: SimpleNamespace(major=13))
    with pytest.raises(RuntimeError) as failure:
        await _prepared._read(driver)
    assert str(failure.value) == (
        "the server is PostgreSQL 13: the check reads execution counts from "
        "pg_prepared_statements, which PostgreSQL 14 added"
    )

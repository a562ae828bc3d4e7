"""Bad database settings are clear errors; nothing the plugin started outlives a run.

The ``database`` fixture (conftest) checks after each test that no temporary directory and
no scratch database of the plugin is left.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_fastsched import _postgres

TWO_TESTS = """
import pytest


@pytest.mark.asyncio
async def test_one(fastsched_db):
    pass


@pytest.mark.asyncio
async def test_two(fastsched_db):
    pass
"""

BAD_INPUT = {
    "bad module:attr": (
        "--fastsched-sessionmaker=app:nope",
        "fastsched_sessionmaker = 'app:nope': module 'app' has no attribute 'nope'. "
        "Check the name after the ':'.",
    ),
    "not a sessionmaker": (
        "--fastsched-sessionmaker=app:engine",
        "fastsched_sessionmaker = 'app:engine' is a sqlalchemy.ext.asyncio.engine.AsyncEngine, "
        "not a sessionmaker: point it at the app's async_sessionmaker, sessionmaker or "
        "scoped_session (the factory its jobs and routes open sessions with).",
    ),
    "not an engine": (
        "--fastsched-engine=app:async_session_factory",
        "fastsched_engine = 'app:async_session_factory' is a "
        "sqlalchemy.ext.asyncio.session.async_sessionmaker, not an engine: point it at the "
        "app's sqlalchemy Engine or AsyncEngine (the one create_engine() or "
        "create_async_engine() made).",
    ),
    "not a MetaData": (
        "--fastsched-metadata=app:Base",
        "fastsched_metadata = 'app:Base' is the class app.Base, not a sqlalchemy.MetaData: "
        "point it at the app's MetaData, e.g. 'app.models:Base.metadata'.",
    ),
    "empty MetaData": (
        "--fastsched-metadata=app:empty_metadata",
        "fastsched_metadata = 'app:empty_metadata' has no tables: no model class was defined "
        "on it when the tests ran, so the modules that define the models were never imported "
        "*. Import the model modules where the metadata lives *",
    ),
    "create_all fails": (
        "--fastsched-metadata=app:broken_metadata",
        "fastsched_metadata = 'app:broken_metadata': create_all() failed on *: *Error: "
        '(*) *"THIS"*. Fix the model (or the DDL it emits) so that the schema can be '
        "created on this database.",
    ),
}


@pytest.mark.parametrize(("option", "message"), BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_fails_each_database_test_with_its_fix(
    db_suite: pytest.Pytester, option: str, message: str
) -> None:
    db_suite.makepyfile(test_two=TWO_TESTS)
    result = db_suite.runpytest_inprocess(option)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([message, message])


DISK_FULL = """
import pytest
from sqlalchemy import text

import app


async def fill():
    for n in range(500):
        async with app.get_background_session() as session:
            await session.execute(text("INSERT INTO blobs VALUES (randomblob(4000))"))


@pytest.mark.asyncio
async def test_disk_full(fastsched_db):
    async with fastsched_db.connection() as connection:
        await connection.exec_driver_sql("CREATE TABLE blobs (b BLOB)")
        await connection.exec_driver_sql("PRAGMA max_page_count = 60")
    try:
        await fill()
    except Exception:
        pass  # jobs catch every exception: the guard still fails the test


@pytest.mark.asyncio
async def test_after(fastsched_db):
    assert await fastsched_db.fetch("items") == []
"""


def test_a_full_disk_names_the_cause_not_the_lost_savepoint(
    make_db_suite: Callable[[str], pytest.Pytester],
) -> None:
    pytester = make_db_suite("sqlite")
    pytester.makepyfile(test_disk=DISK_FULL)
    result = pytester.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "E *DatabaseGuardError: fastsched_db: the database failed with 'database or disk "
            "is full' (in 'INSERT INTO blobs VALUES (randomblob(4000))') and SQLite then rolled "
            "back the test's whole transaction by itself*"
        ]
    )


def test_an_unreachable_server(
    make_db_suite: Callable[[str], pytest.Pytester], user_tmpdir: Path
) -> None:
    pytester = make_db_suite("postgresql+asyncpg://app:secret@127.0.0.1:1/appdb")
    pytester.makepyfile(test_two=TWO_TESTS)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=2)
    message = (
        "fastsched_database = 'postgresql+asyncpg://app:***@127.0.0.1:1/appdb': cannot connect "
        "to the server: *Error: *. Start the server or fix the URL (host, port, user, "
        "password), or set fastsched_database = postgresql to let the plugin run a local "
        "server."
    )
    result.stdout.fnmatch_lines([message, message])
    assert "secret" not in result.stdout.str()
    assert list(user_tmpdir.iterdir()) == []


def test_a_missing_postgresql_binary(
    make_db_suite: Callable[[str], pytest.Pytester],
    user_tmpdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nowhere = user_tmpdir / "nowhere"
    monkeypatch.setattr(
        _postgres,
        "find_bindir",
        functools.partial(_postgres.find_bindir, path="", search_roots=[nowhere]),
    )
    pytester = make_db_suite("postgresql")
    pytester.makepyfile(test_two=TWO_TESTS)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=2)
    message = (
        "fastsched_database = 'postgresql': PostgreSQL server binaries (initdb, pg_ctl) not "
        "found. Searched the PATH, the directory printed by `pg_config --bindir` and "
        f"{nowhere}/*/bin. Install the PostgreSQL server package (for example `apt-get "
        "install postgresql`), or set fastsched_database to the URL of an existing server."
    )
    result.stdout.fnmatch_lines([message, message])
    assert list(user_tmpdir.iterdir()) == []


def test_a_url_of_another_database_is_a_usage_error(
    make_db_suite: Callable[[str], pytest.Pytester],
) -> None:
    pytester = make_db_suite("mysql+aiomysql://app:secret@localhost/appdb")
    pytester.makepyfile(test_two=TWO_TESTS)
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: fastsched_database = 'mysql+aiomysql://app:***@localhost/appdb' is not a "
            "PostgreSQL URL: use 'sqlite', 'postgresql' (a local server the plugin starts) or "
            "the URL of an existing PostgreSQL server, such as "
            "'postgresql+asyncpg://user:password@localhost:5432/postgres' (the plugin works "
            "in a scratch database it creates and drops there). See "
            "https://github.com/pytest-fastsched/pytest-fastsched#configuration"
        ]
    )


FAILING_AND_INTERRUPTED = """
import pytest


@pytest.mark.asyncio
async def test_fails(fastsched_db):
    await fastsched_db.insert("items", {"id": 1})
    assert False


@pytest.mark.asyncio
async def test_interrupted(fastsched_db):
    raise KeyboardInterrupt
"""


def test_the_server_is_removed_after_a_failing_and_interrupted_run(
    make_db_suite: Callable[[str], pytest.Pytester], user_tmpdir: Path
) -> None:
    pytester = make_db_suite("postgresql")
    pytester.makepyfile(test_stop=FAILING_AND_INTERRUPTED)
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*KeyboardInterrupt*", "*1 failed*"])
    assert list(user_tmpdir.iterdir()) == []
    assert _servers_in(user_tmpdir) == []


KILLED = """
import time

import pytest


@pytest.mark.asyncio
async def test_killed_midway(fastsched_db):
    await fastsched_db.insert("items", {"id": 1})
    open("ready", "w").close()
    time.sleep(120)
"""


def test_a_server_left_by_a_killed_run_is_removed_by_the_next_run(
    make_db_suite: Callable[[str], pytest.Pytester], user_tmpdir: Path
) -> None:
    pytester = make_db_suite("postgresql")
    pytester.makepyfile(test_killed=KILLED)
    killed = pytester.popen(
        [sys.executable, "-m", "pytest", "-p", "no:randomly"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(pytester.path / "ready", killed)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert len(_servers_in(user_tmpdir)) == 1
    pytester.path.joinpath("test_killed.py").unlink()
    pytester.makepyfile(test_two=TWO_TESTS)
    pytester.runpytest_subprocess().assert_outcomes(passed=2)
    assert list(user_tmpdir.iterdir()) == []
    assert _servers_in(user_tmpdir) == []


def _wait_for(path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert process.poll() is None, "the run ended before its test started"
        assert time.monotonic() < deadline, "the run did not start its test in 60 s"
        time.sleep(0.05)


def _servers_in(directory: Path) -> list[int]:
    """The pids of live PostgreSQL server processes whose command line names ``directory``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"postgres" in cmdline and os.fsencode(directory) in cmdline:
            pids.append(int(proc.name))
    return pids

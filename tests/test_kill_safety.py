"""A pytest run killed with SIGKILL mid-test: what it leaves behind, and what the next run does.

The user suite (``tests/soak/app.py``) writes rows through a job, writes a marker file and
blocks reading a FIFO that no one opens; the test kills the run once the marker is there.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest

from pytest_fastsched import _postgres
from pytest_fastsched._postgres import EphemeralPostgres

SOAK = Path(__file__).parent / "soak"
# Safety nets against a hung inner run, not speed requirements.
MARKER_TIMEOUT = 120.0
RUN_TIMEOUT = 300.0

KILLED_TEST = """
import os
from pathlib import Path

import pytest


@pytest.mark.fastsched(isolation=os.environ["KILL_ISOLATION"])
async def test_writes_then_blocks(fastsched_clock, fastsched_scheduler, fastsched_db):
    await fastsched_db.insert("items", [{"id": 1}, {"id": 2}])
    await fastsched_clock.advance(minutes=6)
    assert await fastsched_db.status_of("items", 2) == "completed"
    if "KILL_FIFO" in os.environ:
        # Written aside and renamed: the killer sees the whole URL or no marker at all.
        partial = Path(os.environ["KILL_MARKER"] + ".partial")
        partial.write_text(fastsched_db.url)
        partial.replace(os.environ["KILL_MARKER"])
        Path(os.environ["KILL_FIFO"]).read_text()  # no writer ever opens it: blocks
"""

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
fastsched_database = {database}
fastsched_scheduler = app:scheduler
fastsched_sessionmaker = app:async_session_factory
fastsched_metadata = app:Base.metadata
"""


def _write_project(pytester: pytest.Pytester, database: str) -> None:
    pytester.makeini(INI.format(database=database))
    pytester.makepyfile(app=(SOAK / "app.py").read_text(), test_killed=KILLED_TEST)


def _pytest_command() -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider"]


def _run_and_kill(pytester: pytest.Pytester, isolation: str) -> str:
    """Run the suite until its test blocks, SIGKILL it; the test database's URL."""
    marker = pytester.path / "marker"
    fifo = pytester.path / "fifo"
    os.mkfifo(fifo)
    env = {**os.environ, "KILL_MARKER": str(marker), "KILL_FIFO": str(fifo)}
    env["KILL_ISOLATION"] = isolation
    with (pytester.path / "killed.log").open("w") as log:
        process = subprocess.Popen(
            _pytest_command(), cwd=pytester.path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + MARKER_TIMEOUT
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), (pytester.path / "killed.log").read_text()
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    return marker.read_text()


def _run_again(pytester: pytest.Pytester, isolation: str) -> None:
    env = {**os.environ, "KILL_ISOLATION": isolation}
    env.pop("KILL_FIFO", None)
    result = subprocess.run(
        _pytest_command(),
        cwd=pytester.path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def _query(dsn: str, sql: str) -> list[tuple[object, ...]]:
    async def fetch() -> list[tuple[object, ...]]:
        connection = await asyncpg.connect(dsn)
        try:
            return [tuple(row) for row in await connection.fetch(sql)]
        finally:
            await connection.close()

    # In a thread, so that this thread's event loop stays as pytest-asyncio set it.
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, fetch()).result()


@pytest.fixture(scope="module")
def kill_server() -> Iterator[EphemeralPostgres]:
    """A server of its own: the killed runs leave databases on it."""
    with EphemeralPostgres.start() as server:
        yield server


@pytest.fixture
def user_database(kill_server: EphemeralPostgres) -> Iterator[str]:
    """A pre-existing database of the user, given to the plugin by URL; dropped after."""
    name = f"userdb_{secrets.token_hex(4)}"
    kill_server.create_database(name)
    yield name
    for (scratch,) in _query(kill_server.dsn(), SCRATCH_DATABASES):
        kill_server.drop_database(str(scratch))
    kill_server.drop_database(name)


SCRATCH_DATABASES = "SELECT datname FROM pg_database WHERE datname LIKE 'fastsched%'"
USER_TABLES = (
    "SELECT table_name FROM information_schema.tables "
    "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
)


@pytest.mark.parametrize("isolation", ["rollback", "commit"])
def test_a_killed_run_leaves_nothing_in_the_named_database(
    pytester: pytest.Pytester, kill_server: EphemeralPostgres, user_database: str, isolation: str
) -> None:
    _write_project(pytester, kill_server.url(user_database))
    scratch_url = _run_and_kill(pytester, isolation)
    scratch = scratch_url.rpartition("/")[2].partition("?")[0]
    assert scratch != user_database
    assert _query(kill_server.dsn(user_database), USER_TABLES) == []
    # The killed test's writes: rolled back by the server, or committed in the scratch copy.
    committed = 2 if isolation == "commit" else 0
    rows = _query(kill_server.dsn(scratch), "SELECT count(*) FROM items")
    assert rows == [(committed,)]
    _run_again(pytester, isolation)
    assert _query(kill_server.dsn(user_database), USER_TABLES) == []
    # The next run dropped the scratch databases of the killed one, and its own.
    assert _query(kill_server.dsn(), SCRATCH_DATABASES) == []


def test_scratch_databases_of_live_or_foreign_runs_are_left_alone(
    kill_server: EphemeralPostgres, user_database: str
) -> None:
    owners = {
        "fastsched_live_main": f"{socket.gethostname()}:{os.getpid()}",
        "fastsched_other_host_main": "elsewhere.example:1",
        "fastsched_unmarked_main": None,
    }
    for name, owner in owners.items():
        kill_server.create_database(name)
        if owner is not None:
            comment = f"pytest-fastsched scratch database of {owner}"
            _query(kill_server.dsn(), f"COMMENT ON DATABASE {name} IS '{comment}'")
    pytester_free_run = [sys.executable, "-c", _DROP_STALE]
    subprocess.run([*pytester_free_run, kill_server.url()], check=True)
    names = {str(row[0]) for row in _query(kill_server.dsn(), SCRATCH_DATABASES)}
    assert set(owners) <= names


_DROP_STALE = """
import asyncio, sys
from pytest_fastsched import _testdb

async def main():
    engine = _testdb._admin_engine(_testdb.asyncpg_url(sys.argv[1]))
    async with engine.connect() as connection:
        await _testdb._drop_stale_databases(connection)
    await engine.dispose()

asyncio.run(main())
"""


@pytest.fixture
def stale_servers(user_tmpdir: Path) -> Iterator[Path]:
    """``user_tmpdir``, where no server of a killed run is left running after the test."""
    yield user_tmpdir
    _postgres.cleanup_stale(user_tmpdir)


def test_the_next_run_removes_the_server_of_a_killed_run(
    pytester: pytest.Pytester, stale_servers: Path
) -> None:
    _write_project(pytester, "postgresql")
    _run_and_kill(pytester, "rollback")
    (directory,) = stale_servers.glob(f"{_postgres.DIR_PREFIX}*")
    postmaster = _postgres._postmaster_pid(directory)
    assert postmaster is not None
    assert _postgres.pid_alive(postmaster)

    _run_again(pytester, "rollback")
    assert list(stale_servers.glob(f"{_postgres.DIR_PREFIX}*")) == []
    assert not _postgres.pid_alive(postmaster)

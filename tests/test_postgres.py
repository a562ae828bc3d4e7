"""The ephemeral PostgreSQL server: databases, stop, attach, stale cleanup and error messages.

These tests run real servers (no mocks) and are skipped where PostgreSQL is not installed.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_fastsched._postgres import (
    DIR_PREFIX,
    SOCKET_NAME,
    EphemeralPostgres,
    PostgresError,
    PostgresNotFound,
    cleanup_stale,
    find_bindir,
)


def _installed() -> bool:
    try:
        find_bindir()
    except PostgresNotFound:
        return False
    return True


requires_postgres = pytest.mark.skipif(not _installed(), reason="PostgreSQL is not installed")


def _public_dir(prefix: str) -> Path:
    # As root the server runs as another user, who must be able to reach the directory:
    # pytest's tmp_path (under a 0700 directory) is out of its reach.
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)
    return directory


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    """The base directory of this module's servers."""
    directory = _public_dir("fastsched-test-postgres-")
    yield directory
    cleanup_stale(directory)
    shutil.rmtree(directory)


@pytest.fixture(scope="module")
def server(base: Path) -> Iterator[EphemeralPostgres]:
    """One server shared by the tests of this module."""
    with EphemeralPostgres.start(base_dir=base) as server:
        yield server


async def _fetch(dsn: str, sql: str) -> list[tuple[object, ...]]:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        return [tuple(row) for row in await connection.fetch(sql)]
    finally:
        await connection.close()


def _query(server: EphemeralPostgres, database: str, sql: str) -> list[tuple[object, ...]]:
    return asyncio.run(_fetch(server.dsn(database), sql))


def _databases(server: EphemeralPostgres) -> set[str]:
    rows = _query(server, "postgres", "SELECT datname FROM pg_database")
    return {str(name) for (name,) in rows}


def _postmaster_pid(directory: Path) -> int:
    return int((directory / "data" / "postmaster.pid").read_text().split("\n", 1)[0])


def _running(pid: int) -> bool:
    status = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    state = status.stdout.strip()
    return state != "" and not state.startswith("Z")


def _server_dirs(base: Path) -> list[Path]:
    return sorted(base.glob(f"{DIR_PREFIX}*"))


@requires_postgres
def test_created_database_answers_queries_over_the_socket(server: EphemeralPostgres) -> None:
    server.create_database("fastsched created")
    try:
        rows = _query(server, "fastsched created", "SELECT current_database(), 6 * 7")
    finally:
        server.drop_database("fastsched created")
    assert rows == [("fastsched created", 42)]
    assert "fastsched created" not in _databases(server)


@requires_postgres
def test_sqlalchemy_url_reaches_the_server(server: EphemeralPostgres) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def select() -> tuple[object, ...]:
        engine = create_async_engine(server.url())
        try:
            async with engine.connect() as connection:
                result = await connection.execute(text("SELECT current_user, 1"))
                return tuple(result.one())
        finally:
            await engine.dispose()

    assert asyncio.run(select()) == ("postgres", 1)


@requires_postgres
def test_database_from_template_has_its_rows(server: EphemeralPostgres) -> None:
    server.create_database("fastsched_template")
    _query(
        server, "fastsched_template", "CREATE TABLE items AS SELECT 1 AS id, 'pending' AS status"
    )
    server.create_database("fastsched_clone", template="fastsched_template")
    try:
        rows = _query(server, "fastsched_clone", "SELECT id, status FROM items")
    finally:
        server.drop_database("fastsched_clone")
        server.drop_database("fastsched_template")
    assert rows == [(1, "pending")]


@requires_postgres
def test_drop_database_closes_open_connections(server: EphemeralPostgres) -> None:
    import asyncpg

    server.create_database("fastsched_busy")

    async def drop_while_connected() -> None:
        connection = await asyncpg.connect(server.dsn("fastsched_busy"))
        try:
            server.drop_database("fastsched_busy")  # also works inside a running loop
            with pytest.raises(asyncpg.ConnectionDoesNotExistError):
                await connection.fetchval("SELECT 1")
        finally:
            connection.terminate()

    asyncio.run(drop_while_connected())
    assert "fastsched_busy" not in _databases(server)


@requires_postgres
def test_stop_removes_directory_and_server_process(base: Path) -> None:
    server = EphemeralPostgres.start(base_dir=base)
    pid = _postmaster_pid(server.directory)
    assert _running(pid)
    server.stop()
    assert not server.directory.exists()
    assert not _running(pid)
    server.stop()


@requires_postgres
def test_attached_server_is_not_stopped(server: EphemeralPostgres) -> None:
    attached = EphemeralPostgres.attach(str(server.directory))
    assert attached.url("db") == server.url("db")
    with attached:
        attached.create_database("fastsched_attached")
    attached.drop_database("fastsched_attached")
    assert (server.directory / SOCKET_NAME).is_socket()
    assert _query(server, "postgres", "SELECT 1") == [(1,)]


def test_attach_without_a_server_says_so(tmp_path: Path) -> None:
    with pytest.raises(PostgresError) as excinfo:
        EphemeralPostgres.attach(tmp_path)
    assert excinfo.value.args == (
        f"No PostgreSQL server is listening in {tmp_path}: "
        "the socket .s.PGSQL.5432 does not exist.",
    )


@requires_postgres
def test_cleanup_stale_removes_killed_runs_only(base: Path, server: EphemeralPostgres) -> None:
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys; from pathlib import Path;"
            "from pytest_fastsched._postgres import EphemeralPostgres;"
            "EphemeralPostgres.start(base_dir=Path(sys.argv[1])); os.kill(os.getpid(), 9)",
            str(base),
        ],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [stale] = [directory for directory in _server_dirs(base) if directory != server.directory]
    pid = _postmaster_pid(stale)
    assert _running(pid)

    assert cleanup_stale(base) == [stale]

    assert not stale.exists()
    assert not _running(pid)
    assert _server_dirs(base) == [server.directory]
    assert _query(server, "postgres", "SELECT 1") == [(1,)]


def test_missing_binaries_say_what_was_searched(tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    with pytest.raises(PostgresNotFound) as excinfo:
        find_bindir(path=str(tmp_path), search_roots=[roots])
    assert excinfo.value.args == (
        "PostgreSQL server binaries (initdb, pg_ctl) not found. Searched the PATH, the "
        f"directory printed by `pg_config --bindir` and {roots}/*/bin. Install the PostgreSQL "
        "server package (for example `apt-get install postgresql`), or set fastsched_database "
        "to the URL of an existing server.",
    )


def _write_program(path: Path, script: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_newest_version_under_the_search_roots_wins(tmp_path: Path) -> None:
    for version in ("9.6", "15", "13"):
        for program in ("initdb", "pg_ctl"):
            _write_program(tmp_path / "roots" / version / "bin" / program, "exit 0")
    _write_program(tmp_path / "roots" / "16" / "bin" / "pg_ctl", "exit 0")  # no initdb

    found = find_bindir(path=str(tmp_path / "empty"), search_roots=[tmp_path / "roots"])

    assert found == tmp_path / "roots" / "15" / "bin"


@pytest.fixture
def public_base() -> Iterator[Path]:
    """An empty base directory the server user can reach."""
    directory = _public_dir("fastsched-test-failure-")
    yield directory
    shutil.rmtree(directory)


def test_initdb_failure_shows_its_output_and_leaves_nothing(public_base: Path) -> None:
    bindir = public_base / "bin"
    _write_program(bindir / "initdb", 'echo "initdb: error: the disk is on fire" >&2; exit 1')
    _write_program(bindir / "pg_ctl", "exit 0")
    servers = public_base / "servers"
    servers.mkdir()

    with pytest.raises(PostgresError) as excinfo:
        EphemeralPostgres.start(base_dir=servers, bindir=bindir)

    assert excinfo.value.args == (
        f"initdb in {bindir} failed with exit status 1:\ninitdb: error: the disk is on fire",
    )
    assert list(servers.iterdir()) == []


@requires_postgres
def test_start_failure_shows_the_server_log_and_leaves_nothing(public_base: Path) -> None:
    bindir = find_bindir()

    with pytest.raises(PostgresError) as excinfo:
        EphemeralPostgres.start(base_dir=public_base, settings={"shared_buffers": "plenty"})

    message = str(excinfo.value)
    assert message.startswith(f"pg_ctl in {bindir} failed with exit status 1:\n"), message
    assert "\nLast lines of the server log:\n" in message
    assert 'invalid value for parameter "shared_buffers": "plenty"' in message
    assert list(public_base.iterdir()) == []

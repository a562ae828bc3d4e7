"""The server's backends kept from one event loop to the next (``_backends.BackendKeeper``).

Each test drives a keeper with plain asyncpg on the suite's real server, one ``asyncio.run()``
per "test" (a new loop each, as pytest-asyncio's function-scoped loops), and checks on the
server itself what a kept backend carries over: nothing a new connection would not have.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import execute_sql

from pytest_fastsched import _backends, _postgres, _seal
from pytest_fastsched._postgres import EphemeralPostgres


@pytest.fixture
def keeper(postgres_server: EphemeralPostgres) -> Iterator[_backends.BackendKeeper]:
    keeper = _backends.BackendKeeper(postgres_server.directory, _postgres.PORT)
    yield keeper
    keeper.close()
    assert not Path(keeper.directory).exists()


async def connect(keeper: _backends.BackendKeeper, **options: Any) -> asyncpg.Connection:
    parameters: dict[str, Any] = {"user": "postgres", "database": "postgres", **options}
    keeper.redirect(parameters)
    return await asyncpg.connect(**parameters)


def in_a_loop_of_its_own(keeper: _backends.BackendKeeper, work: Any) -> Any:
    """Run ``work(keeper)`` in a new loop, and end the loop's share as the test engine does."""

    async def main() -> Any:
        try:
            return await work(keeper)
        finally:
            keeper.end_loop(asyncio.get_running_loop())

    return asyncio.run(main())


async def backend_pid(keeper: _backends.BackendKeeper) -> int:
    connection = await connect(keeper)
    try:
        pid: int = await connection.fetchval("SELECT pg_backend_pid()")
        return pid
    finally:
        await connection.close()


def test_one_backend_serves_a_new_loop_after_another(keeper: _backends.BackendKeeper) -> None:
    pids = {in_a_loop_of_its_own(keeper, backend_pid) for _ in range(5)}
    assert len(pids) == 1
    assert keeper.opened == 1


def test_a_connection_ended_with_its_loop_gives_its_backend_back(
    keeper: _backends.BackendKeeper,
) -> None:
    async def leave_open(keeper: _backends.BackendKeeper) -> int:
        connection = await connect(keeper)
        pid: int = await connection.fetchval("SELECT pg_backend_pid()")
        connection.terminate()  # as the test engine ends a loop's connections: the loop ends
        return pid  # before the keeper saw the client go

    first = in_a_loop_of_its_own(keeper, leave_open)
    assert in_a_loop_of_its_own(keeper, backend_pid) == first
    assert keeper.opened == 1


def test_a_kept_backend_carries_nothing_of_the_last_connection_over(
    keeper: _backends.BackendKeeper, postgres_server: EphemeralPostgres
) -> None:
    async def leave_state(keeper: _backends.BackendKeeper) -> None:
        connection = await connect(keeper)
        await connection.execute("SET TimeZone = 'Asia/Tokyo'")
        await connection.execute("CREATE TEMPORARY TABLE scratch (n int)")
        await connection.execute("PREPARE named AS SELECT 1")
        await connection.execute("LISTEN somewhere")
        await connection.execute("SELECT pg_advisory_lock(4242)")
        await connection.execute("BEGIN")
        await connection.execute("CREATE TABLE left_in_a_transaction (n int)")
        await connection.close()  # inside the transaction

    async def look(keeper: _backends.BackendKeeper) -> dict[str, object]:
        connection = await connect(keeper)
        try:
            return dict(
                await connection.fetchrow(
                    "SELECT current_setting('TimeZone') AS zone,"
                    " to_regclass('pg_temp.scratch') AS temp_table,"
                    " (SELECT count(*) FROM pg_prepared_statements WHERE name = 'named')"
                    "  AS prepared,"
                    " (SELECT count(*) FROM pg_listening_channels()) AS channels,"
                    " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory') AS locks,"
                    " to_regclass('public.left_in_a_transaction') AS table_made"
                )
            )
        finally:
            await connection.close()

    before = in_a_loop_of_its_own(keeper, look)
    in_a_loop_of_its_own(keeper, leave_state)
    assert in_a_loop_of_its_own(keeper, look) == before
    assert before == {
        "zone": before["zone"],
        "temp_table": None,
        "prepared": 0,
        "channels": 0,
        "locks": 0,
        "table_made": None,
    }
    assert keeper.opened == 1


def test_a_failed_transaction_is_rolled_back_and_the_backend_kept(
    keeper: _backends.BackendKeeper,
) -> None:
    async def fail_in_a_transaction(keeper: _backends.BackendKeeper) -> None:
        connection = await connect(keeper)
        await connection.execute("BEGIN")
        with pytest.raises(asyncpg.DivisionByZeroError):
            await connection.execute("SELECT 1 / 0")
        await connection.close()

    in_a_loop_of_its_own(keeper, fail_in_a_transaction)
    in_a_loop_of_its_own(keeper, backend_pid)
    assert keeper.opened == 1


def test_a_backend_left_in_the_middle_of_a_statement_is_closed(
    keeper: _backends.BackendKeeper,
) -> None:
    async def leave_mid_statement(keeper: _backends.BackendKeeper) -> int:
        connection = await connect(keeper)
        pid: int = await connection.fetchval("SELECT pg_backend_pid()")
        running = asyncio.ensure_future(connection.execute("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.05)
        connection.terminate()
        running.cancel()
        return pid

    first = in_a_loop_of_its_own(keeper, leave_mid_statement)
    assert in_a_loop_of_its_own(keeper, backend_pid) != first
    assert keeper.opened == 2


def test_a_cancel_request_reaches_the_server(keeper: _backends.BackendKeeper) -> None:
    async def time_out(keeper: _backends.BackendKeeper) -> int:
        connection = await connect(keeper)
        with pytest.raises(asyncio.TimeoutError):  # TimeoutError from Python 3.11 on
            await asyncio.wait_for(connection.execute("SELECT pg_sleep(60)"), 0.1)
        # Without the cancel the server would sleep on: the next statement would wait.
        answer: int = await asyncio.wait_for(connection.fetchval("SELECT 42"), 20)
        await connection.close()
        return answer

    assert in_a_loop_of_its_own(keeper, time_out) == 42
    assert keeper.opened == 1


def test_a_backend_the_server_ends_is_lost_for_its_client_and_replaced(
    keeper: _backends.BackendKeeper, postgres_server: EphemeralPostgres
) -> None:
    async def lose_the_backend(keeper: _backends.BackendKeeper) -> None:
        connection = await connect(keeper)
        pid = await connection.fetchval("SELECT pg_backend_pid()")
        other = await asyncpg.connect(postgres_server.dsn())
        try:
            await other.execute("SELECT pg_terminate_backend($1)", pid)
            await asyncio.wait_for(gone(other, pid), 20)
        finally:
            await other.close()
        with pytest.raises(asyncpg.InterfaceError, match="connection is closed"):
            await connection.fetchval("SELECT 1")

    in_a_loop_of_its_own(keeper, lose_the_backend)
    in_a_loop_of_its_own(keeper, backend_pid)
    assert keeper.opened == 2


async def gone(other: asyncpg.Connection, pid: int) -> None:
    """Until the server's backend ``pid`` has ended (its end is asynchronous)."""
    while await other.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
        await asyncio.sleep(0.01)


def test_concurrent_connections_get_backends_of_their_own_and_keep_them(
    keeper: _backends.BackendKeeper,
) -> None:
    async def five(keeper: _backends.BackendKeeper) -> set[int]:
        return set(await asyncio.gather(*(backend_pid(keeper) for _ in range(5))))

    assert len(in_a_loop_of_its_own(keeper, five)) == 5
    assert len(in_a_loop_of_its_own(keeper, five)) == 5
    assert keeper.opened == 5


def test_no_more_idle_backends_are_kept_than_the_limit(keeper: _backends.BackendKeeper) -> None:
    many = _backends.KEPT_PER_KIND + 2

    async def at_once(keeper: _backends.BackendKeeper) -> set[int]:
        return set(await asyncio.gather(*(backend_pid(keeper) for _ in range(many))))

    in_a_loop_of_its_own(keeper, at_once)
    assert [len(kept) for kept in keeper.idle().values()] == [_backends.KEPT_PER_KIND]
    in_a_loop_of_its_own(keeper, at_once)
    assert keeper.opened == many + 2


def test_other_startup_parameters_get_another_backend(keeper: _backends.BackendKeeper) -> None:
    async def named(keeper: _backends.BackendKeeper) -> str:
        connection = await connect(keeper, server_settings={"application_name": "other"})
        try:
            name: str = await connection.fetchval("SELECT current_setting('application_name')")
            return name
        finally:
            await connection.close()

    in_a_loop_of_its_own(keeper, backend_pid)
    assert in_a_loop_of_its_own(keeper, named) == "other"
    in_a_loop_of_its_own(keeper, backend_pid)
    assert keeper.opened == 2


def test_a_refused_startup_reaches_the_client_and_is_not_kept(
    keeper: _backends.BackendKeeper,
) -> None:
    async def missing_database(keeper: _backends.BackendKeeper) -> None:
        with pytest.raises(asyncpg.InvalidCatalogNameError, match='"no_such_database"'):
            await connect(keeper, database="no_such_database")

    in_a_loop_of_its_own(keeper, missing_database)
    in_a_loop_of_its_own(keeper, missing_database)
    assert keeper.opened == 2
    assert not any(keeper.idle().values())


def test_a_server_that_is_gone_is_a_connection_failure_naming_its_socket(
    tmp_path: Path,
) -> None:
    keeper = _backends.BackendKeeper(tmp_path, _postgres.PORT)

    async def connect_to_nothing(keeper: _backends.BackendKeeper) -> None:
        with pytest.raises(asyncpg.ConnectionFailureError) as failure:
            await connect(keeper)
        assert str(failure.value) == (
            f"{tmp_path}/.s.PGSQL.{_postgres.PORT}: FileNotFoundError: "
            "[Errno 2] No such file or directory"
        )

    try:
        in_a_loop_of_its_own(keeper, connect_to_nothing)
    finally:
        keeper.close()


def test_a_client_that_never_starts_up_is_told_so(
    keeper: _backends.BackendKeeper,
    postgres_server: EphemeralPostgres,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_backends, "STARTUP_TIMEOUT", 0.2)

    async def stay_silent(keeper: _backends.BackendKeeper) -> bytes:
        parameters: dict[str, Any] = {}
        keeper.redirect(parameters)
        path = f"{parameters['host']}/.s.PGSQL.{parameters['port']}"
        reader, writer = await asyncio.open_unix_connection(path)
        answer = await reader.read()  # until the keeper closes the connection
        writer.close()
        return answer

    answer = in_a_loop_of_its_own(keeper, stay_silent)
    socket_path = f"{postgres_server.directory}/.s.PGSQL.{_postgres.PORT}"
    assert answer.startswith(b"E")  # a FATAL ErrorResponse, and the connection closed
    assert f"M{socket_path}: no answer to the startup within 0.2 s\x00".encode() in answer


def test_encryption_is_refused_as_the_server_refuses_it(
    keeper: _backends.BackendKeeper,
) -> None:
    async def ask_for_tls(keeper: _backends.BackendKeeper) -> bytes:
        parameters: dict[str, Any] = {}
        keeper.redirect(parameters)
        path = f"{parameters['host']}/.s.PGSQL.{parameters['port']}"
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(struct.pack("!ii", 8, 80877103))
        answer = await reader.readexactly(1)
        writer.close()
        return answer

    assert in_a_loop_of_its_own(keeper, ask_for_tls) == b"N"


def test_the_seal_sees_the_server_behind_the_keepers_socket(
    keeper: _backends.BackendKeeper, postgres_server: EphemeralPostgres
) -> None:
    parameters: dict[str, Any] = {}

    async def redirect(keeper: _backends.BackendKeeper) -> None:
        keeper.redirect(parameters)
        await asyncio.sleep(0)

    in_a_loop_of_its_own(keeper, redirect)
    target = _seal.postgres_target(database="app", user="postgres", **parameters)
    assert target == _seal.url_target(postgres_server.url("app"))


def test_a_killed_runs_socket_directory_is_removed_by_the_next_keeper(
    postgres_server: EphemeralPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    stale = tmp_path / f"{_backends.DIR_PREFIX}999999999-abc"
    stale.mkdir()
    (stale / ".s.PGSQL.1").touch()
    live = tmp_path / f"{_backends.DIR_PREFIX}1-abc"  # pid 1 runs
    live.mkdir()
    keeper = _backends.BackendKeeper(postgres_server.directory, _postgres.PORT)
    keeper.close()
    assert sorted(tmp_path.iterdir()) == [live]


def test_unix_sockets_only_are_kept_for() -> None:
    from sqlalchemy import make_url

    from pytest_fastsched._testdb import _unix_socket

    assert _unix_socket(make_url("postgresql+asyncpg://u@/db?host=/run/pg&port=6543")) == (
        Path("/run/pg"),
        6543,
    )
    assert _unix_socket(make_url("postgresql+asyncpg://u@/db?host=/run/pg")) == (
        Path("/run/pg"),
        5432,
    )
    assert _unix_socket(make_url("postgresql+asyncpg://u:p@db.example:5432/db")) is None


def test_a_server_that_asks_a_password_is_reached_directly(tmp_path: Path) -> None:
    with EphemeralPostgres.start() as server:
        hba = server.directory / "data" / "pg_hba.conf"
        hba.write_text("local all secret password\nlocal all all trust\n")
        asyncio.run(execute_sql(server.dsn(), "CREATE ROLE secret LOGIN PASSWORD 'word'"))
        asyncio.run(execute_sql(server.dsn(), "SELECT pg_reload_conf()"))
        keeper = _backends.BackendKeeper(server.directory, _postgres.PORT)

        async def as_secret(keeper: _backends.BackendKeeper) -> dict[str, Any]:
            connection = await connect(keeper, user="secret", password="word")
            assert await connection.fetchval("SELECT current_user") == "secret"
            await connection.close()
            parameters: dict[str, Any] = {"host": "unchanged"}
            keeper.redirect(parameters)
            return parameters

        try:
            assert in_a_loop_of_its_own(keeper, as_secret) == {"host": "unchanged"}
            assert keeper.passwords
            assert not any(keeper.idle().values())
        finally:
            keeper.close()


KEPT_BACKENDS = """
import pytest
from sqlalchemy import text

import app


@pytest.mark.asyncio
@pytest.mark.parametrize("n", range(3))
async def test_a_loop_of_its_own(fastsched_db, n):
    async with app.async_session_factory() as session:
        pid = await session.scalar(text("SELECT pg_backend_pid()"))
        held = await session.scalar(
            text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = :pid"),
            {"pid": pid},
        )
        await session.execute(text("SELECT pg_advisory_lock(77)"))  # outlives a rollback
    with open("seen.txt", "a") as seen:
        seen.write(f"{pid} {held}\\n")
"""


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_suite_with_a_loop_per_test_keeps_one_backend_clean(
    db_suite: pytest.Pytester,
) -> None:
    db_suite.makepyfile(test_kept=KEPT_BACKENDS)
    result = db_suite.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=3)
    assert "fastsched postgres backends" not in result.stdout.str()
    seen = [line.split() for line in (db_suite.path / "seen.txt").read_text().splitlines()]
    assert len({pid for pid, _ in seen}) == 1
    assert [held for _, held in seen] == ["0", "0", "0"]


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_postgres_backends_new_gives_each_loop_a_backend_of_its_own(
    db_suite: pytest.Pytester,
) -> None:
    db_suite.makepyfile(test_kept=KEPT_BACKENDS)
    result = db_suite.runpytest_subprocess(
        "-p", "no:randomly", "--fastsched-postgres-backends=new"
    )
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["fastsched postgres backends: new"])
    seen = [line.split() for line in (db_suite.path / "seen.txt").read_text().splitlines()]
    assert len({pid for pid, _ in seen}) == 3

"""The ephemeral PostgreSQL server behind ``fastsched_database = postgresql``.

One server per test session: ``initdb`` and ``pg_ctl`` in a private temporary directory that
holds the data directory, the server log and the unix socket (no TCP), with durability off
(``fsync``, ``synchronous_commit``, ``full_page_writes``) because nothing needs to survive.
PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user (or
``nobody``). The directory carries an owner marker: ``cleanup_stale()`` stops and removes the
servers of runs that were killed before they could clean up. Needs PostgreSQL 13 or newer.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Coroutine, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

DIR_PREFIX = "pytest-fastsched-pg-"
SUPERUSER = "postgres"
# Each server has its own socket directory, so every server can use the default port: the
# port only names the socket file. It is still spelled out so that PGPORT cannot redirect us.
PORT = 5432
SOCKET_NAME = f".s.PGSQL.{PORT}"
OWNER_FILE = "owner.pid"
LOG_FILE = "server.log"
DEFAULT_SEARCH_ROOTS: tuple[Path, ...] = (Path("/usr/lib/postgresql"),)
SERVER_BINARIES = ("initdb", "pg_ctl")
SERVER_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "",
    "port": str(PORT),
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
LOG_TAIL_LINES = 20


class PostgresNotFound(Exception):
    """The PostgreSQL server binaries (``initdb``, ``pg_ctl``) are not installed or not found."""


class PostgresError(Exception):
    """The ephemeral server could not be created, started or reached."""


def find_bindir(
    path: str | None = None, search_roots: Iterable[Path] = DEFAULT_SEARCH_ROOTS
) -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``.

    Searched in order: ``path`` (default: the ``PATH`` environment variable), the directory
    printed by ``pg_config --bindir``, then the newest ``<root>/*/bin`` of ``search_roots``.
    """
    search_roots = tuple(search_roots)
    found = _bindir_on_path(path) or _bindir_of_pg_config(path) or _newest_bindir(search_roots)
    if found is None:
        searched = ", ".join(f"{root}/*/bin" for root in search_roots)
        raise PostgresNotFound(
            "PostgreSQL server binaries (initdb, pg_ctl) not found. Searched the PATH, the "
            f"directory printed by `pg_config --bindir` and {searched}. Install the PostgreSQL "
            "server package (for example `apt-get install postgresql`), or set "
            "fastsched_database to the URL of an existing server."
        )
    return found


def _is_bindir(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in SERVER_BINARIES)


def _bindir_on_path(path: str | None) -> Path | None:
    initdb = shutil.which("initdb", path=path)
    if initdb is None:
        return None
    directory = Path(initdb).resolve().parent
    return directory if _is_bindir(directory) else None


def _bindir_of_pg_config(path: str | None) -> Path | None:
    pg_config = shutil.which("pg_config", path=path)
    if pg_config is None:
        return None
    try:
        printed = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(printed) if printed and _is_bindir(Path(printed)) else None


def _newest_bindir(search_roots: Iterable[Path]) -> Path | None:
    candidates = [bindir for root in search_roots for bindir in root.glob("*/bin")]
    candidates.sort(key=lambda bindir: _version_key(bindir.parent.name), reverse=True)
    return next((bindir for bindir in candidates if _is_bindir(bindir)), None)


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(number) for number in re.findall(r"\d+", name))


class EphemeralPostgres:
    """A PostgreSQL server on a private unix socket, owned by this process or attached to.

    Create one with ``start()`` (owned: ``stop()`` shuts it down and removes its directory)
    or ``attach()`` (a server another process owns, e.g. the xdist controller's, given its
    ``directory``: ``stop()`` leaves it running).
    """

    def __init__(self, directory: Path, *, owner_pid: int | None) -> None:
        self.directory = directory
        self._owner_pid = owner_pid

    @classmethod
    def start(
        cls,
        *,
        base_dir: Path | None = None,
        bindir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> EphemeralPostgres:
        """Create and start a server in a new directory under ``base_dir``.

        ``base_dir`` defaults to the system temporary directory; servers left there by killed
        runs are removed first. ``bindir`` defaults to ``find_bindir()``. ``settings`` are
        extra ``postgresql.conf`` parameters. On any failure nothing is left behind. As root,
        ``base_dir`` must be reachable by the ``postgres`` user the server runs as.
        """
        bindir = bindir or find_bindir()
        base = _base(base_dir)
        cleanup_stale(base)
        directory = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=base))
        try:
            (directory / OWNER_FILE).write_text(f"{os.getpid()}\n")
            _create_and_start(bindir, directory, {**SERVER_SETTINGS, **(settings or {})}, timeout)
        except BaseException:
            _remove_server(directory)
            raise
        server = cls(directory, owner_pid=os.getpid())
        atexit.register(server.stop)
        return server

    @classmethod
    def attach(cls, directory: Path | str) -> EphemeralPostgres:
        """The server another process started in ``directory``; ``stop()`` will not stop it."""
        directory = Path(directory)
        if not (directory / SOCKET_NAME).is_socket():
            raise PostgresError(
                f"No PostgreSQL server is listening in {directory}: "
                f"the socket {SOCKET_NAME} does not exist."
            )
        return cls(directory, owner_pid=None)

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database``, for the asyncpg driver."""
        return self._dsn("postgresql+asyncpg", database)

    def dsn(self, database: str = "postgres") -> str:
        """The libpq connection URI of ``database`` (for asyncpg, psql, psycopg)."""
        return self._dsn("postgresql", database)

    def _dsn(self, scheme: str, database: str) -> str:
        host = quote(str(self.directory), safe="/")
        return f"{scheme}://{SUPERUSER}@/{quote(database, safe='')}?host={host}&port={PORT}"

    def create_database(self, name: str, template: str | None = None) -> None:
        """Create database ``name``, as a copy of ``template`` if given.

        The template must have no open connections while it is copied.
        """
        sql = f"CREATE DATABASE {_quote_identifier(name)}"
        if template is not None:
            sql += f" TEMPLATE {_quote_identifier(template)}"
        self._execute(sql)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, closing the connections still open to it."""
        self._execute(f"DROP DATABASE IF EXISTS {_quote_identifier(name)} WITH (FORCE)")

    def _execute(self, sql: str) -> None:
        _run_in_fresh_loop(_execute_in(self.dsn(), sql))

    def stop(self) -> None:
        """Stop the server and remove its directory, if this process owns it; idempotent."""
        if self._owner_pid != os.getpid():
            return
        self._owner_pid = None
        atexit.unregister(self.stop)
        _remove_server(self.directory)

    def __enter__(self) -> EphemeralPostgres:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EphemeralPostgres({str(self.directory)!r})"


def cleanup_stale(base_dir: Path | None = None) -> list[Path]:
    """Stop and remove the servers in ``base_dir`` whose owning process is gone.

    Returns the directories removed. Directories of live processes are never touched.
    """
    removed = []
    for directory in sorted(_base(base_dir).glob(f"{DIR_PREFIX}*")):
        owner_pid = _owner_pid(directory)
        if directory.is_dir() and owner_pid is not None and not pid_alive(owner_pid):
            _remove_server(directory)
            removed.append(directory)
    return removed


def _base(base_dir: Path | None) -> Path:
    return Path(base_dir or tempfile.gettempdir()).resolve()


def _owner_pid(directory: Path) -> int | None:
    # The name carries the pid too, for a run killed before it wrote the marker.
    try:
        return int((directory / OWNER_FILE).read_text())
    except (OSError, ValueError):
        pid = directory.name.removeprefix(DIR_PREFIX).split("-")[0]
        return int(pid) if pid.isdigit() else None


def _create_and_start(
    bindir: Path, directory: Path, settings: Mapping[str, str], timeout: float
) -> None:
    user = _server_user()
    if user is not None:
        os.chown(directory, user.pw_uid, user.pw_gid)
    data = directory / "data"
    initdb = [str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust"]
    initdb += ["-E", "UTF8", "--locale=C", "--no-sync"]
    _run(initdb, user, directory, timeout)
    socket_dir = {"unix_socket_directories": str(directory)}
    _append_settings(data / "postgresql.conf", {**socket_dir, **settings})
    pg_ctl = [str(bindir / "pg_ctl"), "start", "-D", str(data), "-l", str(directory / LOG_FILE)]
    pg_ctl += ["-w", "-t", str(max(1, round(timeout))), "-s"]
    try:
        _run(pg_ctl, user, directory, timeout + 5)
    except PostgresError as error:
        raise PostgresError(f"{error}\n{_log_tail(directory / LOG_FILE)}") from None


def _server_user() -> pwd.struct_passwd | None:
    """The user to run the server as: ``None`` (ourselves) unless we are root.

    Without a ``postgres`` or ``nobody`` user, initdb's own "cannot be run as root" error says
    what to do.
    """
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def _run(command: list[str], user: pwd.struct_passwd | None, cwd: Path, timeout: float) -> None:
    """Run a server program, as ``user`` when we are root; its output goes into the error."""
    as_user: dict[str, Any] = {}
    if user is not None:
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    program = Path(command[0])
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
            **as_user,
        )
    except subprocess.TimeoutExpired:
        raise PostgresError(
            f"{program.name} in {program.parent} did not finish in {timeout:g} s."
        ) from None
    if result.returncode != 0:
        raise PostgresError(
            f"{program.name} in {program.parent} failed with exit status {result.returncode}:\n"
            f"{result.stdout.rstrip()}"
        )


def _append_settings(conf: Path, settings: Mapping[str, str]) -> None:
    with conf.open("a") as file:
        file.writelines(f"{name} = {_conf_string(value)}\n" for name, value in settings.items())


def _conf_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _log_tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "The server wrote no log."
    tail = "\n".join(lines[-LOG_TAIL_LINES:])
    return f"Last lines of the server log:\n{tail}" if tail else "The server log is empty."


def _remove_server(directory: Path) -> None:
    _stop_postmaster(directory)
    shutil.rmtree(directory, ignore_errors=True)


def _stop_postmaster(directory: Path, timeout: float = 10.0) -> None:
    """Immediate shutdown (SIGQUIT) of the directory's server, SIGKILL if it hangs."""
    pid = _postmaster_pid(directory)
    if pid is None:
        return
    for signum in (signal.SIGQUIT, signal.SIGKILL):
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            return
        if _wait_for_exit(pid, timeout):
            return


def _postmaster_pid(directory: Path) -> int | None:
    """The pid in ``postmaster.pid`` if it is still this directory's server."""
    try:
        pid = int((directory / "data" / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    proc = Path("/proc")
    if not proc.is_dir():
        return pid if pid_alive(pid) else None
    try:
        cmdline = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    # A reused pid belongs to some other program: its command line lacks our directory.
    return pid if os.fsencode(directory.name) in cmdline else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    # An exited server waits as a zombie until its new parent (often PID 1) reaps it.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "Z"


def _wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _execute_in(dsn: str, sql: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def _run_in_fresh_loop(coroutine: Coroutine[Any, Any, None]) -> None:
    # A thread of its own, so that callers may already be inside a running event loop; in a
    # copy of the caller's context, which tells a sealed test that this is the plugin's work.
    context = contextvars.copy_context()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsched-pg") as pool:
        pool.submit(context.run, asyncio.run, coroutine).result()

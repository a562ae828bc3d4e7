"""The seal: while a plugin test runs, no connection reaches a database the test does not own.

From the set-up of a test that uses the plugin's fixtures to its teardown (its fixtures, its
body, the jobs in their tasks and threads, the requests and the lifespan of the app), every new
connection a database driver makes is checked against what the test owns: its test database,
the databases the plugin makes on its server while it makes the test database, in-memory
SQLite (the app's own business), and the databases ``allow_databases`` names. Any other
connection fails where it is made, with a :class:`~pytest_fastsched.DatabaseGuardError` that
names the database (its password hidden), the driver call and the SQLAlchemy engine that made
it, the job run or request it came from, and the fix; the test fails even when the code under
test swallows the error.

The drivers are checked where every connection passes, whoever made the engine or pool and
whenever: ``sqlite3.connect`` through Python's audit hook (pysqlite, aiosqlite's worker
thread, and code that imported ``connect`` itself), ``aiosqlite.connect`` (in the caller's
task, so the job run is known), asyncpg's connect (pools included), and ``connect`` of
psycopg 3 and psycopg2 where they are installed (``_options.SEALED_DRIVERS``, imported when
the tests are collected, before any clock starts). The patches, made when the first test is
sealed, stay for the rest of the process and check nothing between tests, as does the audit
hook (which Python cannot remove).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fnmatch
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from pytest_fastsched._backends import real_address
from pytest_fastsched._isolation import DatabaseGuardError
from pytest_fastsched._options import Settings, failure, marker_options
from pytest_fastsched._records import current_request, current_run

DOCS = "https://github.com/pytest-fastsched/pytest-fastsched#the-seal"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a connection goes: a SQLite file (``path``; ``None`` in memory) or a database of a
    PostgreSQL server (``host`` is a name, an address or a unix socket directory)."""

    kind: Literal["sqlite", "postgresql"]
    path: str | None = None
    host: str = ""
    port: int = 5432
    database: str = ""
    user: str = ""

    @property
    def in_memory(self) -> bool:
        """An in-memory SQLite database: the connection's own, nobody else's."""
        return self.kind == "sqlite" and self.path is None

    @property
    def key(self) -> str:
        """The target as ``allow_databases`` patterns match it, without credentials."""
        if self.kind == "sqlite":
            return f"sqlite:///{self.path or ':memory:'}"
        return f"postgresql://{self.host}:{self.port}/{self.database}"

    def shown(self) -> str:
        """The target as messages show it: a URL, the password hidden."""
        if self.kind == "sqlite":
            return self.key
        user = f"{self.user}:***@" if self.user else ""
        return f"postgresql://{user}{self.host}:{self.port}/{self.database}"

    def same_server(self, other: Target) -> bool:
        """Both are databases of one PostgreSQL server."""
        return self.kind == other.kind == "postgresql" and (self.host, self.port) == (
            other.host,
            other.port,
        )


# -- where a connection goes --------------------------------------------------------------------


def sqlite_target(database: object) -> Target:
    """The target of ``sqlite3.connect(database)``: a file, or memory."""
    name = os.fsdecode(database) if isinstance(database, (str, bytes, os.PathLike)) else ""
    if name in ("", ":memory:"):
        return Target("sqlite")
    if name.startswith("file:"):
        parts = urlsplit(name)
        if parts.path in ("", ":memory:") or parse_qs(parts.query).get("mode") == ["memory"]:
            return Target("sqlite")
        name = unquote(parts.path)
    return Target("sqlite", path=os.path.realpath(name))


def url_target(url: str) -> Target:
    """The target of a database URL (``sqlite:///file.db``, ``postgresql+asyncpg://...``)."""
    scheme, _, rest = url.partition("://")
    if scheme.partition("+")[0] == "sqlite":
        path = rest.partition("?")[0].removeprefix("/")
        return sqlite_target(path or ":memory:")
    parts = urlsplit(f"postgresql://{rest}")
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    return postgres_target(
        host=query.get("host") or parts.hostname,
        port=query.get("port") or parts.port,
        database=unquote(parts.path.lstrip("/")) or query.get("dbname"),
        user=unquote(parts.username or "") or query.get("user"),
    )


def allow_pattern(url: str) -> str:
    """An ``allow_databases`` entry as the pattern :attr:`Target.key` values are matched
    with: a URL without driver and credentials; ``*`` matches anything."""
    if "*" not in url:
        return url_target(url).key
    scheme, _, rest = url.partition("://")
    if scheme.partition("+")[0] == "sqlite":
        path = rest.partition("?")[0].removeprefix("/")
        if not path.startswith(("/", "*")):
            path = os.path.join(os.getcwd(), path)
        return f"sqlite:///{path}"
    server, _, database = rest.rpartition("@")[2].partition("/")
    host, _, port = server.rpartition(":") if ":" in server else (server, "", "5432")
    return f"postgresql://{host or 'localhost'}:{port or '5432'}/{database.partition('?')[0]}"


def postgres_target(
    *, host: object = None, port: object = None, database: object = None, user: object = None
) -> Target:
    """A PostgreSQL target, with libpq's defaults for what the caller left out."""
    if isinstance(host, (list, tuple)):
        host = host[0] if host else None
    host_name = str(host or os.environ.get("PGHOST") or "localhost").split(",")[0]
    if isinstance(port, (list, tuple)):
        port = port[0] if port else None
    port_number = int(str(port or os.environ.get("PGPORT") or 5432).split(",")[0])
    user_name = str(user or os.environ.get("PGUSER") or "")
    name = str(database or os.environ.get("PGDATABASE") or user_name)
    if host_name.startswith("/"):
        host_name, port_number = real_address(os.path.realpath(host_name), port_number)
    return Target("postgresql", host=host_name, port=port_number, database=name, user=user_name)


def _asyncpg_target(dsn: object = None, **kwargs: Any) -> Target:
    target = url_target(str(dsn)) if isinstance(dsn, str) and dsn else None
    return postgres_target(
        host=kwargs.get("host") or (target.host if target else None),
        port=kwargs.get("port") or (target.port if target else None),
        database=kwargs.get("database") or (target.database if target else None),
        user=kwargs.get("user") or (target.user if target else None),
    )


def _libpq_target(values: dict[str, Any]) -> Target:
    return postgres_target(
        host=values.get("host") or values.get("hostaddr"),
        port=values.get("port"),
        database=values.get("dbname") or values.get("database"),
        user=values.get("user"),
    )


# -- what a sealed test owns ------------------------------------------------------------------

_plugin_work: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fastsched_plugin_work", default=False
)


@contextlib.contextmanager
def plugin_work() -> Iterator[None]:
    """The plugin makes or fills its own databases in this block (threads it starts with a
    copy of the context included): it may reach any database of the test server."""
    token = _plugin_work.set(True)
    try:
        yield
    finally:
        _plugin_work.reset(token)


Owned = Callable[[], tuple[str | None, Sequence[str]]]
"""What a sealed test owns: the URL of its test database (``None`` until it is made), and
URLs of the servers on which the plugin makes and drops its own databases."""


class Seal:
    """What one test may reach, and the connections it was refused."""

    def __init__(self, owned: Owned, allowed: Sequence[str] = ()) -> None:
        self._owned = owned
        self._allow = allowed
        self._allowed: list[str] | None = None
        self.errors: list[DatabaseGuardError] = []
        self.reported: set[int] = set()

    def check(self, target: Target, call: str) -> None:
        """Let the connection through, or record and raise the refusal."""
        __tracebackhide__ = True
        if self._allowed is None:
            self._allowed = [allow_pattern(url) for url in self._allow]
        if target.in_memory or any(fnmatch.fnmatchcase(target.key, p) for p in self._allowed):
            return
        url, servers = self._owned()
        test_database = None if url is None else url_target(url)
        if test_database is not None and target.key == test_database.key:
            return
        if _plugin_work.get() and any(target.same_server(url_target(each)) for each in servers):
            return
        error = DatabaseGuardError(_refusal(target, call, test_database))
        error.refused = target.shown()  # type: ignore[attr-defined]
        self.errors.append(error)
        raise error

    def first_seen(self, errors: Sequence[BaseException]) -> list[BaseException]:
        """Those of ``errors`` (refusals, guard errors) no report has seen; now seen."""
        new = [error for error in errors if id(error) not in self.reported]
        self.reported.update(id(error) for error in new)
        return new

    def fail_unreported(self) -> None:
        """Fail the test's teardown with the refusals no report has shown (made late)."""
        __tracebackhide__ = True
        late = self.first_seen(self.errors)
        if late:
            raise failure("\n".join(str(error) for error in late))


def _refusal(target: Target, call: str, test_database: Target | None) -> str:
    engine = _engine_of_caller()
    through = f", through the SQLAlchemy engine {engine}" if engine else ""
    own = f" ({test_database.shown()})" if test_database else " (this test has none)"
    fix = (
        "Add that engine to fastsched_engine (or its sessionmaker to fastsched_sessionmaker) so "
        "that each test points it at the test database"
        if engine
        else "Connect through an engine named in fastsched_engine"
    )
    return (
        f"fastsched: database access not allowed: {call} to {target.shown()}, by "
        f"{_activity()}{through}. A test that uses the plugin reaches only its test "
        f"database{own}. {fix}, or allow this database with "
        f"@pytest.mark.fastsched(allow_databases=[{target.key!r}]) or the ini option "
        f"fastsched_allow_databases. See {DOCS}"
    )


def _activity() -> str:
    run = current_run.get()
    if run is not None:
        return run.describe()
    request = current_request.get()
    if request is not None:
        return request
    if threading.current_thread() is not threading.main_thread():
        return f"code in the thread {threading.current_thread().name!r}"
    return "the test (its body or a fixture)"


def _engine_of_caller() -> str | None:
    """The URL (password hidden) of the SQLAlchemy engine up the stack, if any."""
    engine_type = getattr(sys.modules.get("sqlalchemy.engine.base"), "Engine", None)
    if engine_type is None:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, engine_type):
            return str(candidate.url.render_as_string(hide_password=True))
        frame = frame.f_back  # type: ignore[assignment]
    return None


@contextlib.contextmanager
def sealed_test(item: pytest.Item, settings: Settings, owned: Owned) -> Iterator[Seal]:
    """Seal one test (the body of the plugin's autouse fixture), failing it at teardown with
    the refusals no report has shown."""
    __tracebackhide__ = True
    seal = Seal(owned, (*settings.allow_databases, *marker_options(item).allow_databases))
    with sealed(seal):
        yield seal
    seal.fail_unreported()


# -- the drivers ------------------------------------------------------------------------------

_ACTIVE: list[Seal] = []
_LOCK = threading.Lock()
_HOOKED = False
_PATCHED: dict[str, Any] = {}
"""The driver modules patched, by name: a module imported again is patched again."""


def _current() -> Seal | None:
    return _ACTIVE[-1] if _ACTIVE else None


class sealed:
    """Seal the process for one test: every new connection is checked by ``seal``."""

    def __init__(self, seal: Seal) -> None:
        self._seal = seal

    def __enter__(self) -> Seal:
        with _LOCK:
            _install()
            _ACTIVE.append(self._seal)
        return self._seal

    def __exit__(self, *_: object) -> None:
        with _LOCK:
            _ACTIVE.remove(self._seal)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # Python calls this for every audited event of the process: return at once unless a
    # sealed test is opening a SQLite database.
    if event == "sqlite3.connect" and _ACTIVE:
        seal = _current()
        if seal is not None:
            seal.check(sqlite_target(args[0]), f"sqlite3.connect({os.fsdecode(args[0])!r})")


def _install() -> None:
    """Check the drivers imported so far; a patch once made stays, checking nothing between
    tests (a module imported again, as pytester's in-process runs do, is patched again)."""
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    for module_name, patches in _DRIVER_PATCHES.items():
        module = sys.modules.get(module_name)
        if module is None or _PATCHED.get(module_name) is module:
            continue
        for owner_path, name, make in patches:
            owner: Any = module
            for part in owner_path:
                owner = getattr(owner, part, None)
            current = getattr(owner, name, None)
            if current is not None and not getattr(current, "_fastsched_seal", False):
                setattr(owner, name, make(current))
        _PATCHED[module_name] = module


def _checked(call: str, target_of: Callable[..., Target]) -> Callable[[Any], Any]:
    """A patch maker: ``original`` wrapped to check its target first."""

    def make(original: Any) -> Any:
        def checked(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            seal = _current()
            if seal is not None:
                seal.check(target_of(*args, **kwargs), call)
            return original(*args, **kwargs)

        checked.__wrapped__ = original  # type: ignore[attr-defined]
        checked._fastsched_seal = True  # type: ignore[attr-defined]
        return checked

    return make


def _checked_classmethod(call: str, target_of: Callable[..., Target]) -> Callable[[Any], Any]:
    """A patch maker for a ``connect`` classmethod (psycopg 3)."""

    def make(original: Any) -> Any:
        function = original.__func__

        def checked(cls: Any, *args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            seal = _current()
            if seal is not None:
                seal.check(target_of(*args, **kwargs), call)
            return function(cls, *args, **kwargs)

        checked._fastsched_seal = True  # type: ignore[attr-defined]
        return classmethod(checked)

    return make


def _aiosqlite_target(database: object = ":memory:", *args: Any, **kwargs: Any) -> Target:
    return sqlite_target(database)


def _psycopg_target(conninfo: str = "", *args: Any, **kwargs: Any) -> Target:
    from psycopg.conninfo import conninfo_to_dict

    options = {key: value for key, value in kwargs.items() if isinstance(value, (str, int))}
    return _libpq_target(conninfo_to_dict(conninfo, **options))


def _psycopg2_target(dsn: str | None = None, *args: Any, **kwargs: Any) -> Target:
    from psycopg2.extensions import make_dsn, parse_dsn

    options = {key: value for key, value in kwargs.items() if isinstance(value, (str, int))}
    options.pop("connection_factory", None)
    options.pop("cursor_factory", None)
    return _libpq_target(parse_dsn(make_dsn(dsn, **options)))


def _asyncpg_internal_target(*, loop: Any = None, **kwargs: Any) -> Target:
    kwargs.pop("connection_class", None)
    kwargs.pop("record_class", None)
    return _asyncpg_target(**kwargs)


_DRIVER_PATCHES: dict[str, tuple[tuple[tuple[str, ...], str, Callable[[Any], Any]], ...]] = {
    "aiosqlite": (((), "connect", _checked("aiosqlite.connect()", _aiosqlite_target)),),
    "aiosqlite.core": (((), "connect", _checked("aiosqlite.connect()", _aiosqlite_target)),),
    "asyncpg": (((), "connect", _checked("asyncpg.connect()", _asyncpg_target)),),
    "asyncpg.connection": (((), "connect", _checked("asyncpg.connect()", _asyncpg_target)),),
    "asyncpg.connect_utils": (
        (
            (),
            "_connect",
            _checked("an asyncpg connection (of a pool)", _asyncpg_internal_target),
        ),
    ),
    "psycopg": (
        ((), "connect", _checked("psycopg.connect()", _psycopg_target)),
        (
            ("Connection",),
            "connect",
            _checked_classmethod("psycopg.Connection.connect()", _psycopg_target),
        ),
        (
            ("AsyncConnection",),
            "connect",
            _checked_classmethod("psycopg.AsyncConnection.connect()", _psycopg_target),
        ),
    ),
    "psycopg2": (((), "connect", _checked("psycopg2.connect()", _psycopg2_target)),),
}

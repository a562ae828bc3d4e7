"""Settings of the plugin: ini options, their command-line twins, and the ``fastsched`` marker.

Every setting is declared once in :data:`OPTIONS`; ``plugin.py`` registers each one as an ini
option ``fastsched_<name>`` and a command-line option ``--fastsched-<name>`` (the command line
wins). :func:`load_settings` validates them once, in ``pytest_configure``, and
:func:`report_header` echoes them. The helpers every room uses to name a wrong value
(:func:`describe`, :func:`failure`) live here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import difflib
import importlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest

DOCS = "https://github.com/pytest-fastsched/pytest-fastsched#configuration"

CLOCK_BACKENDS = ("freezegun", "time-machine")
ISOLATION_MODES = ("rollback", "commit")
JOB_ERROR_MODES = ("raise", "record")
PREPARED_STATEMENT_MODES = ("ignore", "check", "record")
DATABASE_CLOCKS = ("virtual", "real")
POSTGRES_BACKENDS = ("keep", "new")
DEFAULT_START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)

ClockBackendName = Literal["freezegun", "time-machine"]
IsolationMode = Literal["rollback", "commit"]
JobErrorMode = Literal["raise", "record"]
PreparedStatementMode = Literal["ignore", "check", "record"]
DatabaseClock = Literal["virtual", "real"]
PostgresBackends = Literal["keep", "new"]


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its ini name, help text and default (``None`` means unset)."""

    name: str
    help: str
    default: str | None = None
    flag: bool = False

    @property
    def ini_name(self) -> str:
        return f"fastsched_{self.name}"

    @property
    def cli_name(self) -> str:
        return "--fastsched-" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("scheduler", "the app's AsyncIOScheduler, as 'module:attr'"),
    Option(
        "sessionmaker",
        "the app's async_sessionmaker (or sessionmaker(class_=AsyncSession)), as "
        "'module:attr'; several separated by spaces or commas",
    ),
    Option(
        "engine",
        "the app's AsyncEngine, as 'module:attr'; several separated by spaces or commas: each "
        "test points them at the test database",
    ),
    Option(
        "isolation",
        "how fastsched_db isolates each test: 'rollback' (default) or 'commit'",
        default="rollback",
    ),
    Option(
        "allow_databases",
        "databases a plugin test may reach besides the test database, as URLs "
        "('sqlite:///path/to/file.db', 'postgresql://host:5432/name'; * matches anything), "
        "separated by spaces",
    ),
    Option("metadata", "the app's SQLAlchemy MetaData, as 'module:attr'"),
    Option("app", "the app's ASGI application (FastAPI instance), as 'module:attr'"),
    Option(
        "tables",
        "create only these tables of fastsched_metadata and the tables their foreign keys "
        "reach, separated by spaces or commas",
    ),
    Option(
        "alembic",
        "the app's alembic.ini, relative to the rootdir: build the schema with "
        "'alembic upgrade heads' instead of create_all()",
    ),
    Option(
        "extensions",
        "PostgreSQL extensions to create before the schema, separated by spaces or commas",
    ),
    Option(
        "seed_tables",
        "tables of seed data the schema step fills: commit isolation restores their rows "
        "instead of emptying them, separated by spaces or commas",
    ),
    Option(
        "engine_options",
        "keyword arguments of create_async_engine() for the test engine, as 'module:attr': a "
        "dict, or a function of the test database's URL that returns one (the app's own "
        "engine options, such as its asyncpg connect_args)",
    ),
    Option(
        "prepared_statements",
        "PostgreSQL: 'check' fails a test whose named prepared statements would break behind "
        "a transaction-mode pooler, 'record' only records them, 'ignore' (default) does "
        "neither",
        default="ignore",
    ),
    Option(
        "database",
        "'sqlite' (embedded, default), 'postgresql' (ephemeral local server) "
        "or the SQLAlchemy URL of an existing server",
        default="sqlite",
    ),
    Option(
        "database_clock",
        "'virtual' (default): the test database's now(), CURRENT_TIMESTAMP and the like read "
        "the virtual instant of the test's fastsched_clock; 'real': the server's clock",
        default="virtual",
    ),
    Option(
        "postgres_backends",
        "'keep' (default): on a PostgreSQL server reached over a unix socket, the test "
        "engine's backends are reset and kept from one event loop to the next; 'new': a new "
        "server backend for each new connection",
        default="keep",
    ),
    Option(
        "clock_backend",
        "wall-clock backend: 'time-machine' (default) or 'freezegun'",
        default="time-machine",
    ),
    Option(
        "start",
        "virtual instant every clock starts at, ISO 8601 with a UTC offset "
        "(default 2030-01-01T00:00:00+00:00)",
        default=DEFAULT_START.isoformat(),
    ),
    Option(
        "watchdog",
        "real seconds a clock call may wait for jobs, requests or I/O before the test fails "
        "(default 30)",
        default="30",
    ),
    Option(
        "track",
        "tables fastsched_history records besides those with a 'status' column, as "
        "TABLE:STATUS_COLUMN[:ERROR_COLUMN[:OTHER_COLUMN...]] separated by spaces",
    ),
    Option(
        "timeline",
        "print a timeline of job runs and row transitions for each failing test (every test "
        "with -v)",
        default="false",
        flag=True,
    ),
)


def add_options(parser: pytest.Parser) -> None:
    """Register every setting as an ini option and its command-line twin, in one group."""
    group = parser.getgroup("fastsched", "pytest-fastsched: virtual time for APScheduler jobs")
    for option in OPTIONS:
        kind = {"action": "store_const", "const": "true"} if option.flag else {"metavar": "VALUE"}
        group.addoption(
            option.cli_name, dest=option.ini_name, default=None, help=option.help, **kind
        )
        parser.addini(option.ini_name, help=option.help, default=option.default)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated settings of one pytest run."""

    scheduler: str | None
    sessionmaker: str | None
    metadata: str | None
    app: str | None
    database: str
    clock_backend: ClockBackendName
    start: dt.datetime
    watchdog: float
    tables: tuple[str, ...] = ()
    alembic: str | None = None
    extensions: tuple[str, ...] = ()
    seed_tables: tuple[str, ...] = ()
    track: tuple[TrackSpec, ...] = ()
    timeline: bool = False
    engine_options: str | None = None
    prepared_statements: PreparedStatementMode = "ignore"
    engine: str | None = None
    isolation: IsolationMode = "rollback"
    allow_databases: tuple[str, ...] = ()
    database_clock: DatabaseClock = "virtual"
    postgres_backends: PostgresBackends = "keep"

    @property
    def sessionmakers(self) -> tuple[str, ...]:
        """The ``module:attr`` paths of the app's sessionmakers."""
        return _names(self.sessionmaker)

    @property
    def engines(self) -> tuple[str, ...]:
        """The ``module:attr`` paths of the app's engines."""
        return _names(self.engine)


def _raw_value(config: pytest.Config, option: Option) -> str | None:
    cli_value = config.getoption(option.ini_name, default=None)
    if cli_value is not None:
        return str(cli_value)
    ini_value = config.getini(option.ini_name)
    if ini_value in (None, "", []):
        return option.default
    return str(ini_value).strip()


def _choice(option: Option, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        valid = ", ".join(repr(choice) for choice in choices)
        raise pytest.UsageError(
            f"{option.ini_name} = {value!r} is not valid: use one of {valid} "
            f"(ini option {option.ini_name} or {option.cli_name}). See {DOCS}"
        )
    return value


def _import_path(option: Option, value: str | None) -> str | None:
    if value is None:
        return None
    module, sep, attr = value.partition(":")
    if not sep or not module or not attr:
        raise pytest.UsageError(
            f"{option.ini_name} = {value!r} is not a 'module:attr' path: write it like "
            f"'app.services.scheduler:scheduler'. See {DOCS}"
        )
    return value


def _names(value: str | None, separators: str = r"[\s,]+") -> tuple[str, ...]:
    return tuple(name for name in re.split(separators, value or "") if name)


def _import_paths(option: Option, value: str | None) -> str | None:
    """Several ``module:attr`` paths, each checked; kept as one space-separated string."""
    paths = [_import_path(option, path) for path in _names(value)]
    return " ".join(path for path in paths if path) or None


def _alembic_ini(option: Option, value: str | None, rootdir: Path) -> str | None:
    if value is None:
        return None
    path = rootdir / value
    if not path.is_file():
        raise pytest.UsageError(
            f"{option.ini_name} = {value!r}: no such file {path}. Give the path of the app's "
            f"alembic.ini, relative to the rootdir ({rootdir}). See {DOCS}"
        )
    return str(path)


def _check_schema_sources(settings: Settings) -> None:
    if settings.tables and settings.alembic is not None:
        raise pytest.UsageError(
            "fastsched_tables and fastsched_alembic exclude each other: the migrations build "
            "the whole schema. Remove fastsched_tables, or remove fastsched_alembic to build "
            f"the schema with create_all(). See {DOCS}"
        )
    if settings.tables and settings.metadata is None:
        raise pytest.UsageError(
            f"fastsched_tables = {' '.join(settings.tables)!r} needs fastsched_metadata: it "
            f"names tables of the app's MetaData to create. See {DOCS}"
        )


def parse_start(value: object, source: str) -> dt.datetime:
    """Parse a start instant given as an aware datetime or an ISO 8601 string with an offset."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise pytest.UsageError(
                f"{source} = {value!r} is not an ISO 8601 datetime: write it like "
                f"'2030-01-01T00:00:00+00:00'"
            ) from None
    if not isinstance(value, dt.datetime):
        raise pytest.UsageError(
            f"{source} must be an aware datetime or an ISO 8601 string, not {value!r}"
        )
    if value.tzinfo is None or value.utcoffset() is None:
        raise pytest.UsageError(
            f"{source} = {value.isoformat()!r} is naive: give it a UTC offset, "
            f"e.g. '{value.isoformat()}+00:00' or tzinfo=timezone.utc"
        )
    return value.astimezone(dt.timezone.utc)


def clock_backend(value: str) -> ClockBackendName:
    """Validate a clock backend name given by the ``fastsched_clock_backend`` fixture."""
    if value not in CLOCK_BACKENDS:
        valid = ", ".join(repr(choice) for choice in CLOCK_BACKENDS)
        raise pytest.UsageError(
            f"fastsched_clock_backend = {value!r} is not valid: use one of {valid}"
        )
    return value  # type: ignore[return-value]


def _positive_float(option: Option, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number > 0:
        raise pytest.UsageError(
            f"{option.ini_name} = {value!r} is not valid: give a positive number of seconds"
        )
    return number


def load_settings(config: pytest.Config) -> Settings:
    """Read and validate every setting; a bad value is a ``pytest.UsageError`` naming the fix."""
    raw = {option.name: _raw_value(config, option) for option in OPTIONS}
    by_name = {option.name: option for option in OPTIONS}
    database = raw["database"] or "sqlite"
    if "://" not in database:
        database = _choice(by_name["database"], database, ("sqlite", "postgresql"))
    backend = _choice(by_name["clock_backend"], raw["clock_backend"] or "", CLOCK_BACKENDS)
    settings = Settings(
        scheduler=_import_path(by_name["scheduler"], raw["scheduler"]),
        sessionmaker=_import_paths(by_name["sessionmaker"], raw["sessionmaker"]),
        metadata=_import_path(by_name["metadata"], raw["metadata"]),
        app=_import_path(by_name["app"], raw["app"]),
        database=database,
        clock_backend=backend,  # type: ignore[arg-type]
        start=parse_start(raw["start"], "fastsched_start"),
        watchdog=_positive_float(by_name["watchdog"], raw["watchdog"] or ""),
        tables=_names(raw["tables"]),
        alembic=_alembic_ini(by_name["alembic"], raw["alembic"], config.rootpath),
        extensions=_names(raw["extensions"]),
        seed_tables=_names(raw["seed_tables"]),
        track=parse_track(raw["track"]),
        timeline=_flag(by_name["timeline"], raw["timeline"] or ""),
        engine_options=_import_path(by_name["engine_options"], raw["engine_options"]),
        prepared_statements=_choice(  # type: ignore[arg-type]
            by_name["prepared_statements"],
            raw["prepared_statements"] or "",
            PREPARED_STATEMENT_MODES,
        ),
        engine=_import_paths(by_name["engine"], raw["engine"]),
        isolation=_choice(by_name["isolation"], raw["isolation"] or "", ISOLATION_MODES),  # type: ignore[arg-type]
        allow_databases=_names(raw["allow_databases"], separators=r"\s+"),
        database_clock=_choice(  # type: ignore[arg-type]
            by_name["database_clock"], raw["database_clock"] or "", DATABASE_CLOCKS
        ),
        postgres_backends=_choice(  # type: ignore[arg-type]
            by_name["postgres_backends"], raw["postgres_backends"] or "", POSTGRES_BACKENDS
        ),
    )
    _check_schema_sources(settings)
    _check_database_url(settings.database)
    return settings


def _check_database_url(database: str) -> None:
    if "://" not in database:
        return
    scheme = database.partition("://")[0].partition("+")[0]
    if scheme not in ("postgresql", "postgres"):
        raise pytest.UsageError(
            f"fastsched_database = {redact(database)!r} is not a PostgreSQL URL: use "
            "'sqlite', 'postgresql' (a local server the plugin starts) or the URL of an "
            "existing PostgreSQL server, such as "
            "'postgresql+asyncpg://user:password@localhost:5432/postgres' (the plugin works "
            f"in a scratch database it creates and drops there). See {DOCS}"
        )


def redact(database: str) -> str:
    """A database URL with its password hidden: ``postgresql://user:***@host/db``."""
    scheme, sep, rest = database.partition("://")
    if not sep or "@" not in rest:
        return database
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def report_header(settings: Settings, rootpath: Path) -> list[str]:
    """The lines of the test session's header: the settings in use."""
    lines = [
        f"fastsched: database={redact(settings.database)}, "
        f"clock_backend={settings.clock_backend}, start={settings.start.isoformat()}, "
        f"scheduler={settings.scheduler or '-'}, sessionmaker={settings.sessionmaker or '-'}, "
        f"app={settings.app or '-'}"
    ]
    if settings.engine_options is not None or settings.prepared_statements != "ignore":
        lines.append(
            f"fastsched engine: engine_options={settings.engine_options or '-'}, "
            f"prepared_statements={settings.prepared_statements}"
        )
    if settings.track or settings.timeline:
        tracked = " ".join(
            ":".join([spec.table, spec.status, spec.error or "", *spec.others]).rstrip(":")
            for spec in settings.track
        )
        timeline = "on" if settings.timeline else "off"
        lines.append(f"fastsched history: track={tracked or '-'}, timeline={timeline}")
    schema = {
        "alembic": settings.alembic and os.path.relpath(settings.alembic, rootpath),
        "tables": " ".join(settings.tables),
        "extensions": " ".join(settings.extensions),
        "seed_tables": " ".join(settings.seed_tables),
    }
    if any(schema.values()):
        values = ", ".join(f"{key}={value or '-'}" for key, value in schema.items())
        lines.append(f"fastsched schema: {values}")
    if settings.engine or settings.isolation != "rollback" or settings.allow_databases:
        lines.append(
            f"fastsched isolation: isolation={settings.isolation}, "
            f"engine={settings.engine or '-'}, "
            f"allow_databases={' '.join(map(redact, settings.allow_databases)) or '-'}"
        )
    if settings.database_clock != "virtual":
        lines.append(f"fastsched database clock: {settings.database_clock}")
    if settings.postgres_backends != "keep":
        lines.append(f"fastsched postgres backends: {settings.postgres_backends}")
    return lines


SEALED_DRIVERS = ("aiosqlite", "asyncpg", "psycopg", "psycopg2")
"""The database drivers the seal watches (see ``_seal``), where they are installed."""


def import_before_clock(settings: Settings, fixtures: set[str]) -> None:
    """Import what the collected tests need now, before a test starts the virtual clock.

    Some modules fail to import under freezegun's fake datetime classes: FastAPI imports
    pydantic.v1 when it builds its first route; the C extensions of asyncpg and psycopg check
    the size of ``datetime.date``. So when a test uses the plugin, the app's modules and the
    database drivers the seal watches are imported, and the SQLAlchemy dialect when a test
    uses ``fastsched_db``. Errors of the database and app paths are left to the fixtures,
    which report them (briefly) against each test that needs the path. A scheduler that the
    collected tests need and that does not resolve, or is not an ``AsyncIOScheduler``, is one
    ``pytest.UsageError`` for the session, not a traceback through pytest-asyncio per test.
    """
    if not any(name.startswith("fastsched_") for name in fixtures):
        return
    for driver in SEALED_DRIVERS:
        with contextlib.suppress(ImportError):
            importlib.import_module(driver)
    if "fastsched_scheduler" in fixtures:
        check_scheduler_setting(settings)
    for option, paths in (
        ("fastsched_scheduler", _names(settings.scheduler)),
        ("fastsched_sessionmaker", settings.sessionmakers),
        ("fastsched_engine", settings.engines),
        ("fastsched_metadata", _names(settings.metadata)),
        ("fastsched_app", _names(settings.app)),
    ):
        for path in paths:
            with contextlib.suppress(pytest.UsageError):
                resolve(path, option)
    if "fastsched_db" in fixtures:
        dialect = "sqlite.aiosqlite" if settings.database == "sqlite" else "postgresql.asyncpg"
        importlib.import_module(f"sqlalchemy.dialects.{dialect}")


def check_scheduler_setting(settings: Settings) -> None:
    """Raise ``pytest.UsageError`` unless ``fastsched_scheduler``, if set, is importable and an
    ``AsyncIOScheduler``. Under xdist the controller calls it before the workers start: a
    worker's usage error would crash it instead of stopping the run with the message."""
    if settings.scheduler is not None:
        scheduler = resolve(settings.scheduler, "fastsched_scheduler")
        check_scheduler(scheduler, f"fastsched_scheduler = {settings.scheduler!r}")


def check_scheduler(scheduler: object, source: str) -> None:
    """Raise ``pytest.UsageError`` unless ``scheduler`` is an APScheduler ``AsyncIOScheduler``
    or ``BackgroundScheduler``."""
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.schedulers.blocking import BlockingScheduler

    if isinstance(scheduler, (AsyncIOScheduler, BackgroundScheduler)):
        return
    kind = type(scheduler)
    if isinstance(scheduler, BlockingScheduler):
        why = (
            "a BlockingScheduler runs in the thread that starts it and never returns. A FastAPI "
            "app runs BackgroundScheduler() (sync jobs on a thread pool) or AsyncIOScheduler()."
        )
    else:
        why = (
            "the plugin drives an AsyncIOScheduler or a BackgroundScheduler. Create the app's "
            "scheduler as AsyncIOScheduler() (async jobs) or BackgroundScheduler() (sync jobs)."
        )
    raise pytest.UsageError(
        f"{source} needs an apscheduler AsyncIOScheduler or BackgroundScheduler, got "
        f"{kind.__module__}.{kind.__qualname__}: {why}"
    )


def describe(value: object) -> str:
    """What a setting points at, for messages: ``a module.Class`` or ``the class module.C``."""
    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    kind = type(value)
    return f"a {kind.__module__}.{kind.__qualname__}"


def failure(message: str) -> BaseException:
    """A test failure that shows only ``message`` (the plugin's frames say nothing useful)."""
    return pytest.fail.Exception(message, pytrace=False)


def resolve(path: str, option_name: str) -> Any:
    """Import ``module:attr`` (dots allowed in attr); a failure names the option to fix."""
    module_name, _, attr_path = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise pytest.UsageError(
            f"{option_name} = {path!r}: cannot import module {module_name!r} ({exc}). "
            f"Check the path and that the app is importable from the test run's rootdir."
        ) from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise pytest.UsageError(
                f"{option_name} = {path!r}: module {module_name!r} has no attribute "
                f"{attr_path!r}. Check the name after the ':'."
            ) from None
    return target


@dataclasses.dataclass(frozen=True)
class MarkerOptions:
    """The arguments of ``@pytest.mark.fastsched(...)``; every field is optional."""

    start: dt.datetime | None = None
    isolation: IsolationMode | None = None
    job_errors: JobErrorMode = "raise"
    track: tuple[TrackSpec, ...] | None = None
    replicas: int = 1
    prepared_statements: PreparedStatementMode | None = None
    allow_databases: tuple[str, ...] = ()
    scheduler: bool = True
    """``False``: a test that uses ``fastsched_clock`` does not drive the configured
    scheduler unless it asks for ``fastsched_scheduler``."""


def _marker_signature(
    *,
    start: dt.datetime | str | None = None,
    isolation: str | None = None,
    job_errors: str = "raise",
    track: Mapping[str, Any] | None = None,
    replicas: int = 1,
    prepared_statements: str | None = None,
    allow_databases: Sequence[str] = (),
    scheduler: bool = True,
) -> MarkerOptions:
    isolation = _replica_isolation(replicas, isolation)
    if isolation is not None and isolation not in ISOLATION_MODES:
        raise pytest.UsageError(
            f"@pytest.mark.fastsched(isolation={isolation!r}) is not valid: "
            f"use one of {', '.join(map(repr, ISOLATION_MODES))}"
        )
    if job_errors not in JOB_ERROR_MODES:
        raise pytest.UsageError(
            f"@pytest.mark.fastsched(job_errors={job_errors!r}) is not valid: "
            f"use one of {', '.join(map(repr, JOB_ERROR_MODES))}"
        )
    if prepared_statements is not None and prepared_statements not in PREPARED_STATEMENT_MODES:
        raise pytest.UsageError(
            f"@pytest.mark.fastsched(prepared_statements={prepared_statements!r}) is not "
            f"valid: use one of {', '.join(map(repr, PREPARED_STATEMENT_MODES))}"
        )
    return MarkerOptions(
        start=None if start is None else parse_start(start, "@pytest.mark.fastsched(start=...)"),
        isolation=isolation,  # type: ignore[arg-type]
        job_errors=job_errors,  # type: ignore[arg-type]
        track=None if track is None else track_of_marker(track),
        replicas=replicas,
        prepared_statements=prepared_statements,  # type: ignore[arg-type]
        allow_databases=_allowed_of_marker(allow_databases),
        scheduler=_scheduler_of_marker(scheduler),
    )


def _scheduler_of_marker(scheduler: object) -> bool:
    if not isinstance(scheduler, bool):
        raise pytest.UsageError(
            f"@pytest.mark.fastsched(scheduler={scheduler!r}) is not valid: use False (the "
            "clock does not drive the configured scheduler) or True (the default)"
        )
    return scheduler


def _allowed_of_marker(allow_databases: object) -> tuple[str, ...]:
    """Validate ``allow_databases=``: database URLs (one, or a list)."""
    urls = allow_databases if isinstance(allow_databases, (list, tuple)) else [allow_databases]
    if not all(isinstance(url, str) and "://" in url for url in urls):
        raise pytest.UsageError(
            f"@pytest.mark.fastsched(allow_databases={allow_databases!r}) is not valid: give "
            "database URLs, e.g. allow_databases=('sqlite:///reports.db', "
            "'postgresql://localhost:5432/analytics') (* matches anything)"
        )
    return tuple(urls)


def _replica_isolation(replicas: object, isolation: str | None) -> str | None:
    """Validate ``replicas``; more than one implies (and needs) commit isolation."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise pytest.UsageError(
            f"@pytest.mark.fastsched(replicas={replicas!r}) is not valid: give the number of "
            f"copies of the app's scheduler to run, an int of at least 1"
        )
    if replicas == 1:
        return isolation
    if isolation == "rollback":
        raise pytest.UsageError(
            f"@pytest.mark.fastsched(replicas={replicas}) cannot run under "
            f"isolation='rollback': the replicas' jobs run at once, and under rollback "
            f"isolation every session shares the one test connection. Remove "
            f"isolation='rollback' (replicas imply isolation='commit'), or run one replica."
        )
    return "commit"


MARKER_HELP = (
    "fastsched(*, start=None, isolation=None, job_errors='raise', track=None, replicas=1, "
    "prepared_statements=None, allow_databases=(), scheduler=True): "
    "per-test settings of pytest-fastsched: the virtual start instant, the database isolation "
    "mode ('rollback' or 'commit'), whether job exceptions fail the test ('raise') or are only "
    "recorded ('record'), the tables fastsched_history records "
    "({'table': ('status_column', 'error_column', 'other_column', ...)}), and how many copies "
    "of the app's scheduler run (replicas > 1 implies isolation='commit'), and whether named "
    "prepared statements that would break behind a transaction-mode pooler fail the test "
    "('check'), are only recorded ('record') or not looked at ('ignore'; PostgreSQL only), "
    "the databases the test may reach besides the test database (a list of URLs), "
    "and whether a test that uses fastsched_clock drives the configured scheduler (True) "
    "or only when it asks for fastsched_scheduler (False)."
)


MARKER_KEY: pytest.StashKey[MarkerOptions] = pytest.StashKey()


def marker_options(node: pytest.Item) -> MarkerOptions:
    """The ``fastsched`` markers of a test, merged (closest wins) and validated.

    The plugin's fixtures read them as they are set up; the last reading is kept, for
    :func:`check_marker_unchanged`.
    """
    options = node.stash[MARKER_KEY] = _read_marker_options(node)
    return options


def implied(node: pytest.Item, settings: Settings) -> list[str]:
    """The plugin fixtures a test needs without naming them, in set-up order.

    ``@pytest.mark.fastsched(replicas=N)`` with N > 1 needs ``fastsched_scheduler``, which
    runs the replicas. So does a test that uses ``fastsched_clock`` when the settings name
    the app's scheduler: moving time fires the app's jobs, as in production, unless the
    marker says ``scheduler=False``. Set up before the test's other fixtures, the scheduler
    is running (paused at the virtual start) when the app's set-up code adds its jobs.
    """
    marked = node.get_closest_marker("fastsched") is not None
    if marked and marker_options(node).replicas > 1:
        return ["fastsched_scheduler"]
    fixtures = getattr(node, "fixturenames", ())
    if settings.scheduler is None or "fastsched_clock" not in fixtures:
        return []
    return [] if marked and not marker_options(node).scheduler else ["fastsched_scheduler"]


def check_marker_unchanged(item: pytest.Item) -> None:
    """Fail a test that applied a ``fastsched`` marker after the plugin's fixtures read them.

    ``request.applymarker(pytest.mark.fastsched(...))`` in the test body, or in a fixture
    that runs after the plugin's, comes too late for the fixtures it means to change.
    """
    __tracebackhide__ = True
    used = item.stash.get(MARKER_KEY, None)
    if used is None:
        return
    now = _read_marker_options(item)
    changed = [
        f"{field.name}={getattr(now, field.name)!r} (the fixtures used "
        f"{getattr(used, field.name)!r})"
        for field in dataclasses.fields(MarkerOptions)
        if getattr(now, field.name) != getattr(used, field.name)
    ]
    if changed:
        raise failure(
            f"a fastsched marker was applied to {item.nodeid} after the plugin's fixtures were "
            f"set up, so it changed nothing: {', '.join(changed)}. Put the marker on the test "
            "(or its class or module), or apply it in a fixture that the plugin's fixtures "
            "come after."
        )


def _read_marker_options(node: pytest.Item) -> MarkerOptions:
    kwargs: dict[str, Any] = {}
    for marker in reversed(list(node.iter_markers("fastsched"))):
        if marker.args:
            raise pytest.UsageError(
                f"@pytest.mark.fastsched takes keyword arguments only, got {marker.args!r} "
                f"on {node.nodeid}"
            )
        kwargs.update(marker.kwargs)
    return _call_signature(_marker_signature, kwargs, "@pytest.mark.fastsched")


def _call_signature(
    signature: Callable[..., MarkerOptions], kwargs: Mapping[str, Any], shown_as: str
) -> MarkerOptions:
    valid = [field.name for field in dataclasses.fields(MarkerOptions)]
    for name in kwargs:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise pytest.UsageError(
                f"{shown_as} got an unexpected keyword argument {name!r}{hint}; "
                f"valid: {', '.join(valid)}"
            )
    return signature(**kwargs)


# -- fastsched_history: the tracked tables and the timeline flag ------------------------------

TRACK_SYNTAX = "TABLE:STATUS_COLUMN[:ERROR_COLUMN[:OTHER_COLUMN...]]"
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclasses.dataclass(frozen=True)
class TrackSpec:
    """A table ``fastsched_history`` records, with the columns it records.

    ``status`` is the column whose writes are recorded; ``error`` (the error text, shown and
    checked by ``last_error=``) and ``others`` are recorded with each write.
    """

    table: str
    status: str
    error: str | None = None
    others: tuple[str, ...] = ()


def parse_track(value: str | None) -> tuple[TrackSpec, ...]:
    """Parse ``fastsched_track``: entries ``TABLE:STATUS[:ERROR[:OTHER...]]`` split by spaces.

    An empty ERROR (``items:status::attempts``) records no error column.
    """
    specs: list[TrackSpec] = []
    for entry in (value or "").split():
        table, _, rest = entry.partition(":")
        status, _, rest = rest.partition(":")
        error, _, others = rest.partition(":")
        other_names = tuple(others.split(":")) if others else ()
        if not table or not status or "" in other_names:
            raise pytest.UsageError(
                f"fastsched_track: {entry!r} is not valid: write each table as "
                f"{TRACK_SYNTAX}, separated by spaces, e.g. 'fastsched_track = "
                f"items:status:last_error domains:domain_extraction_status:"
                f"domain_extraction_error'. See {DOCS}"
            )
        specs.append(TrackSpec(table, status, error or None, other_names))
    _check_unique(specs, "fastsched_track")
    return tuple(specs)


def track_of_marker(track: object) -> tuple[TrackSpec, ...]:
    """Validate ``@pytest.mark.fastsched(track=...)``: a dict of table to its columns."""
    items = list(track.items()) if isinstance(track, Mapping) else []
    specs = [_marker_spec(table, columns) for table, columns in items]
    if not items or None in specs:
        raise pytest.UsageError(
            f"@pytest.mark.fastsched(track={track!r}) is not valid: give a dict of table "
            f"name to its status column, or to a tuple (status column, error column or None, "
            f"other columns...), e.g. track={{'domains': ('domain_extraction_status', "
            f"'domain_extraction_error')}}"
        )
    checked = [spec for spec in specs if spec is not None]
    _check_unique(checked, "@pytest.mark.fastsched(track=...)")
    return tuple(checked)


def _marker_spec(table: object, columns: object) -> TrackSpec | None:
    names = (columns,) if isinstance(columns, str) else columns
    if not isinstance(table, str) or not isinstance(names, (tuple, list)) or not names:
        return None
    status, error, *others = (*names, None) if len(names) == 1 else names
    if not all(isinstance(name, str) for name in (status, *others)):
        return None
    if error is not None and not isinstance(error, str):
        return None
    return TrackSpec(table, status, error, tuple(others))


def _check_unique(specs: list[TrackSpec], source: str) -> None:
    tables = [spec.table for spec in specs]
    for table in tables:
        if tables.count(table) > 1:
            raise pytest.UsageError(f"{source} names the table {table!r} twice: keep one entry")


def _flag(option: Option, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise pytest.UsageError(
        f"{option.ini_name} = {value!r} is not valid: use true or false "
        f"(ini option {option.ini_name}, or the flag {option.cli_name}). See {DOCS}"
    )

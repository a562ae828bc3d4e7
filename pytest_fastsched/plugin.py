"""The pytest plugin: options, the ``fastsched`` marker, the report header and the fixtures.

This module stays thin and imports no heavy library at import time: APScheduler, SQLAlchemy
and FastAPI are imported inside the fixtures that need them, so a suite that never uses the
plugin starts as fast as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_fastsched import _options

if TYPE_CHECKING:
    from pytest_fastsched._clock import VirtualClock
    from pytest_fastsched._scheduler import SchedulerHarness

SETTINGS_KEY = pytest.StashKey["_options.Settings"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastsched", "pytest-fastsched: virtual time for APScheduler jobs")
    for option in _options.OPTIONS:
        if option.flag:
            group.addoption(
                option.cli_name,
                dest=option.ini_name,
                action="store_const",
                const="true",
                default=None,
                help=option.help,
            )
        else:
            group.addoption(
                option.cli_name,
                dest=option.ini_name,
                default=None,
                metavar="VALUE",
                help=option.help,
            )
        parser.addini(option.ini_name, help=option.help, default=option.default)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _options.MARKER_HELP)
    config.stash[SETTINGS_KEY] = _options.load_settings(config)


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = config.stash[SETTINGS_KEY]
    return [
        f"fastsched: database={_redact(settings.database)}, "
        f"clock_backend={settings.clock_backend}, start={settings.start.isoformat()}, "
        f"scheduler={settings.scheduler or '-'}, sessionmaker={settings.sessionmaker or '-'}, "
        f"app={settings.app or '-'}"
    ]


@pytest.hookimpl(specname="pytest_report_header")
def pytest_report_header_engine(config: pytest.Config) -> list[str]:
    settings = config.stash[SETTINGS_KEY]
    if settings.engine_options is None and settings.prepared_statements == "ignore":
        return []
    return [
        f"fastsched engine: engine_options={settings.engine_options or '-'}, "
        f"prepared_statements={settings.prepared_statements}"
    ]


def _redact(database: str) -> str:
    scheme, sep, rest = database.partition("://")
    if not sep or "@" not in rest:
        return database
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


@pytest.hookimpl(specname="pytest_collection_finish")
def pytest_collection_finish_app_modules(session: pytest.Session) -> None:
    # Import the app's modules before any test starts the virtual clock: some imports fail
    # under freezegun's fake datetime classes (FastAPI imports pydantic.v1 when it builds its
    # first route; asyncpg's C extension checks the size of datetime.date). Errors are left
    # to the fixtures, which report them against the test that needs the path.
    if not any(
        name.startswith("fastsched_")
        for item in session.items
        for name in getattr(item, "fixturenames", ())
    ):
        return
    settings = session.config.stash[SETTINGS_KEY]
    for option, path in (
        ("fastsched_scheduler", settings.scheduler),
        ("fastsched_sessionmaker", settings.sessionmaker),
        ("fastsched_metadata", settings.metadata),
        ("fastsched_app", settings.app),
    ):
        if path is not None:
            with contextlib.suppress(pytest.UsageError):
                _options.resolve(path, option)


def settings_of(request: pytest.FixtureRequest) -> _options.Settings:
    """The validated settings of this run."""
    return request.config.stash[SETTINGS_KEY]


@pytest.fixture
def fastsched_clock_backend(request: pytest.FixtureRequest) -> str:
    """The wall-clock backend of ``fastsched_clock``: ``freezegun`` or ``time-machine``.

    Defaults to the ``fastsched_clock_backend`` setting. Override it to run tests on both,
    as anyio's ``anyio_backend`` works::

        @pytest.fixture(params=["freezegun", "time-machine"])
        def fastsched_clock_backend(request):
            return request.param
    """
    return settings_of(request).clock_backend


@pytest.fixture
def fastsched_clock(
    request: pytest.FixtureRequest, fastsched_clock_backend: str
) -> Iterator[VirtualClock]:
    """The virtual clock of this test.

    The wall clock (``datetime.now()``, ``time.time()``, in every thread) reads the virtual
    instant from the start of the test; the event loop's clock joins it when the test's
    coroutine starts. Time moves only inside ``advance()``, ``advance_to()``, ``jump()`` and
    ``run_until_idle()``.
    """
    from pytest_fastsched._clock import VirtualClock

    settings = settings_of(request)
    marker = _options.marker_options(request.node)
    clock = VirtualClock(
        start=marker.start or settings.start,
        backend=_options.clock_backend(fastsched_clock_backend),
        watchdog=settings.watchdog,
    )
    clock.start()
    restore = clock.attach_on_test_start(request.node)
    try:
        yield clock
    finally:
        restore()
        clock.close()


@pytest.fixture
def fastsched_scheduler(
    request: pytest.FixtureRequest, fastsched_clock: VirtualClock
) -> Iterator[SchedulerHarness]:
    """The app's own APScheduler instance, driven by ``fastsched_clock``.

    The scheduler comes from the ini option ``fastsched_scheduler`` (``module:attr``); a test
    or fixture may instead call ``fastsched_scheduler.attach(scheduler)`` before the first
    ``advance()``. It is started on the test's loop when the test starts, paused until the
    first clock call (a job due at the start instant fires inside that call), and shut down
    after the test, with its jobs cancelled and its job stores restored.
    """
    from pytest_fastsched._scheduler import SchedulerHarness

    settings = settings_of(request)
    marker = _options.marker_options(request.node)
    harness = SchedulerHarness(fastsched_clock, job_errors=marker.job_errors)
    if settings.scheduler is not None:
        harness.attach(_options.resolve(settings.scheduler, "fastsched_scheduler"))
    try:
        yield harness
    finally:
        harness.close()


# --- databases ------------------------------------------------------------------------------
# The fastsched_db fixture, the hand-over of the PostgreSQL server to xdist workers, and the
# reports of database guard errors and MissingGreenlet. The logic lives in _db.py, which
# imports SQLAlchemy: it is imported only where a database is really in use.

import pytest_asyncio  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Generator

    from pytest_fastsched._db import Controller, Database, Databases

DATABASES_KEY: pytest.StashKey[Databases] = pytest.StashKey()
CONTROLLER_KEY: pytest.StashKey[Controller] = pytest.StashKey()
DATABASE_OF_TEST_KEY: pytest.StashKey[Database] = pytest.StashKey()


@pytest.hookimpl(specname="pytest_configure", trylast=True)
def pytest_configure_databases(config: pytest.Config) -> None:
    database = config.stash[SETTINGS_KEY].database
    if "://" in database:
        scheme = database.partition("://")[0].partition("+")[0]
        if scheme not in ("postgresql", "postgres"):
            raise pytest.UsageError(
                f"fastsched_database = {_redact(database)!r} is not a PostgreSQL URL: use "
                "'sqlite', 'postgresql' (a local server the plugin starts) or the URL of an "
                "existing PostgreSQL server, such as "
                "'postgresql+asyncpg://user:password@localhost:5432/postgres' (the plugin works "
                f"in a scratch database it creates and drops there). See {_options.DOCS}"
            )


@pytest.hookimpl(specname="pytest_collection_finish")
def pytest_collection_finish_databases(session: pytest.Session) -> None:
    # Import the database stack before a test starts the virtual clock: a C extension first
    # imported while freezegun has replaced datetime.date fails its size check (asyncpg).
    if any("fastsched_db" in getattr(item, "fixturenames", ()) for item in session.items):
        from pytest_fastsched import _db

        _db.import_driver(session.config.stash[SETTINGS_KEY].database)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: start the run's PostgreSQL server once and tell each worker of it."""
    config = node.config
    if config.stash[SETTINGS_KEY].database == "sqlite":
        return
    from pytest_fastsched._db import Controller

    if CONTROLLER_KEY not in config.stash:
        config.stash[CONTROLLER_KEY] = Controller(config.stash[SETTINGS_KEY].database)
    node.workerinput.update(config.stash[CONTROLLER_KEY].workerinput())


@pytest.hookimpl(specname="pytest_unconfigure")
def pytest_unconfigure_databases(config: pytest.Config) -> None:
    if DATABASES_KEY in config.stash:
        config.stash[DATABASES_KEY].close()
        del config.stash[DATABASES_KEY]
    if CONTROLLER_KEY in config.stash:
        config.stash[CONTROLLER_KEY].close()
        del config.stash[CONTROLLER_KEY]


@pytest_asyncio.fixture
async def fastsched_db(request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    """The test database, with the app's sessionmaker bound to it for this test.

    ``@pytest.mark.fastsched(isolation="rollback")`` (the default): one connection in an outer
    transaction; each commit of the app's sessions releases a savepoint, visible to the test,
    and everything is rolled back after it. ``isolation="commit"``: real commits on separate
    connections, for work across connections; the tables are emptied after the test.

    On PostgreSQL, ``fastsched_prepared_statements = check`` (or
    ``@pytest.mark.fastsched(prepared_statements="check")``) fails the test, after it ran, when
    the app's named prepared statements would break behind a transaction-mode pooler;
    ``"record"`` only records them for ``fastsched_db.prepared_statement_leaks()``. The test
    engine is built with ``fastsched_engine_options`` (the app's engine options), if set.

    An async fixture: it runs on the loop of ``asyncio_default_fixture_loop_scope``, which
    must be the loop of the test (the same loop scope), as the test connection cannot move
    between loops.
    """
    from pytest_fastsched import _db

    config = request.config
    if DATABASES_KEY not in config.stash:
        config.stash[DATABASES_KEY] = _db.for_config(config, settings_of(request))
    marker = _options.marker_options(request.node)
    isolation = marker.isolation or "rollback"
    prepared = marker.prepared_statements or settings_of(request).prepared_statements
    async with config.stash[DATABASES_KEY].open_test(isolation, prepared) as database:
        request.node.stash[DATABASE_OF_TEST_KEY] = database
        try:
            yield database
        finally:
            del request.node.stash[DATABASE_OF_TEST_KEY]
    database.check_prepared_statements()


@pytest.hookimpl(specname="pytest_runtest_call", wrapper=True)
def pytest_runtest_call_databases(item: pytest.Item) -> Generator[None, object, object]:
    # A job that swallows every exception hides a guard error: fail the test that passed.
    result = yield
    database = item.stash.get(DATABASE_OF_TEST_KEY, None)
    if database is not None:
        database.raise_guard_errors()
    return result


@pytest.hookimpl(specname="pytest_runtest_makereport", wrapper=True)
def pytest_runtest_makereport_databases(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    import sys

    report = yield
    addsection = getattr(report.longrepr, "addsection", None)
    if call.excinfo is None or addsection is None:
        return report
    if "sqlalchemy" not in sys.modules:  # then neither the database nor MissingGreenlet
        return report
    from pytest_fastsched import _db

    failure = call.excinfo.value
    database = item.stash.get(DATABASE_OF_TEST_KEY, None)
    for error in database.unreported_guard_errors(failure) if database is not None else []:
        addsection("fastsched_db guard", str(error))
    hint = _db.missing_greenlet_hint(failure)
    if hint is not None:
        addsection("pytest-fastsched hint", hint)
    return report


# --- the app client -------------------------------------------------------------------------
# fastsched_client: the app's lifespan and requests on the test's loop, in virtual time. The
# logic lives in _client.py, which imports httpx: it is imported only where the client is used.

if TYPE_CHECKING:
    import httpx


@pytest.fixture
def fastsched_app(request: pytest.FixtureRequest) -> Any:
    """The ASGI app that ``fastsched_client`` serves: the ``fastsched_app`` setting.

    Override it when the app is built by a factory::

        @pytest.fixture
        def fastsched_app():
            return create_app()
    """
    from pytest_fastsched import _client

    return _client.resolve_app(settings_of(request).app)


@pytest.fixture
def _fastsched_client_after_db(request: pytest.FixtureRequest) -> None:
    """Set ``fastsched_db`` up before the app starts, when the test uses both."""
    if "fastsched_db" in request.fixturenames:
        request.getfixturevalue("fastsched_db")


@pytest_asyncio.fixture
async def fastsched_client(
    request: pytest.FixtureRequest,
    fastsched_clock: VirtualClock,
    fastsched_scheduler: SchedulerHarness,
    fastsched_app: Any,
    _fastsched_client_after_db: None,
) -> AsyncIterator[httpx.AsyncClient]:
    """An ``httpx.AsyncClient`` on the app of ``fastsched_app``, with its lifespan running.

    Requests and the app's jobs run on the test's loop, on the test database when the test
    also uses ``fastsched_db`` (set up before the app starts). While the test awaits a
    response, virtual time moves as far as the request needs and the jobs that fall due
    meanwhile fire, as on a real server. The app's lifespan starts and shuts down its own
    scheduler (the harness starts it only if the startup does not); closing the client, or
    the end of the test, is the app's shutdown, after which no job runs.

    An async fixture: it runs on the loop of ``asyncio_default_fixture_loop_scope``, which
    must be the loop of the test (the same loop scope).
    """
    from pytest_fastsched import _client

    path = settings_of(request).app
    name = repr(path) if path else repr(fastsched_app)
    async with _client.open_client(
        fastsched_app, fastsched_clock, fastsched_scheduler, name=name
    ) as client:
        yield client


# --- schema ---
# The hook that builds what fastsched_metadata and fastsched_alembic cannot, and the report
# line of the schema settings. The logic lives in _schema.py, which imports SQLAlchemy.

import os  # noqa: E402

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection


class _SchemaHookspecs:
    """The hooks pytest-fastsched calls: implement them in a ``conftest.py`` or a plugin."""

    @pytest.hookspec
    def pytest_fastsched_create_schema(self, connection: Connection, dialect: str) -> None:
        """Finish the schema of a new test database: run any DDL, insert seed rows.

        Called once per test database (once per test session; per xdist worker on SQLite,
        once for the template the workers' PostgreSQL databases are copied from), after
        ``fastsched_alembic`` or ``fastsched_metadata`` built their schema, in a transaction
        that commits when every implementation has returned. ``connection`` is a synchronous
        ``sqlalchemy.engine.Connection`` (``connection.execute(text(...))``, no await);
        ``dialect`` is ``"sqlite"`` or ``"postgresql"``. Rows of tables listed in
        ``fastsched_seed_tables`` stay in place across tests under both isolation modes.
        """


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(_SchemaHookspecs)


@pytest.hookimpl(specname="pytest_report_header")
def pytest_report_header_schema(config: pytest.Config) -> list[str]:
    settings = config.stash[SETTINGS_KEY]
    shown = {
        "alembic": settings.alembic and os.path.relpath(settings.alembic, config.rootpath),
        "tables": " ".join(settings.tables),
        "extensions": " ".join(settings.extensions),
        "seed_tables": " ".join(settings.seed_tables),
    }
    if not any(shown.values()):
        return []
    values = ", ".join(f"{key}={value or '-'}" for key, value in shown.items())
    return [f"fastsched schema: {values}"]


# --- history ---
# fastsched_history (status transitions of the tracked tables, with the job run of each write)
# and the --fastsched-timeline report. The logic lives in _history.py, which imports
# SQLAlchemy, and _asserts.py (the failure messages and the report).

if TYPE_CHECKING:
    from pytest_fastsched._history import History

TIMELINE_SECTION = "fastsched timeline"


@pytest.hookimpl(specname="pytest_report_header")
def pytest_report_header_history(config: pytest.Config) -> list[str]:
    settings = config.stash[SETTINGS_KEY]
    if not settings.track and not settings.timeline:
        return []
    tracked = " ".join(
        ":".join([spec.table, spec.status, spec.error or "", *spec.others]).rstrip(":")
        for spec in settings.track
    )
    timeline = "on" if settings.timeline else "off"
    return [f"fastsched history: track={tracked or '-'}, timeline={timeline}"]


@pytest.fixture
def _fastsched_history_clock(request: pytest.FixtureRequest) -> VirtualClock | None:
    """The test's ``fastsched_clock`` when it uses one: the history then reads virtual time."""
    if "fastsched_clock" in request.fixturenames:
        clock: VirtualClock = request.getfixturevalue("fastsched_clock")
        return clock
    return None


@pytest_asyncio.fixture
async def fastsched_history(
    request: pytest.FixtureRequest,
    fastsched_db: Database,
    _fastsched_history_clock: VirtualClock | None,
) -> AsyncIterator[History]:
    """Every write to the status column of the tracked tables' rows during the test.

    Tracked: each table with a ``status`` column (with ``last_error`` when it has one), and
    the tables named by ``fastsched_track`` or ``@pytest.mark.fastsched(track=...)``. Each
    record holds the row's status before and after the write, the error column and the other
    named columns, the virtual time, and the job run that wrote it (or ``test``); writes
    rolled back to a savepoint stay, marked ``rolled_back``. Assert with
    ``assert_transitions``, ``assert_status``, ``assert_all`` and ``assert_processed_once``;
    ``timeline(table, key)`` returns a row's records.

    An async fixture on the loop of ``fastsched_db``.
    """
    from pytest_fastsched import _history

    settings = settings_of(request)
    marker = _options.marker_options(request.node)
    configured = [(spec, "fastsched_track") for spec in settings.track]
    configured += [(spec, "@pytest.mark.fastsched(track=...)") for spec in marker.track or ()]
    async with _history.record(fastsched_db, configured, _fastsched_history_clock) as history:
        yield history


@pytest.hookimpl(specname="pytest_runtest_makereport", wrapper=True)
def pytest_runtest_makereport_history(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when != "call" or not item.config.stash[SETTINGS_KEY].timeline:
        return report
    if not report.failed and item.config.get_verbosity() <= 0:
        return report
    values: dict[str, Any] = getattr(item, "funcargs", {})
    history = values.get("fastsched_history")
    harness = values.get("fastsched_scheduler")
    if history is None and harness is None:
        return report
    from pytest_fastsched import _asserts

    text = _asserts.timeline_report(history, harness.runs if harness is not None else [])
    if text is not None:
        report.sections.append((TIMELINE_SECTION, text))
    return report


@pytest.hookimpl(specname="pytest_terminal_summary")
def pytest_terminal_summary_history(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    # The timelines of failing tests are shown with their failure; with -v, the others here.
    if not config.stash[SETTINGS_KEY].timeline or config.get_verbosity() <= 0:
        return
    shown = [
        (report.nodeid, content)
        for report in terminalreporter.stats.get("passed", [])
        for name, content in getattr(report, "sections", [])
        if name == TIMELINE_SECTION
    ]
    if not shown:
        return
    terminalreporter.write_sep("=", TIMELINE_SECTION)
    for nodeid, content in shown:
        terminalreporter.write_sep("-", nodeid)
        terminalreporter.write_line(content)


# --- replicas and faults ---
# @pytest.mark.fastsched(replicas=N): N copies of the app's scheduler on the test's clock. The
# logic lives in _replicas.py (imported by the scheduler harness when replicas are asked for).


@pytest.fixture(autouse=True)
def _fastsched_replicas(request: pytest.FixtureRequest) -> None:
    """Run the replicas the ``fastsched`` marker asks for (``replicas=N``)."""
    if request.node.get_closest_marker("fastsched") is None:
        return
    replicas = _options.marker_options(request.node).replicas
    if replicas > 1:
        harness: SchedulerHarness = request.getfixturevalue("fastsched_scheduler")
        node = request.node

        def engine() -> Any:
            database = node.stash.get(DATABASE_OF_TEST_KEY, None)
            return None if database is None else database.engine

        harness.use_replicas(replicas, engine=engine)


REPLICAS_SECTION = "fastsched replicas"


@pytest.hookimpl(specname="pytest_runtest_makereport", wrapper=True)
def pytest_runtest_makereport_replicas(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # A failing test with replicas shows which replica ran which job run.
    report = yield
    if report.when != "call" or not report.failed:
        return report
    harness = getattr(item, "funcargs", {}).get("fastsched_scheduler")
    if harness is None or harness.replica_count < 2:
        return report
    from pytest_fastsched import _replicas

    report.sections.append((REPLICAS_SECTION, _replicas.report(harness.runs)))
    return report


if TYPE_CHECKING:
    from pytest_fastsched._faults import Faults


@pytest.fixture
def fastsched_faults(request: pytest.FixtureRequest, fastsched_db: Database) -> Iterator[Faults]:
    """Database faults: ``fail(pattern, nth=1, times=1, error="operational")``.

    The ``nth`` statement whose SQL matches ``pattern`` (and ``times - 1`` after it) fails
    with the driver's own error: ``"operational"``, ``"serialization"`` (PostgreSQL) or
    ``"disconnect"`` (commit isolation). Faults end with the test; one that never fired fails
    it.
    """
    from pytest_fastsched import _faults

    clock = (
        request.getfixturevalue("fastsched_clock")
        if "fastsched_clock" in (request.fixturenames)
        else None
    )
    now = clock.now if clock is not None else _faults.real_now
    faults = _faults.Faults(fastsched_db.engine, fastsched_db.dialect, fastsched_db.isolation, now)
    try:
        yield faults
    finally:
        never_fired = faults.close()
    _faults.fail_never_fired(never_fired)

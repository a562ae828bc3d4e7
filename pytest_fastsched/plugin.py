"""The pytest plugin: options, the ``fastsched`` marker, the fixtures, and one of each hook.

Each hook hands its phase to the room that owns it (ARCHITECTURE.md). Nothing heavy is
imported here: APScheduler, SQLAlchemy and FastAPI only inside the fixtures that need them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from pytest_fastsched import _options, _reports

if TYPE_CHECKING:
    import httpx

    from pytest_fastsched._clock import VirtualClock
    from pytest_fastsched._db import Database, Databases
    from pytest_fastsched._faults import Faults
    from pytest_fastsched._history import History
    from pytest_fastsched._scheduler import SchedulerHarness
    from pytest_fastsched._testdb import Controller

SETTINGS_KEY: pytest.StashKey[_options.Settings] = pytest.StashKey()
DATABASES_KEY: pytest.StashKey[Databases] = pytest.StashKey()
CONTROLLER_KEY: pytest.StashKey[Controller] = pytest.StashKey()
DATABASE_OF_TEST_KEY: pytest.StashKey[Database] = pytest.StashKey()


# -- hooks -------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    _options.add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_fastsched import _hookspecs

    pluginmanager.add_hookspecs(_hookspecs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _options.MARKER_HELP)
    config.stash[SETTINGS_KEY] = _options.load_settings(config)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return _options.report_header(config.stash[SETTINGS_KEY], config.rootpath)


def pytest_collection_finish(session: pytest.Session) -> None:
    fixtures = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    _options.import_before_clock(session.config.stash[SETTINGS_KEY], fixtures)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: start the run's PostgreSQL server once and tell each worker of it."""
    stash = node.config.stash
    if stash[SETTINGS_KEY].database == "sqlite":
        return
    from pytest_fastsched._testdb import Controller

    if CONTROLLER_KEY not in stash:
        stash[CONTROLLER_KEY] = Controller(stash[SETTINGS_KEY].database)
    node.workerinput.update(stash[CONTROLLER_KEY].workerinput())


def pytest_unconfigure(config: pytest.Config) -> None:
    keys: tuple[pytest.StashKey[Any], ...] = (DATABASES_KEY, CONTROLLER_KEY)
    for key in keys:
        if key in config.stash:
            config.stash[key].close()
            del config.stash[key]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    # A job that swallows every exception hides a guard error: fail the test that passed.
    result = yield
    database = item.stash.get(DATABASE_OF_TEST_KEY, None)
    if database is not None:
        database.raise_guard_errors()
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    settings = item.config.stash[SETTINGS_KEY]
    database = item.stash.get(DATABASE_OF_TEST_KEY, None)
    _reports.add_sections(report, item, call, settings, database)
    return report


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    _reports.terminal_summary(terminalreporter, config, config.stash[SETTINGS_KEY])


# -- fixtures ----------------------------------------------------------------------------------


def settings_of(request: pytest.FixtureRequest) -> _options.Settings:
    """The validated settings of this run."""
    return request.config.stash[SETTINGS_KEY]


def _if_used(request: pytest.FixtureRequest, name: str) -> Any:
    """The fixture ``name`` when the test uses it (set up now), else ``None``."""
    return request.getfixturevalue(name) if name in request.fixturenames else None


@pytest.fixture
def fastsched_clock_backend(request: pytest.FixtureRequest) -> str:
    """``freezegun`` or ``time-machine``: the setting; override it (with ``params=[...]``)."""
    return settings_of(request).clock_backend


@pytest.fixture
def fastsched_clock(
    request: pytest.FixtureRequest, fastsched_clock_backend: str
) -> Iterator[VirtualClock]:
    """The virtual clock of this test: the wall clock (every thread) and the test's loop.

    Time moves only inside ``advance()``, ``advance_to()``, ``jump()`` and
    ``run_until_idle()``, which fire everything that falls due on the way.
    """
    from pytest_fastsched._clock import VirtualClock

    settings = settings_of(request)
    clock = VirtualClock(
        start=_options.marker_options(request.node).start or settings.start,
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

    From the ``fastsched_scheduler`` setting, or ``fastsched_scheduler.attach(scheduler)``
    before the first ``advance()``. Started on the test's loop, paused until the first clock
    call, shut down after the test with its jobs cancelled and its job stores restored.
    """
    from pytest_fastsched._replicas import ReplicaSet
    from pytest_fastsched._scheduler import SchedulerHarness

    settings = settings_of(request)
    job_errors = _options.marker_options(request.node).job_errors
    harness = SchedulerHarness(fastsched_clock, job_errors=job_errors, replicas=ReplicaSet)
    if settings.scheduler is not None:
        harness.attach(_options.resolve(settings.scheduler, "fastsched_scheduler"))
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture(autouse=True)
def _fastsched_replicas(request: pytest.FixtureRequest) -> None:
    """Run the replicas the ``fastsched`` marker asks for (``replicas=N``)."""
    if request.node.get_closest_marker("fastsched") is None:
        return
    replicas = _options.marker_options(request.node).replicas
    if replicas > 1:
        harness: SchedulerHarness = request.getfixturevalue("fastsched_scheduler")
        stash = request.node.stash
        engine = lambda: getattr(stash.get(DATABASE_OF_TEST_KEY, None), "engine", None)  # noqa: E731
        harness.use_replicas(replicas, engine=engine)


@pytest_asyncio.fixture
async def fastsched_db(request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    """The test database, with the app's sessionmaker bound to it for this test.

    ``isolation="rollback"`` (default): one connection in an outer transaction, each app
    commit a savepoint release, all rolled back after the test. ``"commit"``: real commits,
    the tables emptied after the test. An async fixture: give it the test's loop scope.
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


@pytest.fixture
def fastsched_app(request: pytest.FixtureRequest) -> Any:
    """The ASGI app that ``fastsched_client`` serves: the ``fastsched_app`` setting.

    Override it when the app is built by a factory (``return create_app()``).
    """
    from pytest_fastsched import _client

    return _client.resolve_app(settings_of(request).app)


@pytest.fixture
def _fastsched_client_after_db(request: pytest.FixtureRequest) -> None:
    """Set ``fastsched_db`` up before the app starts, when the test uses both."""
    _if_used(request, "fastsched_db")


@pytest_asyncio.fixture
async def fastsched_client(
    request: pytest.FixtureRequest,
    fastsched_clock: VirtualClock,
    fastsched_scheduler: SchedulerHarness,
    fastsched_app: Any,
    _fastsched_client_after_db: None,
) -> AsyncIterator[httpx.AsyncClient]:
    """An ``httpx.AsyncClient`` on the app of ``fastsched_app``, with its lifespan running.

    While a response is awaited, virtual time moves as far as the request needs, firing the
    jobs that fall due. Closing the client is the app's shutdown. Give it the test's loop.
    """
    from pytest_fastsched import _client

    path = settings_of(request).app
    name = repr(path) if path else repr(fastsched_app)
    async with _client.open_client(
        fastsched_app, fastsched_clock, fastsched_scheduler, name=name
    ) as client:
        yield client


@pytest.fixture
def _fastsched_history_clock(request: pytest.FixtureRequest) -> VirtualClock | None:
    """The test's ``fastsched_clock`` when it uses one: the history then reads virtual time."""
    clock: VirtualClock | None = _if_used(request, "fastsched_clock")
    return clock


@pytest_asyncio.fixture
async def fastsched_history(
    request: pytest.FixtureRequest,
    fastsched_db: Database,
    _fastsched_history_clock: VirtualClock | None,
) -> AsyncIterator[History]:
    """Every write to the status column of the tracked tables' rows during the test.

    Tracked: tables with a ``status`` column, and those ``fastsched_track`` or the marker's
    ``track=`` name. Each record holds the row's values, the virtual time and the job run.
    """
    from pytest_fastsched import _history

    configured = [(spec, "fastsched_track") for spec in settings_of(request).track]
    marker = _options.marker_options(request.node)
    configured += [(spec, "@pytest.mark.fastsched(track=...)") for spec in marker.track or ()]
    async with _history.record(fastsched_db, configured, _fastsched_history_clock) as history:
        yield history


@pytest.fixture
def fastsched_faults(request: pytest.FixtureRequest, fastsched_db: Database) -> Iterator[Faults]:
    """Database faults: ``fail(pattern, nth=1, times=1, error="operational")``.

    The ``nth`` statement matching ``pattern`` (and ``times - 1`` after it) fails with the
    driver's own error; a fault that never fired fails the test.
    """
    from pytest_fastsched import _faults

    clock = _if_used(request, "fastsched_clock")
    now = _faults.real_now if clock is None else clock.now
    faults = _faults.Faults(fastsched_db.engine, fastsched_db.dialect, fastsched_db.isolation, now)
    try:
        yield faults
    finally:
        never_fired = faults.close()
    _faults.fail_never_fired(never_fired)

"""The pytest plugin: options, the ``fastsched`` marker, the fixtures, and one of each hook.

Each hook hands its phase to the room that owns it (ARCHITECTURE.md). Nothing heavy is
imported here: APScheduler, SQLAlchemy and FastAPI only inside the fixtures that need them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from typing import TYPE_CHECKING, Any, cast

import pytest
import pytest_asyncio

from pytest_fastsched import _hookspecs, _options, _reports, _worlds

if TYPE_CHECKING:
    import httpx

    from pytest_fastsched._clock import VirtualClock
    from pytest_fastsched._db import Database, Databases
    from pytest_fastsched._faults import Faults
    from pytest_fastsched._history import History
    from pytest_fastsched._scheduler import SchedulerHarness
    from pytest_fastsched._seal import Seal
    from pytest_fastsched._testdb import Controller

SETTINGS_KEY: pytest.StashKey[_options.Settings] = pytest.StashKey()
DATABASES_KEY: pytest.StashKey[Databases] = pytest.StashKey()
CONTROLLER_KEY: pytest.StashKey[Controller] = pytest.StashKey()
DATABASE_OF_TEST_KEY: pytest.StashKey[Database] = pytest.StashKey()
SEAL_KEY: pytest.StashKey[Seal] = pytest.StashKey()


# -- hooks -------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    _options.add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
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
    """xdist controller: check the scheduler, start the PostgreSQL server once, tell workers."""
    stash = node.config.stash
    _options.check_scheduler_setting(stash[SETTINGS_KEY])  # a worker could not report it
    if stash[SETTINGS_KEY].database == "sqlite":
        return
    from pytest_fastsched._testdb import Controller

    if CONTROLLER_KEY not in stash:
        stash[CONTROLLER_KEY] = Controller(stash[SETTINGS_KEY].database)
    node.workerinput.update(stash[CONTROLLER_KEY].workerinput())


def pytest_unconfigure(config: pytest.Config) -> None:
    for owned in (config.stash.get(DATABASES_KEY, None), config.stash.get(CONTROLLER_KEY, None)):
        if owned is not None:
            owned.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    __tracebackhide__ = True
    clock: VirtualClock | None = getattr(item, "funcargs", {}).get("fastsched_clock")
    try:
        result = yield
    finally:  # before teardown, which may close the test's loop
        if clock is not None:
            clock.end_of_test()  # end the work the jobs left running
    errors = _errors_beside_the_test(item)  # a job may have swallowed a guard error
    if errors:
        raise errors[0]
    _options.check_marker_unchanged(item)  # a marker applied after the fixtures read it
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    seal = item.stash.get(SEAL_KEY, None)
    errors = seal.first_seen(_errors_beside_the_test(item)) if seal is not None else []
    _reports.add_sections(report, item, call, item.config.stash[SETTINGS_KEY], errors)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: Any, request: pytest.FixtureRequest) -> Generator[None]:
    try:
        return (yield)
    except Exception as error:  # e.g. the app imported under freezegun, a start with no loop
        _reports.explain_fixture_error(fixturedef.argname, error)
        raise


def _errors_beside_the_test(item: pytest.Item) -> list[BaseException]:
    seal, database = item.stash.get(SEAL_KEY, None), item.stash.get(DATABASE_OF_TEST_KEY, None)
    clock = (getattr(item, "funcargs", None) or {}).get("fastsched_clock")
    errors = [*(seal.errors if seal else ()), *(database.guard_errors if database else ())]
    return errors + (clock.leftovers if clock else []) + _worlds.never_awaited(item)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    _reports.terminal_summary(terminalreporter, config, config.stash[SETTINGS_KEY])


# -- fixtures ----------------------------------------------------------------------------------


def settings_of(request: pytest.FixtureRequest) -> _options.Settings:
    return request.config.stash[SETTINGS_KEY]


def _if_used(request: pytest.FixtureRequest, name: str) -> Any:
    """The fixture ``name`` when the test uses it (set up now), else ``None``."""
    return request.getfixturevalue(name) if name in request.fixturenames else None


@pytest.fixture(autouse=True)
def _fastsched_seal(request: pytest.FixtureRequest) -> Iterator[None]:
    """Seal a test that uses the plugin: it reaches no database but its own (see _seal.py)."""
    if not any(name.startswith("fastsched_") for name in request.fixturenames):
        yield
        return
    from pytest_fastsched import _seal

    stash = request.config.stash
    owned = lambda: stash[DATABASES_KEY].owned() if DATABASES_KEY in stash else (None, [])  # noqa: E731
    with _seal.sealed_test(request.node, settings_of(request), owned) as seal:
        request.node.stash[SEAL_KEY] = seal
        yield


@pytest.fixture
def fastsched_clock_backend(request: pytest.FixtureRequest) -> str:
    """``freezegun`` or ``time-machine``: the setting; override it (with ``params=[...]``)."""
    return settings_of(request).clock_backend


@pytest.fixture
def fastsched_clock(
    request: pytest.FixtureRequest, fastsched_clock_backend: str, _fastsched_seal: None
) -> Iterator[VirtualClock]:
    """The virtual clock of this test: the wall clock (every thread) and the test's loop.

    Time moves only inside ``advance()``, ``advance_to()``, ``jump()``, ``run_until_idle()``
    and the test's own ``await asyncio.sleep()``, firing everything that falls due.
    """
    from pytest_fastsched import _clock

    with _clock.for_test(request.node, settings_of(request), fastsched_clock_backend) as clock:
        yield clock


@pytest.fixture
def fastsched_scheduler(
    request: pytest.FixtureRequest, fastsched_clock: VirtualClock
) -> Iterator[SchedulerHarness]:
    """The app's own APScheduler instance, driven by ``fastsched_clock``.

    From the ``fastsched_scheduler`` setting, or ``fastsched_scheduler.attach(scheduler)``
    before the first ``advance()``. Its jobs run on the test database when the settings name
    the app's sessionmakers or engines, whether the test asks for ``fastsched_db`` or not.
    """
    from pytest_fastsched import _scheduler
    from pytest_fastsched._replicas import ReplicaSet

    if settings_of(request).sessionmaker or settings_of(request).engine:
        request.getfixturevalue("fastsched_db")  # the app's jobs run on the test database
    engine = lambda: getattr(request.node.stash.get(DATABASE_OF_TEST_KEY, None), "engine", None)  # noqa: E731
    with _scheduler.for_test(
        request.node, settings_of(request), fastsched_clock, ReplicaSet, engine
    ) as harness:
        yield harness


@pytest.fixture(autouse=True)
def _fastsched_implied(request: pytest.FixtureRequest) -> None:
    """Set up the fixtures the test needs without naming them (``_options.implied``)."""
    for name in _options.implied(request.node, settings_of(request)):
        request.getfixturevalue(name)


@pytest_asyncio.fixture
async def fastsched_db(
    request: pytest.FixtureRequest,
    _fastsched_seal: None,
    _fastsched_test_clock: VirtualClock | None,
) -> AsyncIterator[Database]:
    """The test database, with the app's sessionmaker bound to it for this test.

    ``isolation="rollback"`` (default): one connection in an outer transaction, each app
    commit a savepoint release, all rolled back after the test. ``"commit"``: real commits,
    the tables emptied after the test. SQL's ``now()`` reads ``fastsched_clock``; async.
    """
    from pytest_fastsched import _db

    stash = request.config.stash
    if DATABASES_KEY not in stash:
        stash[DATABASES_KEY] = _db.for_config(request.config, settings_of(request))
    async with stash[DATABASES_KEY].open_for(request.node, _fastsched_test_clock) as database:
        request.node.stash[DATABASE_OF_TEST_KEY] = database
        try:
            yield database
        finally:
            del request.node.stash[DATABASE_OF_TEST_KEY]


@pytest.fixture
def fastsched_app(request: pytest.FixtureRequest) -> Any:
    """The ASGI app of ``fastsched_client``: the setting; override it to call a factory."""
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

    _worlds.refuse_in_def_test(request.node, "fastsched_client", "an httpx.AsyncClient")
    path = settings_of(request).app
    name = repr(path) if path else repr(fastsched_app)
    async with _client.open_client(
        fastsched_app, fastsched_clock, fastsched_scheduler, name=name
    ) as client:
        yield client


@pytest.fixture
def _fastsched_test_clock(request: pytest.FixtureRequest) -> VirtualClock | None:
    """The test's ``fastsched_clock`` when it uses one: the database then reads virtual time."""
    return cast("VirtualClock | None", _if_used(request, "fastsched_clock"))


@pytest_asyncio.fixture
async def fastsched_history(
    request: pytest.FixtureRequest, fastsched_db: Database
) -> AsyncIterator[History]:
    """Every write to the status column of the tracked tables' rows during the test.

    Tracked: tables with a ``status`` column, and those ``fastsched_track`` or the marker's
    ``track=`` name. Each record holds the row's values, the virtual time and the job run.
    """
    from pytest_fastsched import _history

    configured = _history.configured(request.node, settings_of(request))
    async with _history.record(fastsched_db, configured, fastsched_db.clock) as history:
        yield history


@pytest.fixture
def fastsched_faults(request: pytest.FixtureRequest, fastsched_db: Database) -> Iterator[Faults]:
    """Database faults: ``fail(pattern, nth=1, times=1, error="operational")`` makes
    statements fail with the driver's own error; a fault that never fired fails the test."""
    from pytest_fastsched import _faults

    with _faults.for_test(fastsched_db, _if_used(request, "fastsched_clock")) as faults:
        yield faults

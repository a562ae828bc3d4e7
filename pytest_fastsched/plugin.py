"""The pytest plugin: options, the ``fastsched`` marker, the report header and the fixtures.

This module stays thin and imports no heavy library at import time: APScheduler, SQLAlchemy
and FastAPI are imported inside the fixtures that need them, so a suite that never uses the
plugin starts as fast as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from pytest_fastsched import _options

if TYPE_CHECKING:
    from pytest_fastsched._clock import VirtualClock
    from pytest_fastsched._scheduler import SchedulerHarness

SETTINGS_KEY = pytest.StashKey["_options.Settings"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastsched", "pytest-fastsched: virtual time for APScheduler jobs")
    for option in _options.OPTIONS:
        group.addoption(
            option.cli_name, dest=option.ini_name, default=None, metavar="VALUE", help=option.help
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


def _redact(database: str) -> str:
    scheme, sep, rest = database.partition("://")
    if not sep or "@" not in rest:
        return database
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def settings_of(request: pytest.FixtureRequest) -> _options.Settings:
    """The validated settings of this run."""
    return request.config.stash[SETTINGS_KEY]


@pytest.fixture
def fastsched_clock(request: pytest.FixtureRequest) -> Iterator[VirtualClock]:
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
        backend=settings.clock_backend,
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
    ``advance()``. It is started on virtual time at the first clock call and shut down after
    the test, with its jobs cancelled.
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

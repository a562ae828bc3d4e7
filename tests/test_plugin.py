"""The plugin as users run it: settings, the marker, loop scopes and failure output."""

from __future__ import annotations

import pytest

SCHEDULER_MODULE = """
from apscheduler.schedulers.asyncio import AsyncIOScheduler

scheduler = AsyncIOScheduler(timezone="UTC")
ran = []


async def tick():
    ran.append(1)


def boom():
    raise ValueError("boom at the third step")


scheduler.add_job(tick, "interval", minutes=5, id="tick")
"""

FIRES = """
import datetime as dt

import app_scheduler


async def test_fires(fastsched_clock, fastsched_scheduler):
    await fastsched_clock.advance(minutes=15)
    fastsched_scheduler.assert_ran("tick", times=3)
    assert dt.datetime.now(dt.timezone.utc) == fastsched_clock.now()
"""


def _ini(pytester: pytest.Pytester, *lines: str, mode: str = "auto") -> None:
    scheduler = (
        []
        if any("fastsched_scheduler" in line for line in lines)
        else ["fastsched_scheduler = app_scheduler:scheduler"]
    )
    defaults = ["asyncio_default_fixture_loop_scope = function"]
    if any("asyncio_default_fixture_loop_scope" in line for line in lines):
        defaults = []
    pytester.makeini(
        "\n".join(
            [
                "[pytest]",
                f"asyncio_mode = {mode}",
                *defaults,
                *lines,
                *scheduler,
            ]
        )
    )
    pytester.makepyfile(app_scheduler=SCHEDULER_MODULE)


@pytest.mark.parametrize("backend", ["freezegun", "time-machine"])
def test_a_user_suite_fires_the_apps_jobs(pytester: pytest.Pytester, backend: str) -> None:
    _ini(pytester, f"fastsched_clock_backend = {backend}")
    pytester.makepyfile(test_user=FIRES)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "fastsched: database=sqlite, clock_backend="
            + backend
            + ", start=2030-01-01T00:00:00+00:00, scheduler=app_scheduler:scheduler, "
            "sessionmaker=-, app=-"
        ]
    )


def test_time_machine_is_the_default_backend(pytester: pytest.Pytester) -> None:
    _ini(pytester)
    pytester.makepyfile(test_user=FIRES)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["fastsched: database=sqlite, clock_backend=time-machine, *"])


def test_the_freezegun_backend_without_freezegun_names_the_extra(
    pytester: pytest.Pytester,
) -> None:
    _ini(pytester, "fastsched_clock_backend = freezegun")
    # A None entry in sys.modules makes ``import freezegun`` fail as if it were not installed.
    pytester.makeconftest("import sys\nsys.modules['freezegun'] = None\n")
    pytester.makepyfile(test_user=FIRES)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    assert (
        "UsageError: fastsched_clock_backend = 'freezegun' needs the freezegun package: "
        "pip install 'pytest-fastsched[freezegun]'"
    ) in result.stdout.str()


def test_strict_mode_with_the_asyncio_marker(pytester: pytest.Pytester) -> None:
    _ini(pytester, mode="strict")
    pytester.makepyfile(test_user="import pytest\npytestmark = pytest.mark.asyncio\n" + FIRES)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_session_scoped_loop_gets_a_fresh_clock_and_scheduler_per_test(
    pytester: pytest.Pytester,
) -> None:
    _ini(
        pytester,
        "asyncio_default_test_loop_scope = session",
        "asyncio_default_fixture_loop_scope = session",
    )
    pytester.makepyfile(
        test_user="""
        import asyncio
        import datetime as dt

        START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
        loops = []

        async def test_one(fastsched_clock, fastsched_scheduler):
            loops.append(asyncio.get_running_loop())
            await fastsched_clock.advance(minutes=12)
            assert fastsched_scheduler.run_times("tick")[-1] == START + dt.timedelta(minutes=10)

        async def test_two(fastsched_clock, fastsched_scheduler):
            loops.append(asyncio.get_running_loop())
            assert loops[0] is loops[1]
            assert fastsched_clock.now() == START
            await fastsched_clock.advance(minutes=5)
            assert fastsched_scheduler.run_times("tick") == [START + dt.timedelta(minutes=5)]

        def test_three_outside():
            assert dt.datetime.now(dt.timezone.utc).year < 2030
        """
    )
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=3)


def test_wall_clock_and_scheduler_are_restored_after_a_failing_test(
    pytester: pytest.Pytester,
) -> None:
    _ini(pytester)
    pytester.makepyfile(
        test_user="""
        import datetime as dt
        import time

        import app_scheduler

        async def test_fails(fastsched_clock, fastsched_scheduler):
            await fastsched_clock.advance(minutes=7)
            raise RuntimeError("the test failed")

        def test_after():
            assert dt.datetime.now().year < 2030
            assert time.time() < dt.datetime(2030, 1, 1).timestamp()
            assert not app_scheduler.scheduler.running
            assert [job.id for job in app_scheduler.scheduler.get_jobs()] == ["tick"]
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)


def test_job_exception_fails_the_test_with_the_virtual_instant(
    pytester: pytest.Pytester,
) -> None:
    _ini(pytester)
    pytester.makepyfile(
        test_user="""
        import app_scheduler

        async def test_job_fails(fastsched_clock, fastsched_scheduler):
            fastsched_scheduler.scheduler.add_job(app_scheduler.boom, "date",
                run_date="2030-01-01 00:03:00+00:00", id="boom")
            await fastsched_clock.advance(minutes=10)
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E       pytest_fastsched.JobRunError: job 'boom' (scheduled "
            "2030-01-01T00:03:00+00:00) raised ValueError: boom at the third step",
            "E       at virtual 2030-01-01T00:03:00+00:00",
        ],
        consecutive=True,
    )
    result.stdout.no_fnmatch_line("*_clock.py*")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "fastsched_clock_backend = sundial",
            "ERROR: fastsched_clock_backend = 'sundial' is not valid: use one of 'freezegun', "
            "'time-machine' (ini option fastsched_clock_backend or --fastsched-clock-backend)."
            " See https://github.com/pytest-fastsched/pytest-fastsched#configuration",
        ),
        (
            "fastsched_scheduler = app_scheduler.scheduler",
            "ERROR: fastsched_scheduler = 'app_scheduler.scheduler' is not a 'module:attr' "
            "path: write it like 'app.services.scheduler:scheduler'. "
            "See https://github.com/pytest-fastsched/pytest-fastsched#configuration",
        ),
        (
            "fastsched_start = 2030-01-01 00:00",
            "ERROR: fastsched_start = '2030-01-01T00:00:00' is naive: give it a UTC offset, "
            "e.g. '2030-01-01T00:00:00+00:00' or tzinfo=timezone.utc",
        ),
        (
            "fastsched_watchdog = -3",
            "ERROR: fastsched_watchdog = '-3' is not valid: give a positive number of seconds",
        ),
        (
            "fastsched_isolation = nested",
            "ERROR: fastsched_isolation = 'nested' is not valid: use one of 'rollback', "
            "'commit' (ini option fastsched_isolation or --fastsched-isolation). "
            "See https://github.com/pytest-fastsched/pytest-fastsched#configuration",
        ),
        (
            "fastsched_sessionmaker = app.session:factory app.session.other",
            "ERROR: fastsched_sessionmaker = 'app.session.other' is not a 'module:attr' path: "
            "write it like 'app.services.scheduler:scheduler'. "
            "See https://github.com/pytest-fastsched/pytest-fastsched#configuration",
        ),
        (
            "fastsched_database_clock = frozen",
            "ERROR: fastsched_database_clock = 'frozen' is not valid: use one of 'virtual', "
            "'real' (ini option fastsched_database_clock or --fastsched-database-clock). "
            "See https://github.com/pytest-fastsched/pytest-fastsched#configuration",
        ),
        (
            "fastsched_postgres_backends = shared",
            "ERROR: fastsched_postgres_backends = 'shared' is not valid: use one of 'keep', "
            "'new' (ini option fastsched_postgres_backends or --fastsched-postgres-backends). "
            "See https://github.com/pytest-fastsched/pytest-fastsched#configuration",
        ),
        (
            "fastsched_engine = app.session.engine",
            "ERROR: fastsched_engine = 'app.session.engine' is not a 'module:attr' path: "
            "write it like 'app.services.scheduler:scheduler'. "
            "See https://github.com/pytest-fastsched/pytest-fastsched#configuration",
        ),
    ],
    ids=[
        "backend",
        "module-attr",
        "naive-start",
        "watchdog",
        "isolation",
        "sessionmakers",
        "database-clock",
        "postgres-backends",
        "engine",
    ],
)
def test_bad_ini_values_are_usage_errors(
    pytester: pytest.Pytester, line: str, message: str
) -> None:
    _ini(pytester, line)
    pytester.makepyfile(test_user=FIRES)
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_the_header_names_the_isolation_settings(pytester: pytest.Pytester) -> None:
    _ini(
        pytester,
        "fastsched_isolation = commit",
        "fastsched_engine = app_scheduler:engine",
        "fastsched_allow_databases = postgresql://reports:5432/* sqlite:////srv/cache.db",
    )
    pytester.makepyfile(test_user=FIRES)
    result = pytester.runpytest_subprocess()
    result.stdout.fnmatch_lines(
        [
            "fastsched isolation: isolation=commit, engine=app_scheduler:engine, "
            "allow_databases=postgresql://reports:5432/* sqlite:////srv/cache.db"
        ]
    )


def test_command_line_beats_ini(pytester: pytest.Pytester) -> None:
    _ini(pytester, "fastsched_clock_backend = sundial")
    pytester.makepyfile(test_user=FIRES)
    result = pytester.runpytest_subprocess("--fastsched-clock-backend=freezegun")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["fastsched: *clock_backend=freezegun,*"])


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "nowhere.app:scheduler",
            "ERROR: fastsched_scheduler = 'nowhere.app:scheduler': cannot import "
            "module 'nowhere.app' (No module named 'nowhere'). Check the path and that the app "
            "is importable from the test run's rootdir.",
        ),
        (
            "app_scheduler:sched",
            "ERROR: fastsched_scheduler = 'app_scheduler:sched': module "
            "'app_scheduler' has no attribute 'sched'. Check the name after the ':'.",
        ),
        (
            "app_scheduler:blocking",
            "ERROR: fastsched_scheduler = 'app_scheduler:blocking' needs an apscheduler "
            "AsyncIOScheduler or BackgroundScheduler, got "
            "apscheduler.schedulers.blocking.BlockingScheduler: a BlockingScheduler runs in the "
            "thread that starts it and never returns. A FastAPI app runs BackgroundScheduler() "
            "(sync jobs on a thread pool) or AsyncIOScheduler().",
        ),
    ],
    ids=["module", "attribute", "blocking"],
)
@pytest.mark.parametrize("xdist", [(), ("-p", "xdist", "-n", "2")], ids=["one-process", "xdist"])
def test_a_bad_scheduler_is_one_usage_error(
    pytester: pytest.Pytester, path: str, message: str, xdist: tuple[str, ...]
) -> None:
    _ini(pytester, f"fastsched_scheduler = {path}")
    pytester.makepyfile(
        app_scheduler=SCHEDULER_MODULE
        + "\nfrom apscheduler.schedulers.blocking import BlockingScheduler\n"
        "blocking = BlockingScheduler()\n"
    )
    second = FIRES.replace("def test_fires", "def test_fires_again")
    pytester.makepyfile(test_user=FIRES.replace("import app_scheduler", "") + second)
    result = pytester.runpytest_subprocess(*xdist)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert sum(line.startswith("ERROR: fastsched") for line in result.stderr.lines) == 1
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        (
            "@pytest.mark.fastsched(stat='2030-01-01T00:00:00+00:00')",
            "E*UsageError: @pytest.mark.fastsched got an unexpected keyword argument "
            "'stat' (did you mean 'start'?); valid: start, isolation, job_errors, track, "
            "replicas, prepared_statements, allow_databases, scheduler",
        ),
        (
            "@pytest.mark.fastsched(workers=2)",
            "E*UsageError: @pytest.mark.fastsched got an unexpected keyword argument "
            "'workers'; valid: start, isolation, job_errors, track, replicas, "
            "prepared_statements, allow_databases, scheduler",
        ),
        (
            "@pytest.mark.fastsched(scheduler='no')",
            "E*UsageError: @pytest.mark.fastsched(scheduler='no') is not valid: use False (the "
            "clock does not drive the configured scheduler) or True (the default)",
        ),
        (
            "@pytest.mark.fastsched(allow_databases='reports.db')",
            "E*UsageError: @pytest.mark.fastsched(allow_databases='reports.db') is not valid: "
            "give database URLs, e.g. allow_databases=('sqlite:///reports.db', "
            "'postgresql://localhost:5432/analytics') (? matches anything)",
        ),
        (
            "@pytest.mark.fastsched(isolation='nested')",
            "E*UsageError: @pytest.mark.fastsched(isolation='nested') is not valid: use "
            "one of 'rollback', 'commit'",
        ),
        (
            "@pytest.mark.fastsched('2030')",
            "E*UsageError: @pytest.mark.fastsched takes keyword arguments only, got "
            "('2030',) on test_user.py::test_fires",
        ),
    ],
    ids=["typo", "unknown", "bad-scheduler", "allow-databases", "bad-isolation", "positional"],
)
def test_marker_arguments_are_validated(
    pytester: pytest.Pytester, marker: str, message: str
) -> None:
    _ini(pytester)
    pytester.makepyfile(
        test_user="import pytest\n\n"
        + FIRES.replace("async def test_fires", f"{marker}\nasync def test_fires")
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([message])


def test_marker_start_moves_the_start_instant(pytester: pytest.Pytester) -> None:
    _ini(pytester, "fastsched_start = 2031-06-01T12:00:00+02:00")
    pytester.makepyfile(
        test_user="""
        import datetime as dt
        import pytest

        async def test_ini_start(fastsched_clock):
            assert fastsched_clock.now().isoformat() == "2031-06-01T10:00:00+00:00"

        @pytest.mark.fastsched(start="2040-02-29T00:00:00+00:00")
        async def test_marker_start(fastsched_clock):
            assert dt.datetime.now(dt.timezone.utc).isoformat() == "2040-02-29T00:00:00+00:00"
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=2)


def test_a_loop_the_plugin_cannot_drive_is_refused(pytester: pytest.Pytester) -> None:
    pytest.importorskip("uvloop")
    _ini(pytester)
    pytester.makeconftest(
        """
        import pytest
        import uvloop

        @pytest.fixture(scope="session")
        def event_loop_policy():
            return uvloop.EventLoopPolicy()
        """
    )
    pytester.makepyfile(test_user=FIRES)
    result = pytester.runpytest_subprocess("-W", "ignore::DeprecationWarning")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*pytest_fastsched._clock.ClockError: fastsched_clock cannot drive this event "
            "loop (uvloop.Loop): it needs asyncio's own event loop (asyncio.BaseEventLoop), "
            "whose clock can be replaced per instance. Run the tests that use fastsched_clock "
            "without uvloop (e.g. do not install uvloop's event loop policy for them)."
        ]
    )


def test_plugin_is_inert_for_suites_that_do_not_use_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
        import sys

        def test_nothing_heavy_imported():
            assert "apscheduler" not in sys.modules
            assert "freezegun" not in sys.modules
            assert "sqlalchemy" not in sys.modules
            assert "fastapi" not in sys.modules
        """
    )
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=1)

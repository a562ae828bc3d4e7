"""``fastsched_history``: every write path is recorded, on both databases, in both isolations.

Each test runs a small user suite on SQLite and on PostgreSQL: the app of ``conftest.DB_APP``
plus the tables and the scheduler of :data:`HISTORY_MODELS`. Inside it, a fixture runs each
test under both isolation modes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

# In-process pytester runs re-import the modules a user suite imported, but the package keeps
# its attribute of the first import: imported here, every run uses the same modules (and so
# the same job-run context variable).
import pytest_fastsched._history  # noqa: F401
from pytest_fastsched import _options

NO_RANDOM_ORDER = ("-p", "no:randomly")

# Appended to conftest.DB_APP: keys that are strings, composite or UUIDs, status columns with
# other names, a table without a status column, and a scheduler for jobs.
HISTORY_MODELS = """

import uuid

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import CheckConstraint, Uuid


class Domain(Base):
    __tablename__ = "domains"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    domain_extraction_status: Mapped[str] = mapped_column(String(20), default="pending")
    domain_extraction_error: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(default=0)


class Pair(Base):
    __tablename__ = "pairs"
    left: Mapped[int] = mapped_column(primary_key=True)
    right: Mapped[str] = mapped_column(String(10), primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    last_error: Mapped[str | None] = mapped_column(String(200))


class Document(Base):
    __tablename__ = "documents"
    __table_args__ = (CheckConstraint("status <> 'invalid'", name="ck_documents_status"),)
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column(String(20))


scheduler = AsyncIOScheduler(timezone="UTC")
"""

# The isolation modes, as a fixture every test of a user suite requests.
ISOLATIONS = """
import pytest

@pytest.fixture(
    params=[
        pytest.param("rollback", id="rollback"),
        pytest.param("commit", marks=pytest.mark.fastsched(isolation="commit"), id="commit"),
    ]
)
def isolation(request):
    return request.param
"""

CAPTURE = """
import datetime as dt
import uuid

import pytest
from sqlalchemy import text, update

import app
from pytest_fastsched import assert_status, assert_transitions, timeline

START = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
DOC = uuid.UUID("6f1c2a4e-8b3d-4f5a-9c7e-1d2b3c4d5e6f")


async def run(statement, **values):
    async with app.get_background_session() as session:
        await session.execute(text(statement), values)


def story(history, table, key):
    return [
        (r.kind, r.old_status, r.status, r.last_error, r.rolled_back)
        for r in history.timeline(table, key)
    ]


async def test_every_write_path(isolation, fastsched_db, fastsched_history):
    assert fastsched_db.isolation == isolation
    async with fastsched_db.background_session() as session:
        session.add(app.Item(id=1, status="pending"))  # ORM insert
    await fastsched_db.insert("items", [{"id": 2}, {"id": 3}])  # core insert, executemany
    await run("INSERT INTO items (id, status) VALUES (4, 'pending')")  # raw insert
    async with app.get_background_session() as session:  # bulk update
        await session.execute(
            update(app.Item).where(app.Item.status == "pending").values(status="processing")
        )
    async with app.get_background_session() as session:  # ORM flush
        (await session.get(app.Item, 1)).status = "completed"
    await run("UPDATE items SET status = 'error', last_error = 'boom' WHERE id = 2")  # text()
    await run("UPDATE items SET status = 'processing' WHERE id = 3")  # the same value
    await run("UPDATE items SET last_error = 'stored later' WHERE id = 4")  # error alone

    h = fastsched_history
    h.assert_transitions("items", 1, ["pending", "processing", "completed"])
    h.assert_transitions("items", 2, ["pending", "processing", "error"])
    h.assert_status("items", 2, "error", last_error="boom")
    h.assert_transitions("items", 3, ["pending", "processing", "processing"])
    assert story(h, "items", 3) == [
        ("insert", None, "pending", None, False),
        ("status", "pending", "processing", None, False),
        ("status", "processing", "processing", None, False),
    ]
    assert h.timeline("items", 3)[-1].same_value
    assert story(h, "items", 4) == [
        ("insert", None, "pending", None, False),
        ("status", "pending", "processing", None, False),
        ("columns", "processing", "processing", "stored later", False),
    ]
    h.assert_status("items", 4, "processing", last_error="stored later")
    assert_transitions("items", 4, ["pending", "processing"])
    assert [r.by for r in timeline("items", 2)] == ["test"] * 3


async def test_rolled_back_writes_are_recorded_and_marked(
    isolation, fastsched_db, fastsched_history
):
    await fastsched_db.insert("items", [{"id": 1}, {"id": 2}])
    await app.process_pending(fail={2})  # item 2: completed, then rolled back, then error
    assert story(fastsched_history, "items", 2) == [
        ("insert", None, "pending", None, False),
        ("status", "pending", "processing", None, False),
        ("status", "processing", "completed", None, True),
        ("status", "processing", "error", "boom 2", False),
    ]
    fastsched_history.assert_transitions("items", 2, ["pending", "processing", "error"])
    assert_status("items", 2, "error", last_error="boom 2")
    fastsched_history.assert_processed_once("items")

    # A statement that fails undoes its own writes (SQLite fires the trigger of the first
    # row before the second fails its CHECK; PostgreSQL fires none).
    await fastsched_db.insert("documents", [{"id": DOC}, {"id": uuid.uuid4()}])
    stored = DOC.hex if fastsched_db.dialect == "sqlite" else str(DOC)
    with pytest.raises(Exception, match="ck_documents_status"):
        await run(
            f"UPDATE documents SET status = CASE WHEN id = '{stored}' THEN 'done' "
            "ELSE 'invalid' END"
        )
    assert all(r.rolled_back for r in fastsched_history.timeline("documents", DOC)[1:])
    fastsched_history.assert_all("documents", "pending")


async def test_a_write_of_the_same_value_is_the_footprint_of_two_workers(
    isolation, fastsched_db, fastsched_history
):
    await fastsched_db.insert("items", [{"id": 1}, {"id": 2}])
    await run("UPDATE items SET status = 'error' WHERE id = 2")
    await run("UPDATE items SET status = 'pending' WHERE id = 2")  # a legitimate retry
    for _ in range(2):  # two workers claim item 1 without a status condition
        await run("UPDATE items SET status = 'processing' WHERE id = 1")
    fastsched_history.assert_transitions("items", 2, ["pending", "error", "pending"])
    with pytest.raises(AssertionError, match=r"items\\[1\\] \\(processing -> processing\\)"):
        fastsched_history.assert_processed_once("items")


async def test_each_write_names_its_job_run(
    isolation, fastsched_clock, fastsched_scheduler, fastsched_db, fastsched_history
):
    app.scheduler.add_job(app.process_pending, "interval", minutes=5, id="process")
    await fastsched_db.insert("items", {"id": 1})
    await fastsched_clock.advance(minutes=5)
    await fastsched_db.insert("items", {"id": 2})
    await fastsched_scheduler.run_job("process")
    five = START + dt.timedelta(minutes=5)
    assert [(r.status, r.job_id, r.scheduled, r.at) for r in timeline("items", 1)] == [
        ("pending", None, None, START),
        ("processing", "process", five, five),
        ("completed", "process", five, five),
    ]
    assert [r.by for r in timeline("items", 2)] == [
        "test",
        "process (scheduled 2030-01-01 00:05:00+00:00)",
        "process (scheduled 2030-01-01 00:05:00+00:00)",
    ]
    assert [r.job_id for r in timeline("items", 2)] == [None, "process", "process"]


@pytest.mark.fastsched(
    track={"domains": ("domain_extraction_status", "domain_extraction_error", "attempts")}
)
async def test_keys_and_named_columns(isolation, fastsched_db, fastsched_history):
    h = fastsched_history
    assert h.tables == ["documents", "domains", "events", "items", "pairs"]
    await fastsched_db.insert("domains", {"name": "example.com"})
    await fastsched_db.insert("pairs", [{"left": 1, "right": "a"}, {"left": 1, "right": "b"}])
    await fastsched_db.insert("documents", {"id": DOC})
    await fastsched_db.insert("events", {"id": 7, "state": "new"})
    await run(
        "UPDATE domains SET domain_extraction_status = 'error', "
        "domain_extraction_error = 'timeout', attempts = attempts + 1"
    )
    await run("UPDATE pairs SET status = 'done' WHERE \\"right\\" = 'b'")
    async with app.get_background_session() as session:
        await session.execute(update(app.Document).values(status="done"))
        await session.execute(update(app.Event).values(state="seen"))

    h.assert_status("domains", "example.com", "error", last_error="timeout")
    assert h.timeline("domains", "example.com")[-1].values == {"attempts": 1}
    h.assert_transitions("pairs", (1, "b"), ["pending", "done"])
    h.assert_transitions("pairs", (1, "a"), ["pending"])
    h.assert_transitions(app.Document, DOC, ["pending", "done"])
    h.assert_transitions("documents", str(DOC), ["pending", "done"])
    assert h.timeline("documents", DOC)[0].key == DOC
    h.assert_transitions("events", 7, ["new", "seen"])


@pytest.fixture
async def before_recording(fastsched_db):
    await fastsched_db.insert("items", [{"id": 1, "status": "processing"}])


async def test_rows_there_before_recording_started(
    isolation, fastsched_db, before_recording, fastsched_history
):
    await run("UPDATE items SET status = 'completed' WHERE id = 1")
    assert story(fastsched_history, "items", 1) == [
        ("existing", None, "processing", None, False),
        ("status", "processing", "completed", None, False),
    ]
    fastsched_history.assert_all("items", "completed")
"""


def _write_history_suite(pytester: pytest.Pytester) -> pytest.Pytester:
    app = pytester.path.joinpath("app.py")
    app.write_text(app.read_text() + HISTORY_MODELS)
    pytester.makeconftest(ISOLATIONS)
    return pytester


@pytest.fixture
def history_suite(db_suite: pytest.Pytester) -> pytest.Pytester:
    """The user project of ``db_suite`` with the tables and scheduler of HISTORY_MODELS."""
    return _write_history_suite(db_suite)


HISTORY_OPTIONS = (
    "-o",
    "asyncio_mode=auto",
    "--fastsched-scheduler=app:scheduler",
    "-o",
    "fastsched_track=events:state",
)


def test_every_capture_path_on_both_isolations(history_suite: pytest.Pytester) -> None:
    history_suite.makepyfile(test_capture=CAPTURE)
    result = history_suite.runpytest_inprocess(*NO_RANDOM_ORDER, *HISTORY_OPTIONS)
    result.assert_outcomes(passed=12)


MIGRATED_COLUMNS_CONFTEST = """
from sqlalchemy import text


def pytest_fastsched_create_schema(connection, dialect):
    # Columns the database has and the models lack, as a migration adds them.
    connection.execute(text("ALTER TABLE events ADD COLUMN failure VARCHAR(200)"))
    connection.execute(text("ALTER TABLE documents ADD COLUMN last_error VARCHAR(200)"))
"""

MIGRATED_COLUMNS = """
import uuid

import pytest
from sqlalchemy import text

import app

DOCUMENT = uuid.UUID("6f1c3b9e-0000-4000-8000-000000000001")


async def fail(table, key, column):
    async with app.get_background_session() as session:
        await session.execute(
            text(f"UPDATE {table} SET {column} = 'boom' WHERE id = :id"), {"id": key}
        )
        await session.execute(
            text(f"UPDATE {table} SET " + ("state" if table == "events" else "status")
                 + " = 'error' WHERE id = :id"),
            {"id": key},
        )


async def test_a_tracked_error_column_only_the_database_has(fastsched_db, fastsched_history):
    await fastsched_db.insert("events", {"id": 1, "state": "pending", "failure": None})
    await fail("events", 1, "failure")
    fastsched_history.assert_status("events", 1, "error", last_error="boom")


async def test_a_last_error_column_only_the_database_has(fastsched_db, fastsched_history):
    await fastsched_db.insert("documents", {"id": DOCUMENT, "status": "pending"})
    key = DOCUMENT if fastsched_db.dialect == "postgresql" else DOCUMENT.hex
    await fail("documents", key, "last_error")
    fastsched_history.assert_status("documents", DOCUMENT, "error", last_error="boom")
"""


def test_columns_a_migration_added_are_recorded_and_asserted(
    history_suite: pytest.Pytester,
) -> None:
    history_suite.makeconftest(MIGRATED_COLUMNS_CONFTEST)
    history_suite.makepyfile(test_migrated=MIGRATED_COLUMNS)
    result = history_suite.runpytest_inprocess(
        *NO_RANDOM_ORDER, "-o", "asyncio_mode=auto", "-o", "fastsched_track=events:state:failure"
    )
    result.assert_outcomes(passed=2)


BAD_INPUT = """
import re

import pytest

import app

TRACKED = (
    "Tracked: documents (status), domains (domain_extraction_status, "
    "domain_extraction_error), events (state), items (status, last_error), "
    "pairs (status, last_error)"
)


def error_of(call, *args, **kwargs):
    with pytest.raises(Exception) as excinfo:
        call(*args, **kwargs)
    return f"{type(excinfo.value).__name__}: {excinfo.value}"


@pytest.mark.fastsched(track={"domains": ("domain_extraction_status", "domain_extraction_error")})
async def test_bad_input(fastsched_db, fastsched_history):
    h = fastsched_history
    await fastsched_db.insert("items", [{"id": 1}, {"id": 2}])
    assert error_of(h.assert_status, "itmes", 1, "pending") == (
        "LookupError: fastsched_history: the test database has no table 'itmes'. " + TRACKED
    )
    assert error_of(h.assert_transitions, "items", 99, ["pending"]) == (
        "LookupError: items has no row with id=99 in the history of this test "
        "(rows recorded: items[1], items[2])"
    )
    assert error_of(h.timeline, "pairs", (1, "a")) == (
        "LookupError: pairs has no row with left=1, right='a' in the history of this test "
        "(no row of pairs was written)"
    )
    assert error_of(h.assert_all, "notes", "done") == (
        "LookupError: fastsched_history does not track the table 'notes': it has no column "
        "'status'. Name its status column in the ini option fastsched_track = "
        "notes:STATUS_COLUMN[:ERROR_COLUMN] or with "
        "@pytest.mark.fastsched(track={'notes': 'STATUS_COLUMN'}). " + TRACKED
    )
    assert error_of(h.assert_status, "items", 1, "pending", last_error_match="boom(") == (
        "ValueError: last_error_match='boom(' is not a valid regular expression: "
        "missing ), unterminated subpattern at position 4"
    )
    assert error_of(h.assert_status, "items", 1, "pending", last_error=re.compile(b"x")) == (
        "TypeError: last_error=re.compile(b'x') is a bytes pattern; the error column holds "
        "text: compile a str, e.g. re.compile('x')"
    )
    assert error_of(h.assert_status, "items", 1, "pending", last_error=42) == (
        "TypeError: last_error= takes the exact text (a str), a compiled regular expression "
        "(re.compile(...), matched with search) or None (no error), not 42"
    )
    assert error_of(h.assert_status, "documents", 1, "x", last_error=None).startswith(
        "TypeError: documents has no error column recorded, so last_error cannot be checked"
    )
    assert error_of(h.assert_transitions, "pairs", 1, ["pending"]) == (
        "TypeError: pairs has the primary key (left, right): give 2 value(s) as key, not 1"
    )
    assert error_of(h.assert_transitions, "items", 1, "pending") == (
        "TypeError: assert_transitions() takes the statuses as a list, e.g. "
        "['pending', 'processing', 'completed'], not 'pending'"
    )
    h.assert_status("items", 1, "pending", last_error=None)


def test_the_plain_functions_need_the_fixture():
    from pytest_fastsched import assert_all

    with pytest.raises(pytest.UsageError, match=re.escape(
        "pytest_fastsched.assert_all() checks the history of the running test: request the "
        "fastsched_history fixture in the test (or in a fixture it uses)"
    )):
        assert_all("items", "done")


@pytest.mark.fastsched(track={"items": ("state",)})
async def test_a_configured_column_the_table_lacks(fastsched_db, fastsched_history):
    pass


@pytest.mark.fastsched(track={"nowhere": ("status",)})
async def test_a_configured_table_the_database_lacks(fastsched_db, fastsched_history):
    pass


@pytest.mark.fastsched(track=["items"])
async def test_a_track_that_is_not_a_dict(fastsched_db, fastsched_history):
    pass
"""

NOTES = """

class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str | None] = mapped_column(String(200))
"""


def test_bad_input_is_a_clear_error(history_suite: pytest.Pytester) -> None:
    app = history_suite.path.joinpath("app.py")
    app.write_text(app.read_text() + NOTES)
    history_suite.makepyfile(test_bad=BAD_INPUT)
    result = history_suite.runpytest_inprocess(*NO_RANDOM_ORDER, "--tb=short", *HISTORY_OPTIONS)
    result.assert_outcomes(passed=2, errors=3)
    result.stdout.fnmatch_lines(
        [
            "E   *UsageError: @pytest.mark.fastsched(track=...): table 'items' has no "
            "column 'state' (its columns: id, status, last_error). "
            "See https://github.com/pytest-fastsched/pytest-fastsched#configuration",
            "E   *UsageError: @pytest.mark.fastsched(track=...) names the table "
            "'nowhere', which the test database does not have (tables: documents, domains, "
            "events, items, notes, pairs). "
            "See https://github.com/pytest-fastsched/pytest-fastsched#configuration",
            "E   *UsageError: @pytest.mark.fastsched(track=[[]'items']) is not valid: give "
            "a dict of table name to its status column, or to a tuple (status column, error "
            "column or None, other columns...), e.g. track={'domains': "
            "('domain_extraction_status', 'domain_extraction_error')}",
        ],
    )


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            ("-o", "fastsched_track=items:status:last_error domains"),
            "ERROR: fastsched_track: 'domains' is not valid: write each table as "
            "TABLE:STATUS_COLUMN[:ERROR_COLUMN[:OTHER_COLUMN...]], separated by spaces, e.g. "
            "'fastsched_track = items:status:last_error domains:domain_extraction_status:"
            "domain_extraction_error'. "
            "See https://github.com/pytest-fastsched/pytest-fastsched#configuration",
        ),
        (
            ("--fastsched-track", "items:status items:state"),
            "ERROR: fastsched_track names the table 'items' twice: keep one entry",
        ),
        (
            ("-o", "fastsched_timeline=sometimes"),
            "ERROR: fastsched_timeline = 'sometimes' is not valid: use true or false (ini "
            "option fastsched_timeline, or the flag --fastsched-timeline). "
            "See https://github.com/pytest-fastsched/pytest-fastsched#configuration",
        ),
    ],
    ids=["syntax", "twice", "timeline"],
)
def test_bad_settings_are_usage_errors(
    make_db_suite: Callable[[str], pytest.Pytester], option: tuple[str, ...], message: str
) -> None:
    suite = make_db_suite("sqlite")
    suite.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = suite.runpytest_subprocess(*option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_settings_are_echoed_in_the_header(
    make_db_suite: Callable[[str], pytest.Pytester],
) -> None:
    suite = make_db_suite("sqlite")
    suite.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = suite.runpytest_subprocess(
        "--fastsched-timeline", "--fastsched-track", "domains:state::attempts:note items:status"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["fastsched history: track=domains:state::attempts:note items:status, timeline=on"]
    )


README = Path(__file__).resolve().parent.parent / "README.md"

# The README's examples assume the app's 5-minute job: DB_APP's, failing item 2.
README_JOB = """
import pytest

import app


@pytest.fixture(autouse=True)
def process_pending_items(fastsched_scheduler):
    app.scheduler.add_job(
        app.process_pending, "interval", minutes=5, id="process_pending_items",
        kwargs={"fail": {2}},
    )
"""


def _readme_blocks(language: str) -> list[str]:
    """The code blocks of the README's fastsched_history section in ``language``."""
    section = README.read_text().split("### `fastsched_history`\n", 1)[1]
    section = section.split("\n## ", 1)[0].split("\n### ", 1)[0]
    blocks = section.split("```")[1::2]  # the text inside each pair of fences
    return [block.split("\n", 1)[1] for block in blocks if block.split("\n", 1)[0] == language]


def test_the_readme_examples_run_as_shown(history_suite: pytest.Pytester) -> None:
    example, marker = _readme_blocks("python")
    history_suite.makeconftest(README_JOB)
    history_suite.makepyfile(test_readme=f"{example}\n\n\n{marker}\n")
    result = history_suite.runpytest_inprocess(
        *NO_RANDOM_ORDER, *HISTORY_OPTIONS, "--fastsched-timeline", "-v"
    )
    result.assert_outcomes(passed=2)
    timeline = _readme_blocks("")[-1].splitlines()
    result.stdout.fnmatch_lines(timeline[1:], consecutive=True)  # after the test's heading
    (toml,) = _readme_blocks("toml")
    track = re.search(r'fastsched_track = "(.+)"', toml)
    assert track is not None
    assert [spec.table for spec in _options.parse_track(track.group(1))] == ["items", "domains"]

"""Status-transition recording behind ``fastsched_history``: what is tracked, and the history.

Every write to the status column of a tracked row is recorded: by ORM flushes, raw ``text()``
SQL, bulk ``UPDATE ... WHERE status = 'pending'`` and ``INSERT``, on SQLite and PostgreSQL,
under both isolation modes, with the error column (and the other columns the user names) as
they were written, the virtual instant, and the job run that wrote it. How each write is
captured is :mod:`._capture`'s business; the assertions over the records are
:mod:`._asserts`'.

Writes through connections the plugin does not hand out (an engine the test makes itself on
``fastsched_db.url``) are not recorded; neither are deletes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import MetaData, Table, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.exc import NoSuchTableError

from pytest_fastsched import _asserts
from pytest_fastsched._capture import Tracked, capture
from pytest_fastsched._db import with_database_columns
from pytest_fastsched._options import DOCS, Settings, TrackSpec, marker_options
from pytest_fastsched._records import HistoryRecord

if TYPE_CHECKING:
    from pytest_fastsched._clock import VirtualClock
    from pytest_fastsched._db import Database

# -- resolving the tracked tables against the test database --------------------------------

# The tables of each test database (by URL): its schema does not change between tests.
_TABLES: dict[str, dict[str, Table]] = {}


@dataclasses.dataclass
class _Resolved:
    tracked: dict[str, Tracked]
    untracked: dict[str, str]  # a table of the database, and why it is not tracked


async def resolve(database: Database, configured: Sequence[tuple[TrackSpec, str]]) -> _Resolved:
    """Tracked tables: each table with a ``status`` column, then the configured ones.

    ``configured`` pairs each spec with where it was given (for errors); later ones win.
    """
    __tracebackhide__ = True
    tables = await _tables_of(database)
    resolved = _Resolved({}, {})
    for name, table in tables.items():
        if "status" not in table.columns:
            resolved.untracked[name] = "it has no column 'status'"
            continue
        error = "last_error" if "last_error" in table.columns else None
        spec = TrackSpec(name, "status", error)
        if not table.primary_key.columns:
            resolved.untracked[name] = (
                "it has no primary key, by which fastsched_history tells rows apart"
            )
            continue
        resolved.tracked[name] = Tracked(name, table, spec)
    for spec, source in configured:
        found = tables.get(spec.table)
        table = found if found is not None else await _reflect(database, spec, tables, source)
        _check_columns(table, spec, source)
        resolved.tracked[spec.table] = Tracked(spec.table, table, spec)
        resolved.untracked.pop(spec.table, None)
    return resolved


async def _tables_of(database: Database) -> dict[str, Table]:
    """The tables of the test database: the app's ``Table`` objects where it has them, with
    the columns a migration or the schema hook added."""
    if database.url not in _TABLES:
        metadata = database.metadata

        def load(connection: Connection) -> dict[str, Table]:
            names = inspect(connection).get_table_names()
            reflected = MetaData()
            known = metadata.tables if metadata is not None else {}
            missing = [name for name in names if name not in known]
            if missing:
                reflected.reflect(connection, only=missing)
            tables = {
                name: with_database_columns(connection, known[name])
                for name in names
                if name in known
            }
            tables.update(reflected.tables)
            return tables

        async with database.connection() as connection:
            _TABLES[database.url] = await connection.run_sync(load)
    return dict(_TABLES[database.url])


async def _reflect(
    database: Database, spec: TrackSpec, tables: dict[str, Table], source: str
) -> Table:
    """A table created after the schema (by the test, say), reflected now."""
    __tracebackhide__ = True
    name = spec.table

    def load(connection: Connection) -> Table | None:
        try:
            table: Table = Table(name, MetaData(), autoload_with=connection)
            return table
        except NoSuchTableError:
            return None

    async with database.connection() as connection:
        table = await connection.run_sync(load)
    if table is None:
        known = ", ".join(sorted(tables)) or "none"
        raise pytest.UsageError(
            f"{source} names the table {name!r}, which the test database does not have "
            f"(tables: {known}). See {DOCS}"
        )
    return table


def _check_columns(table: Table, spec: TrackSpec, source: str) -> None:
    __tracebackhide__ = True
    names = [spec.status, *([spec.error] if spec.error else []), *spec.others]
    missing = [name for name in names if name not in table.columns]
    if missing:
        columns = ", ".join(table.columns.keys())
        raise pytest.UsageError(
            f"{source}: table {spec.table!r} has no column {missing[0]!r} (its columns: "
            f"{columns}). See {DOCS}"
        )
    if not table.primary_key.columns:
        raise pytest.UsageError(
            f"{source}: table {spec.table!r} has no primary key, by which fastsched_history "
            f"tells rows apart: give it one"
        )


def configured(item: pytest.Item, settings: Settings) -> list[tuple[TrackSpec, str]]:
    """The tables ``fastsched_track`` and the marker's ``track=`` name, with their source."""
    marker = marker_options(item)
    return [
        *((spec, "fastsched_track") for spec in settings.track),
        *((spec, "@pytest.mark.fastsched(track=...)") for spec in marker.track or ()),
    ]


@contextlib.asynccontextmanager
async def record(
    database: Database,
    configured: Sequence[tuple[TrackSpec, str]],
    clock: VirtualClock | None,
) -> AsyncIterator[History]:
    """Record the tracked tables of ``database`` for one test (the fixture's body)."""
    __tracebackhide__ = True
    resolved = await resolve(database, configured)
    history = History(resolved.tracked, resolved.untracked)

    def now() -> dt.datetime:
        return clock.now() if clock is not None else dt.datetime.now(dt.timezone.utc)

    async with capture(database, history.tracked, history.add, now):
        _ACTIVE.append(history)
        try:
            yield history
        finally:
            _ACTIVE.remove(history)


# -- the fixture's object --------------------------------------------------------------------


class History:
    """The status history of the tracked tables in this test (the ``fastsched_history``
    fixture).

    Tables are tracked when they have a ``status`` column (with ``last_error`` when they have
    one), or when ``fastsched_track`` / ``@pytest.mark.fastsched(track=...)`` name them. A
    table is given by name (or as a ``Table`` or a mapped class), a row by its primary key (a
    tuple when the key has several columns). Assertions look at the writes that stayed (not
    rolled back); failures show the row's whole timeline, rolled-back writes included.
    """

    def __init__(self, tracked: dict[str, Tracked], untracked: dict[str, str]) -> None:
        self.tracked = tracked
        self._untracked = untracked
        self._records: list[HistoryRecord] = []
        self._rows: dict[str, dict[Any, list[HistoryRecord]]] = {name: {} for name in tracked}

    @property
    def tables(self) -> list[str]:
        """The names of the tracked tables."""
        return sorted(self.tracked)

    def add(self, record: HistoryRecord) -> None:
        """Add a record (the recorder calls this)."""
        _insert_by_seq(self._records, record)
        _insert_by_seq(self._rows[record.table].setdefault(record.key, []), record)

    def all_records(self) -> list[HistoryRecord]:
        """Every record of every tracked table, in the order the writes happened."""
        return list(self._records)

    def timeline(self, table: Any, key: Any) -> list[HistoryRecord]:
        """The records of one row, in order, rolled-back writes included (``rolled_back``)."""
        __tracebackhide__ = True
        return list(self.row(table, key)[2])

    def assert_transitions(self, table: Any, key: Any, statuses: Sequence[Any]) -> None:
        """Assert that the row went through exactly ``statuses``, in order.

        The row's statuses are its first one (when inserted, or when recording started) and
        then each write to its status column that stayed, a write of the same value included:
        ``["pending", "processing", "completed"]``.
        """
        __tracebackhide__ = True
        _asserts.check_statuses_argument(statuses)
        tracked, row_key, records = self.row(table, key)
        _asserts.check_transitions(tracked.columns, row_key, records, statuses)

    def assert_status(
        self,
        table: Any,
        key: Any,
        status: Any,
        *,
        last_error: Any = _asserts.UNSET,
        last_error_match: str | None = None,
    ) -> None:
        """Assert that the row ended in ``status``, and what its error column holds.

        ``last_error``: a ``str`` must equal the error column exactly (the reference app
        writes ``"RuntimeError: boom"``, not ``"boom"``); a compiled regular expression
        (``re.compile("boom")``) must be found in it (``search``); ``None`` means no error.
        ``last_error_match="boom"`` is the same as ``last_error=re.compile("boom")``.
        """
        __tracebackhide__ = True
        expected_error = _asserts.error_check(last_error, last_error_match)
        _asserts.check_error_column(self.table(table).columns, expected_error)
        tracked, row_key, records = self.row(table, key)
        _asserts.check_status(tracked.columns, row_key, records, status, expected_error)

    def assert_all(self, table: Any, status: Any) -> None:
        """Assert that every row of ``table`` ended in ``status``.

        The rows are those the test wrote and those there when recording started; a table
        without rows fails (a test that set nothing up rarely means to pass).
        """
        __tracebackhide__ = True
        tracked, rows = self.rows(table)
        _asserts.check_all(tracked.columns, rows, status)

    def assert_processed_once(self, table: Any) -> None:
        """Assert that no row of ``table`` had its status set to the value it already had.

        Such a write is the signature of two workers processing the same row. Legitimate
        retries (``error -> pending -> processing``) pass.
        """
        __tracebackhide__ = True
        tracked, rows = self.rows(table)
        _asserts.check_processed_once(tracked.columns, rows)

    def error_columns(self) -> dict[str, str | None]:
        """The error column of each tracked table (``None`` where it has none)."""
        return {name: tracked.error for name, tracked in self.tracked.items()}

    # -- lookups

    def table(self, table: Any) -> Tracked:
        """The tracked table ``table`` (a name, a ``Table`` or a mapped class)."""
        __tracebackhide__ = True
        name = _table_name(table)
        if name in self.tracked:
            return self.tracked[name]
        tracked = ", ".join(self.tracked[name].describe() for name in self.tables) or "none"
        if name in self._untracked:
            raise LookupError(
                f"fastsched_history does not track the table {name!r}: "
                f"{self._untracked[name]}. Name its status column in the ini option "
                f"fastsched_track = {name}:STATUS_COLUMN[:ERROR_COLUMN] or with "
                f"@pytest.mark.fastsched(track={{{name!r}: 'STATUS_COLUMN'}}). "
                f"Tracked: {tracked}"
            )
        raise LookupError(
            f"fastsched_history: the test database has no table {name!r}. Tracked: {tracked}"
        )

    def rows(self, table: Any) -> tuple[Tracked, dict[Any, list[HistoryRecord]]]:
        """The tracked table and its rows' records, by row key."""
        __tracebackhide__ = True
        tracked = self.table(table)
        return tracked, self._rows[tracked.name]

    def row(self, table: Any, key: Any) -> tuple[Tracked, Any, list[HistoryRecord]]:
        """The tracked table, the row's key and its records; an unknown row is an error."""
        __tracebackhide__ = True
        tracked, rows = self.rows(table)
        wanted = tracked.user_key(key)
        for candidate in _key_variants(wanted):
            if candidate in rows:
                return tracked, candidate, rows[candidate]
        described = ", ".join(
            f"{name}={value!r}"
            for name, value in zip(
                tracked.keys, wanted if isinstance(wanted, tuple) else (wanted,), strict=True
            )
        )
        keys = [_asserts.show_key(tracked.name, known) for known in list(rows)[:10]]
        seen = ", ".join(keys) + (", ..." if len(rows) > 10 else "")
        raise LookupError(
            f"{tracked.name} has no row with {described} in the history of this test "
            + (f"(rows recorded: {seen})" if rows else f"(no row of {tracked.name} was written)")
        )


def _table_name(table: Any) -> str:
    if isinstance(table, str):
        return table
    found = getattr(table, "__table__", table)
    if isinstance(found, Table):
        return found.name if found.schema is None else f"{found.schema}.{found.name}"
    raise TypeError(f"give a table as its name, a Table or a mapped class, not {table!r}")


def _key_variants(key: Any) -> Iterable[Any]:
    """The key, and the same key with UUIDs spelled as the database may hold them."""
    yield key
    parts = key if isinstance(key, tuple) else (key,)
    if not any(isinstance(part, (uuid.UUID, str)) for part in parts):
        return
    spelled = [_uuid_spellings(part) for part in parts]
    for variant in itertools.product(*spelled):
        yield variant[0] if len(variant) == 1 else tuple(variant)


def _uuid_spellings(part: Any) -> list[Any]:
    if isinstance(part, uuid.UUID):
        return [str(part), part.hex]
    if isinstance(part, str):
        with contextlib.suppress(ValueError):
            return [uuid.UUID(part), part]
    return [part]


def _insert_by_seq(records: list[HistoryRecord], record: HistoryRecord) -> None:
    index = len(records)
    while index and records[index - 1].seq > record.seq:
        index -= 1
    records.insert(index, record)


# -- the plain functions: the history of the running test -----------------------------------

_ACTIVE: list[History] = []
"""The histories of the running tests, innermost last (the fixture adds and removes them)."""


def _active(function: str) -> History:
    __tracebackhide__ = True
    if not _ACTIVE:
        raise pytest.UsageError(
            f"pytest_fastsched.{function}() checks the history of the running test: request "
            f"the fastsched_history fixture in the test (or in a fixture it uses)"
        )
    return _ACTIVE[-1]


def assert_transitions(table: str, key: Any, statuses: Sequence[Any]) -> None:
    """Assert that the row ``key`` of ``table`` went through exactly ``statuses``.

    The history of the running test (``fastsched_history``); see
    :meth:`History.assert_transitions`.
    """
    __tracebackhide__ = True
    _active("assert_transitions").assert_transitions(table, key, statuses)


def assert_status(
    table: str,
    key: Any,
    status: Any,
    *,
    last_error: Any = _asserts.UNSET,
    last_error_match: str | None = None,
) -> None:
    """Assert that the row ``key`` of ``table`` ended in ``status``; see
    :meth:`History.assert_status`."""
    __tracebackhide__ = True
    _active("assert_status").assert_status(
        table, key, status, last_error=last_error, last_error_match=last_error_match
    )


def assert_all(table: str, status: Any) -> None:
    """Assert that every row of ``table`` ended in ``status``; see :meth:`History.assert_all`."""
    __tracebackhide__ = True
    _active("assert_all").assert_all(table, status)


def assert_processed_once(table: str) -> None:
    """Assert that no row of ``table`` had its status set to the value it already had; see
    :meth:`History.assert_processed_once`."""
    __tracebackhide__ = True
    _active("assert_processed_once").assert_processed_once(table)


def timeline(table: str, key: Any) -> list[HistoryRecord]:
    """The records of the row ``key`` of ``table``; see :meth:`History.timeline`."""
    __tracebackhide__ = True
    return _active("timeline").timeline(table, key)

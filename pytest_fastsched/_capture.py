"""How ``fastsched_history`` captures every write to a tracked row, and why this way.

- **Database triggers see the writes.** Only the database sees every write path, including a
  write of the value the row already has (the footprint of two workers processing the same
  row): ``AFTER INSERT`` and ``AFTER UPDATE OF <status>`` ``FOR EACH ROW`` triggers compare
  OLD and NEW exactly, whatever SQL the app sent. SQLAlchemy events would miss raw SQL and bulk
  updates, and could not know the old value of a row they never loaded. A third trigger,
  ``AFTER UPDATE OF <error and other columns>`` when they change, catches an error text
  stored in a statement of its own, so ``assert_status(last_error=...)`` checks what the row
  really holds; it is merged with the status trigger's record when both fire for one row.
- **The triggers hand each write to Python at once, outside the transaction.** A trigger that
  inserted into a history table would see its rows undone with the savepoint they belong to,
  and could not know the virtual time or the job run. Instead, on SQLite the trigger calls a
  Python function registered on the connection (``create_function``); on PostgreSQL it raises
  a ``NOTICE`` carrying the row as JSON, which asyncpg hands to a listener on the connection
  before the statement's result arrives. Both are cheap and survive any rollback.
- **Sync sessions are recorded as async ones.** Under rollback isolation the app's sync
  sessions run on the test connection itself (see ``_rebind``); under commit isolation each
  connection of the sync test engine registers the same SQLite function, or a psycopg 3
  notice handler, when the pool hands it out. The job run travels with the context into
  worker threads (``asyncio.to_thread``, the harness's job threads).
- **SQLAlchemy events stamp and place each write.** After each statement
  (``after_cursor_execute``, in the task that ran it) the writes it caused are stamped with the
  virtual time and the job run of the running code (a context variable the scheduler harness
  sets for each job's task), and put in the innermost open transaction or savepoint of their
  connection. ``ROLLBACK [TO SAVEPOINT]`` marks them rolled back (they stay in the history),
  ``RELEASE``/``COMMIT`` keep them; a statement that fails (``handle_error``) marks its own.
- **The triggers never leak.** SQLite: TEMP triggers, which live on one connection only, on
  the test connection inside the test's outer transaction (undone with it) or, under commit
  isolation, on each connection the pool hands out (the sync side's pool too). PostgreSQL:
  under rollback isolation the functions and triggers are created inside the test's
  transaction and undone with it; under commit isolation they are committed in the process's
  own scratch database (never the database a URL names), where they stay, silent for tests
  that do not record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import decimal
import itertools
import json
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, event, select
from sqlalchemy.engine import Connection, Dialect, Engine

from pytest_fastsched._options import TrackSpec
from pytest_fastsched._records import HistoryRecord, Kind, RunRef, current_run

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import ExceptionContext

    from pytest_fastsched._db import Database

_KINDS: dict[str, Kind] = {"i": "insert", "s": "status", "c": "columns", "e": "existing"}
NAME = "fastsched_history"  # the SQLite function, the PostgreSQL schema, the trigger prefix
NOTICE_PREFIX = f"{NAME}:"
_STATE_KEY = "fastsched_history"  # in the DBAPI connection's ``info``
_SEQUENCE = itertools.count()  # orders writes across connections, in the order they happened
_TRANSACTION_WORDS = (
    "SAVEPOINT",
    "RELEASE",
    "ROLLBACK",
    "COMMIT",
    "BEGIN",
    "END",
    "ABORT",
    "START",
)


# -- what is tracked -----------------------------------------------------------------------


class Tracked:
    """A tracked table resolved against the test database: its columns and how to record."""

    def __init__(self, name: str, table: Table, spec: TrackSpec) -> None:
        self.name = name
        self.table = table
        self.columns = spec
        """The recorded columns, as the assertions read them."""
        self.status = spec.status
        self.error = spec.error
        self.others = spec.others
        self.keys = tuple(column.name for column in table.primary_key.columns)
        self._key_converters = [_converter(table.columns[name]) for name in self.keys]
        self._converters = {
            name: _converter(table.columns[name])
            for name in (spec.status, *([spec.error] if spec.error else []), *spec.others)
        }

    @property
    def signature(self) -> tuple[Any, ...]:
        """What the triggers of this table depend on."""
        return (self.name, self.status, self.error, self.others, self.keys)

    def describe(self) -> str:
        """``items (status, last_error)``: the table and its recorded columns."""
        return f"{self.name} ({', '.join(self._recorded())})"

    def _recorded(self) -> list[str]:
        return [self.status, *([self.error] if self.error else []), *self.others]

    def key_of(self, values: Sequence[Any]) -> Any:
        """The row key of primary-key ``values`` (a tuple when the key has several columns)."""
        converted = tuple(
            value if convert is None or value is None else _convert(convert, value)
            for convert, value in zip(self._key_converters, values, strict=True)
        )
        return converted[0] if len(converted) == 1 else converted

    def user_key(self, key: Any) -> Any:
        """The row key a test gives, checked against the primary key and converted."""
        __tracebackhide__ = True
        values = key if isinstance(key, tuple) else (key,)
        if len(values) != len(self.keys):
            raise TypeError(
                f"{self.name} has the primary key ({', '.join(self.keys)}): give "
                f"{len(self.keys)} value(s) as key, not {key!r}"
            )
        return self.key_of(values)

    def value(self, column: str, raw: Any) -> Any:
        """A recorded column's value, converted to the column's Python type where it helps."""
        convert = self._converters.get(column)
        return raw if convert is None or raw is None else _convert(convert, raw)

    def record(
        self, args: Sequence[Any], seq: int, at: dt.datetime, run: RunRef | None
    ) -> HistoryRecord:
        """The :class:`HistoryRecord` of one trigger call (see :meth:`_payload`)."""
        _, kind, old, new, error, *rest = args
        keys, others = rest[: len(self.keys)], rest[len(self.keys) :]
        return HistoryRecord(
            table=self.name,
            key=self.key_of(keys),
            kind=_KINDS[kind],
            at=at,
            old_status=self.value(self.status, old),
            status=self.value(self.status, new),
            last_error=self.value(self.error, error) if self.error else None,
            values={
                name: self.value(name, raw) for name, raw in zip(self.others, others, strict=True)
            },
            job_id=None if run is None else run.job_id,
            scheduled=None if run is None else run.scheduled,
            seq=seq,
            replica=getattr(run, "replica", 0),
        )

    # -- trigger SQL

    def _payload(self, dialect: Dialect, kind: str) -> list[str]:
        """The trigger's arguments: table, kind, old and new status, error, key, others."""
        column = dialect.identifier_preparer.quote
        old = f"OLD.{column(self.status)}" if kind != "i" else "NULL"
        if dialect.name == "postgresql":
            old = f"CASE WHEN TG_OP = 'UPDATE' THEN OLD.{column(self.status)} END"
            kind = "TG_ARGV[0]"
        else:
            kind = _literal(kind)
        error = f"NEW.{column(self.error)}" if self.error else "NULL"
        rest = [f"NEW.{column(name)}" for name in (*self.keys, *self.others)]
        return [_literal(self.name), kind, old, f"NEW.{column(self.status)}", error, *rest]

    def _changed(self, dialect: Dialect) -> str | None:
        """The WHEN condition of the columns trigger: the error or another column changed."""
        names = [*([self.error] if self.error else []), *self.others]
        if not names:
            return None
        column = dialect.identifier_preparer.quote
        if dialect.name == "postgresql":  # json has no equality operator: compare as text
            test = "OLD.{0}::text IS DISTINCT FROM NEW.{0}::text"
        else:
            test = "OLD.{0} IS NOT NEW.{0}"
        tests = [test.format(column(name)) for name in names]
        return " OR ".join(tests)

    def _events(self, dialect: Dialect) -> list[tuple[str, str, str | None]]:
        """(kind, trigger event, WHEN condition) of each trigger of this table."""
        column = dialect.identifier_preparer.quote
        events: list[tuple[str, str, str | None]] = [
            ("i", "INSERT", None),
            ("s", f"UPDATE OF {column(self.status)}", None),
        ]
        changed = self._changed(dialect)
        if changed is not None:
            names = [*([self.error] if self.error else []), *self.others]
            events.append(("c", f"UPDATE OF {', '.join(map(column, names))}", changed))
        return events

    def sqlite_ddl(self, dialect: Dialect) -> tuple[list[str], list[str]]:
        """The TEMP triggers of this table on one SQLite connection: their names and DDL."""
        quote = dialect.identifier_preparer.quote
        target = f"{quote(self.table.schema or 'main')}.{quote(self.table.name)}"
        names, statements = [], []
        for kind, trigger_event, when in self._events(dialect):
            name = f"{NAME}_{kind}_{self.name}"
            arguments = ", ".join(self._payload(dialect, kind))
            condition = f" WHEN {when}" if when else ""
            names.append(name)
            statements.append(
                f"CREATE TEMP TRIGGER {quote(name)} AFTER {trigger_event} ON {target} "
                f"FOR EACH ROW{condition} BEGIN SELECT {NAME}({arguments}); END"
            )
        return names, statements

    def postgres_ddl(self, dialect: Dialect) -> list[str]:
        """The trigger function and triggers of this table, as statements of a DO block."""
        quote = dialect.identifier_preparer.quote
        target = dialect.identifier_preparer.format_table(self.table)
        function = f"{NAME}.{quote('record_' + self.name)}"
        payload = ", ".join(self._payload(dialect, "s"))
        statements = [
            f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS "
            f"$fastsched_body$ BEGIN RAISE NOTICE USING MESSAGE = {_literal(NOTICE_PREFIX)} "
            f"|| json_build_array({payload})::text; RETURN NULL; END $fastsched_body$",
        ]
        statements += [f"DROP TRIGGER IF EXISTS {NAME}_{kind} ON {target}" for kind in "isc"]
        for kind, trigger_event, when in self._events(dialect):
            condition = f" WHEN ({when})" if when else ""
            statements.append(
                f"CREATE TRIGGER {NAME}_{kind} AFTER {trigger_event} ON {target} FOR EACH ROW"
                f"{condition} EXECUTE FUNCTION {function}({_literal(kind)})"
            )
        return statements


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _converter(column: Any) -> Callable[[Any], Any] | None:
    """How to bring a raw value (SQLite's, or JSON from PostgreSQL) to the column's type."""
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        return None
    converters: dict[type, Callable[[Any], Any]] = {
        uuid.UUID: lambda value: value if isinstance(value, uuid.UUID) else uuid.UUID(str(value)),
        bool: bool,
        dt.datetime: lambda value: (
            dt.datetime.fromisoformat(value) if isinstance(value, str) else value
        ),
        dt.date: lambda value: dt.date.fromisoformat(value) if isinstance(value, str) else value,
        decimal.Decimal: lambda value: decimal.Decimal(str(value)),
    }
    return converters.get(python_type)


def _convert(convert: Callable[[Any], Any], value: Any) -> Any:
    try:
        return convert(value)
    except (TypeError, ValueError, ArithmeticError):
        return value


# -- one connection's writes and transactions -----------------------------------------------


@dataclasses.dataclass
class _Frame:
    """The transaction (``name`` None) or a savepoint of a connection, and its writes."""

    name: str | None
    records: list[HistoryRecord] = dataclasses.field(default_factory=list)


class _ConnectionState:
    """What one DBAPI connection captured: writes of the running statement, open frames."""

    def __init__(self, hooks: _EngineHooks) -> None:
        self.hooks = hooks
        self.buffer: list[tuple[int, Any]] = []
        self.frames: list[_Frame] = []
        self.has_function = False
        self.listening = False
        self.temp_triggers: tuple[Any, ...] | None = None  # signature of the TEMP triggers
        self.trigger_names: set[str] = set()  # every TEMP trigger ever made on it

    def capture(self, *args: Any) -> None:
        """The SQLite function the triggers call (in aiosqlite's thread)."""
        if self.hooks.active is not None:
            self.buffer.append((next(_SEQUENCE), args))

    def on_notice(self, _connection: Any, message: Any) -> None:
        """asyncpg's log listener: the NOTICE raised by a PostgreSQL trigger."""
        text = message.message
        if self.hooks.active is not None and text.startswith(NOTICE_PREFIX):
            self.buffer.append((next(_SEQUENCE), text))

    def on_psycopg_notice(self, diagnostic: Any) -> None:
        """psycopg 3's notice handler (the sync side's connections): as :meth:`on_notice`."""
        text = diagnostic.message_primary or ""
        if self.hooks.active is not None and text.startswith(NOTICE_PREFIX):
            self.buffer.append((next(_SEQUENCE), text))

    def reset(self, in_transaction: bool) -> None:
        """Forget the writes and frames of earlier use."""
        self.buffer = []
        self.frames = [_Frame(None)] if in_transaction else []

    # -- transactions

    def begin(self) -> None:
        self.frames = [_Frame(None)]

    def commit(self) -> None:
        self.frames = []

    def rollback(self) -> None:
        self._mark(self.frames)
        self.frames = []

    def statement(self, statement: str) -> None:
        """Follow the savepoints (and transactions) a statement opens or ends."""
        words = [word.strip('"').lower() for word in statement.split(None, 4)[:4]]
        if words[0] == "savepoint" and len(words) > 1:
            if not self.frames:
                self.begin()
            self.frames.append(_Frame(words[1]))
        elif words[0] == "release":
            self._release(words[-1])
        elif words[0] == "rollback" and len(words) > 2 and words[1] == "to":
            self._rollback_to(words[-1])
        elif words[0] in ("rollback", "abort"):
            self.rollback()
        elif words[0] in ("commit", "end"):
            self.commit()
        elif words[0] in ("begin", "start"):
            self.begin()

    def _index(self, name: str) -> int | None:
        for index in range(len(self.frames) - 1, 0, -1):
            if self.frames[index].name == name:
                return index
        return None

    def _release(self, name: str) -> None:
        index = self._index(name) or 1  # a savepoint made before recording: into the base
        if index < len(self.frames):
            merged = [record for frame in self.frames[index:] for record in frame.records]
            self.frames[index - 1].records.extend(merged)
            del self.frames[index:]

    def _rollback_to(self, name: str) -> None:
        index = self._index(name)
        if index is None:  # made before recording: everything recorded since is undone
            self._mark(self.frames)
            del self.frames[1:]
            if self.frames:
                self.frames[0].records = []
            return
        self._mark(self.frames[index:])
        self.frames[index].records = []
        del self.frames[index + 1 :]

    @staticmethod
    def _mark(frames: Iterable[_Frame]) -> None:
        for frame in frames:
            for record in frame.records:
                record.rolled_back = True


class _EngineHooks:
    """The SQLAlchemy events of one engine, feeding the recorder of the running test."""

    def __init__(self, engine: Engine) -> None:
        self.active: _Recorder | None = None
        event.listen(engine, "after_cursor_execute", self._after_execute)
        event.listen(engine, "handle_error", self._on_error)
        event.listen(engine, "begin", self._on_begin)
        event.listen(engine, "commit", self._on_commit)
        event.listen(engine, "rollback", self._on_rollback)
        event.listen(engine, "checkout", self._on_checkout)

    def state(self, dbapi_connection_info: dict[Any, Any]) -> _ConnectionState:
        """The state of a DBAPI connection (by its ``info``), made on first use."""
        state = dbapi_connection_info.get(_STATE_KEY)
        if state is None:
            state = dbapi_connection_info[_STATE_KEY] = _ConnectionState(self)
        return state

    def _state_of(self, connection: Connection) -> _ConnectionState | None:
        if self.active is None:
            return None
        try:
            state: _ConnectionState | None = connection.info.get(_STATE_KEY)
            return state
        except Exception:  # an invalidated or closed connection
            return None

    def _after_execute(
        self,
        connection: Connection,
        _cursor: Any,
        statement: str,
        _parameters: Any,
        _context: Any,
        _executemany: bool,
    ) -> None:
        state = self._state_of(connection)
        if state is None or self.active is None:
            return
        if state.buffer:
            self.active.drain(state, failed=False)
        if statement[:32].lstrip()[:9].upper().startswith(_TRANSACTION_WORDS):
            state.statement(statement)

    def _on_error(self, context: ExceptionContext) -> None:
        connection = context.connection
        state = None if connection is None else self._state_of(connection)
        if state is not None and state.buffer and self.active is not None:
            self.active.drain(state, failed=True)

    def _on_begin(self, connection: Connection) -> None:
        state = self._state_of(connection)
        if state is not None:
            state.begin()

    def _on_commit(self, connection: Connection) -> None:
        state = self._state_of(connection)
        if state is not None:
            state.commit()

    def _on_rollback(self, connection: Connection) -> None:
        state = self._state_of(connection)
        if state is not None:
            state.rollback()

    def _on_checkout(self, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        # Commit isolation: every connection the pool hands out records (from outside any
        # transaction, so SQLite's TEMP triggers made here stay on the connection).
        if self.active is not None:
            self.active.prepare(dbapi_connection, self.state(record.info), in_transaction=False)


_HOOKS: weakref.WeakKeyDictionary[Engine, _EngineHooks] = weakref.WeakKeyDictionary()


def _hooks_of(engine: Engine) -> _EngineHooks:
    if engine not in _HOOKS:
        _HOOKS[engine] = _EngineHooks(engine)
    return _HOOKS[engine]


# -- the recorder of one test ---------------------------------------------------------------


class _Recorder:
    """Turns the captured writes of one test into :class:`HistoryRecord` objects."""

    def __init__(
        self,
        tracked: dict[str, Tracked],
        add: Callable[[HistoryRecord], None],
        dialect: Dialect,
        now: Callable[[], dt.datetime],
    ) -> None:
        self.tracked = tracked
        self.add = add
        self.dialect = dialect
        self.now = now
        self.signature = tuple(table.signature for table in tracked.values())

    def drain(self, state: _ConnectionState, *, failed: bool) -> None:
        """Stamp the writes of the statement that just ran and place them in their frame."""
        captured, state.buffer = state.buffer, []
        at, run = self.now(), current_run.get()
        made: list[HistoryRecord] = []
        for seq, payload in captured:
            args = payload
            if isinstance(payload, str):
                args = json.loads(payload[len(NOTICE_PREFIX) :])
            tracked = self.tracked.get(args[0])
            if tracked is None:
                continue
            record = tracked.record(args, seq, at, run)
            if made and _one_write(made[-1], record):
                if record.kind == "status":
                    made[-1] = record
                continue
            made.append(record)
        for record in made:
            if failed:  # the statement's own changes are undone with it
                record.rolled_back = True
            elif state.frames:
                state.frames[-1].records.append(record)
            self.add(record)

    def prepare(
        self, dbapi_connection: Any, state: _ConnectionState, *, in_transaction: bool
    ) -> None:
        """Make one connection capture writes (synchronous: inside SQLAlchemy's greenlet)."""
        state.reset(in_transaction)
        if self.dialect.name == "sqlite":
            self._prepare_sqlite(dbapi_connection, state)
        elif not state.listening:
            driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
            if hasattr(driver, "add_log_listener"):  # asyncpg
                driver.add_log_listener(state.on_notice)
            else:  # psycopg 3, the sync side's driver under commit isolation
                driver.add_notice_handler(state.on_psycopg_notice)
            state.listening = True

    def _prepare_sqlite(self, dbapi_connection: Any, state: _ConnectionState) -> None:
        if not state.has_function:
            if hasattr(dbapi_connection, "run_async"):  # aiosqlite, in its thread
                dbapi_connection.run_async(
                    lambda driver: driver.create_function(NAME, -1, state.capture)
                )
            else:  # pysqlite, the sync side's driver under commit isolation
                dbapi_connection.create_function(NAME, -1, state.capture)
            state.has_function = True
        if state.temp_triggers == self.signature:
            return
        quote = self.dialect.identifier_preparer.quote
        statements = [f"DROP TRIGGER IF EXISTS temp.{quote(name)}" for name in state.trigger_names]
        for tracked in self.tracked.values():
            names, ddl = tracked.sqlite_ddl(self.dialect)
            state.trigger_names.update(names)
            statements += ddl
        cursor = dbapi_connection.cursor()
        try:
            for statement in statements:
                cursor.execute(statement)
        finally:
            cursor.close()
        state.temp_triggers = self.signature


def _one_write(first: HistoryRecord, second: HistoryRecord) -> bool:
    """The status and the columns trigger both fired for one row: keep one record."""
    return (
        first.table == second.table
        and first.key == second.key
        and {first.kind, second.kind} == {"status", "columns"}
    )


# PostgreSQL triggers committed in each scratch database (commit isolation), by table.
_COMMITTED: dict[str, dict[str, tuple[Any, ...]]] = {}


async def _install(database: Database, recorder: _Recorder, hooks: _EngineHooks) -> Any:
    """Install the triggers for this test; returns the test connection's state, if any."""
    rollback = database.isolation == "rollback"
    committed = _COMMITTED.setdefault(database.url, {})
    postgres = [
        tracked
        for tracked in recorder.tracked.values()
        if committed.get(tracked.name) != tracked.signature
    ]

    def install(connection: Connection) -> _ConnectionState | None:
        if recorder.dialect.name == "postgresql" and postgres:
            statements = [f"CREATE SCHEMA IF NOT EXISTS {NAME}"]
            for tracked in postgres:
                statements += tracked.postgres_ddl(recorder.dialect)
            block = ";\n".join(statements)
            connection.exec_driver_sql(f"DO $fastsched$ BEGIN\n{block};\nEND $fastsched$")
        if not rollback:
            return None
        fairy = connection.connection
        state = hooks.state(fairy.info)
        recorder.prepare(fairy.dbapi_connection, state, in_transaction=True)
        return state

    async with database.connection() as connection:
        state = await connection.run_sync(install)
    if not rollback:
        committed.update({tracked.name: tracked.signature for tracked in postgres})
    return state


async def _existing_rows(
    database: Database,
    tracked_tables: dict[str, Tracked],
    add: Callable[[HistoryRecord], None],
    at: dt.datetime,
) -> None:
    """Record the rows that are there before recording starts (inserted by earlier fixtures)."""

    def load(connection: Connection) -> list[tuple[Tracked, list[Any]]]:
        rows = []
        for tracked in tracked_tables.values():
            names = [
                *tracked.keys,
                tracked.status,
                *([tracked.error] if tracked.error else []),
                *tracked.others,
            ]
            query = select(*(tracked.table.columns[name] for name in names))
            rows.append((tracked, list(connection.execute(query))))
        return rows

    async with database.connection() as connection:
        loaded = await connection.run_sync(load)
    for tracked, rows in loaded:
        width = len(tracked.keys)
        for row in rows:
            error = row[width + 1] if tracked.error else None
            others = row[width + 2 :] if tracked.error else row[width + 1 :]
            payload = [tracked.name, "e", None, row[width], error, *row[:width], *others]
            add(tracked.record(payload, next(_SEQUENCE), at, None))


@contextlib.asynccontextmanager
async def capture(
    database: Database,
    tracked: dict[str, Tracked],
    add: Callable[[HistoryRecord], None],
    now: Callable[[], dt.datetime],
) -> AsyncIterator[None]:
    """Capture the writes to the ``tracked`` tables of ``database`` while the block runs.

    Each write becomes a :class:`HistoryRecord` stamped with ``now()`` and the running job,
    handed to ``add``; so do the rows already there when the block starts.
    """
    hooks = _hooks_of(database.engine.sync_engine)
    recorder = _Recorder(tracked, add, database.engine.dialect, now)
    # The sync side's own engine (commit isolation) records each connection it hands out.
    sync_engine = database.sync_engine
    every_hooks = [hooks] + ([] if sync_engine is None else [_hooks_of(sync_engine)])
    for each in every_hooks:
        each.active = recorder
    test_state = None
    try:
        test_state = await _install(database, recorder, hooks)
        await _existing_rows(database, tracked, add, now())
        yield
    finally:
        for each in every_hooks:
            each.active = None
        if test_state is not None:  # the test's rollback undoes the TEMP triggers made on it
            test_state.temp_triggers = None

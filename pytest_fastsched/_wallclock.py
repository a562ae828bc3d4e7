"""The wall-clock backends: what makes ``datetime.now()`` and ``time.time()`` read virtual time.

A backend freezes the wall clock at an instant, moves it when the virtual clock moves, and
restores it; every module and every thread must see the same instant. Two are supported:
time-machine (the default: it patches the C-level clocks and starts in microseconds) and
freezegun (an extra, for suites whose own tests use ``freeze_time``). Neither patches
``time.monotonic``: that hangs asyncio and every ``threading`` timeout.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

import pytest


class WallClock(Protocol):
    """A wall-clock backend: freezes ``datetime.now()`` / ``time.time()`` and moves them."""

    name: str

    def start(self, instant: dt.datetime) -> None: ...
    def move_to(self, instant: dt.datetime, us: int | None = None) -> None:
        """Move to ``instant`` (aware); ``us`` is the same instant in epoch microseconds."""

    def stop(self) -> None: ...


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_NAIVE_EPOCH = _EPOCH.replace(tzinfo=None)


def to_us(instant: dt.datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime, exactly."""
    delta = instant - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> dt.datetime:
    """The aware UTC datetime ``us`` microseconds after the Unix epoch."""
    return _EPOCH + dt.timedelta(0, 0, us)  # positional: a third cheaper than microseconds=us


def _naive_utc(instant: dt.datetime) -> dt.datetime:
    # Naive UTC on purpose: an aware destination makes time-machine set TZ, which changes
    # what tzlocal (and so APScheduler's default timezone) reports.
    return instant.astimezone(dt.timezone.utc).replace(tzinfo=None)


class FreezegunWallClock:
    """freezegun, configured so that every module and every thread sees the virtual time.

    freezegun's defaults are wrong here: its ignore list (``threading``, ``queue``, ...)
    makes worker threads read the real clock, and it freezes ``time.monotonic``, which hangs
    ``asyncio.sleep`` and thread timeouts. Both are undone right after ``start()``.
    """

    name = "freezegun"

    def start(self, instant: dt.datetime) -> None:
        try:
            from freezegun import api, freeze_time
        except ImportError:
            raise pytest.UsageError(
                "fastsched_clock_backend = 'freezegun' needs the freezegun package: "
                "pip install 'pytest-fastsched[freezegun]'"
            ) from None
        self._freezer = freeze_time(_naive_utc(instant), tick=False)
        self._freezer.ignore = ()
        self._factory = self._freezer.start()
        self._frozen = type(self._factory) is api.FrozenDateTimeFactory
        self._restore_monotonic()
        self._keep_fold()
        _teach_pydantic_fake_dates()

    def _keep_fold(self) -> None:
        # freezegun rebuilds every datetime result without its ``fold``, so the second
        # 02:30 of a DST fall-back night becomes the first again and APScheduler's cron
        # trigger loops forever at that hour. Keep the fold while the clock runs.
        #
        # ``FakeDatetime.now(tz)`` loses it earlier still: it returns
        # ``tz.fromutc(...) + tz_offset``, and an aware datetime plus a timedelta always has
        # fold=0, so during the repeated hour ``now(tz)`` reads an hour early and
        # APScheduler, which asks ``datetime.now(self.timezone)``, sleeps through that hour.
        # Convert from the frozen UTC instant instead.
        from freezegun import api

        dropping_fold = api.datetime_to_fakedatetime
        original_now = api.FakeDatetime.__dict__["now"]

        def datetime_to_fakedatetime(value: dt.datetime) -> dt.datetime:
            fake = dropping_fold(value)
            return fake.replace(fold=1) if value.fold else fake

        def now(cls: Any, tz: dt.tzinfo | None = None) -> dt.datetime:
            if tz is None or cls._tz_offset():
                result: dt.datetime = original_now.__func__(cls, tz)
                return result
            frozen = cls._time_to_freeze() or api.real_datetime.now(dt.timezone.utc)
            utc = frozen.replace(tzinfo=dt.timezone.utc)
            return datetime_to_fakedatetime(utc.astimezone(tz))

        self._dropping_fold = dropping_fold
        self._original_now = original_now
        api.datetime_to_fakedatetime = datetime_to_fakedatetime  # type: ignore[assignment]
        api.FakeDatetime.now = classmethod(now)  # type: ignore[method-assign, assignment]

    def _restore_monotonic(self) -> None:
        from freezegun import api

        names = ("monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns")
        reals = {
            name: getattr(api, f"real_{name}") for name in names if hasattr(api, f"real_{name}")
        }
        for name, real in reals.items():
            setattr(time, name, real)
        real_ids = {id(real) for real in reals.values()}
        kept = []
        for module, attribute, original in self._freezer.undo_changes:
            if id(original) in real_ids:
                setattr(module, attribute, original)
            else:
                kept.append((module, attribute, original))
        self._freezer.undo_changes = kept

    def move_to(self, instant: dt.datetime, us: int | None = None) -> None:
        # From the microseconds when given: half the cost of converting the aware instant.
        naive = _naive_utc(instant) if us is None else _NAIVE_EPOCH + dt.timedelta(0, 0, us)
        if self._frozen:
            # What FrozenDateTimeFactory.move_to ends with, without its re-parsing and its
            # type checks (a few microseconds per instant).
            self._factory.time_to_freeze = naive
        else:
            self._factory.move_to(naive)

    def stop(self) -> None:
        from freezegun import api

        api.datetime_to_fakedatetime = self._dropping_fold
        api.FakeDatetime.now = self._original_now  # type: ignore[method-assign]
        self._freezer.stop()


def _teach_pydantic_fake_dates() -> None:
    """Let pydantic build schemas for annotations that freezegun turned into its fake classes.

    freezegun replaces ``datetime`` in every module that imported it, so FastAPI, resolving a
    route's ``run_at: datetime`` annotation during the test, gets ``FakeDatetime`` and
    pydantic refuses it. They validate as the real types.
    """
    from freezegun import api

    def datetime_schema(cls: type, source: Any, handler: Any) -> Any:
        return handler.generate_schema(api.real_datetime)

    def date_schema(cls: type, source: Any, handler: Any) -> Any:
        return handler.generate_schema(api.real_date)

    api.FakeDatetime.__get_pydantic_core_schema__ = classmethod(datetime_schema)  # type: ignore[attr-defined]
    api.FakeDate.__get_pydantic_core_schema__ = classmethod(date_schema)  # type: ignore[attr-defined]


class TimeMachineWallClock:
    """time-machine: patches the C-level clocks, so every thread agrees; fast to start."""

    name = "time-machine"

    def start(self, instant: dt.datetime) -> None:
        import time_machine

        self._travel = time_machine.travel(_naive_utc(instant), tick=False)
        self._traveller = self._travel.start()
        # Where the traveller stands, in nanoseconds since the epoch (time-machine 3.0 and
        # later). Set exactly: ``shift()`` in time-machine 3.0 goes through float seconds,
        # which can leave the clock a nanosecond short of a microsecond, and ``datetime.now()``
        # then truncates to the microsecond before.
        self._exact = isinstance(getattr(self._traveller, "_destination_timestamp_ns", None), int)

    def move_to(self, instant: dt.datetime, us: int | None = None) -> None:
        if us is None:
            us = to_us(instant)
        if self._exact:
            self._traveller._destination_timestamp_ns = us * 1000
        else:
            self._traveller.move_to(_naive_utc(instant))

    def stop(self) -> None:
        self._travel.stop()


def make_wall_clock(backend: str) -> WallClock:
    """The wall-clock backend called ``backend`` (``freezegun`` or ``time-machine``)."""
    if backend == "time-machine":
        return TimeMachineWallClock()
    return FreezegunWallClock()


_FOREIGN_FREEZERS = (
    ("freezegun.api", "_freeze_time", "freezegun.freeze_time"),
    ("time_machine", "travel", "time_machine.travel"),
)


def refuse_foreign_freezes(
    now: Callable[[], dt.datetime], error: type[Exception]
) -> Callable[[], None]:
    """Make ``freezegun.freeze_time`` and ``time_machine.travel`` raise ``error`` until undone.

    Started inside a test on virtual time, either would replace the virtual instant for
    ``datetime.now()`` and ``time.time()`` while the event loop and the scheduler's timers
    stay on the virtual clock: jobs would run at instants that mean nothing. Both start every
    freeze (context manager, decorator, ``start()``) through one ``start`` method, replaced at
    class level; the backend's own freeze is already running. ``now`` is the virtual instant,
    for the message. Returns the function that puts them back.
    """
    patched: list[tuple[type, Any]] = []
    for module_name, class_name, label in _FOREIGN_FREEZERS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if not isinstance(cls, type) or "start" not in vars(cls):
            continue

        def start(freezer: Any, *args: Any, label: str = label, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            raise error(_foreign_freeze_message(label, _destination(freezer), now()))

        patched.append((cls, vars(cls)["start"]))
        cls.start = start  # type: ignore[attr-defined]

    def restore() -> None:
        for cls, original in reversed(patched):
            cls.start = original
        patched.clear()

    return restore


def _destination(freezer: Any) -> dt.datetime | None:
    frozen = getattr(freezer, "time_to_freeze", None)  # freezegun: naive UTC
    if isinstance(frozen, dt.datetime):
        return frozen.replace(tzinfo=dt.timezone.utc)
    stamp = getattr(freezer, "destination_timestamp_ns", None)  # time-machine
    if isinstance(stamp, int):
        return from_us(stamp // 1000)
    seconds = getattr(freezer, "destination_timestamp", None)  # older time-machine releases
    if isinstance(seconds, (int, float)):
        return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
    return None


def _foreign_freeze_message(label: str, target: dt.datetime | None, now: dt.datetime) -> str:
    where = f" to {target.isoformat()}" if target is not None else ""
    move = ""
    if target is not None and target >= now:
        move = (
            f"await fastsched_clock.advance_to(datetime.fromisoformat({target.isoformat()!r})) "
            "(the jobs due on the way fire) or jump() there, or "
        )
    start = f'"{target.isoformat()}"' if target is not None else "..."
    return (
        f"{label}{where} was started during a test that uses fastsched_clock: it would "
        "override the virtual clock for datetime.now() and time.time() while the event loop "
        f"and the scheduler's timers stay at virtual {now.isoformat()}, so jobs would run at "
        f"the wrong instants. Move the virtual clock instead: {move}start the test there with "
        f"@pytest.mark.fastsched(start={start})."
    )


_FROZEN_CLASS_SIGNS = ("PydanticSchemaGenerationError", "metaclass conflict", "FakeDate")


def explain_frozen_import(fixture: str, error: BaseException) -> None:
    """Fail the set-up of ``fixture`` with the cause of ``error`` when it is freezegun's doing.

    While freezegun runs, ``datetime.datetime`` and ``datetime.date`` are its fake classes in
    every module: code that builds classes from them then (pydantic building a FastAPI app's
    models, a subclass of ``date``) fails. Returns when the error is something else.
    """
    __tracebackhide__ = True
    api = sys.modules.get("freezegun.api")
    if api is None or not getattr(api, "freeze_factories", None):
        return
    text = f"{type(error).__name__}: {error}"
    if not any(sign in text for sign in _FROZEN_CLASS_SIGNS):
        return
    raise pytest.fail.Exception(
        f"{fixture}: the app was imported or built while the virtual clock runs on freezegun, "
        "which then "
        "replaces datetime.datetime and datetime.date with fake classes in every module, so "
        "building classes from them fails (here: "
        f"{text.splitlines()[0][:200]}). Import the app's modules before the clock starts "
        "(at the top of conftest.py or the test module, and only call the factory in the "
        "fixture), or use the time-machine backend (fastsched_clock_backend = time-machine).",
        pytrace=False,
    ) from None

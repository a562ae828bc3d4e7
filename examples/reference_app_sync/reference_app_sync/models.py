"""The ``items`` table: one unit of background work and its status.

An item is created ``pending``. A processing run claims it (``processing``, ``attempts + 1``),
then stores either its result (``completed``, ``data``, ``processed_at``) or the reason it
failed (``error``, ``last_error``). The nightly retry job moves failed items with attempts left
back to ``pending``.

Every timestamp is a timezone-aware UTC ``datetime`` set in Python with
``datetime.now(timezone.utc)``, never the naive ``datetime.utcnow()``, and it reads back aware
on every database (see :class:`UTCDateTime`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal, get_args

from sqlalchemy import JSON, CheckConstraint, DateTime, Dialect, Index, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

PENDING = "pending"
PROCESSING = "processing"
COMPLETED = "completed"
ERROR = "error"
ItemStatus = Literal["pending", "processing", "completed", "error"]
"""The type of ``items.status``."""
STATUSES: tuple[str, ...] = get_args(ItemStatus)
"""Every value ``items.status`` may hold, in lifecycle order."""


def utc_now() -> datetime:
    """Return the current instant as an aware UTC datetime."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A ``TIMESTAMP WITH TIME ZONE`` that stores UTC and always reads back aware UTC.

    SQLite has no time zone type: SQLAlchemy writes the wall time and reads back a naive value.
    Converting to UTC on the way in and attaching UTC on the way out makes both databases
    behave alike. Naive values are refused, since their meaning is a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert an aware datetime to UTC; refuse a naive one."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"naive datetime {value.isoformat()!r} given to a UTC column: "
                f"use datetime.now(timezone.utc) or attach a tzinfo"
            )
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return the stored instant as an aware UTC datetime."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of the sync reference app's models."""


class Item(Base):
    """One unit of background work, moved through its statuses by the scheduled jobs."""

    __tablename__ = "items"
    __table_args__ = (
        CheckConstraint(
            "status IN (" + ", ".join(f"'{status}'" for status in STATUSES) + ")",
            name="ck_items_status",
        ),
        Index("ix_items_status_id", "status", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default=PENDING, server_default=PENDING)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utc_now, onupdate=utc_now)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


metadata = Base.metadata
"""The app's schema, for ``metadata.create_all()`` and for pytest-fastsched."""

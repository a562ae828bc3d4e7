"""The sync app of the soak suite: a BackgroundScheduler whose def jobs write rows through
SessionLocal, sleep in virtual time and do real work in their threads."""

import datetime as dt
import os
import threading
import time

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import String, create_engine, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    last_error: Mapped[str | None] = mapped_column(String(200))


class Tick(Base):
    __tablename__ = "ticks"
    id: Mapped[int] = mapped_column(primary_key=True)
    job: Mapped[str] = mapped_column(String(20))
    at: Mapped[str] = mapped_column(String(40))


# The production engine, on the suite's canary: the tests must never reach it.
PRODUCTION = os.environ["FASTSCHED_CANARY_URL"]
engine = create_engine(PRODUCTION.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg"))
SessionLocal = sessionmaker(bind=engine, expire_on_commit=False)
scheduler = BackgroundScheduler(timezone="UTC")
beats: list[dt.datetime] = []


def process_pending():
    with SessionLocal() as session:
        query = select(Item.id).where(Item.status == "pending").order_by(Item.id)
        ids = list(session.scalars(query).all())
    for item_id in ids:
        with SessionLocal() as session:
            session.execute(update(Item).where(Item.id == item_id).values(status="processing"))
            session.commit()
        time.sleep(1)
        status, error = (
            ("error", f"unlucky {item_id}") if item_id % 7 == 0 else ("completed", None)
        )
        with SessionLocal() as session:
            session.execute(
                update(Item).where(Item.id == item_id).values(status=status, last_error=error)
            )
            session.commit()


def report():
    _tick("report-start")
    time.sleep(90)
    _tick("report-end")


def _tick(job):
    with SessionLocal() as session:
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        session.add(Tick(job=job, at=now))
        session.commit()


def beat():
    threading.Event().wait(0.001)  # real work in the thread (time.sleep would be virtual)
    beats.append(dt.datetime.now(dt.timezone.utc))


def explode():
    _tick("explode")
    raise RuntimeError("exploded on purpose")


scheduler.add_job(process_pending, "interval", minutes=5, id="process")
scheduler.add_job(report, "cron", minute="17,47", id="report")
scheduler.add_job(beat, "interval", minutes=10, id="beat")

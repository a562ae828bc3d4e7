"""The app of the soak suite: jobs that write rows, sleep in virtual time and run in threads."""

import asyncio
import datetime as dt
import os
import threading

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import String, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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
engine = create_async_engine(os.environ["FASTSCHED_CANARY_URL"])
async_session_factory = async_sessionmaker(engine, expire_on_commit=False)
scheduler = AsyncIOScheduler(timezone="UTC")
beats: list[dt.datetime] = []


async def process_pending():
    async with async_session_factory() as session:
        query = select(Item.id).where(Item.status == "pending").order_by(Item.id)
        ids = list((await session.scalars(query)).all())
    for item_id in ids:
        async with async_session_factory() as session:
            await session.execute(
                update(Item).where(Item.id == item_id).values(status="processing")
            )
            await session.commit()
        await asyncio.sleep(1)
        status, error = (
            ("error", f"unlucky {item_id}") if item_id % 7 == 0 else ("completed", None)
        )
        async with async_session_factory() as session:
            await session.execute(
                update(Item).where(Item.id == item_id).values(status=status, last_error=error)
            )
            await session.commit()


async def report():
    await _tick("report-start")
    await asyncio.sleep(90)
    await _tick("report-end")


async def _tick(job):
    async with async_session_factory() as session:
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        session.add(Tick(job=job, at=now))
        await session.commit()


def beat():
    threading.Event().wait(0.001)  # real work in the thread (time.sleep would be virtual)
    beats.append(dt.datetime.now(dt.timezone.utc))


async def explode():
    await _tick("explode")
    raise RuntimeError("exploded on purpose")


scheduler.add_job(process_pending, "interval", minutes=5, id="process")
scheduler.add_job(report, "cron", minute="17,47", id="report")
scheduler.add_job(beat, "interval", minutes=10, id="beat")

"""The app whose schema the Alembic project builds: its models map fewer columns."""

import enum
import os

from sqlalchemy import Enum, ForeignKey, String, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class JobStatus(enum.Enum):
    pending = "pending"
    processing = "processing"
    completed = "completed"
    error = "error"


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, name="job_status"), default=JobStatus.pending
    )
    last_error: Mapped[str | None] = mapped_column(String(200))


# The production engine, on the suite's canary: the tests must never reach it.
engine = create_async_engine(os.environ["FASTSCHED_CANARY_URL"])
async_session_factory = async_sessionmaker(engine, expire_on_commit=False)


async def complete_pending() -> list[int]:
    """The app's job: every pending job of every tenant becomes completed."""
    async with async_session_factory() as session:
        jobs = (await session.scalars(select(Job).where(Job.status == JobStatus.pending))).all()
        for job in jobs:
            job.status = JobStatus.completed
        await session.commit()
        return [job.id for job in jobs]

"""Tenants and their jobs, with a PostgreSQL enum type for the job status.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JOB_STATUS = sa.Enum("pending", "processing", "completed", "error", name="job_status")


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50), nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("status", JOB_STATUS, nullable=False, server_default="pending"),
        sa.Column("last_error", sa.String(200)),
    )


def downgrade() -> None:
    op.drop_table("jobs")
    op.drop_table("tenants")
    JOB_STATUS.drop(op.get_bind(), checkfirst=True)

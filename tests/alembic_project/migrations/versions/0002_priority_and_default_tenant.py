"""A job priority the models do not map, and the default tenant every job belongs to.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("priority", sa.Integer, nullable=False, server_default="0"))
    tenants = sa.table("tenants", sa.column("id", sa.Integer), sa.column("name", sa.String))
    op.bulk_insert(tenants, [{"id": 1, "name": "default"}])


def downgrade() -> None:
    op.execute("DELETE FROM tenants WHERE id = 1")
    op.drop_column("jobs", "priority")

"""variants, run priority, cancelled jobs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 19:03:32.459640
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = "'pending', 'queued', 'running', 'done', 'failed', 'blocked'"
NEW_STATUSES = OLD_STATUSES + ", 'cancelled'"


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("variant", sa.String(length=500), server_default="", nullable=False)
        )
        # Autogenerate does not compare CHECK constraints: this one is written by hand.
        batch_op.drop_constraint(op.f("ck_jobs_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_jobs_status"), f"status IN ({NEW_STATUSES})")

    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("priority")

    op.execute("UPDATE jobs SET status = 'failed' WHERE status = 'cancelled'")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_jobs_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_jobs_status"), f"status IN ({OLD_STATUSES})")
        batch_op.drop_column("variant")

"""dead jobs, dropped flagged images

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 09:12:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = "'pending', 'queued', 'running', 'done', 'failed', 'blocked', 'cancelled'"
NEW_STATUSES = "'pending', 'queued', 'running', 'done', 'failed', 'dead', 'blocked', 'cancelled'"
STORED_UNLESS_FLAGGED = "storage_key <> '' OR safety = 'flagged'"


def upgrade() -> None:
    # Autogenerate does not compare CHECK constraints: both changes are written by hand.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_jobs_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_jobs_status"), f"status IN ({NEW_STATUSES})")

    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.create_check_constraint(
            op.f("ck_images_stored_unless_flagged"), STORED_UNLESS_FLAGGED
        )


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_images_stored_unless_flagged"), type_="check")

    op.execute("UPDATE jobs SET status = 'failed' WHERE status = 'dead'")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_jobs_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_jobs_status"), f"status IN ({OLD_STATUSES})")

"""image model identity, library versions, safety score, thumbnails

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 22:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    json_type = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("safety_score", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("thumbnail_key", sa.String(length=500), nullable=True))
        batch_op.add_column(sa.Column("model_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("versions", json_type, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("versions")
        batch_op.drop_column("model_sha256")
        batch_op.drop_column("thumbnail_key")
        batch_op.drop_column("safety_score")

"""input images, job kinds and options

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 01:24:08.388424
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS = "kind IN ('txt2img', 'img2img', 'inpaint', 'controlnet')"


def upgrade() -> None:
    json_type = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
    op.create_table(
        "input_images",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("storage_key", sa.String(length=500), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("bytes > 0", name=op.f("ck_input_images_bytes_positive")),
        sa.CheckConstraint("width > 0 AND height > 0", name=op.f("ck_input_images_size")),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_input_images")),
    )
    op.create_table(
        "input_sources",
        sa.Column("source", sa.String(length=2000), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["sha256"],
            ["input_images.sha256"],
            name=op.f("fk_input_sources_sha256_input_images"),
        ),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_input_sources")),
    )
    op.create_index(op.f("ix_input_sources_sha256"), "input_sources", ["sha256"], unique=False)
    # Batch mode: SQLite can add foreign keys and CHECKs only by rebuilding the table.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), server_default="txt2img", nullable=False)
        )
        batch_op.add_column(sa.Column("input_image", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("mask_image", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("options", json_type, nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_jobs_input_image_input_images"),
            "input_images",
            ["input_image"],
            ["sha256"],
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_jobs_mask_image_input_images"),
            "input_images",
            ["mask_image"],
            ["sha256"],
        )
        batch_op.create_check_constraint(batch_op.f("ck_jobs_kind"), KINDS)
        batch_op.create_check_constraint(
            batch_op.f("ck_jobs_kind_has_image"), "kind = 'txt2img' OR input_image IS NOT NULL"
        )
        batch_op.create_check_constraint(
            batch_op.f("ck_jobs_mask_only_inpaint"), "kind = 'inpaint' OR mask_image IS NULL"
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_jobs_mask_only_inpaint"), type_="check")
        batch_op.drop_constraint(batch_op.f("ck_jobs_kind_has_image"), type_="check")
        batch_op.drop_constraint(batch_op.f("ck_jobs_kind"), type_="check")
        batch_op.drop_constraint(batch_op.f("fk_jobs_mask_image_input_images"), type_="foreignkey")
        batch_op.drop_constraint(batch_op.f("fk_jobs_input_image_input_images"), type_="foreignkey")
        batch_op.drop_column("options")
        batch_op.drop_column("mask_image")
        batch_op.drop_column("input_image")
        batch_op.drop_column("kind")
    op.drop_index(op.f("ix_input_sources_sha256"), table_name="input_sources")
    op.drop_table("input_sources")
    op.drop_table("input_images")

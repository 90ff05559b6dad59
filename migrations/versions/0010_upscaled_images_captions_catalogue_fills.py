"""finishing: upscaled copies of keepers, their captions and alt text, filled catalogue fields

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "catalogue_fills",
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("field", sa.String(length=200), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_catalogue_fills_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["catalogue_items.id"],
            name=op.f("fk_catalogue_fills_item_id_catalogue_items"),
        ),
        sa.PrimaryKeyConstraint("item_id", "field", name=op.f("pk_catalogue_fills")),
    )
    op.create_index(
        op.f("ix_catalogue_fills_image_id"), "catalogue_fills", ["image_id"], unique=False
    )
    op.create_table(
        "image_captions",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("caption", sa.Text(), nullable=False),
        sa.Column("alt_text", sa.Text(), nullable=False),
        sa.Column("captioner", sa.String(length=64), nullable=False),
        sa.Column("captioner_name", sa.String(length=500), nullable=False),
        sa.Column("prompt", sa.Text(), server_default="", nullable=False),
        sa.Column(
            "versions",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_image_captions_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_image_captions")),
    )
    op.create_table(
        "upscaled_images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("storage_key", sa.String(length=500), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("scale", sa.Integer(), nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=500), nullable=False),
        sa.Column("tile", sa.Integer(), nullable=False),
        sa.Column("tile_overlap", sa.Integer(), nullable=False),
        sa.Column(
            "versions",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("bytes > 0", name=op.f("ck_upscaled_images_bytes_positive")),
        sa.CheckConstraint("scale IN (2, 4)", name=op.f("ck_upscaled_images_scale")),
        sa.CheckConstraint("width > 0 AND height > 0", name=op.f("ck_upscaled_images_size")),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_upscaled_images_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_upscaled_images")),
        sa.UniqueConstraint(
            "image_id",
            "scale",
            "model_sha256",
            name=op.f("uq_upscaled_images_image_id_scale_model_sha256"),
        ),
        sa.UniqueConstraint("storage_key", name=op.f("uq_upscaled_images_storage_key")),
    )


def downgrade() -> None:
    op.drop_table("upscaled_images")
    op.drop_table("image_captions")
    op.drop_index(op.f("ix_catalogue_fills_image_id"), table_name="catalogue_fills")
    op.drop_table("catalogue_fills")

"""scores, keeper models, predictions, automatic rejections, skipped seeds

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 22:34:31.075126
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "keeper_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("scorer", sa.String(length=64), nullable=False),
        sa.Column("trained_on", sa.Integer(), nullable=False),
        sa.Column("held_out", sa.Integer(), nullable=False),
        sa.Column("auc", sa.Float(), nullable=True),
        sa.Column("decisions_seen", sa.Integer(), nullable=False),
        sa.Column(
            "parameters",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "auc IS NULL OR (auc >= 0 AND auc <= 1)", name=op.f("ck_keeper_models_auc_range")
        ),
        sa.CheckConstraint("held_out >= 0", name=op.f("ck_keeper_models_held_out_non_negative")),
        sa.CheckConstraint("trained_on > 0", name=op.f("ck_keeper_models_trained_on_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keeper_models")),
        sa.UniqueConstraint("source", "version", name=op.f("uq_keeper_models_source_version")),
    )
    op.create_table(
        "auto_rejects",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("review_item_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("undone_by", sa.Integer(), nullable=True),
        sa.Column("undone_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(undone_by IS NULL) = (undone_at IS NULL)", name=op.f("ck_auto_rejects_undo_has_time")
        ),
        sa.CheckConstraint(
            "probability >= 0 AND probability <= 1", name=op.f("ck_auto_rejects_probability_range")
        ),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_auto_rejects_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["keeper_models.id"],
            name=op.f("fk_auto_rejects_model_id_keeper_models"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["review_item_id"],
            ["review_items.id"],
            name=op.f("fk_auto_rejects_review_item_id_review_items"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_auto_rejects_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["undone_by"], ["reviewers.id"], name=op.f("fk_auto_rejects_undone_by_reviewers")
        ),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_auto_rejects")),
    )
    with op.batch_alter_table("auto_rejects", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_auto_rejects_review_item_id"), ["review_item_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_auto_rejects_run_id_undone_at"), ["run_id", "undone_at"], unique=False
        )

    op.create_table(
        "image_scores",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("scorer", sa.String(length=64), nullable=False),
        sa.Column("clip_score", sa.Float(), nullable=False),
        sa.Column("aesthetic_score", sa.Float(), nullable=True),
        sa.Column("image_similarity", sa.Float(), nullable=True),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "clip_score >= -1 AND clip_score <= 1", name=op.f("ck_image_scores_clip_score_cosine")
        ),
        sa.CheckConstraint(
            "image_similarity IS NULL OR (image_similarity >= -1 AND image_similarity <= 1)",
            name=op.f("ck_image_scores_image_similarity_cosine"),
        ),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_image_scores_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_image_scores")),
    )
    with op.batch_alter_table("image_scores", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_image_scores_scorer"), ["scorer"], unique=False)

    op.create_table(
        "keeper_predictions",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "probability >= 0 AND probability <= 1",
            name=op.f("ck_keeper_predictions_probability_range"),
        ),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_keeper_predictions_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["keeper_models.id"],
            name=op.f("fk_keeper_predictions_model_id_keeper_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_keeper_predictions")),
    )
    with op.batch_alter_table("keeper_predictions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_keeper_predictions_model_id"), ["model_id"], unique=False
        )

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "skipped_seeds",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("skipped_seeds")

    with op.batch_alter_table("keeper_predictions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_keeper_predictions_model_id"))

    op.drop_table("keeper_predictions")
    with op.batch_alter_table("image_scores", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_image_scores_scorer"))

    op.drop_table("image_scores")
    with op.batch_alter_table("auto_rejects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_auto_rejects_run_id_undone_at"))
        batch_op.drop_index(batch_op.f("ix_auto_rejects_review_item_id"))

    op.drop_table("auto_rejects")
    op.drop_table("keeper_models")

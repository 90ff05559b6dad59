"""review: reviewers, the review queue (claims), decisions and their audit log

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 21:56:16.754443
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # CHECK constraints are written out here by hand: autogenerate does not compare them, and
    # tests/db/test_migrations.py holds them to the models' values.
    op.create_table(
        "reviewers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=False),
        sa.Column("is_admin", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviewers")),
        sa.UniqueConstraint("name", name=op.f("uq_reviewers_name")),
    )
    op.create_table(
        "review_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="open", nullable=False),
        sa.Column("claimed_by", sa.Integer(), nullable=True),
        sa.Column("claim_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rerolls", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("submitted_by", sa.Integer(), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('open', 'rerolling', 'done')", name=op.f("ck_review_items_status")
        ),
        sa.CheckConstraint(
            "(claimed_by IS NULL) = (claim_expires_at IS NULL)",
            name=op.f("ck_review_items_claim_has_expiry"),
        ),
        sa.CheckConstraint("rerolls >= 0", name=op.f("ck_review_items_rerolls_non_negative")),
        sa.ForeignKeyConstraint(
            ["claimed_by"], ["reviewers.id"], name=op.f("fk_review_items_claimed_by_reviewers")
        ),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["catalogue_items.id"],
            name=op.f("fk_review_items_item_id_catalogue_items"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_review_items_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["submitted_by"], ["reviewers.id"], name=op.f("fk_review_items_submitted_by_reviewers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_items")),
        sa.UniqueConstraint("run_id", "item_id", name=op.f("uq_review_items_run_id_item_id")),
    )
    op.create_index(
        op.f("ix_review_items_claimed_by"), "review_items", ["claimed_by"], unique=False
    )
    op.create_index(
        op.f("ix_review_items_run_id_status_id"),
        "review_items",
        ["run_id", "status", "id"],
        unique=False,
    )
    op.create_table(
        "review_sync",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("run_finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_review_sync_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_review_sync")),
    )
    op.create_table(
        "image_reviews",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("review_item_id", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("reviewer_id", sa.Integer(), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "decision IN ('keep', 'reject')", name=op.f("ck_image_reviews_decision")
        ),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_image_reviews_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["review_item_id"],
            ["review_items.id"],
            name=op.f("fk_image_reviews_review_item_id_review_items"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["reviewer_id"], ["reviewers.id"], name=op.f("fk_image_reviews_reviewer_id_reviewers")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_image_reviews_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_image_reviews")),
    )
    op.create_index(
        op.f("ix_image_reviews_review_item_id"), "image_reviews", ["review_item_id"], unique=False
    )
    op.create_index(
        op.f("ix_image_reviews_run_id_decision"),
        "image_reviews",
        ["run_id", "decision"],
        unique=False,
    )
    op.create_table(
        "review_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("review_item_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("reviewer_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("previous", sa.String(length=16), nullable=True),
        sa.Column("undone", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "action IN ('keep', 'reject', 'undo', 'submit', 'reroll')",
            name=op.f("ck_review_events_action"),
        ),
        sa.CheckConstraint(
            "previous IS NULL OR previous IN ('keep', 'reject')",
            name=op.f("ck_review_events_previous_decision"),
        ),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_review_events_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["review_item_id"],
            ["review_items.id"],
            name=op.f("fk_review_events_review_item_id_review_items"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["reviewer_id"], ["reviewers.id"], name=op.f("fk_review_events_reviewer_id_reviewers")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_review_events_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_events")),
    )
    op.create_index(
        op.f("ix_review_events_review_item_id_id"),
        "review_events",
        ["review_item_id", "id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_review_events_run_id_reviewer_id_created_at"),
        "review_events",
        ["run_id", "reviewer_id", "created_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_review_events_run_id_reviewer_id_created_at"), table_name="review_events"
    )
    op.drop_index(op.f("ix_review_events_review_item_id_id"), table_name="review_events")
    op.drop_table("review_events")
    op.drop_index(op.f("ix_image_reviews_run_id_decision"), table_name="image_reviews")
    op.drop_index(op.f("ix_image_reviews_review_item_id"), table_name="image_reviews")
    op.drop_table("image_reviews")
    op.drop_table("review_sync")
    op.drop_index(op.f("ix_review_items_run_id_status_id"), table_name="review_items")
    op.drop_index(op.f("ix_review_items_claimed_by"), table_name="review_items")
    op.drop_table("review_items")
    op.drop_table("reviewers")

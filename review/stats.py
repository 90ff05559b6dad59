"""Per-run review figures: progress, keep rates per template and variant, reviewer speed, and
what a keeper costs (db.keeper_costs: GPU- and reviewer-seconds, early stop's savings, the
model's auto-rejects, keeper recall in the ranking's top k)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from db.keeper_costs import REVIEW_GAP_CAP_SECONDS, RunCosts, reviewer_times, run_costs
from db.models import Decision, Image, ImageReview, Job, ReviewItem, Run, SafetyStatus

# A pause longer than this between two of a reviewer's events is a break, not review time: it
# counts as this long, in decisions per hour and in reviewer-seconds per keeper alike.
IDLE_GAP_SECONDS = REVIEW_GAP_CAP_SECONDS
# Decisions per hour are not shown before this much review time: two decisions a second apart
# would read as 7,200 an hour.
MIN_RATE_SECONDS = 300.0


def rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@dataclass
class KeepRate:
    images: int = 0
    reviewed: int = 0
    kept: int = 0

    @property
    def keep_rate(self) -> float | None:
        """Kept images over reviewed images (None before any review)."""
        return rate(self.kept, self.reviewed)

    def add(self, other: KeepRate) -> None:
        self.images += other.images
        self.reviewed += other.reviewed
        self.kept += other.kept


@dataclass
class ReviewerSpeed:
    name: str
    decisions: int
    active_seconds: float

    @property
    def decisions_per_hour(self) -> float | None:
        """None until MIN_RATE_SECONDS of review time make the figure mean something."""
        if self.active_seconds < MIN_RATE_SECONDS:
            return None
        return self.decisions * 3600.0 / self.active_seconds


@dataclass
class RunStats:
    run_id: int
    run_name: str
    totals: KeepRate
    flagged: int
    items: dict[str, int]
    costs: RunCosts
    templates: dict[str, KeepRate] = field(default_factory=dict)
    variants: dict[tuple[str, str], KeepRate] = field(default_factory=dict)
    reviewers: list[ReviewerSpeed] = field(default_factory=list)


def run_stats(session: Session, run: Run) -> RunStats:
    kept = func.sum(case((ImageReview.decision == Decision.KEEP, 1), else_=0))
    flagged = func.sum(case((Image.safety == SafetyStatus.FLAGGED, 1), else_=0))
    rows = session.execute(
        select(
            Job.template,
            Job.variant,
            func.count(Image.id),
            func.count(ImageReview.image_id),
            func.coalesce(kept, 0),
            func.coalesce(flagged, 0),
        )
        .select_from(Image)
        .join(Job, Job.id == Image.job_id)
        .outerjoin(ImageReview, ImageReview.image_id == Image.id)
        .where(Job.run_id == run.id)
        .group_by(Job.template, Job.variant)
        .order_by(Job.template, Job.variant)
    ).all()
    totals = KeepRate()
    flagged_total = 0
    templates: dict[str, KeepRate] = {}
    variants: dict[tuple[str, str], KeepRate] = {}
    for template, variant, images, reviewed, kept_count, flagged_count in rows:
        figures = KeepRate(int(images), int(reviewed), int(kept_count))
        variants[(template, variant)] = figures
        templates.setdefault(template, KeepRate()).add(figures)
        totals.add(figures)
        flagged_total += int(flagged_count)
    items = dict(
        session.execute(
            select(ReviewItem.status, func.count())
            .where(ReviewItem.run_id == run.id)
            .group_by(ReviewItem.status)
        ).all()
    )
    return RunStats(
        run_id=run.id,
        run_name=run.name,
        totals=totals,
        flagged=flagged_total,
        items={status: int(count) for status, count in items.items()},
        templates=templates,
        variants=variants,
        reviewers=reviewer_speeds(session, run.id),
        costs=run_costs(session, run.id),
    )


def reviewer_speeds(
    session: Session, run_id: int, reviewer_id: int | None = None
) -> list[ReviewerSpeed]:
    """Decisions (keep or reject) per reviewer (or of one) and their review time: the gaps
    between consecutive events of theirs in the run (every action), each capped at
    IDLE_GAP_SECONDS (db.keeper_costs defines it, for reviewer-seconds per keeper too)."""
    return [
        ReviewerSpeed(time.name, time.decisions, time.seconds)
        for time in reviewer_times(session, run_id, reviewer_id)
    ]

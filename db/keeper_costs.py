"""What a keeper costs, per run and per (template, variant): the review app's stats,
`pixelmill status` and the exporter read these figures from here, so all three agree.

- **GPU-seconds** are the images' ``render_seconds`` (each image's share of its batch's render
  time), every image of the run counted, flagged ones too: they took the GPU as long. Per
  keeper they are all the GPU-seconds spent so far over the keepers found so far, so the
  figure runs high until the run's review is done (unreviewed images hold keepers not yet
  found); items are reviewed whole, so templates stay comparable meanwhile.
- **Keepers** and rejects are people's decisions (``image_reviews``). A model's automatic
  rejection (``auto_rejects``) is counted apart, never as a decision, and costs no
  reviewer-seconds; one a person undid or overrode by deciding the image is not counted.
- **Reviewer-seconds**: a reviewer's events in a run (every action: keep, reject, undo,
  submit, re-roll), in time order; each costs the time since that reviewer's previous event
  in the run, capped at REVIEW_GAP_CAP_SECONDS (a longer pause is a break and costs the cap);
  a reviewer's first event in the run costs nothing. The seconds belong to the event's item;
  an item's seconds are shared equally among the item's images people decided, which is how
  a template and variant get theirs (the run's total also holds items without decisions).
- **GPU-seconds saved** by early stop: each job's skipped seeds times the job's mean
  ``render_seconds``, or where the job rendered none, the mean of the run's images rendered
  with the same model, steps and size (as the worker reports it); nothing when neither exists.
- **Keeper recall in the top k**: of the kept images with a predicted keep probability, the
  share ranked within the first k of their item's grid by that probability (best first, ties
  in image order, flagged images left out as the grid hides them). It reads the latest
  predictions, which a model trained on these very decisions has seen: the keeper model's
  held-out AUC is the unflattered figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from sqlalchemy import ColumnElement, Float, and_, case, cast, exists, func, select
from sqlalchemy.orm import Session

from db.keep_rates import keep_records_by_run
from db.models import (
    Decision,
    Image,
    ImageReview,
    Job,
    ReviewAction,
    Reviewer,
    ReviewEvent,
    SafetyStatus,
)
from db.ranking import AutoReject, KeeperPrediction

# A pause between two of a reviewer's events longer than this is a break: it counts as this.
REVIEW_GAP_CAP_SECONDS = 300.0
# How many of an item's best-ranked images keeper recall looks at: about one row of the grid.
RECALL_TOP_K = 4

Arm = tuple[str, str]  # (template, variant)


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


@dataclass
class CostFigures:
    """The costs of one (template, variant), one template, or one run."""

    images: int = 0
    gpu_seconds: float = 0.0
    kept: int = 0
    rejected: int = 0  # by people
    auto_rejected: int = 0  # by the keeper model, still standing
    reviewer_seconds: float = 0.0
    skipped_seeds: int = 0
    gpu_seconds_saved: float = 0.0
    ranked_keepers: int = 0  # kept images with a predicted probability
    keepers_in_top_k: int = 0

    @property
    def gpu_seconds_per_image(self) -> float | None:
        return _ratio(self.gpu_seconds, self.images)

    @property
    def gpu_seconds_per_keeper(self) -> float | None:
        return _ratio(self.gpu_seconds, self.kept)

    @property
    def reviewer_seconds_per_keeper(self) -> float | None:
        return _ratio(self.reviewer_seconds, self.kept)

    @property
    def keeper_recall(self) -> float | None:
        """None until a kept image has a prediction to be ranked by."""
        return _ratio(self.keepers_in_top_k, self.ranked_keepers)

    def add(self, other: CostFigures) -> None:
        for name in (f.name for f in fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class RunCosts:
    run_id: int
    top_k: int
    total: CostFigures = field(default_factory=CostFigures)
    variants: dict[Arm, CostFigures] = field(default_factory=dict)

    @property
    def templates(self) -> dict[str, CostFigures]:
        merged: dict[str, CostFigures] = {}
        for (template, _variant), figures in sorted(self.variants.items()):
            merged.setdefault(template, CostFigures()).add(figures)
        return merged

    def arm(self, template: str, variant: str) -> CostFigures:
        return self.variants.setdefault((template, variant), CostFigures())


@dataclass(frozen=True)
class ReviewerTime:
    name: str
    decisions: int  # keep and reject events, undone ones included
    seconds: float


def run_costs(session: Session, run_id: int, *, top_k: int = RECALL_TOP_K) -> RunCosts:
    return runs_costs(session, [run_id], top_k=top_k)[run_id]


def runs_costs(
    session: Session, run_ids: Sequence[int], *, top_k: int = RECALL_TOP_K
) -> dict[int, RunCosts]:
    """The costs of several runs, each figure read by one grouped query over all of them."""
    ids = list(run_ids)
    costs = {run_id: RunCosts(run_id, top_k) for run_id in ids}
    if not ids:
        return costs
    _read_gpu(session, costs, ids)
    for run_id, records in keep_records_by_run(session, ids).items():
        for (template, variant), record in records.items():
            figures = costs[run_id].arm(template, variant)
            figures.kept, figures.rejected = record.kept, record.rejected
    _read_auto_rejects(session, costs, ids)
    _read_skipped(session, costs, ids)
    _read_recall(session, costs, ids, top_k)
    _read_reviewer_seconds(session, costs, ids)
    for run in costs.values():
        reviewer_seconds = run.total.reviewer_seconds  # the run's own, items without decisions in
        for figures in run.variants.values():
            run.total.add(figures)
        run.total.reviewer_seconds = reviewer_seconds
    return costs


def _read_gpu(session: Session, costs: dict[int, RunCosts], ids: list[int]) -> None:
    rows = session.execute(
        select(
            Job.run_id,
            Job.template,
            Job.variant,
            func.count(Image.id),
            func.coalesce(func.sum(Image.render_seconds), 0.0),
        )
        .join(Job, Job.id == Image.job_id)
        .where(Job.run_id.in_(ids))
        .group_by(Job.run_id, Job.template, Job.variant)
    )
    for run_id, template, variant, images, seconds in rows:
        figures = costs[run_id].arm(template, variant)
        figures.images, figures.gpu_seconds = int(images), float(seconds)


def _read_auto_rejects(session: Session, costs: dict[int, RunCosts], ids: list[int]) -> None:
    person_decided = exists().where(ImageReview.image_id == AutoReject.image_id)
    rows = session.execute(
        select(AutoReject.run_id, Job.template, Job.variant, func.count())
        .join(Image, Image.id == AutoReject.image_id)
        .join(Job, Job.id == Image.job_id)
        .where(AutoReject.run_id.in_(ids), AutoReject.undone_at.is_(None), ~person_decided)
        .group_by(AutoReject.run_id, Job.template, Job.variant)
    )
    for run_id, template, variant, count in rows:
        costs[run_id].arm(template, variant).auto_rejected = int(count)


def json_array_length(session: Session, column: Any) -> ColumnElement[int]:
    """Length of a JSON array column, 0 for anything else: SQL NULL, and a JSON null (what an
    explicit None stores), which the databases' own array length functions refuse."""
    if session.get_bind().dialect.name == "postgresql":
        return case(
            (func.jsonb_typeof(column) == "array", func.jsonb_array_length(column)), else_=0
        )
    return case((func.json_type(column) == "array", func.json_array_length(column)), else_=0)


def _read_skipped(session: Session, costs: dict[int, RunCosts], ids: list[int]) -> None:
    skipped = json_array_length(session, Job.skipped_seeds)
    own_mean = (
        select(Image.job_id, func.avg(Image.render_seconds).label("mean"))
        .join(Job, Job.id == Image.job_id)
        .where(Job.run_id.in_(ids), Job.skipped_seeds.is_not(None))
        .group_by(Image.job_id)
        .subquery()
    )
    alike = (Job.run_id, Job.model, Job.steps, Job.width, Job.height)
    alike_mean = (
        select(*alike, func.avg(Image.render_seconds).label("mean"))
        .join(Image, Image.job_id == Job.id)
        .where(Job.run_id.in_(ids))
        .group_by(*alike)
        .subquery()
    )
    mean = func.coalesce(own_mean.c.mean, alike_mean.c.mean, 0.0)
    rows = session.execute(
        select(
            Job.run_id,
            Job.template,
            Job.variant,
            func.coalesce(func.sum(skipped), 0),
            func.coalesce(func.sum(skipped * mean), 0.0),
        )
        .outerjoin(own_mean, own_mean.c.job_id == Job.id)
        .outerjoin(
            alike_mean,
            and_(*(alike_mean.c[column.key] == column for column in alike)),
        )
        .where(Job.run_id.in_(ids), Job.skipped_seeds.is_not(None))
        .group_by(Job.run_id, Job.template, Job.variant)
    )
    for run_id, template, variant, seeds, saved in rows:
        if int(seeds):
            figures = costs[run_id].arm(template, variant)
            figures.skipped_seeds, figures.gpu_seconds_saved = int(seeds), float(saved)


def _read_recall(session: Session, costs: dict[int, RunCosts], ids: list[int], top_k: int) -> None:
    rank = func.row_number().over(
        partition_by=(Job.run_id, Job.item_id),
        order_by=(KeeperPrediction.probability.desc(), Image.id),
    )
    ranked = (
        select(
            Image.id.label("image_id"),
            Job.run_id,
            Job.template,
            Job.variant,
            rank.label("rank"),
        )
        .join(Job, Job.id == Image.job_id)
        .join(KeeperPrediction, KeeperPrediction.image_id == Image.id)
        .where(Job.run_id.in_(ids), Image.safety != SafetyStatus.FLAGGED)
        .subquery()
    )
    in_top = func.sum(case((ranked.c.rank <= top_k, 1), else_=0))
    rows = session.execute(
        select(ranked.c.run_id, ranked.c.template, ranked.c.variant, func.count(), in_top)
        .join(ImageReview, ImageReview.image_id == ranked.c.image_id)
        .where(ImageReview.decision == Decision.KEEP)
        .group_by(ranked.c.run_id, ranked.c.template, ranked.c.variant)
    )
    for run_id, template, variant, keepers, top in rows:
        figures = costs[run_id].arm(template, variant)
        figures.ranked_keepers, figures.keepers_in_top_k = int(keepers), int(top or 0)


def _event_charges(session: Session, ids: list[int]) -> Any:
    """Every review event of the runs with the seconds it costs (the module's definition)."""
    previous = func.lag(ReviewEvent.created_at).over(
        partition_by=(ReviewEvent.run_id, ReviewEvent.reviewer_id),
        order_by=(ReviewEvent.created_at, ReviewEvent.id),
    )
    events = (
        select(
            ReviewEvent.run_id,
            ReviewEvent.review_item_id,
            ReviewEvent.reviewer_id,
            ReviewEvent.action,
            ReviewEvent.created_at.label("at"),
            previous.label("previous_at"),
        )
        .where(ReviewEvent.run_id.in_(ids))
        .subquery()
    )
    if session.get_bind().dialect.name == "postgresql":
        gap: Any = func.extract("epoch", events.c.at - events.c.previous_at)
        capped = func.least(gap, REVIEW_GAP_CAP_SECONDS)
    else:  # SQLite: julian days; its two-argument min() is a scalar
        gap = (func.julianday(events.c.at) - func.julianday(events.c.previous_at)) * 86400.0
        capped = func.min(gap, REVIEW_GAP_CAP_SECONDS)
    seconds = cast(case((events.c.previous_at.is_(None), 0.0), else_=capped), Float)
    return select(
        events.c.run_id,
        events.c.review_item_id,
        events.c.reviewer_id,
        events.c.action,
        seconds.label("seconds"),
    ).subquery()


def _read_reviewer_seconds(session: Session, costs: dict[int, RunCosts], ids: list[int]) -> None:
    charges = _event_charges(session, ids)
    for run_id, seconds in session.execute(
        select(charges.c.run_id, func.sum(charges.c.seconds)).group_by(charges.c.run_id)
    ):
        costs[run_id].total.reviewer_seconds = float(seconds or 0.0)
    item_seconds = (
        select(charges.c.review_item_id, func.sum(charges.c.seconds).label("seconds"))
        .group_by(charges.c.review_item_id)
        .subquery()
    )
    decided = (
        select(
            ImageReview.run_id,
            ImageReview.review_item_id,
            Job.template,
            Job.variant,
            func.count().label("images"),
        )
        .join(Image, Image.id == ImageReview.image_id)
        .join(Job, Job.id == Image.job_id)
        .where(ImageReview.run_id.in_(ids))
        .group_by(ImageReview.run_id, ImageReview.review_item_id, Job.template, Job.variant)
        .subquery()
    )
    per_item = (
        select(ImageReview.review_item_id, func.count().label("images"))
        .where(ImageReview.run_id.in_(ids))
        .group_by(ImageReview.review_item_id)
        .subquery()
    )
    share = item_seconds.c.seconds * cast(decided.c.images, Float) / per_item.c.images
    rows = session.execute(
        select(decided.c.run_id, decided.c.template, decided.c.variant, func.sum(share))
        .join(item_seconds, item_seconds.c.review_item_id == decided.c.review_item_id)
        .join(per_item, per_item.c.review_item_id == decided.c.review_item_id)
        .group_by(decided.c.run_id, decided.c.template, decided.c.variant)
    )
    for run_id, template, variant, seconds in rows:
        costs[run_id].arm(template, variant).reviewer_seconds = float(seconds or 0.0)


def reviewer_times(
    session: Session, run_id: int, reviewer_id: int | None = None
) -> list[ReviewerTime]:
    """Each reviewer's (or one's) decisions and reviewer-seconds in a run, by name."""
    charges = _event_charges(session, [run_id])
    is_decision = case((charges.c.action.in_([ReviewAction.KEEP, ReviewAction.REJECT]), 1), else_=0)
    statement = (
        select(Reviewer.name, func.sum(is_decision), func.sum(charges.c.seconds))
        .join(Reviewer, Reviewer.id == charges.c.reviewer_id)
        .group_by(Reviewer.name)
        .order_by(Reviewer.name)
    )
    if reviewer_id is not None:
        statement = statement.where(charges.c.reviewer_id == reviewer_id)
    return [
        ReviewerTime(str(name), int(decisions or 0), float(seconds or 0.0))
        for name, decisions, seconds in session.execute(statement)
    ]

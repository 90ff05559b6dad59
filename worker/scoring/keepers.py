"""Keep probabilities at render time, and the early stop of a sweep.

When a job's catalogue source has a keeper model trained on this worker's scorer (review
trains them from reviewers' decisions; the latest such version is used), every image the job
renders gets a prediction recorded with its row. With early stop on
(``PIXELMILL_EARLY_STOP_KEEPERS=K``), a sweep stops once its item, in this run, has K images
predicted to be kept with at least ``PIXELMILL_EARLY_STOP_PROBABILITY``: counting the
predictions already recorded for the item (every job of it in the run: other templates, other
workers) and those of the batch just rendered, never an image a person rejected (so the seeds
a "none of these" re-roll queues are rendered). The seeds left are recorded on the job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import func, null, select, update
from sqlalchemy.orm import Session

from db.models import CatalogueItem, Decision, Image, ImageReview, Job, JobStatus
from db.ranking import KeeperPrediction, latest_keeper_model
from pixelmill.keeper import Candidate, KeeperModelError, KeeperPredictor
from worker import metrics
from worker.claim import ClaimedJob
from worker.scoring.scorer import ImageScores

log = logging.getLogger(__name__)


@dataclass
class JobKeepers:
    """What a job's images are predicted with, and when its sweep has enough."""

    job_id: int
    run_id: int
    item_id: int
    template: str
    variant: str
    model_id: int | None = None  # the keeper model's row; None: nothing is predicted
    predictor: KeeperPredictor | None = field(default=None, repr=False)
    stop_at: int | None = None  # K likely keepers end the sweep; None: it never stops early
    probability: float = 1.0  # what "likely" means

    def predict(self, scores: Sequence[ImageScores]) -> list[float] | None:
        """Keep probabilities of a batch's scores (None: this job predicts nothing)."""
        if self.predictor is None or not scores:
            return None
        candidates = [
            Candidate(
                embedding=score.embedding,
                clip_score=score.clip_score,
                aesthetic_score=score.aesthetic_score,
                image_similarity=score.image_similarity,
                template=self.template,
                variant=self.variant,
            )
            for score in scores
        ]
        try:
            return self.predictor.predict(candidates)
        except KeeperModelError as exc:
            # A model that cannot read these scores orders nothing: the job renders on.
            log.warning("job %s: keeper model %s not used: %s", self.job_id, self.model_id, exc)
            self.predictor = self.model_id = None
            return None

    def likely(self, probabilities: Sequence[float | None]) -> int:
        return sum(1 for p in probabilities if p is not None and p >= self.probability)

    def enough(self, session: Session, pending: Sequence[float | None] = ()) -> bool:
        """Whether the item already has K likely keepers: those recorded, plus ``pending``
        (the probabilities of images rendered but not yet recorded). Ends its read
        transaction: nothing is left open while the next batch renders."""
        if self.stop_at is None or self.model_id is None:
            return False
        try:
            recorded = likely_keepers(session, self.run_id, self.item_id, self.probability)
        finally:
            session.commit()
        return recorded + self.likely(pending) >= self.stop_at


def likely_keepers(session: Session, run_id: int, item_id: int, probability: float) -> int:
    """Images of the item in the run predicted to be kept with at least ``probability``,
    leaving out those a person rejected."""
    rejected = select(ImageReview.image_id).where(
        ImageReview.image_id == Image.id, ImageReview.decision == Decision.REJECT
    )
    count = session.scalar(
        select(func.count())
        .select_from(KeeperPrediction)
        .join(Image, Image.id == KeeperPrediction.image_id)
        .join(Job, Job.id == Image.job_id)
        .where(
            Job.run_id == run_id,
            Job.item_id == item_id,
            KeeperPrediction.probability >= probability,
            ~rejected.exists(),
        )
    )
    return int(count or 0)


def job_keepers(
    session: Session,
    job: ClaimedJob,
    scorer: str,
    *,
    stop_at: int | None,
    probability: float,
) -> JobKeepers:
    """The job's item and its source's keeper model, read once when the job starts."""
    item_id, source, template, variant = session.execute(
        select(Job.item_id, CatalogueItem.source, Job.template, Job.variant)
        .join(CatalogueItem, CatalogueItem.id == Job.item_id)
        .where(Job.id == job.id)
    ).one()
    keepers = JobKeepers(
        job_id=job.id,
        run_id=job.run_id,
        item_id=int(item_id),
        template=str(template),
        variant=str(variant),
        stop_at=stop_at,
        probability=probability,
    )
    model = latest_keeper_model(session, str(source), scorer)
    if model is not None:
        try:
            keepers.predictor = KeeperPredictor(model.parameters)
            keepers.model_id = model.id
        except (KeeperModelError, KeyError, TypeError, ValueError) as exc:
            log.warning("job %s: keeper model %s cannot be read: %s", job.id, model.id, exc)
    return keepers


# --- the seeds not rendered -----------------------------------------------------------------


def record_skipped(session: Session, job: ClaimedJob, skipped: Sequence[int]) -> None:
    """Write the seeds the sweep left out (none: SQL NULL) in the caller's transaction, fenced
    on the claim like every write of the job's outcome."""
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.RUNNING, Job.attempts == job.attempt)
        .values(skipped_seeds=[int(seed) for seed in skipped] if skipped else null())
    )


def mean_render_seconds(session: Session, job: ClaimedJob) -> float | None:
    """The job's mean seconds per image; for a job that rendered none, that of the run's
    images rendered with the same model, steps and size (the same cost per image)."""
    own = session.scalar(select(func.avg(Image.render_seconds)).where(Image.job_id == job.id))
    if own is not None:
        return float(own)
    alike = session.scalar(
        select(func.avg(Image.render_seconds))
        .join(Job, Job.id == Image.job_id)
        .where(
            Job.run_id == job.run_id,
            Job.model == job.model,
            Job.steps == job.steps,
            Job.width == job.width,
            Job.height == job.height,
        )
    )
    return None if alike is None else float(alike)


def report_early_stop(job: ClaimedJob, skipped: Sequence[int], seconds: float | None) -> None:
    """The job's log line and the worker's counters for a sweep that stopped early."""
    saved = 0.0 if seconds is None else seconds * len(skipped)
    metrics.EARLY_STOP_SEEDS.inc(len(skipped))
    metrics.GPU_SECONDS_SAVED.inc(saved)
    estimate = "unknown" if seconds is None else f"about {saved:.1f}"
    log.info(
        "job %s stopped early: its item has enough likely keepers; %d of %d seeds not "
        "rendered (recorded on the job), %s GPU-seconds saved",
        job.id,
        len(skipped),
        len(job.seeds),
        estimate,
    )

"""How often people keep what each template and variant renders: the producer's budget
allocates seeds by it, and stats and the exporter report it."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from db.models import CatalogueItem, Decision, Image, ImageReview, Job


@dataclass(frozen=True)
class ArmRecord:
    """People's decisions on one (template, variant) of a source."""

    template: str
    variant: str
    kept: int
    rejected: int

    @property
    def decided(self) -> int:
        return self.kept + self.rejected

    @property
    def keep_rate(self) -> float | None:
        return None if self.decided == 0 else self.kept / self.decided


def keep_records(
    session: Session, *, source: str | None = None, run_id: int | None = None
) -> dict[tuple[str, str], ArmRecord]:
    """Decisions per (template, variant), over a catalogue source's runs or one run."""
    kept = func.sum(case((ImageReview.decision == Decision.KEEP, 1), else_=0))
    statement = (
        select(Job.template, Job.variant, kept, func.count())
        .select_from(ImageReview)
        .join(Image, Image.id == ImageReview.image_id)
        .join(Job, Job.id == Image.job_id)
        .group_by(Job.template, Job.variant)
    )
    if source is not None:
        statement = statement.join(CatalogueItem, CatalogueItem.id == Job.item_id).where(
            CatalogueItem.source == source
        )
    if run_id is not None:
        statement = statement.where(ImageReview.run_id == run_id)
    records = {}
    for template, variant, keeps, total in session.execute(statement):
        keeps = int(keeps or 0)
        records[(template, variant)] = ArmRecord(template, variant, keeps, int(total) - keeps)
    return records


def keep_records_by_run(
    session: Session, run_ids: list[int]
) -> dict[int, dict[tuple[str, str], ArmRecord]]:
    """Decisions per (template, variant) of each of several runs, in one grouped query."""
    kept = func.sum(case((ImageReview.decision == Decision.KEEP, 1), else_=0))
    statement = (
        select(ImageReview.run_id, Job.template, Job.variant, kept, func.count())
        .select_from(ImageReview)
        .join(Image, Image.id == ImageReview.image_id)
        .join(Job, Job.id == Image.job_id)
        .where(ImageReview.run_id.in_(run_ids))
        .group_by(ImageReview.run_id, Job.template, Job.variant)
    )
    records: dict[int, dict[tuple[str, str], ArmRecord]] = {run_id: {} for run_id in run_ids}
    for run_id, template, variant, keeps, total in session.execute(statement):
        keeps = int(keeps or 0)
        records[run_id][(template, variant)] = ArmRecord(
            template, variant, keeps, int(total) - keeps
        )
    return records

"""(Re)scoring images already rendered: ``pixelmill score RUN``.

Images are read back from storage in batches, scored against their job's prompt (and
catalogue photo), and their rows written batch by batch: an interrupted run resumes where it
stopped, and running it again with the same scorer does nothing (an image scored by another
scorer is scored again: its row then holds the new scorer's values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from db.models import Image, InputImage, Job, SafetyStatus
from db.ranking import ImageScore
from db.upsert import upsert_many
from pixelmill.storage import Storage
from worker.conditioning import decode_image
from worker.scoring.scorer import ImageScores, Scorer, pixels_of

BATCH = 32

Progress = Callable[[int, int], None]


@dataclass
class RescoreReport:
    scored: int = 0
    already: int = 0  # scored by this scorer before


def _unscored(run_id: int, scorer: str) -> Select:
    score = ImageScore.__table__.alias("score")
    return (
        select(Image.id, Image.storage_key, Job.id, Job.prompt, Job.input_image)
        .join(Job, Job.id == Image.job_id)
        .outerjoin(score, score.c.image_id == Image.id)
        .where(
            Job.run_id == run_id,
            # Flagged images are not scored, as at render time (worker.scoring.render_time).
            Image.safety != SafetyStatus.FLAGGED,
            or_(score.c.image_id.is_(None), score.c.scorer != scorer),
        )
        .order_by(Image.id)
    )


def _batches(session: Session, run_id: int, scorer: str) -> Iterator[list[tuple[object, ...]]]:
    after = 0
    while True:
        rows = session.execute(_unscored(run_id, scorer).where(Image.id > after).limit(BATCH)).all()
        if not rows:
            return
        after = int(rows[-1][0])
        yield [tuple(row) for row in rows]


def rescore_run(
    session: Session,
    storage: Storage,
    scorer: Scorer,
    run_id: int,
    *,
    progress: Progress | None = None,
) -> RescoreReport:
    """Score every stored image of a run not yet scored by ``scorer``; commits per batch."""
    total = session.scalar(
        select(func.count()).select_from(_unscored(run_id, scorer.identity).subquery())
    )
    already = session.scalar(
        select(func.count())
        .select_from(ImageScore)
        .join(Image, Image.id == ImageScore.image_id)
        .join(Job, and_(Job.id == Image.job_id, Job.run_id == run_id))
        .where(ImageScore.scorer == scorer.identity)
    )
    report = RescoreReport(already=int(already or 0))
    photos: dict[str, torch.Tensor] = {}
    for rows in _batches(session, run_id, scorer.identity):
        values = []
        for (prompt, photo_sha), group in _by_job(rows).items():
            pixels = torch.stack([_pixels(storage, row) for row in group])
            reference = _photo(session, storage, photos, photo_sha)
            scores = scorer.score(pixels, prompt, reference)
            values += [
                _row(int(str(row[0])), scorer.identity, score)
                for row, score in zip(group, scores, strict=True)
            ]
        upsert_many(session, ImageScore, values, ["image_id"])
        session.commit()
        report.scored += len(values)
        if progress is not None:
            progress(report.scored, int(total or 0))
    return report


def _by_job(rows: list[tuple[object, ...]]) -> dict[tuple[str, object], list[tuple[object, ...]]]:
    """Rows grouped by what they are scored against (one text and photo embedding each)."""
    groups: dict[tuple[str, object], list[tuple[object, ...]]] = {}
    for row in rows:
        groups.setdefault((str(row[3]), row[4]), []).append(row)
    return groups


def _pixels(storage: Storage, row: tuple[object, ...]) -> torch.Tensor:
    return pixels_of(decode_image(storage.get(str(row[1])), what=f"image {row[0]}"))


def _photo(
    session: Session, storage: Storage, cache: dict[str, torch.Tensor], sha: object
) -> torch.Tensor | None:
    if sha is None:
        return None
    key = str(sha)
    if key not in cache:
        staged = session.get(InputImage, key)
        if staged is None:
            return None
        data = storage.get(staged.storage_key)
        cache[key] = pixels_of(decode_image(data, what=f"input image {key[:12]}"))
    return cache[key]


def _row(image_id: int, scorer: str, scores: ImageScores) -> dict[str, object]:
    return {
        "image_id": image_id,
        "scorer": scorer,
        "clip_score": scores.clip_score,
        "aesthetic_score": scores.aesthetic_score,
        "image_similarity": scores.image_similarity,
        "embedding": scores.embedding,
    }

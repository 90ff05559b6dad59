"""Scoring a job's images as they are rendered: on the render device, right after each batch
is decoded and before its PNGs are encoded, so the scores travel with the image rows (one
transaction, worker.image_writer.insert_images)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import PIL.Image
import torch
from sqlalchemy.orm import Session

from worker import metrics
from worker.scoring.keepers import JobKeepers
from worker.scoring.scorer import ImageScores, Scorer, pixels_of

if TYPE_CHECKING:
    from worker.pipeline import RenderedImage


@dataclass(frozen=True)
class ScoredImage:
    """What an image's row is recorded with besides itself."""

    scorer: str  # Scorer.identity
    scores: ImageScores
    model_id: int | None = None  # the keeper model behind ``probability``
    probability: float | None = None


class JobScoring:
    """Scores (and, with a keeper model, predicts) the images of one job."""

    def __init__(
        self,
        scorer: Scorer,
        prompt: str,
        keepers: JobKeepers,
        *,
        photo: PIL.Image.Image | None = None,
    ) -> None:
        """``photo``: the catalogue photo a job starts from (img2img, inpaint, ControlNet),
        as staged and decoded, as `pixelmill score` reads it too."""
        self.scorer = scorer
        self.prompt = prompt
        self.keepers = keepers
        # The photo's embedding, once per job: every seed is compared with it.
        self.photo = None if photo is None else scorer.photo_embedding(pixels_of(photo))

    def score(self, rendered: Sequence[RenderedImage]) -> list[ScoredImage | None]:
        """One entry per image, None for an image left unscored.

        Images the safety checker flagged are not scored: they are kept out of the review
        grid (quarantined or dropped), can never be a keeper, and a prediction for one must
        not count towards the item's likely keepers and stop its sweep.
        """
        chosen = [i for i, image in enumerate(rendered) if _scorable(image)]
        result: list[ScoredImage | None] = [None] * len(rendered)
        if not chosen:
            return result
        started = time.perf_counter()
        pixels = torch.stack([_pixels(rendered[i]) for i in chosen])
        scores = self.scorer.score_against(pixels, self.prompt, self.photo)
        probabilities = self.keepers.predict(scores)
        model_id = self.keepers.model_id if probabilities is not None else None
        for position, (index, score) in enumerate(zip(chosen, scores, strict=True)):
            result[index] = ScoredImage(
                scorer=self.scorer.identity,
                scores=score,
                model_id=model_id,
                probability=None if probabilities is None else probabilities[position],
            )
        metrics.SCORE_SECONDS.observe(time.perf_counter() - started)
        return result

    def enough(self, session: Session, scored: Sequence[ScoredImage | None]) -> bool:
        """Whether the sweep may stop: see :meth:`JobKeepers.enough`."""
        pending = [None if s is None else s.probability for s in scored]
        return self.keepers.enough(session, pending)


def score_batch(
    scoring: JobScoring | None, rendered: Sequence[RenderedImage]
) -> list[ScoredImage | None]:
    """The batch's scores (all None when nothing is scored)."""
    if scoring is None:
        return [None] * len(rendered)
    return scoring.score(rendered)


def without_pixels(image: RenderedImage) -> RenderedImage:
    """The image as the upload pool needs it: its device tensor is let go once scored."""
    return image if image.pixels is None else dataclasses.replace(image, pixels=None)


def _scorable(image: RenderedImage) -> bool:
    return image.pixels is not None and image.nsfw is not True


def _pixels(image: RenderedImage) -> torch.Tensor:
    assert image.pixels is not None  # _scorable
    return image.pixels

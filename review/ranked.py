"""An item's grid in ranked order: its near-duplicate groups best first (each shown as its best
member), the run's cut line, and the images the keeper model rejected on its own at the end.

The order itself is review.ranking.order's (the keeper model's probability, else the prior
from the CLIP and aesthetic scores, else render order); this module applies it to what the
grid shows and keeps the run's cut for a while, since it averages every prediction of the run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from threading import Lock
from typing import Literal

from sqlalchemy.orm import Session

from review.ranking.auto_reject import AutoRejected, item_auto_rejects
from review.ranking.order import ScoredImage, item_scores, rank_and_group, run_cut

# The cut moves only when predictions do (a render, a retraining): recomputed at most this often.
CUT_CACHE_SECONDS = 30.0

RankedBy = Literal["model", "scores", "render order"]


class RunCuts:
    """Each run's cut line, cached for CUT_CACHE_SECONDS (shared by the app's threads)."""

    def __init__(self, seconds: float = CUT_CACHE_SECONDS) -> None:
        self.seconds = seconds
        self._lock = Lock()
        self._cuts: dict[int, tuple[float, float | None]] = {}

    def get(self, session: Session, run_id: int) -> float | None:
        now = time.monotonic()
        with self._lock:
            cached = self._cuts.get(run_id)
        if cached is not None and now - cached[0] < self.seconds:
            return cached[1]
        cut = run_cut(session, run_id)
        with self._lock:
            self._cuts[run_id] = (now, cut)
        return cut


@dataclass(frozen=True)
class RankedImage:
    scored: ScoredImage
    group: int  # the image id of the group's best member
    group_size: int
    lead: bool  # the member the grid shows for the group
    below_cut: bool
    decided: bool  # by a person
    auto_reject: AutoRejected | None  # the model's rejection, in force or undone
    auto_rejected: bool  # the model's rejection is in force: no person decided, none undid it


@dataclass
class RankedGrid:
    images: list[RankedImage] = field(default_factory=list)
    cut: float | None = None
    ranked_by: RankedBy = "render order"

    @property
    def groups(self) -> list[list[int]]:
        """Each group's image ids, best first, the groups in grid order."""
        members: dict[int, list[int]] = {}
        for image in self.images:
            members.setdefault(image.group, []).append(image.scored.image_id)
        return list(members.values())


def _below(scored: ScoredImage, cut: float | None) -> bool:
    """Below the run's cut; without a prediction an image sorts after every predicted one."""
    if cut is None:
        return False
    return scored.probability is None or scored.probability < cut


def _ranked_by(scores: Sequence[ScoredImage]) -> RankedBy:
    if any(image.probability is not None for image in scores):
        return "model"
    if any(image.prior is not None for image in scores):
        return "scores"
    return "render order"


def rank_grid(
    session: Session,
    *,
    run_id: int,
    item_id: int,
    review_item_id: int,
    shown: Sequence[int],
    decided: set[int],
    duplicate_similarity: float,
    cut: float | None,
) -> RankedGrid:
    """The grid of ``shown`` images (in render order; ``decided``: those a person decided)."""
    known = item_scores(session, run_id, item_id)
    scores = [known.get(image_id, ScoredImage(image_id, "")) for image_id in shown]
    auto = item_auto_rejects(session, review_item_id)

    def in_force(image_id: int) -> bool:
        reject = auto.get(image_id)
        return reject is not None and not reject.undone and image_id not in decided

    grid = RankedGrid(cut=cut, ranked_by=_ranked_by(scores))
    candidates = [image for image in scores if not in_force(image.image_id)]
    for group in rank_and_group(candidates, threshold=duplicate_similarity):
        for position, member in enumerate(group.members):
            grid.images.append(
                RankedImage(
                    scored=member,
                    group=group.best.image_id,
                    group_size=len(group.members),
                    lead=position == 0,
                    below_cut=_below(member, cut),
                    decided=member.image_id in decided,
                    auto_reject=auto.get(member.image_id),
                    auto_rejected=False,
                )
            )
    rejected = sorted(
        (image for image in scores if in_force(image.image_id)), key=lambda i: i.rank_key
    )
    for image in rejected:
        grid.images.append(
            RankedImage(image, image.image_id, 1, True, True, False, auto[image.image_id], True)
        )
    return grid

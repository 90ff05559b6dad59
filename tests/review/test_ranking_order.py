"""Ranking an item's candidates: best first, near-duplicates grouped, one cut per run."""

from __future__ import annotations

import pytest

from pixelmill.keeper import embedding_to_bytes
from review.ranking.order import ScoredImage, cut_for, rank_and_group


def _image(image_id: int, vector: list[float], **values: object) -> ScoredImage:
    return ScoredImage(
        image_id=image_id,
        sha256=str(values.pop("sha", f"sha-{image_id}")),
        embedding=embedding_to_bytes(vector),
        **values,  # type: ignore[arg-type]
    )


def test_probability_orders_before_prior_and_unscored_keep_render_order() -> None:
    images = [
        ScoredImage(1, "a"),
        _image(2, [1, 0, 0], prior=0.9),
        _image(3, [0, 1, 0], probability=0.2),
        ScoredImage(4, "b"),
        _image(5, [0, 0, 1], probability=0.7),
    ]
    groups = rank_and_group(images, threshold=0.97)
    assert [group.best.image_id for group in groups] == [5, 3, 2, 1, 4]


def test_near_duplicates_and_identical_files_form_groups_shown_by_their_best() -> None:
    images = [
        _image(1, [1.0, 0.0, 0.0], probability=0.3),
        _image(2, [0.99, 0.05, 0.0], probability=0.6),  # close to 1
        _image(3, [0.0, 1.0, 0.0], probability=0.5, sha="same"),
        _image(4, [0.0, 0.0, 1.0], probability=0.1, sha="same"),  # same file as 3
        _image(5, [0.6, 0.8, 0.0], probability=0.9),
    ]
    groups = rank_and_group(images, threshold=0.97)
    assert [[m.image_id for m in group.members] for group in groups] == [[5], [2, 1], [3, 4]]


@pytest.mark.parametrize("threshold", [0.5, 0.999])
def test_threshold_decides_what_is_a_duplicate(threshold: float) -> None:
    images = [_image(1, [1.0, 0.0]), _image(2, [0.8, 0.6])]  # cosine 0.8
    groups = rank_and_group(images, threshold=threshold)
    assert len(groups) == (1 if threshold < 0.8 else 2)


def test_cut_is_where_a_look_beats_a_random_one() -> None:
    probabilities = [0.9, 0.8, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0]
    cut = cut_for(probabilities)
    assert cut == pytest.approx(sum(probabilities) / len(probabilities))
    assert [p for p in probabilities if p >= (cut or 0)] == [0.9, 0.8]
    assert cut_for([]) is None

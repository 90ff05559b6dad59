"""The scorer: a tiny random CLIP and aesthetic head, saved to disk and loaded the way a real
scorer is, scoring planted images on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pixelmill.keeper import embedding_from_bytes
from worker.scoring.aesthetic import AestheticHeadError, load_aesthetic_head, random_aesthetic_head
from worker.scoring.scorer import ScorerError, load_scorer
from worker.scoring.tiny import HEAD_FILE, PROJECTION_DIM, build_tiny_scorer


@pytest.fixture(scope="module")
def tiny_scorer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_scorer(tmp_path_factory.mktemp("scorer") / "tiny-scorer")


def _pixels(count: int, *, seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_scores_a_batch_with_embeddings_clip_aesthetic_and_photo_similarity(
    tiny_scorer_dir: Path,
) -> None:
    scorer = load_scorer(str(tiny_scorer_dir), head_path=tiny_scorer_dir / HEAD_FILE)
    pixels = _pixels(3)

    scores = scorer.score(pixels, "a brass lamp on a table", reference=pixels[1])

    assert len(scores) == 3
    for score in scores:
        embedding = embedding_from_bytes(score.embedding)
        assert embedding.shape == (PROJECTION_DIM,)
        assert float((embedding**2).sum()) == pytest.approx(1.0, abs=1e-2)
        assert -1 <= score.clip_score <= 1
        assert score.aesthetic_score is not None
        assert score.image_similarity is not None
    # The photo itself is its own nearest image.
    assert scores[1].image_similarity == pytest.approx(1.0, abs=1e-3)
    assert max(scores, key=lambda s: s.image_similarity or 0) is scores[1]


def test_scores_do_not_depend_on_the_batch(tiny_scorer_dir: Path) -> None:
    scorer = load_scorer(str(tiny_scorer_dir))
    pixels = _pixels(4, seed=3)

    batch = scorer.score(pixels, "lamp")
    alone = [scorer.score(pixels[i : i + 1], "lamp")[0] for i in range(4)]

    for together, single in zip(batch, alone, strict=True):
        assert together.clip_score == pytest.approx(single.clip_score, abs=1e-4)
        assert together.aesthetic_score is None


def test_identity_changes_with_the_weights_and_the_head(
    tiny_scorer_dir: Path, tmp_path: Path
) -> None:
    other = build_tiny_scorer(tmp_path / "other", seed=1)
    plain = load_scorer(str(tiny_scorer_dir)).identity
    with_head = load_scorer(str(tiny_scorer_dir), head_path=tiny_scorer_dir / HEAD_FILE).identity
    assert len({plain, with_head, load_scorer(str(other)).identity}) == 3
    assert load_scorer(str(tiny_scorer_dir)).identity == plain


def test_aesthetic_heads_in_laion_and_linear_layouts(tmp_path: Path) -> None:
    laion = tmp_path / "laion.pth"
    torch.save(random_aesthetic_head(8), laion)
    linear = tmp_path / "linear.safetensors"
    save_file({"weight": torch.ones(1, 8), "bias": torch.zeros(1)}, str(linear))

    assert len(load_aesthetic_head(laion, embedding_size=8)) == 5
    head = load_aesthetic_head(linear, embedding_size=8)
    assert float(head(torch.ones(1, 8))) == pytest.approx(8.0)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"layers.0.weight": torch.ones(4, 8)}, "lacks its weight or bias"),
        ({"weight": torch.ones(2, 8), "bias": torch.zeros(2)}, "end in one output"),
        ({"weight": torch.ones(1, 16), "bias": torch.zeros(1)}, "takes 16-value embeddings"),
        ({"encoder.attn": torch.ones(1)}, "unexpected key"),
    ],
)
def test_bad_heads_are_named_with_their_file(
    tmp_path: Path, state: dict[str, torch.Tensor], message: str
) -> None:
    path = tmp_path / "head.safetensors"
    save_file(state, str(path))
    with pytest.raises(AestheticHeadError, match=message) as caught:
        load_aesthetic_head(path, embedding_size=8)
    assert str(path) in str(caught.value)


def test_missing_scorer_and_head_are_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ScorerError, match="cannot load"):
        load_scorer(str(tmp_path / "nothing"))
    with pytest.raises(AestheticHeadError, match="no such aesthetic head"):
        load_aesthetic_head(tmp_path / "none.pth", embedding_size=8)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(AestheticHeadError, match="not a readable state dict"):
        load_aesthetic_head(tmp_path / "junk.pth", embedding_size=8)


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable:UserWarning")
def test_tiny_scorer_tells_distinct_tiny_renders_apart_and_groups_near_copies(
    tiny_scorer_dir: Path, tiny_model_dir: Path
) -> None:
    # What the demo's grid groups: renders of the tiny model, which all look like noise of
    # the same colour, must not be near-duplicates of one another, while an image and a
    # copy of it one 8-bit level off must be.
    from pixelmill.settings import Settings
    from worker.loading import load_pipeline
    from worker.pipeline import RenderParams, render_batch

    threshold = Settings().duplicate_similarity
    pipe = load_pipeline(str(tiny_model_dir), device=torch.device("cpu"))
    params = RenderParams(
        prompt="a brass lamp", negative_prompt="", steps=3, guidance=7.0, width=64, height=64
    )
    renders = render_batch(pipe, params, [1, 2, 3, 4])
    pixels = torch.stack([render.pixels for render in renders if render.pixels is not None])
    scorer = load_scorer(str(tiny_scorer_dir))

    embeddings = scorer.image_embeddings(pixels)
    similarity = embeddings @ embeddings.T
    distinct = similarity[torch.triu(torch.ones_like(similarity), diagonal=1).bool()]
    assert len(distinct) == 6 and float(distinct.max()) < threshold

    one_level = torch.randint(-1, 2, pixels.shape, generator=torch.Generator().manual_seed(0))
    near_copies = scorer.image_embeddings((pixels + one_level / 255).clamp(0, 1))
    assert float((embeddings * near_copies).sum(dim=-1).min()) > threshold

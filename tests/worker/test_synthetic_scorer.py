"""The synthetic full-size scorer (`pixelmill model synthetic --arch clip-vit-l14`): the
released CLIP ViT-L/14 architecture, written and loaded through the scorer's own loader."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig
from typer.testing import CliRunner

from cli.main import app
from worker.scoring.scorer import load_scorer
from worker.scoring.synthetic import (
    CLIP_VIT_L14_VISION,
    build_synthetic_scorer,
    scorer_parameter_count,
)
from worker.scoring.tiny import HEAD_FILE


def test_it_has_the_released_parameter_count() -> None:
    # openai/clip-vit-large-patch14: 427,616,513 parameters (logit scale included).
    assert scorer_parameter_count() == 427_616_513
    assert (CLIP_VIT_L14_VISION["patch_size"], CLIP_VIT_L14_VISION["image_size"]) == (14, 224)


def small_config() -> CLIPConfig:
    layer = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4}
    return CLIPConfig(
        text_config={**layer, "num_hidden_layers": 1, "vocab_size": 49408},
        vision_config={**layer, "num_hidden_layers": 1, "image_size": 28, "patch_size": 14},
        projection_dim=16,
    )


def test_it_is_written_and_scores_through_the_scorers_loader(tmp_path: Path) -> None:
    folder = build_synthetic_scorer(tmp_path / "clip", dtype=torch.float32, config=small_config())
    scorer = load_scorer(str(folder), head_path=folder / HEAD_FILE)
    assert scorer.image_size == 28
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    scores = scorer.score(pixels, "a ceramic teapot")
    assert len(scores) == 2
    assert all(-1 <= row.clip_score <= 1 and row.aesthetic_score is not None for row in scores)


def test_the_command_refuses_a_folder_in_use(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    result = CliRunner().invoke(
        app, ["model", "synthetic", "--arch", "clip-vit-l14", "--out", str(tmp_path / "used")]
    )
    assert result.exit_code == 2
    assert "exists and is not an empty folder" in result.output

"""Captions with BLIP: a tiny random BlipForConditionalGeneration with its processor, built in
code, saved with save_pretrained and loaded with from_pretrained; alt text from captions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from pixelmill.errors import BadInputError
from tests.worker.finishing.conftest import Models
from worker.finishing.caption import CaptionerError, alt_text, load_captioner


def noise(seed: int) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels, "RGB")


def test_a_saved_blip_captions_images_the_same_each_time(models: Models) -> None:
    captioner = load_captioner(str(models.blip), max_tokens=8, beams=2)
    assert captioner.model.config.model_type == "blip"
    assert len(captioner.identity) == 64
    caption = captioner.caption(noise(0))
    assert caption and caption == captioner.caption(noise(0))
    assert caption == " ".join(caption.split())
    assert len(caption.split()) <= 8


def test_the_prompt_starts_the_caption_and_is_left_out(models: Models) -> None:
    plain = load_captioner(str(models.blip), max_tokens=6, beams=1)
    prompted = load_captioner(str(models.blip), prompt="A product photo of", max_tokens=6)
    caption = prompted.caption(noise(1))
    assert not caption.lower().startswith("a product photo of")
    assert prompted.identity == plain.identity  # same weights, whatever the prompt


@pytest.mark.parametrize(
    ("caption", "limit", "expected"),
    [
        ("a brass lamp on a wooden table", 125, "A brass lamp on a wooden table."),
        ("  a   lamp .", 125, "A lamp."),
        ("is it a lamp?", 125, "Is it a lamp?"),
        ("", 125, ""),
        ("a brass lamp on a wooden table", 20, "A brass lamp on a."),
        ("abcdefghijklmnopqrstuvwxyz", 16, "Abcdefghijklmno."),
    ],
)
def test_alt_text_is_one_short_sentence(caption: str, limit: int, expected: str) -> None:
    text = alt_text(caption, limit)
    assert text == expected
    assert len(text) <= limit


def test_models_that_cannot_caption_are_named(tmp_path: Path) -> None:
    with pytest.raises(CaptionerError, match=r"PIXELMILL_CAPTION_MODEL .*missing: no such folder"):
        load_captioner(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionerError, match=r"no config\.json in the folder") as caught:
        load_captioner(str(tmp_path / "empty"))
    assert isinstance(caught.value, BadInputError)
    assert str(tmp_path / "empty") in str(caught.value)
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "blip"}')
    with pytest.raises(CaptionerError, match="cannot load a BLIP captioner"):
        load_captioner(str(tmp_path / "empty"))


def test_finishing_models_are_checked_without_building_the_tiny_ones(tmp_path: Path) -> None:
    from pixelmill.settings import Settings
    from worker.finishing.configured import check_finishing_models

    check_finishing_models(
        Settings(data_dir=tmp_path / "data", upscale_model="tiny", caption_model="tiny")
    )
    assert not (tmp_path / "data").exists()  # nothing built, nothing written
    with pytest.raises(BadInputError, match=r"PIXELMILL_CAPTION_MODEL .*: no such folder"):
        check_finishing_models(Settings(caption_model=str(tmp_path / "gone")))
    with pytest.raises(BadInputError, match=r"PIXELMILL_UPSCALE_MODEL .*: no such file"):
        check_finishing_models(Settings(upscale_model=str(tmp_path / "gone.pth")))


def test_a_model_of_another_kind_is_refused(tmp_path: Path) -> None:
    from worker.scoring.tiny import build_tiny_scorer

    clip = build_tiny_scorer(tmp_path / "clip")
    with pytest.raises(CaptionerError, match="a 'clip' model, not a BLIP captioner"):
        load_captioner(str(clip))

from __future__ import annotations

import io

import PIL.Image
import pytest

from worker.png import (
    a1111_parameters,
    encode_png,
    read_parameters,
    read_pixelmill,
)


def _params(**overrides: object) -> str:
    values: dict[str, object] = {
        "prompt": "a red fox in the snow, (masterpiece:1.2)",
        "negative_prompt": "blurry, lowres",
        "steps": 20,
        "sampler": "Euler a",
        "cfg_scale": 7,
        "seed": 123,
        "width": 512,
        "height": 768,
        "model_name": "sd15",
        "model_hash": "abcd1234",
        "version": "pixelmill 0.1.0",
    }
    values.update(overrides)
    return a1111_parameters(**values)  # type: ignore[arg-type]


def test_a1111_format() -> None:
    assert _params() == (
        "a red fox in the snow, (masterpiece:1.2)\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 123, Size: 512x768, "
        "Model hash: abcd1234, Model: sd15, Version: pixelmill 0.1.0"
    )


def test_a1111_schedule_type_follows_the_sampler() -> None:
    text = _params(sampler="DPM++ 2M Karras", schedule_type="Karras")
    assert "Steps: 20, Sampler: DPM++ 2M Karras, Schedule type: Karras, CFG scale: 7.0," in text


def test_a1111_format_omits_empty_negative_and_missing_hash() -> None:
    assert _params(negative_prompt="", model_hash=None, cfg_scale=4.5) == (
        "a red fox in the snow, (masterpiece:1.2)\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 4.5, Seed: 123, Size: 512x768, "
        "Model: sd15, Version: pixelmill 0.1.0"
    )


@pytest.mark.parametrize(
    "prompt",
    [
        "a cat",
        "café crème, naïve",  # latin-1: tEXt chunk
        "一只在雪地里的红狐狸",  # not latin-1: iTXt chunk
        "emoji 🦊 and\nmultiple\nlines",
    ],
)
def test_png_round_trip(prompt: str) -> None:
    image = PIL.Image.new("RGB", (64, 48), (200, 10, 30))
    parameters = _params(prompt=prompt, negative_prompt="模糊")
    png = encode_png(image, parameters=parameters)

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert read_parameters(png) == parameters
    with PIL.Image.open(io.BytesIO(png)) as decoded:
        assert decoded.format == "PNG"
        assert decoded.size == (64, 48)
        assert decoded.convert("RGB").getpixel((5, 5)) == (200, 10, 30)


def test_non_latin_text_uses_itxt_chunk() -> None:
    image = PIL.Image.new("RGB", (8, 8))
    assert b"iTXtparameters" in encode_png(image, parameters="狐狸")
    assert b"tEXtparameters" in encode_png(image, parameters="fox")


def test_read_parameters_without_chunk() -> None:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    assert read_parameters(buffer.getvalue()) is None


def test_pixelmill_chunk_round_trips_as_json() -> None:
    image = PIL.Image.new("RGB", (16, 16), (10, 20, 30))
    chunk = {"job_id": 7, "item_key": "茶壶-01", "model_sha256": "ab" * 32, "safety": None}
    png = encode_png(image, parameters="a teapot", pixelmill=chunk)
    assert read_pixelmill(png) == chunk
    assert read_parameters(png) == "a teapot"  # the A1111 chunk is untouched
    assert read_pixelmill(encode_png(image, parameters="a teapot")) is None

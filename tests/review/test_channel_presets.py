"""Channel presets: the built-in ones (the same file as examples/channels.yaml), and bad
presets refused with the file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pixelmill.errors import BadInputError, InputError
from review.channels.presets import (
    DEFAULT_PRESETS_PATH,
    PresetError,
    choose,
    load_presets,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "channels.yaml"


def test_the_examples_are_the_built_in_presets() -> None:
    assert EXAMPLES.read_text(encoding="utf-8") == DEFAULT_PRESETS_PATH.read_text(encoding="utf-8")
    presets = load_presets()
    main = presets["marketplace-main"]
    assert (main.format, main.width, main.height, main.fit) == ("jpeg", 2000, 2000, "pad")
    assert main.background == (255, 255, 255) and main.max_bytes == 10_000_000
    shop = presets["web-shop"]
    assert (shop.format, shop.longer_side, shop.width) == ("webp", 2048, None)
    china = presets["cn-marketplace"]
    assert (china.width, china.height, china.format) == (800, 800, "jpeg")
    assert all(preset.srgb for preset in presets.values())


def test_an_aspect_makes_the_canvas(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "channels:\n"
        "  tall: {size: 1500, aspect: '2:3', format: webp, fit: crop, background: black}\n"
        "  clear: {size: 300x200, format: png, background: transparent}\n"
    )
    presets = load_presets(path)
    assert (presets["tall"].width, presets["tall"].height) == (1000, 1500)
    assert presets["tall"].background == (0, 0, 0) and presets["tall"].quality == 90
    assert presets["clear"].background is None and presets["clear"].quality is None
    assert [p.name for p in choose(presets, ["clear", "tall", "clear"], path)] == ["clear", "tall"]


@pytest.mark.parametrize(
    ("body", "line", "field", "reason"),
    [
        ("channels:\n  a:\n    size: 2000\n    format: gif\n", 4, "channels.a.format", "'gif'"),
        ("channels:\n  a:\n    format: jpeg\n", 3, "channels.a.size", "missing"),
        ("channels:\n  a:\n    size: 2000\n    format: jpeg\n    colour: red\n", 5,
         "channels.a.colour", "unknown field"),
        ("channels:\n  a:\n    size: big\n    format: jpeg\n", 3, "channels.a.size", "'big'"),
        ("channels:\n  a:\n    size: 5\n    format: jpeg\n", 3, "channels.a.size", "16..16383"),
        ("channels:\n  a:\n    size: 800x800\n    aspect: '1:1'\n    format: jpeg\n", 4,
         "channels.a.aspect", "plain size"),
        ("channels:\n  a:\n    size: 800\n    aspect: wide\n    format: jpeg\n", 4,
         "channels.a.aspect", "WIDTH:HEIGHT"),
        ("channels:\n  a:\n    size: 800\n    format: jpeg\n    quality: 101\n", 5,
         "channels.a.quality", "1..100"),
        ("channels:\n  a:\n    size: 800\n    format: png\n    quality: 80\n", 5,
         "channels.a.quality", "lossless"),
        ("channels:\n  a:\n    size: 800\n    format: jpeg\n    background: transparent\n", 5,
         "channels.a.background", "no transparency"),
        ("channels:\n  a:\n    size: 800\n    format: jpeg\n    background: '#12'\n", 5,
         "channels.a.background", "give a colour"),
        ("channels:\n  a:\n    size: 800\n    format: jpeg\n    min_size: 400\n", 5,
         "channels.a.min_size", "needs max_bytes"),
        ("channels:\n  a:\n    size: 800\n    format: jpeg\n    max_bytes: 9\n", 5,
         "channels.a.max_bytes", "1024.."),
        ("channels:\n  a:\n    size: 800\n    format: jpeg\n    srgb: maybe\n", 5,
         "channels.a.srgb", "true or false"),
        ("channels:\n  Big Name:\n    size: 800\n    format: jpeg\n", 2,
         "channels.Big Name", "lower-case"),
        ("channels:\n  a: {size: 800, format: jpeg}\n  a: {size: 900, format: jpeg}\n", 3,
         "channels.a", "duplicate key (first at line 2)"),
        ("presets:\n  a: {}\n", 1, "presets", "unknown field"),
        ("channels: {}\n", 1, "channels", "no channel"),
    ],
)  # fmt: skip
def test_a_bad_preset_names_file_line_and_field(
    tmp_path: Path, body: str, line: int, field: str, reason: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(PresetError) as caught:
        load_presets(path)
    error = caught.value
    assert isinstance(error, InputError) and isinstance(error, BadInputError)
    assert (error.path, error.line, error.field) == (str(path), line, field)
    assert reason in error.reason
    assert str(error).startswith(f"{path}:{line}: field {field!r}: ")


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(PresetError, match="cannot read"):
        load_presets(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("channels:\n  a: [unclosed\n")
    with pytest.raises(PresetError, match="not valid YAML") as caught:
        load_presets(broken)
    assert caught.value.line is not None
    with pytest.raises(PresetError, match="no channel 'amazon' \\(known: cn-marketplace"):
        choose(load_presets(), ["amazon"], None)

"""Template fields beyond the prompt (kind, image, strength, mask, controlnet, loras,
embeddings): what each turns into (db.job_options.JobOptions), and every refusal naming the
file, line and field."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from db.job_options import ControlNetSpec, EmbeddingRef, JobOptions, LoraRef, MaskSpec
from producer.conditioning import DEFAULT_IMG2IMG_STRENGTH, Conditioning
from producer.templates import TemplateError, load_templates


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "templates.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def adapter(tmp_path: Path, name: str, content: bytes = b"weights") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def conditioning(tmp_path: Path, text: str) -> dict[str, Conditioning]:
    loaded = load_templates(write(tmp_path, text))
    return {template.name: template.conditioning for template in loaded.templates}


def refused(tmp_path: Path, text: str) -> TemplateError:
    path = write(tmp_path, text)
    with pytest.raises(TemplateError) as info:
        load_templates(path)
    assert info.value.path == str(path)
    return info.value


# --------------------------------------------------------------------------- accepted


def test_a_template_without_these_fields_is_plain_txt2img(tmp_path: Path) -> None:
    result = conditioning(tmp_path, 'templates:\n  t:\n    prompt: "x"\n')
    assert result["t"] == Conditioning()
    assert result["t"].kind == "txt2img"
    assert result["t"].options.to_json() is None
    assert result["t"].options.canonical() == ""
    assert result["t"].columns() == ()


def test_each_kind_and_its_options(tmp_path: Path) -> None:
    (tmp_path / "nets" / "canny").mkdir(parents=True)
    result = conditioning(
        tmp_path,
        """\
        templates:
          remix:
            kind: img2img
            image: photo
            strength: 0.55
            prompt: "x"
          remix_default:
            kind: img2img
            image: photo
            prompt: "x"
          cutout:
            kind: inpaint
            image: photo
            mask: alpha
            strength: 0.9
            prompt: "x"
          masked:
            kind: inpaint
            image: photo
            mask: {column: mask_url}
            prompt: "x"
          boxed:
            kind: inpaint
            image: photo
            width: 128
            height: 64
            mask: {keep_box: [10, 0, 128, 64]}
            prompt: "x"
          edges:
            kind: controlnet
            image: photo
            controlnet:
              model: nets/canny
              scale: 0.8
              low_threshold: 50
              high_threshold: 150
            prompt: "x"
          supplied:
            kind: controlnet
            image: depth
            controlnet: {model: lllyasviel/sd-controlnet-depth, conditioning: image}
            prompt: "x"
          builtin:
            kind: controlnet
            image: photo
            controlnet: {model: tiny-controlnet}
            prompt: "x"
        """,
    )
    assert result["remix"] == Conditioning(
        kind="img2img", image="photo", options=JobOptions(strength=0.55)
    )
    assert result["remix_default"].options == JobOptions(strength=DEFAULT_IMG2IMG_STRENGTH)
    assert result["cutout"] == Conditioning(
        kind="inpaint",
        image="photo",
        options=JobOptions(strength=0.9, mask=MaskSpec(source="alpha")),
    )
    assert result["cutout"].mask_from_alpha
    assert result["masked"] == Conditioning(
        kind="inpaint",
        image="photo",
        mask_column="mask_url",
        options=JobOptions(mask=MaskSpec(source="column")),
    )
    assert result["masked"].columns() == ("photo", "mask_url")
    assert result["boxed"].options.mask == MaskSpec(source="box", keep_box=(10, 0, 128, 64))
    assert result["edges"].options.controlnet == ControlNetSpec(
        model=str(tmp_path / "nets" / "canny"),
        conditioning="canny",
        scale=0.8,
        low_threshold=50,
        high_threshold=150,
    )
    # A hub id is kept as written: the workers load it.
    assert result["supplied"].options.controlnet == ControlNetSpec(
        model="lllyasviel/sd-controlnet-depth", conditioning="image"
    )
    assert result["supplied"].image == "depth"
    assert result["builtin"].options.controlnet == ControlNetSpec(model="tiny-controlnet")


def test_adapters_resolve_against_the_template_file_and_are_hashed(tmp_path: Path) -> None:
    lora = adapter(tmp_path, "loras/linen.safetensors", b"lora bytes")
    other = adapter(tmp_path / "elsewhere", "detail.safetensors", b"other bytes")
    embedding = adapter(tmp_path, "embeddings/brand.safetensors", b"embedding bytes")
    result = conditioning(
        tmp_path,
        f"""\
        templates:
          styled:
            prompt: "<brand> mug"
            loras:
              - {{path: loras/linen.safetensors, scale: 0.8}}
              - {{path: {other}}}
            embeddings:
              - {{path: embeddings/brand.safetensors, token: "<brand>"}}
        """,
    )
    options = result["styled"].options
    assert result["styled"].kind == "txt2img"
    assert options.loras == (
        LoraRef(path=str(lora), scale=0.8, sha256=sha(b"lora bytes")),
        LoraRef(path=str(other), scale=1.0, sha256=sha(b"other bytes")),
    )
    assert options.embeddings == (
        EmbeddingRef(path=str(embedding), token="<brand>", sha256=sha(b"embedding bytes")),
    )
    # Not empty: the dedupe key covers the adapters (and their contents, by hash).
    assert options.canonical() != ""
    assert sha(b"lora bytes") in options.canonical()


def test_each_adapter_file_is_hashed_once_per_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter(tmp_path, "shared.safetensors")
    opened: list[str] = []
    real_open = open

    def counting_open(file: str, *args: object, **kwargs: object) -> object:
        if str(file).endswith(".safetensors"):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", counting_open)
    result = conditioning(
        tmp_path,
        """\
        defaults:
          loras: [{path: shared.safetensors}]
        templates:
          a: {prompt: "x"}
          b: {prompt: "y", loras: [{path: shared.safetensors, scale: 0.5}]}
          c: {prompt: "z"}
        """,
    )
    assert opened == [str(tmp_path / "shared.safetensors")]
    assert {name: c.options.loras[0].scale for name, c in result.items()} == {
        "a": 1.0,
        "b": 0.5,
        "c": 1.0,
    }


def test_defaults_apply_where_the_kind_uses_them(tmp_path: Path) -> None:
    result = conditioning(
        tmp_path,
        """\
        defaults:
          image: photo
          strength: 0.6
          mask: alpha
          kind: img2img
        templates:
          remix: {prompt: "x"}
          plain: {prompt: "x", kind: txt2img}
          cutout: {prompt: "x", kind: inpaint, strength: 1}
          none: {prompt: "x", kind: img2img, loras: []}
        """,
    )
    assert result["remix"] == Conditioning(
        kind="img2img", image="photo", options=JobOptions(strength=0.6)
    )
    # A txt2img template has no use for the defaults' image, strength or mask.
    assert result["plain"] == Conditioning()
    assert result["cutout"].options == JobOptions(strength=1.0, mask=MaskSpec(source="alpha"))
    assert result["none"].options.loras == ()


def test_kind_from_defaults_needs_an_image(tmp_path: Path) -> None:
    error = refused(
        tmp_path,
        """\
        defaults: {kind: img2img}
        templates:
          remix:
            prompt: "x"
        """,
    )
    assert (error.line, error.field) == (4, "templates.remix.image")
    assert "is required for kind 'img2img'" in error.reason


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    ("body", "line", "field", "reason"),
    [
        ("kind: sketch", 3, "templates.t.kind", "must be one of txt2img, img2img, inpaint"),
        ("image: photo", 3, "templates.t.image", "kind 'txt2img' takes no image"),
        ("strength: 0.5", 3, "templates.t.strength", "kind 'txt2img' takes no strength"),
        ("mask: alpha", 3, "templates.t.mask", "kind 'txt2img' takes no mask"),
        ("controlnet: {model: a/b}", 3, "templates.t.controlnet", "set kind: controlnet"),
        ("kind: img2img", 3, "templates.t.image", "is required for kind 'img2img'"),
        ("kind: controlnet\n    image: p", 3, "templates.t.controlnet", "is required for kind"),
        ("kind: inpaint\n    image: p", 3, "templates.t.mask", "is required for kind 'inpaint'"),
        ("kind: img2img\n    image: ''", 4, "templates.t.image", "catalogue column name"),
        ("kind: img2img\n    image: [a]", 4, "templates.t.image", "catalogue column name"),
        ("kind: img2img\n    image: p\n    strength: 0", 5, "templates.t.strength", "0 < s"),
        ("kind: img2img\n    image: p\n    strength: 1.5", 5, "templates.t.strength", "<= 1"),
        ("kind: img2img\n    image: p\n    strength: yes", 5, "templates.t.strength", "number"),
        (
            "kind: img2img\n    image: p\n    mask: alpha",
            5,
            "templates.t.mask",
            "kind 'img2img' takes no mask (only inpaint does)",
        ),
        (
            "kind: inpaint\n    image: p\n    strength: 0.5\n    controlnet: {model: a/b}",
            6,
            "templates.t.controlnet",
            "kind 'inpaint' takes no controlnet",
        ),
    ],
)
def test_kind_and_field_combinations(
    tmp_path: Path, body: str, line: int, field: str, reason: str
) -> None:
    error = refused(tmp_path, f'templates:\n  t:\n    {body}\n    prompt: "x"\n')
    assert (error.line, error.field) == (line, field), error
    assert reason.replace("0 < s", "0 < strength") in error.reason


@pytest.mark.parametrize(
    ("mask", "field", "reason"),
    [
        ("beta", "templates.t.mask", "must be alpha, {column: NAME} or {keep_box"),
        ("[1, 2]", "templates.t.mask", "must be alpha"),
        ("{column: photo}", "templates.t.mask.column", "must differ from the image column"),
        ("{column: m, keep_box: [0, 0, 8, 8]}", "templates.t.mask", "must be alpha"),
        ("{colum: m}", "templates.t.mask.colum", "unknown key"),
        ("{keep_box: [0, 0, 8]}", "templates.t.mask.keep_box", "[left, top, right, bottom]"),
        ("{keep_box: [0, 0, 65, 8]}", "templates.t.mask.keep_box", "right <= 64 (width)"),
        ("{keep_box: [0, 0, 8, 80]}", "templates.t.mask.keep_box", "bottom <= 72 (height)"),
        ("{keep_box: [8, 0, 8, 8]}", "templates.t.mask.keep_box", "left < right"),
        ("{keep_box: [0, 0, 8.5, 8]}", "templates.t.mask.keep_box", "[left, top, right, bottom]"),
    ],
)
def test_mask_refusals(tmp_path: Path, mask: str, field: str, reason: str) -> None:
    error = refused(
        tmp_path,
        f"""\
        templates:
          t:
            kind: inpaint
            image: photo
            width: 64
            height: 72
            mask: {mask}
            prompt: "x"
        """,
    )
    assert (error.line, error.field) == (7, field), error
    assert reason in error.reason


@pytest.mark.parametrize(
    ("controlnet", "field", "reason"),
    [
        ("{scale: 1}", "templates.t.controlnet.model", "is required"),
        ("{model: ''}", "templates.t.controlnet.model", "ControlNet folder or a hub id"),
        ("{model: ./nets/missing}", "templates.t.controlnet.model", "no such folder"),
        ("{model: tiny-controlnets}", "templates.t.controlnet.model", "no such folder"),
        ("{model: nets/missing/deeper}", "templates.t.controlnet.model", "no such folder"),
        ("{model: /nowhere/net}", "templates.t.controlnet.model", "no such folder: /nowhere/net"),
        ("{model: file.txt}", "templates.t.controlnet.model", "is a file"),
        ("{model: a/b, conditioning: depth}", "templates.t.controlnet.conditioning", "canny or"),
        ("{model: a/b, scale: -1}", "templates.t.controlnet.scale", "between 0 and 5"),
        ("{model: a/b, low_threshold: 300}", "templates.t.controlnet.low_threshold", "0..255"),
        (
            "{model: a/b, low_threshold: 200, high_threshold: 100}",
            "templates.t.controlnet.low_threshold",
            "must be below high_threshold (200 >= 100)",
        ),
        (
            "{model: a/b, conditioning: image, high_threshold: 100}",
            "templates.t.controlnet.high_threshold",
            "applies only to conditioning: canny",
        ),
        ("{model: a/b, strength: 1}", "templates.t.controlnet.strength", "unknown key"),
    ],
)
def test_controlnet_refusals(tmp_path: Path, controlnet: str, field: str, reason: str) -> None:
    (tmp_path / "file.txt").write_text("not a folder")
    error = refused(
        tmp_path,
        f"""\
        templates:
          t:
            kind: controlnet
            image: photo
            controlnet: {controlnet}
            prompt: "x"
        """,
    )
    assert (error.line, error.field) == (5, field), error
    assert reason in error.reason


def test_missing_adapter_file_names_file_line_and_field(tmp_path: Path) -> None:
    adapter(tmp_path, "loras/ok.safetensors")
    error = refused(
        tmp_path,
        """\
        templates:
          t:
            prompt: "x"
            loras:
              - {path: loras/ok.safetensors}
              - {path: loras/gone.safetensors, scale: 0.5}
        """,
    )
    assert (error.line, error.field) == (6, "templates.t.loras[1].path")
    assert f"no such file: {tmp_path / 'loras' / 'gone.safetensors'}" in error.reason
    assert "relative to the template file" in error.reason
    assert str(tmp_path / "templates.yaml") in str(error)


@pytest.mark.parametrize(
    ("entries", "line", "field", "reason"),
    [
        ("loras: {path: a.safetensors}", 4, "templates.t.loras", "must be a list"),
        ("loras: [a.safetensors]", 4, "templates.t.loras[0]", "must be a mapping"),
        ("loras: [{scale: 1}]", 4, "templates.t.loras[0].path", "is required"),
        ("loras: [{path: a.safetensors, scale: 11}]", 4, "templates.t.loras[0].scale", "-10"),
        ("loras: [{path: a.safetensors, weight: 1}]", 4, "templates.t.loras[0].weight", "unknown"),
        ("loras: [{path: folder}]", 4, "templates.t.loras[0].path", "is not a file"),
        ("loras: [{path: a.ckpt}]", 4, "templates.t.loras[0].path", "must be a .safetensors"),
        ("embeddings: [{path: e.safetensors}]", 4, "templates.t.embeddings[0].token", "required"),
        (
            "embeddings: [{path: e.safetensors, token: 'two words'}]",
            4,
            "templates.t.embeddings[0].token",
            "must be one word",
        ),
        (
            "embeddings: [{path: e.safetensors, token: x}, {path: e.safetensors, token: x}]",
            4,
            "templates.t.embeddings[1].token",
            "token 'x' is used twice",
        ),
        (
            "embeddings: [{path: gone.safetensors, token: x}]",
            4,
            "templates.t.embeddings[0].path",
            "no such file",
        ),
    ],
)
def test_adapter_refusals(tmp_path: Path, entries: str, line: int, field: str, reason: str) -> None:
    adapter(tmp_path, "a.safetensors")
    adapter(tmp_path, "a.ckpt")
    adapter(tmp_path, "e.safetensors")
    (tmp_path / "folder").mkdir()
    error = refused(tmp_path, f'templates:\n  t:\n    prompt: "x"\n    {entries}\n')
    assert (error.line, error.field) == (line, field), error
    assert reason in error.reason


def test_adapter_errors_in_defaults_point_at_defaults(tmp_path: Path) -> None:
    error = refused(
        tmp_path,
        """\
        defaults:
          embeddings:
            - {path: gone.safetensors, token: x}
        templates:
          t: {prompt: "x"}
        """,
    )
    assert (error.line, error.field) == (3, "defaults.embeddings[0].path")


def test_unknown_keys_list_the_new_fields(tmp_path: Path) -> None:
    error = refused(tmp_path, 'templates:\n  t:\n    prompt: "x"\n    lora: []\n')
    assert error.field == "templates.t.lora"
    assert "loras" in error.reason and "controlnet" in error.reason

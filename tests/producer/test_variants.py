from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from producer.templates import RenderError, TemplateError, load_templates
from producer.variants import VariantError, expand_variants


def expand(text: str, negative: str = "", *, wildcards: Path | None = None, cap: int = 16):
    return expand_variants(
        [("prompt", text), ("negative_prompt", negative)], wildcards=wildcards, max_variants=cap
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "templates.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def wildcard(tmp_path: Path, name: str, lines: list[str]) -> None:
    path = tmp_path / "wildcards" / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_no_variant_syntax_gives_one_unlabelled_variant() -> None:
    (v,) = expand("costs $5, 100% cotton #1, {{ title|lower }}", "snake_case")
    assert v.label == ""
    assert v.texts == ("costs $5, 100% cotton #1, {{ title|lower }}", "snake_case")


def test_simple_alternatives_in_order() -> None:
    variants = expand("{oil painting|watercolour} of x, {warm|cold} light")
    assert [v.label for v in variants] == [
        "oil painting / warm",
        "oil painting / cold",
        "watercolour / warm",
        "watercolour / cold",
    ]
    assert variants[1].texts[0] == "oil painting of x, cold light"


def test_weights_are_ignored_combinatorially() -> None:
    variants = expand("{0.7::a|0.3::b}")
    assert [v.texts[0] for v in variants] == ["a", "b"]
    assert [v.label for v in variants] == ["a", "b"]


def test_pick_n() -> None:
    texts = [v.texts[0] for v in expand("{2$$a|b|c}")]
    # dynamicprompts yields ordered picks of two distinct options.
    assert texts == ["a,b", "a,c", "b,a", "b,c", "c,a", "c,b"]


def test_jinja_with_pipes_survives_and_labels_show_jinja() -> None:
    variants = expand("{{ title|lower }} {% if x %}{{ x|upper }}{% endif %}, {a|{{ c|title }}}")
    assert [v.texts[0] for v in variants] == [
        "{{ title|lower }} {% if x %}{{ x|upper }}{% endif %}, a",
        "{{ title|lower }} {% if x %}{{ x|upper }}{% endif %}, {{ c|title }}",
    ]
    assert [v.label for v in variants] == ["a", "{{ c|title }}"]


def test_negative_prompt_variants_expand_jointly() -> None:
    variants = expand("{a|b}", "{x|y}")
    assert [v.texts for v in variants] == [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]
    assert [v.label for v in variants] == ["a / x", "a / y", "b / x", "b / y"]


def test_cap_is_an_error_not_truncation() -> None:
    assert len(expand("{a|b|c}", "{x|y|z}", cap=9)) == 9
    with pytest.raises(VariantError) as err:
        expand("{a|b|c}", "{x|y|z}", cap=8)
    assert err.value.part is None and "9 combinations" in err.value.reason
    assert "max_variants=8" in err.value.reason


def test_labels_stable_and_distinct() -> None:
    first = [v.label for v in expand("{a|b} {c|d|e}")]
    assert first == [v.label for v in expand("{a|b} {c|d|e}")]
    assert len(set(first)) == len(first) == 6
    with pytest.raises(VariantError, match="same label"):
        expand("{a / b|a} {c|b / c}")


def test_empty_option_label() -> None:
    variants = expand("x{|, dramatic}")
    assert [(v.label, v.texts[0]) for v in variants] == [
        ("(empty)", "x"),
        (", dramatic", "x, dramatic"),
    ]


@pytest.mark.parametrize("text", ["{~a|b}", "{@a|b}"])
def test_random_and_cyclical_rejected(text: str) -> None:
    with pytest.raises(VariantError, match="not supported") as err:
        expand(text)
    assert err.value.part == "prompt"


def test_syntax_error_names_part() -> None:
    with pytest.raises(VariantError, match="variant syntax error") as err:
        expand("ok", "{a|b")
    assert err.value.part == "negative_prompt"


def test_wildcards_including_nested_folder(tmp_path: Path) -> None:
    wildcard(tmp_path, "colours/warm", ["red", "orange", "# a comment", "red"])
    wildcard(tmp_path, "size", ["small", "{{ size_word }}"])
    variants = expand("__colours/warm__ __size__ mug", wildcards=tmp_path / "wildcards")
    assert [v.texts[0] for v in variants] == [
        "orange small mug",
        "orange {{ size_word }} mug",
        "red small mug",
        "red {{ size_word }} mug",
    ]
    assert variants[1].label == "orange / {{ size_word }}"


def test_missing_wildcard_file(tmp_path: Path) -> None:
    (tmp_path / "wildcards").mkdir()
    with pytest.raises(VariantError) as err:
        expand("__nope__", wildcards=tmp_path / "wildcards")
    assert "__nope__" in err.value.reason and str(tmp_path / "wildcards") in err.value.reason
    with pytest.raises(VariantError, match="does not exist"):
        expand("__nope__", wildcards=tmp_path / "elsewhere")


# ----------------------------------------------------------------------------- via the loader


def test_loaded_template_expands_per_row(tmp_path: Path) -> None:
    wildcard(tmp_path, "light", ["warm light", "cold light"])
    path = write(
        tmp_path,
        """\
        templates:
          t:
            prompt: "{oil painting|photo} of {{ title|lower }}, __light__"
            negative_prompt: "{blurry|text}"
            max_variants: 8
        """,
    )
    (t,) = load_templates(path).templates
    assert t.max_variants == 8
    # Wildcard options come in sorted order (dynamicprompts sorts wildcard files).
    assert t.variants() == (
        "oil painting / cold light / blurry",
        "oil painting / cold light / text",
        "oil painting / warm light / blurry",
        "oil painting / warm light / text",
        "photo / cold light / blurry",
        "photo / cold light / text",
        "photo / warm light / blurry",
        "photo / warm light / text",
    )
    out = t.expand({"title": "Red MUG"}, where="c.csv:2")
    assert [r.variant for r in out] == list(t.variants())
    assert (out[7].prompt, out[7].negative_prompt) == ("photo of red mug, warm light", "text")
    # render() is the first variant.
    assert t.render({"title": "Red MUG"}, where="c.csv:2") == (
        "oil painting of red mug, cold light",
        "blurry",
    )
    assert t.prompt_fields() == frozenset({"title"})


def test_loader_cap_error_names_template_and_count(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        defaults:
          max_variants: 3
        templates:
          big:
            prompt: "{a|b} {c|d}"
        """,
    )
    with pytest.raises(TemplateError) as err:
        load_templates(path)
    assert (err.value.line, err.value.field) == (4, "templates.big")
    assert "'big'" in err.value.reason and "4 combinations" in err.value.reason


def test_loader_missing_wildcard_error(tmp_path: Path) -> None:
    path = write(tmp_path, "templates:\n  t:\n    prompt: x\n    negative_prompt: __neg__\n")
    with pytest.raises(TemplateError) as err:
        load_templates(path)
    assert (err.value.line, err.value.field) == (4, "templates.t.negative_prompt")
    assert "__neg__" in err.value.reason and "'t'" in err.value.reason
    assert str(tmp_path / "wildcards") in err.value.reason


def test_loader_max_variants_validated(tmp_path: Path) -> None:
    path = write(tmp_path, "templates:\n  t:\n    prompt: x\n    max_variants: 0\n")
    with pytest.raises(TemplateError) as err:
        load_templates(path)
    assert (err.value.line, err.value.field) == (4, "templates.t.max_variants")


def test_variant_splitting_a_jinja_block_is_a_load_error(tmp_path: Path) -> None:
    path = write(tmp_path, 'templates:\n  t:\n    prompt: "{% if x %}{a|b{% endif %}}"\n')
    with pytest.raises(TemplateError) as err:
        load_templates(path)
    assert (err.value.line, err.value.field) == (3, "templates.t.prompt")
    assert "not valid Jinja" in err.value.reason


def test_variant_with_empty_field_fails_for_row(tmp_path: Path) -> None:
    path = write(tmp_path, 'templates:\n  t:\n    prompt: "{a|{{ colour }}} mug"\n')
    (t,) = load_templates(path).templates
    with pytest.raises(RenderError) as err:
        t.expand({"colour": ""}, where="c.csv:9")
    assert (err.value.field, err.value.reason) == ("colour", "is empty")

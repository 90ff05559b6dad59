from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from producer.templates import (
    RenderedPrompt,
    RenderError,
    Template,
    TemplateError,
    load_templates,
)

GOOD = """\
key: item_id
defaults:
  model: tiny
  scheduler: euler_a
  steps: 20
  guidance: 7
  width: 512
  height: 768
  seeds: 4
  negative_prompt: "lowres, blurry"
templates:
  studio:
    prompt: "best quality, product photo of {{ title }}, {{ colour }}, white background"
  lifestyle:
    prompt: |
      {{ title }} on a kitchen table,
          morning light
    negative_prompt: "{{ colour }} background, text"
    steps: 30
    model: null
    width: 1024
    seeds: 8
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "templates.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def make(prompt: str, negative: str = "") -> Template:
    return Template(
        name="t",
        prompt=prompt,
        negative_prompt=negative,
        model=None,
        scheduler=None,
        steps=20,
        guidance=7.0,
        width=512,
        height=512,
        seeds=None,
    )


def load_error(tmp_path: Path, text: str) -> TemplateError:
    path = write(tmp_path, text)
    with pytest.raises(TemplateError) as err:
        load_templates(path)
    assert err.value.path == str(path)
    return err.value


# ----------------------------------------------------------------------------- loading


def test_happy_path_defaults_and_overrides(tmp_path: Path) -> None:
    tf = load_templates(write(tmp_path, GOOD))
    assert tf.key == "item_id"
    studio, lifestyle = tf.templates
    assert studio.name == "studio"
    assert (studio.model, studio.scheduler, studio.steps) == ("tiny", "euler_a", 20)
    assert studio.guidance == 7.0 and isinstance(studio.guidance, float)
    assert (studio.width, studio.height, studio.seeds) == (512, 768, 4)
    assert studio.negative_prompt == "lowres, blurry"
    assert lifestyle.model is None  # explicit null: the worker's default model
    assert (lifestyle.steps, lifestyle.width, lifestyle.height, lifestyle.seeds) == (
        30,
        1024,
        768,
        8,
    )
    assert lifestyle.scheduler == "euler_a"


def test_builtin_defaults_and_default_key(tmp_path: Path) -> None:
    tf = load_templates(write(tmp_path, "templates:\n  a:\n    prompt: hello\n"))
    assert tf.key == "sku"
    (t,) = tf.templates
    assert (t.model, t.scheduler, t.steps, t.guidance, t.width, t.height, t.seeds) == (
        None,
        None,
        20,
        7.0,
        512,
        512,
        None,
    )
    assert t.negative_prompt == ""


def test_unknown_key_in_template(tmp_path: Path) -> None:
    err = load_error(
        tmp_path,
        """\
        templates:
          studio:
            prompt: hi
            step: 30
        """,
    )
    assert (err.line, err.field) == (4, "templates.studio.step")
    assert "unknown key" in err.reason
    assert str(err).startswith(f"{tmp_path / 'templates.yaml'}:4: field 'templates.studio.step'")


def test_unknown_key_top_level_and_defaults(tmp_path: Path) -> None:
    err = load_error(tmp_path, "keys: sku\ntemplates:\n  a:\n    prompt: x\n")
    assert (err.line, err.field) == (1, "keys")
    err = load_error(tmp_path, "defaults:\n  guidence: 3\ntemplates:\n  a:\n    prompt: x\n")
    assert (err.line, err.field) == (2, "defaults.guidence")


def test_duplicate_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, "templates:\n  a:\n    prompt: x\n    prompt: y\n")
    assert (err.line, err.field) == (4, "templates.a.prompt")
    assert "duplicate" in err.reason and "line 3" in err.reason


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("steps", "0", "integer in 1..500"),
        ("steps", "501", "integer in 1..500"),
        ("steps", "2.5", "integer in 1..500"),
        ("steps", "true", "integer in 1..500"),
        ("steps", '"20"', "integer in 1..500"),
        ("guidance", "-1", "between 0 and 50"),
        ("guidance", "50.5", "between 0 and 50"),
        ("guidance", "high", "between 0 and 50"),
        ("width", "500", "multiple of 8"),
        ("width", "56", "multiple of 8"),
        ("height", "4104", "multiple of 8"),
        ("seeds", "0", "1..1000"),
        ("seeds", "1001", "1..1000"),
        ("model", '""', "non-empty string"),
        ("scheduler", "3", "non-empty string"),
        ("negative_prompt", "[a, b]", "must be a string"),
    ],
)
def test_setting_validation_names_line_and_field(
    tmp_path: Path, setting: str, value: str, message: str
) -> None:
    text = f"templates:\n  studio:\n    prompt: hi\n    {setting}: {value}\n"
    err = load_error(tmp_path, text)
    assert (err.line, err.field) == (4, f"templates.studio.{setting}")
    assert message in err.reason
    # Same check on defaults, where the dotted path differs.
    err = load_error(
        tmp_path, f"defaults:\n  {setting}: {value}\ntemplates:\n  a:\n    prompt: x\n"
    )
    assert (err.line, err.field) == (2, f"defaults.{setting}")


def test_boundaries_accepted(tmp_path: Path) -> None:
    text = (
        "templates:\n  a:\n    prompt: x\n    steps: 500\n    guidance: 0\n"
        "    width: 64\n    height: 4096\n    seeds: 1000\n"
    )
    (t,) = load_templates(write(tmp_path, text)).templates
    assert (t.steps, t.guidance, t.width, t.height, t.seeds) == (500, 0.0, 64, 4096, 1000)


def test_prompt_required(tmp_path: Path) -> None:
    err = load_error(tmp_path, "templates:\n  studio:\n    steps: 3\n")
    assert (err.line, err.field) == (3, "templates.studio.prompt")
    assert "required" in err.reason


def test_prompt_empty(tmp_path: Path) -> None:
    err = load_error(tmp_path, 'templates:\n  studio:\n    prompt: "   "\n')
    assert (err.line, err.field) == (3, "templates.studio.prompt")


def test_template_must_be_mapping(tmp_path: Path) -> None:
    err = load_error(tmp_path, "templates:\n  studio: just a string\n")
    assert (err.line, err.field) == (2, "templates.studio")
    assert "mapping" in err.reason


def test_bad_template_name(tmp_path: Path) -> None:
    err = load_error(tmp_path, "templates:\n  ../evil:\n    prompt: x\n")
    assert (err.line, err.field) == (2, "templates.../evil")


def test_jinja_syntax_error_names_template_and_line(tmp_path: Path) -> None:
    err = load_error(
        tmp_path,
        """\
        templates:
          ok:
            prompt: fine
          broken:
            prompt: "photo of {{ title }"
        """,
    )
    assert (err.line, err.field) == (5, "templates.broken.prompt")
    assert "'broken'" in err.reason and "syntax error" in err.reason


def test_jinja_syntax_error_in_block_scalar_line(tmp_path: Path) -> None:
    err = load_error(
        tmp_path,
        """\
        templates:
          broken:
            prompt: |
              line one {{ title }}
              line two {% if %}
        """,
    )
    assert (err.line, err.field) == (5, "templates.broken.prompt")


def test_unknown_filter_rejected_at_load(tmp_path: Path) -> None:
    err = load_error(tmp_path, 'templates:\n  a:\n    prompt: "{{ title|center(9) }}"\n')
    assert (err.line, err.field) == (3, "templates.a.prompt")
    assert "center" in err.reason


def test_empty_file(tmp_path: Path) -> None:
    err = load_error(tmp_path, "")
    assert err.line == 1 and "empty" in err.reason
    err = load_error(tmp_path, "# only a comment\n")
    assert err.line == 1 and "empty" in err.reason


def test_no_templates(tmp_path: Path) -> None:
    err = load_error(tmp_path, "key: sku\n")
    assert (err.line, err.field) == (1, "templates")
    err = load_error(tmp_path, "key: sku\ntemplates:\n")
    assert err.field == "templates" and "no templates" in err.reason
    err = load_error(tmp_path, "key: sku\ntemplates: {}\n")
    assert (err.line, err.field) == (2, "templates")


def test_invalid_yaml_has_line(tmp_path: Path) -> None:
    err = load_error(tmp_path, "templates:\n  a:\n    prompt: [unclosed\n  b: 1\n")
    assert err.line is not None and err.line >= 3
    assert "invalid YAML" in err.reason


def test_root_must_be_mapping(tmp_path: Path) -> None:
    err = load_error(tmp_path, "- a\n- b\n")
    assert err.line == 1 and "mapping" in err.reason


def test_bad_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, "key: ''\ntemplates:\n  a:\n    prompt: x\n")
    assert (err.line, err.field) == (1, "key")


# ----------------------------------------------------------------------------- render


def test_render_and_whitespace_collapsing(tmp_path: Path) -> None:
    tf = load_templates(write(tmp_path, GOOD))
    studio, lifestyle = tf.templates
    row = {"item_id": "A1", "title": "Red  mug", "colour": "red", "unused": ""}
    assert studio.render(row, where="cat.csv:2") == (
        "best quality, product photo of Red mug, red, white background",
        "lowres, blurry",
    )
    assert lifestyle.render(row, where="cat.csv:2") == (
        "Red mug on a kitchen table, morning light",
        "red background, text",
    )


def test_fields_lists_referenced_fields(tmp_path: Path) -> None:
    studio, lifestyle = load_templates(write(tmp_path, GOOD)).templates
    assert studio.fields() == frozenset({"title", "colour"})
    assert lifestyle.fields() == frozenset({"title", "colour"})
    t = make("{% set x = title|upper %}{{ x }} {% for w in words %}{{ w }}{% endfor %}", "{{ n }}")
    assert t.fields() == frozenset({"title", "words", "n"})


def test_filters_and_conditionals_work() -> None:
    t = make("{{ title|upper }}{% if colour == 'red' %}, warm{% endif %}")
    assert t.render({"title": "mug", "colour": "red"}, where="c:2") == ("MUG, warm", "")


def test_missing_field() -> None:
    with pytest.raises(RenderError) as err:
        make("photo of {{ title }}", "{{ colour }}").render({"title": "x"}, where="cat.csv:7")
    assert (err.value.field, err.value.reason, err.value.where) == (
        "colour",
        "is missing",
        "cat.csv:7",
    )
    assert str(err.value) == "cat.csv:7: template 't': field 'colour': is missing"


def test_empty_field() -> None:
    with pytest.raises(RenderError) as err:
        make("photo of {{ title }}").render({"title": "  "}, where="cat.csv:3")
    assert (err.value.field, err.value.reason) == ("title", "is empty")
    assert "cat.csv:3" in str(err.value)


@pytest.mark.parametrize(
    ("source", "fields"),
    [
        ("{{ ''.__class__.__mro__ }}", {}),
        ("{{ title.__class__.__mro__[1].__subclasses__() }}", {"title": "x"}),
        ("{{ cycler.__init__.__globals__ }}", {}),
        ("{{ cycler.__init__.__globals__ }}", {"cycler": "x"}),
        ("{{ lipsum.__globals__['os'] }}", {"lipsum": "x"}),
        ("{{ title.center(1000000000) }}", {"title": "x"}),
        ("{{ title * 1000000000 }}", {"title": "x"}),
        ("{{ 9 ** 999999999 }}", {}),
        ("{{ title.format_map({}) }}", {"title": "x"}),
    ],
)
def test_sandbox_escapes_fail_cleanly(source: str, fields: dict[str, str]) -> None:
    with pytest.raises(RenderError) as err:
        make(source).render(fields, where="cat.csv:2")
    message = str(err.value)
    assert message.startswith("cat.csv:2: ")
    for leak in ("<class", "<function", "<built-in", "0x", "__builtins__"):
        assert leak not in message


def test_sandbox_reason_is_clear() -> None:
    with pytest.raises(RenderError) as err:
        make("{{ title.__class__ }}").render({"title": "x"}, where="c:2")
    assert err.value.field == "prompt"
    assert "sandbox" in err.value.reason and "__class__" in err.value.reason


def test_runtime_error_in_template_is_render_error() -> None:
    with pytest.raises(RenderError, match="ZeroDivisionError"):
        make("{{ 1 / 0 }}").render({}, where="c:2")


def test_too_long_output() -> None:
    with pytest.raises(RenderError) as err:
        make("{{ title }} {{ title }}").render({"title": "x" * 1500}, where="c:2")
    assert err.value.field == "prompt" and "limit 2000" in err.value.reason


def test_prompt_rendering_to_nothing_is_an_error() -> None:
    with pytest.raises(RenderError, match="empty prompt"):
        make("{% if colour == 'blue' %}blue{% endif %}").render({"colour": "red"}, where="c:2")


# ----------------------------------------------------------------------------- when


WHEN = """\
defaults:
  when: "category == 'shoes'"
templates:
  shoes:
    prompt: "{{ title }}"
  pricey:
    prompt: "{{ title }}"
    when: "category == 'shoes' and price|float > 20"
  always:
    prompt: "{{ title }}"
    when: null
"""


def test_when_true_false_and_defaults(tmp_path: Path) -> None:
    shoes, pricey, always = load_templates(write(tmp_path, WHEN)).templates
    cheap = {"title": "x", "category": "shoes", "price": "10"}
    dear = {"title": "x", "category": "shoes", "price": "25.5"}
    hat = {"title": "x", "category": "hats", "price": "99"}
    assert [shoes.applies_to(r, where="c:2") for r in (cheap, dear, hat)] == [True, True, False]
    assert [pricey.applies_to(r, where="c:2") for r in (cheap, dear, hat)] == [False, True, False]
    assert always.when is None and always.applies_to(hat, where="c:2") is True
    # An empty when-only field is fine: float("") falls back to 0.0.
    assert pricey.applies_to({**dear, "price": ""}, where="c:2") is False


def test_when_fields_vs_prompt_fields(tmp_path: Path) -> None:
    _shoes, pricey, _always = load_templates(write(tmp_path, WHEN)).templates
    assert pricey.prompt_fields() == frozenset({"title"})
    assert pricey.fields() == frozenset({"title", "category", "price"})
    # Empty when-only fields do not stop the prompt from rendering.
    (out,) = pricey.expand({"title": "boot", "category": "", "price": ""}, where="c:2")
    assert out.prompt == "boot"


def test_when_missing_field_and_eval_error(tmp_path: Path) -> None:
    _shoes, pricey, _always = load_templates(write(tmp_path, WHEN)).templates
    with pytest.raises(RenderError) as err:
        pricey.applies_to({"title": "x", "category": "shoes"}, where="c.csv:4")
    assert (err.value.field, err.value.where) == ("price", "c.csv:4")
    path = write(tmp_path, 'templates:\n  t:\n    prompt: x\n    when: "1 / (n|int)"\n')
    (t,) = load_templates(path).templates
    assert t.applies_to({"n": "2"}, where="c:2") is True
    with pytest.raises(RenderError) as err:
        t.applies_to({"n": "0"}, where="c.csv:5")
    assert err.value.field == "when" and "ZeroDivisionError" in err.value.reason


def test_when_sandbox_escape_fails(tmp_path: Path) -> None:
    path = write(tmp_path, 'templates:\n  t:\n    prompt: x\n    when: "a.__class__"\n')
    (t,) = load_templates(path).templates
    with pytest.raises(RenderError) as err:
        t.applies_to({"a": "x"}, where="c:2")
    assert err.value.field == "when" and "sandbox" in err.value.reason
    assert "<class" not in str(err.value)


def test_when_syntax_error_at_load(tmp_path: Path) -> None:
    err = load_error(tmp_path, 'templates:\n  t:\n    prompt: x\n    when: "price >"\n')
    assert (err.line, err.field) == (4, "templates.t.when")
    assert "syntax error" in err.reason and "'t'" in err.reason
    err = load_error(tmp_path, 'defaults:\n  when: "a|center"\ntemplates:\n  t:\n    prompt: x\n')
    assert (err.line, err.field) == (2, "defaults.when")


# ----------------------------------------------------------------------------- presets


PRESETS = """\
presets:
  photo:
    before: "best quality, {{ style }}"
    after: "soft light"
    negative_prompt: "watermark"
  painting:
    before: "{oil|watercolour} painting"
  bare:
defaults:
  negative_prompt: "blurry"
  preset: photo
templates:
  a:
    prompt: "{{ title }}"
  b:
    prompt: "{{ title }}"
    preset: painting
    negative_prompt: "{text|logo}"
  c:
    prompt: "{{ title }}"
    preset: null
"""


def test_presets_join_parts(tmp_path: Path) -> None:
    a, b, c = load_templates(write(tmp_path, PRESETS)).templates
    row = {"title": "mug", "style": "photo"}
    assert a.preset == "photo"
    assert a.expand(row, where="c:2") == [
        RenderedPrompt("", "best quality, photo, mug, soft light", "watermark, blurry")
    ]
    assert [(r.variant, r.prompt, r.negative_prompt) for r in b.expand(row, where="c:2")] == [
        ("oil / text", "oil painting, mug", "text"),
        ("oil / logo", "oil painting, mug", "logo"),
        ("watercolour / text", "watercolour painting, mug", "text"),
        ("watercolour / logo", "watercolour painting, mug", "logo"),
    ]
    assert c.render(row, where="c:2") == ("mug", "blurry")


def test_preset_part_rendering_empty_is_skipped() -> None:
    t = Template(
        name="t",
        prompt="{{ title }}",
        negative_prompt="",
        model=None,
        scheduler=None,
        steps=20,
        guidance=7.0,
        width=512,
        height=512,
        seeds=None,
        preset="p",
        preset_before="{% if hq == 'y' %}masterpiece{% endif %}",
        preset_after="studio",
    )
    assert t.render({"title": "mug", "hq": "n"}, where="c:2") == ("mug, studio", "")
    assert t.render({"title": "mug", "hq": "y"}, where="c:2") == ("masterpiece, mug, studio", "")


def test_unknown_preset(tmp_path: Path) -> None:
    err = load_error(
        tmp_path, "presets:\n  p: {}\ntemplates:\n  t:\n    prompt: x\n    preset: q\n"
    )
    assert (err.line, err.field) == (6, "templates.t.preset")
    assert "'q'" in err.reason and "unknown preset" in err.reason
    err = load_error(tmp_path, "defaults:\n  preset: q\ntemplates:\n  t:\n    prompt: x\n")
    assert (err.line, err.field) == (2, "defaults.preset")


def test_preset_errors_point_at_preset(tmp_path: Path) -> None:
    err = load_error(tmp_path, "presets:\n  p:\n    befor: x\ntemplates:\n  t:\n    prompt: x\n")
    assert (err.line, err.field) == (3, "presets.p.befor")
    text = 'presets:\n  p:\n    after: "{{ x }"\ntemplates:\n  t:\n    prompt: x\n    preset: p\n'
    err = load_error(tmp_path, text)
    assert (err.line, err.field) == (3, "presets.p.after")
    text = 'presets:\n  p:\n    after: "__nope__"\ntemplates:\n  t:\n    prompt: x\n    preset: p\n'
    err = load_error(tmp_path, text)
    assert (err.line, err.field) == (3, "presets.p.after") and "__nope__" in err.reason


def test_fields_include_preset_fields(tmp_path: Path) -> None:
    a, _b, _c = load_templates(write(tmp_path, PRESETS)).templates
    assert a.prompt_fields() == frozenset({"title", "style"})

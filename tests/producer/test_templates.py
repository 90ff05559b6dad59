from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from producer.templates import (
    MAX_PROMPT_CHARS,
    MODEL_LENGTH,
    TEMPLATE_NAME_LENGTH,
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
    t = make("{% set x = title|upper %}{{ x }} {% if words %}{{ words }}{% endif %}", "{{ n }}")
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


# ----------------------------------------------------------------------------- bounded rendering

# A 20-character field, as in the review that found these templates unbounded.
TITLE = {"title": "t" * 20}
# Far more than a bounded render of a tiny template needs, even on a loaded CI machine; the
# unbounded renders took minutes or gigabytes.
QUICK_SECONDS = 2.0


def render_error(source: str, fields: dict[str, str]) -> RenderError:
    started = time.monotonic()
    with pytest.raises(RenderError) as err:
        make(source).render(fields, where="cat.csv:2")
    assert time.monotonic() - started < QUICK_SECONDS
    assert str(err.value).startswith("cat.csv:2: template 't': field 'prompt': ")
    return err.value


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        # 4,004,000 characters from a 20-character field, before the 2,000-character check.
        ('{{ (title*100)|replace("", title*100) }}', "replace would build a text of 4004000"),
        # Nested, that used to multiply again.
        (
            '{{ ((title*100)|replace("", title*100))|replace("", title*100) }}',
            "replace would build a text of 4004000",
        ),
        ("{{ title|join(title|join(title)) }}", "join would build a text of 7620"),
        ('{% filter replace("", title) %}{{ title*100 }}{% endfilter %}', "replace would build"),
        # Doubling a text in "set"s: 2**n characters after n lines.
        (
            "{% set a = title*100 %}{% set a = a ~ a %}{% set a = a ~ a %}{{ a|truncate(9) }}",
            "'~' would build a text of 4000",
        ),
        (
            "{% set a = title*100 %}{% set a = a + a %}{% set a = a + a %}{{ a|truncate(9) }}",
            "'+' would build a text of 4000",
        ),
        # 100 references to one 2000-character text are 200,000 characters once written out.
        ("{{ [title*100]*100 }}", "'*' would build a text of 200100"),
        ('{{ "%099999999d" % 1 }}', "'%' string formatting is not allowed"),
        ("{{ ((2**64)**64)**64 }}", "the result of '**' is too large a number"),
        (
            "{% set n = 2**64 %}{% set n = n*n %}{% set n = n*n %}{% set n = n*n %}"
            "{% set n = n*n %}{% set n = n*n %}{% set n = n*n %}{{ n % 10 }}",
            "the result of '*' is too large a number",
        ),
    ],
)
def test_building_a_huge_value_fails_quickly(source: str, reason: str) -> None:
    err = render_error(source, TITLE)
    assert reason in err.reason, err.reason
    assert "forbidden by the template sandbox" in err.reason
    if "would build" in reason:
        assert f"prompt limit {MAX_PROMPT_CHARS}" in err.reason


def test_bounded_operations_still_work() -> None:
    fields = {"title": "red mug", "price": "7", "description": "word " * 3000}
    source = (
        '{{ title|replace(" ", "-") }} {{ [title, "blue"]|join(" and ") }} {{ "~" ~ title }} '
        '{{ title + "!" }} {{ price|int % 4 }} {{ 2 ** 10 }} {{ "ab" * 3 }} '
        # A catalogue field longer than the limit may be reshaped without growing.
        "{{ description|replace('word', 'text')|truncate(14, True, '') }}"
    )
    assert make(source).render(fields, where="c:2")[0] == (
        "red-mug red mug and blue ~red mug red mug! 3 1024 ababab text text text"
    )
    # Up to the limit is fine; one character more is not.
    assert make("{{ title|replace('t', 'tt') }}").render(TITLE, where="c:2")[0] == "t" * 40
    assert len(make("{{ (title*50)|replace('t', 'tt') }}").render(TITLE, where="c:2")[0]) == 2000
    assert "2001" in render_error("{{ (title*50)|replace('t', 'tt') ~ '!' }}", TITLE).reason


def test_methods_are_not_written_into_the_prompt() -> None:
    # Written out, a method would put a memory address, different on every run, into the
    # prompt and so into the job's dedupe key.
    for source in ("{{ title.upper }}", "{{ title['upper'] }}", "{{ title.format }}"):
        err = render_error(source, TITLE)
        assert "'upper'" in err.reason or "'format'" in err.reason
        assert "0x" not in str(err)


@pytest.mark.parametrize(
    ("prompt", "line", "reason"),
    [
        # Three nested loops over a 2000-character text: minutes per row.
        (
            "{% for a in title*100 %}{% for b in title*100 %}{% for c in title*100 %}"
            "{% endfor %}{% endfor %}{% endfor %}",
            1,
            "'for' loops are not allowed in prompts",
        ),
        (
            "{% for x in title recursive %}{{ loop(x) }}{% endfor %}",
            1,
            "'for' loops are not allowed in prompts",
        ),
        # A macro calling itself twice doubles the work with every level.
        (
            "{% macro m(n) %}{{ m(n) }}{{ m(n) }}{% endmacro %}{{ m(1) }}",
            1,
            "macros are not allowed in prompts",
        ),
        ("{% call x() %}y{% endcall %}", 1, "'call' blocks are not allowed in prompts"),
        ("{% include 'other.txt' %}", 1, "'include' is not allowed in prompts"),
    ],
)
def test_loops_and_macros_fail_at_load(tmp_path: Path, prompt: str, line: int, reason: str) -> None:
    started = time.monotonic()
    path = tmp_path / "templates.yaml"
    # JSON is a double-quoted YAML scalar: the prompt's quotes and newline are escaped.
    path.write_text(
        "templates:\n  studio:\n    prompt: " + json.dumps(prompt) + "\n", encoding="utf-8"
    )
    with pytest.raises(TemplateError) as err:
        load_templates(path)
    assert time.monotonic() - started < QUICK_SECONDS
    assert (err.value.path, err.value.line, err.value.field) == (
        str(path),
        3,
        "templates.studio.prompt",
    )
    assert err.value.reason.startswith(f"template 'studio': {reason}")
    assert err.value.reason.endswith(f"(line {line} of the prompt)")


def test_loop_in_a_block_prompt_names_its_line(tmp_path: Path) -> None:
    text = """\
    templates:
      studio:
        prompt: |
          photo of {{ title }},
          {% for c in title %}{{ c }}{% endfor %}
    """
    err = load_error(tmp_path, text)
    assert (err.line, err.field) == (5, "templates.studio.prompt")
    assert "'for' loops are not allowed" in err.reason and "line 2 of the prompt" in err.reason


def test_loop_from_a_wildcard_fails_at_load(tmp_path: Path) -> None:
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "style.txt").write_text(
        "plain\n{% for c in title %}{{ c }}{% endfor %}\n", encoding="utf-8"
    )
    err = load_error(tmp_path, "templates:\n  studio:\n    prompt: '{{ title }}, __style__'\n")
    assert (err.line, err.field) == (3, "templates.studio.prompt")
    assert "'for' loops are not allowed" in err.reason and "template 'studio'" in err.reason


# ----------------------------------------------------------------------------- schedulers


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        ("euler_a", "euler_a"),  # the canonical spelling is stored as it is
        ("Euler a", "euler_a"),
        ("EULER_A", "euler_a"),
        ("DPM++ 2M Karras", "dpmpp_2m_karras"),
        ("ddim", "ddim"),
        ("default", None),
        ("Default", None),
        ("null", None),
    ],
)
def test_scheduler_is_stored_canonical(tmp_path: Path, written: str, stored: str | None) -> None:
    # The job row and its dedupe key take the template's scheduler: one name per scheduler,
    # so a spelling change re-renders nothing.
    text = f"templates:\n  a:\n    prompt: x\n    scheduler: {written}\n"
    (t,) = load_templates(write(tmp_path, text)).templates
    assert t.scheduler == stored
    text = f"defaults:\n  scheduler: {written}\ntemplates:\n  a:\n    prompt: x\n"
    (t,) = load_templates(write(tmp_path, text)).templates
    assert t.scheduler == stored


def test_readme_schedulers_are_accepted(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    (line,) = [line for line in readme.splitlines() if line.strip().startswith("scheduler:")]
    names = line.split("#", 1)[1].split(",")
    assert len(names) == 7
    for name in names:
        text = f"templates:\n  a:\n    prompt: x\n    scheduler: {name.strip()}\n"
        (t,) = load_templates(write(tmp_path, text)).templates
        assert t.scheduler == (None if name.strip() == "default" else name.strip())


def test_unknown_scheduler_fails_at_load(tmp_path: Path) -> None:
    err = load_error(tmp_path, "templates:\n  a:\n    prompt: x\n    scheduler: euler_ancestral\n")
    assert (err.line, err.field) == (4, "templates.a.scheduler")
    assert err.reason == (
        "unknown scheduler 'euler_ancestral' (known: default, euler, euler_a, ddim, dpmpp_2m, "
        "dpmpp_2m_karras, pndm; A1111 names such as 'Euler a' work too)"
    )
    err = load_error(tmp_path, "defaults:\n  scheduler: lms\ntemplates:\n  a:\n    prompt: x\n")
    assert (err.line, err.field) == (2, "defaults.scheduler")
    assert "unknown scheduler 'lms'" in err.reason


# ----------------------------------------------------------------------------- column lengths


def test_template_name_longer_than_its_column(tmp_path: Path) -> None:
    assert TEMPLATE_NAME_LENGTH == 200  # jobs.template
    longest = "n" * TEMPLATE_NAME_LENGTH
    (t,) = load_templates(write(tmp_path, f"templates:\n  {longest}:\n    prompt: x\n")).templates
    assert t.name == longest
    err = load_error(tmp_path, f"templates:\n  ok:\n    prompt: x\n  {longest}n:\n    prompt: y\n")
    assert (err.line, err.field) == (4, f"templates.{longest}n")
    assert err.reason == "template name is 201 characters; the jobs table holds at most 200"


def test_model_longer_than_its_column(tmp_path: Path) -> None:
    assert MODEL_LENGTH == 500  # jobs.model
    longest = "org/" + "m" * (MODEL_LENGTH - 4)
    text = f"templates:\n  a:\n    prompt: x\n    model: {longest}\n"
    (t,) = load_templates(write(tmp_path, text)).templates
    assert t.model == longest
    err = load_error(tmp_path, f"templates:\n  a:\n    prompt: x\n    model: {longest}m\n")
    assert (err.line, err.field) == (4, "templates.a.model")
    assert err.reason == "model name is 501 characters; the jobs table holds at most 500"
    err = load_error(tmp_path, f"defaults:\n  model: {longest}m\ntemplates:\n  a:\n    prompt: x\n")
    assert (err.line, err.field) == (2, "defaults.model")
    err = load_error(tmp_path, 'templates:\n  a:\n    prompt: x\n    model: "tiny\\0"\n')
    assert (err.line, err.field) == (4, "templates.a.model")
    assert "NUL character" in err.reason

"""YAML prompt templates: loading with located validation errors, and sandboxed rendering.

File format::

    key: sku                 # catalogue column identifying an item (default "sku")
    defaults:                # optional, applied to every template
      model: tiny            # null / absent means "the worker's configured default model"
      scheduler: euler_a
      steps: 20
      guidance: 7.0
      width: 512
      height: 512
      seeds: 4               # optional sweep size; the CLI --seeds overrides it
      negative_prompt: "lowres, blurry"
      preset: photo          # optional, see presets
      max_variants: 16       # cap on the variants one template may expand to
      when: null             # optional condition over catalogue fields
    presets:                 # optional; the prompt formula: style tags, subject, scene
      photo:
        before: "best quality, {product photo|studio photo}"   # quality and style tags
        after: "soft light"                                    # scene details
        negative_prompt: "text, watermark"
    templates:
      studio:
        prompt: "{{ colour }} {{ title }}, {white|grey} background"
        when: "category == 'mugs' and price|float > 20"
        steps: 25            # any default may be overridden per template
      on_table:
        kind: img2img        # txt2img (default), img2img, inpaint or controlnet
        image: photo         # the catalogue column holding the product image
        strength: 0.6
        prompt: "{{ title }} on an oak table"

Job kinds, the catalogue image, masks, ControlNet and LoRA/embedding adapters are described
in producer.conditioning; they may be set in ``defaults`` too.

Final prompt = before, prompt, after (joined with ", ", empty parts skipped); final
negative = preset negative_prompt, template negative_prompt.  Variant syntax ({a|b},
__wildcard__, see producer.variants) is expanded once at load over all these parts jointly;
wildcards are read from the ``wildcards/`` folder next to the template file.

The file is walked as a YAML node tree (``yaml.compose``) rather than loaded into plain
dicts, so every error can name the line of the node that caused it.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.filters
import jinja2.meta
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
import jinja2.sandbox
import yaml

from db.limits import string_length, unstorable
from db.models import Job
from pixelmill.errors import BadInputError, InputError
from pixelmill.schedulers import KNOWN_SCHEDULERS, canonical_scheduler
from producer.conditioning import CONDITIONING_KEYS, Conditioning, ConditioningReader, FileHasher
from producer.variants import Variant, VariantError, expand_variants

# Rendered prompts longer than this are certainly a template bug (CLIP reads ~77 tokens).
MAX_PROMPT_CHARS = 2000

# Used when neither the template nor ``defaults`` sets a value (the A1111 defaults).
BUILTIN_DEFAULTS: dict[str, Any] = {
    "model": None,
    "scheduler": None,
    "steps": 20,
    "guidance": 7.0,
    "width": 512,
    "height": 512,
    "seeds": None,
    "negative_prompt": "",
    "when": None,
    "preset": None,
    "max_variants": 16,
}

_TOP_KEYS = frozenset({"key", "defaults", "presets", "templates"})
_SETTING_KEYS = frozenset(BUILTIN_DEFAULTS)
_DEFAULT_KEYS = _SETTING_KEYS | CONDITIONING_KEYS
_TEMPLATE_KEYS = _DEFAULT_KEYS | {"prompt"}
_PRESET_KEYS = frozenset({"before", "after", "negative_prompt"})

# Template parts in the order their variant choices appear in a label.  Keys are the
# part names VariantError reports; values the output a part ends up in.
_PROMPT_PARTS = ("before", "prompt", "after")
_NEGATIVE_PARTS = ("preset_negative_prompt", "negative_prompt")

# Template names end up in job rows, seeds and output paths, so keep them path-safe.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# The jobs table's columns for a template's name and model: a longer value would abort the
# whole produce at the database, so the loader refuses it with the line.
TEMPLATE_NAME_LENGTH = string_length(Job.__table__.c.template)
MODEL_LENGTH = string_length(Job.__table__.c.model)


class TemplateError(InputError):
    """A problem in the template file, located by file, YAML line and dotted field path."""


class RenderError(BadInputError):
    """Rendering a template for one catalogue row failed.

    ``where`` is the caller's "file:line" of the catalogue row; ``field`` names the
    catalogue field (or "prompt"/"negative_prompt" for output problems) when known.
    """

    def __init__(self, where: str, field: str | None, reason: str, template: str | None = None):
        self.where = where
        self.field = field
        self.reason = reason
        self.template = template
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [self.where]
        if self.template is not None:
            parts.append(f"template {self.template!r}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        parts.append(self.reason)
        return ": ".join(parts)


# --------------------------------------------------------------------------- sandbox

# Prompts only need simple text shaping.  Every other built-in filter is left out: some
# can allocate unbounded memory (center, indent, wordwrap with a huge width) and none are
# needed to write a prompt.  Unknown filters fail when the file is loaded.
_ALLOWED_FILTERS = (
    "capitalize",
    "d",
    "default",
    "first",
    "float",  # for `when` conditions such as "price|float > 20"
    "int",
    "join",
    "last",
    "length",
    "lower",
    "replace",
    "round",
    "string",
    "title",
    "trim",
    "truncate",
    "upper",
)

# A prompt never needs a text longer than the prompt limit, so an operation that builds one
# (``*``, ``+``, ``~``, ``replace``, ``join``) is refused before it allocates it: otherwise a
# few nested filters can build gigabytes before the rendered prompt's length is checked
# (``(title*100)|replace("", title*100)`` is 4 million characters).  An operation may still
# keep a longer catalogue field at its length, so "description|replace('\n', ' ')|
# truncate(300)" works on a long description.
_MAX_BUILT_CHARS = MAX_PROMPT_CHARS
# Numbers: "(2**64)**64" or a number squared again and again in "{% set %}"s grows without
# bound; no prompt needs more than a few digits.
_MAX_EXPONENT = 64
_MAX_INT_BITS = 4096


def _size(value: Any) -> int:
    """About how many characters ``value`` is as text: strings by length, lists by their items
    (a list of 2000 long strings is as big as their join); anything else counts as 1."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list | tuple):
        return len(value) + sum(map(_size, value))
    return 1


def _check_built(operation: str, size: int, *inputs: int) -> None:
    if size > max(_MAX_BUILT_CHARS, *inputs):
        raise jinja2.sandbox.SecurityError(
            f"{operation} would build a text of {size} characters (prompt limit {MAX_PROMPT_CHARS})"
        )


def _bounded_replace(s: Any, old: Any, new: Any, count: int | None = None) -> str:
    """Jinja's ``replace`` filter, refusing a result longer than the limit before building it."""
    text, old_text, new_text = str(s), str(old), str(new)
    found = text.count(old_text)  # "" is found between every two characters
    replaced = found if count is None or count < 0 else min(found, count)
    _check_built("replace", len(text) + replaced * (len(new_text) - len(old_text)), len(text))
    return text.replace(old_text, new_text, -1 if count is None else count)


@jinja2.pass_environment
def _bounded_join(
    environment: jinja2.Environment, value: Any, d: Any = "", attribute: Any = None
) -> str:
    """Jinja's ``join`` filter, refusing a result longer than the limit before building it."""
    if attribute is not None:
        value = map(jinja2.filters.make_attrgetter(environment, attribute), value)
    texts = [str(item) for item in value]
    separator = str(d)
    joined = sum(map(len, texts))
    _check_built("join", joined + len(separator) * max(len(texts) - 1, 0), joined)
    return separator.join(texts)


# The filters that can build a text longer than their input.
_BOUNDED_FILTERS: dict[str, Callable[..., Any]] = {
    "join": _bounded_join,
    "replace": _bounded_replace,
}


class _NotAllowed(jinja2.TemplateSyntaxError):
    """A Jinja construct prompts may not use; raised when the template is parsed (loaded)."""


# Constructs that repeat work, the only way to make rendering one row slow (three nested
# loops over a 2000-character text are 8 billion steps; a macro calling itself twice per
# call doubles with every level).  Catalogue fields are single texts, so a prompt has nothing
# to loop over.  Other templates cannot be reached (there is no loader).
_NOT_ALLOWED: dict[type[jinja2.nodes.Node], str] = {
    jinja2.nodes.For: "'for' loops are not allowed in prompts (catalogue fields are single texts)",
    jinja2.nodes.Macro: "macros are not allowed in prompts",
    jinja2.nodes.CallBlock: "'call' blocks are not allowed in prompts",
    jinja2.nodes.Extends: "'extends' is not allowed in prompts",
    jinja2.nodes.Include: "'include' is not allowed in prompts",
    jinja2.nodes.Import: "'import' is not allowed in prompts",
    jinja2.nodes.FromImport: "'import' is not allowed in prompts",
}


class _PromptCodeGenerator(jinja2.compiler.CodeGenerator):
    """Compiles ``a ~ b`` to the sandbox's bounded concatenation: the plain one is a
    module-level function of Jinja's runtime, which a sandbox cannot intercept."""

    @jinja2.compiler.optimizeconst
    def visit_Concat(self, node: jinja2.nodes.Concat, frame: jinja2.compiler.Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _PromptSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox prompts render in.

    On top of Jinja's sandbox (no underscore attributes, no mutation of containers):
    no globals (``range``, ``cycler``, ``lipsum`` ... are not needed and would otherwise be
    reported as catalogue fields), a filter allow-list, no calls (string methods such as
    ``title.center(10**9)`` could exhaust memory; filters cover the legitimate uses), no
    loops or macros (refused when the template is parsed), and every operation that can
    build a long text or a huge number bounded.  Rendering one row therefore takes time
    and memory in proportion to the template and the row.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _PromptCodeGenerator

    def __init__(self) -> None:
        super().__init__(undefined=jinja2.StrictUndefined, autoescape=False)
        self.globals.clear()
        self.filters = {
            name: _BOUNDED_FILTERS.get(name, self.filters[name]) for name in _ALLOWED_FILTERS
        }

    def _parse(self, source: str, name: str | None, filename: str | None) -> jinja2.nodes.Template:
        tree = super()._parse(source, name, filename)
        for node in tree.find_all(tuple(_NOT_ALLOWED)):
            raise _NotAllowed(_NOT_ALLOWED[type(node)], node.lineno, name, filename)
        return tree

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        # A method cannot be called, and written out it would put its repr, with a memory
        # address that differs on every run, into the prompt and so into the dedupe key.
        return not callable(value) and super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any) -> None:
        return None  # str.format is a method like any other (see is_safe_attribute)

    def is_safe_callable(self, obj: Any) -> bool:
        return False  # no globals, no macros: nothing a prompt calls is ours

    def call(self, context: jinja2.runtime.Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        # Same as the base class, but without putting the object's repr (with its memory
        # address) into the message.
        raise jinja2.sandbox.SecurityError(
            "calling functions or methods is not allowed in prompts (use filters)"
        )

    def bounded_concat(self, values: tuple[Any, ...]) -> str:
        """``a ~ b ~ ...``: each value as text, joined, refused past the limit."""
        texts = [str(value) for value in values]
        _check_built("'~'", sum(map(len, texts)), *map(len, texts))
        return "".join(texts)

    def call_binop(self, context: jinja2.runtime.Context, op: str, left: Any, right: Any) -> Any:
        if op == "%" and isinstance(left, str):
            # "%0999999999d" % 1 is a gigabyte; prompts write "{{ a }}, {{ b }}" instead.
            raise jinja2.sandbox.SecurityError("'%' string formatting is not allowed in prompts")
        if op == "+" and isinstance(left, str | list | tuple):
            _check_built("'+'", _size(left) + _size(right), _size(left), _size(right))
        if op == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int):
                    _check_built("'*'", _size(seq) * count, _size(seq) if count <= 1 else 0)
        if op == "**" and isinstance(right, int | float) and abs(right) > _MAX_EXPONENT:
            raise jinja2.sandbox.SecurityError(f"exponent {right} is too large")
        if _is_int(left) and _is_int(right):
            bits = {"*": left.bit_length() + right.bit_length(), "**": left.bit_length() * right}
            if bits.get(op, 0) > _MAX_INT_BITS:
                raise jinja2.sandbox.SecurityError(f"the result of '{op}' is too large a number")
        binop: Callable[[Any, Any], Any] = {
            "*": operator.mul,
            "**": operator.pow,
            "+": operator.add,
            "%": operator.mod,
        }[op]
        return binop(left, right)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# One environment is shared: it holds no per-render state.
_ENV = _PromptSandbox()


def _collapse(text: str) -> str:
    # Multi-line YAML prompts and Jinja blocks leave runs of spaces and newlines; the
    # model does not care and job rows are easier to read on one line.
    return " ".join(text.split())


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class RenderedPrompt:
    variant: str  # the variant label ("" when the template has no variant syntax)
    prompt: str
    negative_prompt: str


class _Substitution:
    """A part that is only literal text and ``{{ field }}``s, rendered without Jinja.

    Most catalogue prompts are exactly that, and a bulk run renders them millions of times:
    one ``str.format_map`` call is several times cheaper than a Jinja render (which builds a
    context each call). Anything else (filters, conditions, attribute access) goes through
    the sandboxed Jinja template; the output is the same either way.
    """

    def __init__(self, pieces: list[tuple[bool, str]]) -> None:
        self.pieces = pieces  # (is_field, literal text or field name)
        self.literal = not any(is_field for is_field, _text in pieces)
        # Jinja names are identifiers, so "{name}" is a plain format field; literal braces
        # are doubled.
        self._format = "".join(
            "{" + text + "}" if is_field else text.replace("{", "{{").replace("}", "}}")
            for is_field, text in pieces
        )

    @classmethod
    def compile(cls, source: str) -> _Substitution | None:
        body = _ENV.parse(source).body
        pieces: list[tuple[bool, str]] = []
        for node in body:
            if not isinstance(node, jinja2.nodes.Output):
                return None
            for child in node.nodes:
                if isinstance(child, jinja2.nodes.TemplateData):
                    pieces.append((False, child.data))
                elif isinstance(child, jinja2.nodes.Name) and child.ctx == "load":
                    pieces.append((True, child.name))
                else:
                    return None
        return cls(pieces)

    def render(self, context: Mapping[str, str]) -> str:
        return self._format.format_map(context)


_Part = _Substitution | jinja2.Template


def _compile_part(source: str) -> _Part:
    return _Substitution.compile(source) or _ENV.from_string(source)


@dataclass(frozen=True)
class _CompiledVariant:
    label: str
    # Non-empty parts only, compiled once: bulk runs expand every template for every row.
    prompt_parts: tuple[_Part, ...]
    negative_parts: tuple[_Part, ...]
    # The negative prompt when it is literal text (the usual case): rendered once, not per row.
    constant_negative: str | None = None


def _constant(parts: tuple[_Part, ...]) -> bool:
    return all(isinstance(part, _Substitution) and part.literal for part in parts)


def _expression_fields(source: str) -> frozenset[str]:
    # What Environment.compile_expression parses, wrapped as a template so jinja2.meta can
    # list the undeclared names.
    parser = jinja2.parser.Parser(_ENV, source, state="variable")
    body = jinja2.nodes.Template([jinja2.nodes.Output([parser.parse_expression()])], lineno=1)
    body.set_environment(_ENV)
    return frozenset(jinja2.meta.find_undeclared_variables(body))


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str
    negative_prompt: str
    model: str | None
    scheduler: str | None
    steps: int
    guidance: float
    width: int
    height: int
    seeds: int | None
    when: str | None = None
    max_variants: int = 16
    preset: str | None = None  # the preset's name; its texts are below
    preset_before: str = ""
    preset_after: str = ""
    preset_negative_prompt: str = ""
    # Where __name__ wildcards are read from (None: wildcards are an error).
    wildcards: Path | None = None
    # The job kind, the catalogue columns of its images, and its options (adapters, ...).
    conditioning: Conditioning = field(default_factory=Conditioning)
    _variants: tuple[_CompiledVariant, ...] = field(init=False, repr=False, compare=False)
    _when: Callable[..., Any] | None = field(init=False, repr=False, compare=False)
    _prompt_fields: frozenset[str] = field(init=False, repr=False, compare=False)
    _checked_fields: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _only_substitutions: bool = field(init=False, repr=False, compare=False)
    _when_fields: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Expands variants and compiles everything once.

        Raises VariantError (naming the part: "prompt", "before", ...) for bad variant syntax
        and jinja2.TemplateSyntaxError for bad Jinja; the loader turns both into located
        TemplateErrors.
        """
        sources = {
            "before": self.preset_before,
            "prompt": self.prompt,
            "after": self.preset_after,
            "preset_negative_prompt": self.preset_negative_prompt,
            "negative_prompt": self.negative_prompt,
        }
        names = (*_PROMPT_PARTS, *_NEGATIVE_PARTS)
        expanded = expand_variants(
            [(name, sources[name]) for name in names],
            wildcards=self.wildcards,
            max_variants=self.max_variants,
        )
        cache: dict[str, _Part] = {}
        fields: set[str] = set()
        compiled: list[_CompiledVariant] = []
        for variant in expanded:
            texts = dict(zip(names, variant.texts, strict=True))
            parts: dict[str, tuple[_Part, ...]] = {}
            for output, part_names in (("prompt", _PROMPT_PARTS), ("neg", _NEGATIVE_PARTS)):
                templates: list[_Part] = []
                for name in part_names:
                    text = texts[name]
                    if not text.strip():
                        continue  # an empty part is skipped, not joined as ", ,"
                    if text not in cache:
                        fields |= self._parse_fields(name, text, variant)
                        cache[text] = _compile_part(text)
                    templates.append(cache[text])
                parts[output] = tuple(templates)
            negative = None
            if _constant(parts["neg"]):
                try:
                    negative = self._render_parts(parts["neg"], {}, "negative_prompt", "")
                except RenderError:
                    negative = None  # too long: every row reports it, as it always did
            compiled.append(
                _CompiledVariant(variant.label, parts["prompt"], parts["neg"], negative)
            )
        object.__setattr__(self, "_variants", tuple(compiled))
        object.__setattr__(self, "_prompt_fields", frozenset(fields))
        object.__setattr__(self, "_checked_fields", tuple(sorted(fields)))
        object.__setattr__(
            self,
            "_only_substitutions",
            all(isinstance(part, _Substitution) for part in cache.values()),
        )
        when_fields: frozenset[str] = frozenset()
        when_fn: Callable[..., Any] | None = None
        if self.when is not None:
            when_fn = _ENV.compile_expression(self.when, undefined_to_none=False)
            when_fields = _expression_fields(self.when)
        object.__setattr__(self, "_when", when_fn)
        object.__setattr__(self, "_when_fields", when_fields)

    @staticmethod
    def _parse_fields(part: str, text: str, variant: Variant) -> frozenset[str]:
        try:
            return frozenset(jinja2.meta.find_undeclared_variables(_ENV.parse(text)))
        except jinja2.TemplateSyntaxError as exc:
            if not variant.label:
                raise  # the text as written is broken: the loader locates the line
            # The text as written was valid Jinja, so the variant split a Jinja block
            # (e.g. "{% if x %}{a|b{% endif %}}").
            if isinstance(exc, _NotAllowed):  # e.g. a wildcard file holding a loop
                raise VariantError(part, f"variant {variant.label!r}: {exc.message}") from None
            raise VariantError(
                part, f"variant {variant.label!r} is not valid Jinja: {exc.message}"
            ) from None

    # ------------------------------------------------------------------ introspection

    def variants(self) -> tuple[str, ...]:
        """Variant labels in expansion order (first construct varies slowest)."""
        return tuple(variant.label for variant in self._variants)

    def prompt_fields(self) -> frozenset[str]:
        """Catalogue fields the prompt and negative prompt (any variant) use.

        These must be present and non-empty in every row.
        """
        return self._prompt_fields

    def fields(self) -> frozenset[str]:
        """Every catalogue field referenced: prompt fields plus those used by `when`.

        `when`-only fields must exist as columns but may be empty in a row.
        """
        return self._prompt_fields | self._when_fields

    # ------------------------------------------------------------------ per row

    def applies_to(self, fields: Mapping[str, str], *, where: str) -> bool:
        """Whether this template should render the row (True when there is no `when`)."""
        if self._when is None:
            return True
        for name in sorted(self._when_fields):
            if name not in fields:
                raise RenderError(where, name, "is missing (used by 'when')", self.name)
        try:
            return bool(self._when(**fields))
        except jinja2.sandbox.SecurityError as exc:
            raise RenderError(
                where, "when", f"forbidden by the template sandbox: {exc}", self.name
            ) from None
        except Exception as exc:
            # Same reasoning as in expand(): a failing condition is a data error for this row.
            raise RenderError(where, "when", f"{type(exc).__name__}: {exc}", self.name) from None

    def expand(self, fields: Mapping[str, str], *, where: str) -> list[RenderedPrompt]:
        """Renders every variant for one catalogue row.

        Every prompt field must be present and non-empty: an empty cell would silently
        produce a prompt such as "product photo of , white background".
        """
        return [
            RenderedPrompt(variant.label, prompt, negative)
            for variant, (prompt, negative) in zip(
                self._variants, self.expand_prompts(fields, where=where), strict=True
            )
        ]

    def expand_prompts(self, fields: Mapping[str, str], *, where: str) -> list[tuple[str, str]]:
        """(prompt, negative prompt) of every variant, in :meth:`variants` order.

        The same checks and texts as :meth:`expand`, without a label object per prompt: the
        producer calls this for every row of a bulk run.
        """
        for name in self._checked_fields:
            if name not in fields:
                raise RenderError(where, name, "is missing", self.name)
            if not fields[name].strip():
                raise RenderError(where, name, "is empty", self.name)
        # Jinja gets a copy (it must not see later changes); a format_map only reads.
        context = fields if self._only_substitutions else dict(fields)
        results: list[tuple[str, str]] = []
        for variant in self._variants:
            prompt = self._render_parts(variant.prompt_parts, context, "prompt", where)
            if not prompt:
                raise RenderError(where, "prompt", "rendered to an empty prompt", self.name)
            negative = variant.constant_negative
            if negative is None:
                negative = self._render_parts(
                    variant.negative_parts, context, "negative_prompt", where
                )
            results.append((prompt, negative))
        return results

    def render(self, fields: Mapping[str, str], *, where: str) -> tuple[str, str]:
        """(prompt, negative_prompt) of the first variant; kept for older callers."""
        first = self.expand(fields, where=where)[0]
        return first.prompt, first.negative_prompt

    def _render_parts(
        self,
        parts: tuple[_Part, ...],
        context: Mapping[str, str],
        label: str,
        where: str,
    ) -> str:
        texts: list[str] = []
        for compiled in parts:
            try:
                text = _collapse(compiled.render(context))
            except jinja2.sandbox.SecurityError as exc:
                raise RenderError(
                    where, label, f"forbidden by the template sandbox: {exc}", self.name
                ) from None
            except jinja2.UndefinedError as exc:
                raise RenderError(where, label, f"undefined value: {exc}", self.name) from None
            except Exception as exc:
                # The template is user content; any failure inside it (1/0, bad filter
                # argument, recursion) is a data error for this row, not a crash.
                raise RenderError(where, label, f"{type(exc).__name__}: {exc}", self.name) from None
            if text:  # a part that renders to nothing is skipped, not joined as ", ,"
                texts.append(text)
        result = ", ".join(texts)
        if len(result) > MAX_PROMPT_CHARS:
            raise RenderError(
                where,
                label,
                f"rendered to {len(result)} characters (limit {MAX_PROMPT_CHARS})",
                self.name,
            )
        return result


@dataclass(frozen=True)
class TemplateFile:
    path: Path
    key: str
    templates: tuple[Template, ...]


# --------------------------------------------------------------------------- loading


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


@dataclass(frozen=True)
class _Preset:
    # Keyed by template part: "before", "after", "preset_negative_prompt".
    texts: dict[str, str]
    sources: dict[str, tuple[str, yaml.Node]]  # part -> (dotted field, value node)


class _Loader:
    """Validates the composed YAML tree of one template file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Used only to turn scalar nodes into Python values with YAML 1.1 safe typing.
        self._constructor = yaml.constructor.SafeConstructor()
        # Kept so errors about a value inherited from defaults can point at its line.
        self.default_entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        # Adapter files are hashed once per load, however many templates use them.
        self.conditioning = ConditioningReader(self, path.parent, FileHasher())

    def error(self, node: yaml.Node | None, field: str | None, reason: str) -> TemplateError:
        return TemplateError(self.path, None if node is None else _line(node), field, reason)

    def mapping(
        self, node: yaml.Node, field: str | None, allowed: frozenset[str] | None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Returns {key: (key node, value node)}; rejects duplicate and unknown keys."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, field, "must be a mapping")
        result: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            name = self.scalar(key_node)
            dotted = name if field is None else f"{field}.{name}"
            if not isinstance(name, str):
                raise self.error(key_node, field, f"key {name!r} must be a string")
            if allowed is not None and name not in allowed:
                raise self.error(
                    key_node, dotted, f"unknown key (allowed: {', '.join(sorted(allowed))})"
                )
            # PyYAML silently keeps the last of duplicate keys, which hides typos.
            if name in result:
                raise self.error(
                    key_node, dotted, f"duplicate key (first at line {_line(result[name][0])})"
                )
            result[name] = (key_node, value_node)
        return result

    def scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return node  # callers reject non-scalars with their own message
        return self._constructor.construct_object(node, deep=True)

    def setting(self, name: str, node: yaml.Node, field: str) -> Any:
        """Converts and range-checks one of the settings shared by defaults and templates."""
        value = self.scalar(node)
        if name in ("model", "scheduler"):
            if value is None:
                return None
            if not isinstance(value, str) or not value.strip():
                raise self.error(node, field, "must be a non-empty string or null")
            value = value.strip()
        if name == "scheduler":
            # Checked here, not by the worker failing every job; the canonical name (None for
            # the model's own) goes into the job row, so that "Euler a" and "euler_a" share a
            # dedupe key and a spelling change re-renders nothing.
            try:
                return canonical_scheduler(value)
            except ValueError:
                raise self.error(
                    node,
                    field,
                    f"unknown scheduler {value!r} (known: {', '.join(KNOWN_SCHEDULERS)}; "
                    "A1111 names such as 'Euler a' work too)",
                ) from None
        if name == "model":
            if len(value) > MODEL_LENGTH:
                raise self.error(
                    node,
                    field,
                    f"model name is {len(value)} characters; the jobs table holds at most "
                    f"{MODEL_LENGTH}",
                )
            if (reason := unstorable(value)) is not None:
                raise self.error(node, field, f"model name {reason}")
            return value
        if name == "when":
            if value is None:
                return None
            if not isinstance(value, str) or not value.strip():
                raise self.error(node, field, "must be a non-empty Jinja expression or null")
            return value.strip()
        if name == "preset":
            if value is None:
                return None
            if not isinstance(value, str) or not value.strip():
                raise self.error(node, field, "must be a preset name or null")
            return value.strip()
        if name == "negative_prompt":
            if value is None:
                return ""
            if not isinstance(value, str):
                raise self.error(node, field, "must be a string")
            return value
        if name == "guidance":
            # bool is an int subclass; "guidance: yes" is a typo, not 1.0.
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self.error(node, field, "must be a number between 0 and 50")
            if not 0 <= value <= 50:
                raise self.error(node, field, "must be a number between 0 and 50")
            return float(value)
        if name == "seeds" and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(node, field, f"must be an integer {_int_rule(name)}")
        low, high = _INT_RANGES[name]
        if not low <= value <= high:
            raise self.error(node, field, f"must be an integer {_int_rule(name)}")
        if name in ("width", "height") and value % 8:
            raise self.error(node, field, f"must be an integer {_int_rule(name)}")
        return value

    def settings(
        self, entries: dict[str, tuple[yaml.Node, yaml.Node]], prefix: str
    ) -> dict[str, Any]:
        return {
            name: self.setting(name, value_node, f"{prefix}.{name}")
            for name, (_key_node, value_node) in entries.items()
            if name in _SETTING_KEYS
        }

    def template(
        self,
        name: str,
        key_node: yaml.Node,
        node: yaml.Node,
        defaults: dict[str, Any],
        presets: dict[str, _Preset],
    ) -> Template:
        prefix = f"templates.{name}"
        if not _NAME_RE.fullmatch(name):
            raise self.error(
                key_node, prefix, "template name must use only letters, digits, '_', '.', '-'"
            )
        if len(name) > TEMPLATE_NAME_LENGTH:
            raise self.error(
                key_node,
                prefix,
                f"template name is {len(name)} characters; the jobs table holds at most "
                f"{TEMPLATE_NAME_LENGTH}",
            )
        entries = self.mapping(node, prefix, _TEMPLATE_KEYS)
        if "prompt" not in entries:
            raise self.error(node, f"{prefix}.prompt", "is required")
        prompt_node = entries["prompt"][1]
        prompt = self.scalar(prompt_node)
        if not isinstance(prompt, str) or not prompt.strip():
            raise self.error(prompt_node, f"{prefix}.prompt", "must be a non-empty string")
        values = {**BUILTIN_DEFAULTS, **defaults, **self.settings(entries, prefix)}

        def locate(setting: str) -> tuple[str, yaml.Node]:
            # The template's own value wins over defaults; point at whichever was used.
            if setting in entries:
                return f"{prefix}.{setting}", entries[setting][1]
            if setting in self.default_entries:
                return f"defaults.{setting}", self.default_entries[setting][1]
            return prefix, node

        # Where each expandable part's text came from: (dotted field, value node).
        sources: dict[str, tuple[str, yaml.Node]] = {
            "prompt": (f"{prefix}.prompt", prompt_node),
            "negative_prompt": locate("negative_prompt"),
        }
        preset: _Preset | None = None
        if values["preset"] is not None:
            field_name, preset_node = locate("preset")
            if values["preset"] not in presets:
                known = ", ".join(sorted(presets)) or "none defined"
                raise self.error(
                    preset_node,
                    field_name,
                    f"template {name!r}: unknown preset {values['preset']!r} (presets: {known})",
                )
            preset = presets[values["preset"]]
            sources.update(preset.sources)

        # Check Jinja syntax (and unknown filters) on the text as written, so a broken
        # template fails at load and the error can point at the line inside the text.
        texts = {
            "prompt": prompt,
            "negative_prompt": values["negative_prompt"],
            **({} if preset is None else preset.texts),
        }
        for part, source in texts.items():
            try:
                _ENV.from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                raise self.jinja_error(name, sources[part], exc) from None
        if values["when"] is not None:
            try:
                _ENV.compile_expression(values["when"])
            except jinja2.TemplateSyntaxError as exc:
                raise self.jinja_error(name, locate("when"), exc) from None

        conditioning = self.conditioning.read(
            {k: v for k, v in entries.items() if k in CONDITIONING_KEYS},
            {k: v for k, v in self.default_entries.items() if k in CONDITIONING_KEYS},
            prefix=prefix,
            node=node,
            width=values["width"],
            height=values["height"],
        )
        try:
            return Template(
                name=name,
                prompt=prompt,
                preset_before=texts.get("before", ""),
                preset_after=texts.get("after", ""),
                preset_negative_prompt=texts.get("preset_negative_prompt", ""),
                wildcards=self.path.parent / "wildcards",
                conditioning=conditioning,
                **values,
            )
        except VariantError as exc:
            field_name, where_node = (prefix, key_node) if exc.part is None else sources[exc.part]
            raise self.error(where_node, field_name, f"template {name!r}: {exc.reason}") from None
        except jinja2.TemplateSyntaxError as exc:
            raise self.error(
                node, prefix, f"template {name!r}: Jinja syntax error: {exc.message}"
            ) from None

    def jinja_error(
        self, name: str, source: tuple[str, yaml.Node], exc: jinja2.TemplateSyntaxError
    ) -> TemplateError:
        field_name, value_node = source
        # Jinja counts lines within the text.  A block scalar (| or >) starts on the line
        # after its indicator; other scalars start on the node's own line.
        style = getattr(value_node, "style", None)
        first = _line(value_node) + (1 if style in ("|", ">") else 0)
        part = field_name.rsplit(".", 1)[-1]
        what = "" if isinstance(exc, _NotAllowed) else "Jinja syntax error: "
        return TemplateError(
            self.path,
            first + (exc.lineno or 1) - 1,
            field_name,
            f"template {name!r}: {what}{exc.message} (line {exc.lineno} of the {part})",
        )

    def presets(self, node: yaml.Node) -> dict[str, _Preset]:
        result: dict[str, _Preset] = {}
        for name, (key_node, value_node) in self.mapping(node, "presets", None).items():
            prefix = f"presets.{name}"
            if not _NAME_RE.fullmatch(name):
                raise self.error(
                    key_node, prefix, "preset name must use only letters, digits, '_', '.', '-'"
                )
            # "bare:" with nothing under it is an empty preset (it adds nothing).
            entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
            if not (isinstance(value_node, yaml.ScalarNode) and self.scalar(value_node) is None):
                entries = self.mapping(value_node, prefix, _PRESET_KEYS)
            texts: dict[str, str] = {}
            sources: dict[str, tuple[str, yaml.Node]] = {}
            for key, (_k, text_node) in entries.items():
                text = self.scalar(text_node)
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise self.error(text_node, f"{prefix}.{key}", "must be a string")
                # The preset's negative prompt is its own part, ahead of the template's.
                part = "preset_negative_prompt" if key == "negative_prompt" else key
                texts[part] = text
                sources[part] = (f"{prefix}.{key}", text_node)
            result[name] = _Preset(texts=texts, sources=sources)
        return result

    def load(self, text: str) -> TemplateFile:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = None if mark is None else mark.line + 1
            raise TemplateError(self.path, line, None, f"invalid YAML: {exc.problem}") from None
        except yaml.YAMLError as exc:
            raise TemplateError(self.path, None, None, f"invalid YAML: {exc}") from None
        if root is None:
            raise TemplateError(self.path, 1, None, "file is empty")
        top = self.mapping(root, None, _TOP_KEYS)

        key = "sku"
        if "key" in top:
            key_node = top["key"][1]
            key = self.scalar(key_node)
            if not isinstance(key, str) or not key.strip():
                raise self.error(key_node, "key", "must be a non-empty column name")
            key = key.strip()

        defaults: dict[str, Any] = {}
        if "defaults" in top:
            node = top["defaults"][1]
            # "defaults:" with nothing under it is null; treat it like an empty mapping.
            if not (isinstance(node, yaml.ScalarNode) and self.scalar(node) is None):
                self.default_entries = self.mapping(node, "defaults", _DEFAULT_KEYS)
                defaults = self.settings(self.default_entries, "defaults")

        presets: dict[str, _Preset] = {}
        if "presets" in top:
            node = top["presets"][1]
            if not (isinstance(node, yaml.ScalarNode) and self.scalar(node) is None):
                presets = self.presets(node)

        if "templates" not in top:
            raise self.error(root, "templates", "is required")
        templates_node = top["templates"][1]
        if isinstance(templates_node, yaml.ScalarNode) and self.scalar(templates_node) is None:
            raise self.error(templates_node, "templates", "no templates defined")
        entries = self.mapping(templates_node, "templates", None)
        if not entries:
            raise self.error(templates_node, "templates", "no templates defined")
        templates = tuple(
            self.template(name, key_node, value_node, defaults, presets)
            for name, (key_node, value_node) in entries.items()
        )
        return TemplateFile(path=self.path, key=key, templates=templates)


_INT_RANGES: dict[str, tuple[int, int]] = {
    "steps": (1, 500),
    "width": (64, 4096),
    "height": (64, 4096),
    "seeds": (1, 1000),
    "max_variants": (1, 1000),
}


def _int_rule(name: str) -> str:
    low, high = _INT_RANGES[name]
    if name in ("width", "height"):
        return f"multiple of 8 in {low}..{high}"
    if name == "seeds":
        return f"in {low}..{high} (or null)"
    return f"in {low}..{high}"


def load_templates(path: Path) -> TemplateFile:
    """Loads and fully validates a template file; raises TemplateError on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateError(path, None, None, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise TemplateError(path, None, None, f"not valid UTF-8: {exc.reason}") from None
    return _Loader(path).load(text)

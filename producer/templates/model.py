"""A template as loaded: its variants compiled once, rendered for each catalogue row.

Every part of a template (preset texts, prompt, negative prompt) is expanded into its
variants (see producer.variants) and compiled when the template is made; a bulk run then
renders the compiled parts for millions of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox

from pixelmill.errors import BadInputError
from producer.conditioning import Conditioning
from producer.templates.sandbox import MAX_PROMPT_CHARS, SANDBOX, NotAllowed
from producer.variants import Variant, VariantError, expand_variants

# Template parts in the order their variant choices appear in a label.  Keys are the
# part names VariantError reports; values the output a part ends up in.
_PROMPT_PARTS = ("before", "prompt", "after")
_NEGATIVE_PARTS = ("preset_negative_prompt", "negative_prompt")
_PARTS = (*_PROMPT_PARTS, *_NEGATIVE_PARTS)


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


def collapse_spaces(text: str) -> str:
    # Multi-line YAML prompts and Jinja blocks leave runs of spaces and newlines; the
    # model does not care and job rows are easier to read on one line.
    return " ".join(text.split())


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
        body = SANDBOX.parse(source).body
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
    return _Substitution.compile(source) or SANDBOX.from_string(source)


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
    parser = jinja2.parser.Parser(SANDBOX, source, state="variable")
    body = jinja2.nodes.Template([jinja2.nodes.Output([parser.parse_expression()])], lineno=1)
    body.set_environment(SANDBOX)
    return frozenset(jinja2.meta.find_undeclared_variables(body))


def _parse_fields(part: str, text: str, variant: Variant) -> frozenset[str]:
    """The catalogue fields one part's text uses."""
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(SANDBOX.parse(text)))
    except jinja2.TemplateSyntaxError as exc:
        if not variant.label:
            raise  # the text as written is broken: the loader locates the line
        # The text as written was valid Jinja, so the variant split a Jinja block
        # (e.g. "{% if x %}{a|b{% endif %}}").
        if isinstance(exc, NotAllowed):  # e.g. a wildcard file holding a loop
            raise VariantError(part, f"variant {variant.label!r}: {exc.message}") from None
        raise VariantError(
            part, f"variant {variant.label!r} is not valid Jinja: {exc.message}"
        ) from None


class _PartCompiler:
    """Compiles each distinct part text once (the variants of a template repeat most of
    their parts) and collects the catalogue fields the texts use."""

    def __init__(self) -> None:
        self.cache: dict[str, _Part] = {}
        self.fields: set[str] = set()

    def compile(self, part: str, text: str, variant: Variant) -> _Part:
        if text not in self.cache:
            self.fields |= _parse_fields(part, text, variant)
            self.cache[text] = _compile_part(text)
        return self.cache[text]

    def only_substitutions(self) -> bool:
        return all(isinstance(part, _Substitution) for part in self.cache.values())


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
        compiler = _PartCompiler()
        compiled = tuple(
            self._compile_variant(variant, compiler) for variant in self._expand_variants()
        )
        object.__setattr__(self, "_variants", compiled)
        object.__setattr__(self, "_prompt_fields", frozenset(compiler.fields))
        object.__setattr__(self, "_checked_fields", tuple(sorted(compiler.fields)))
        object.__setattr__(self, "_only_substitutions", compiler.only_substitutions())
        self._compile_when()

    def _expand_variants(self) -> list[Variant]:
        texts = {
            "before": self.preset_before,
            "prompt": self.prompt,
            "after": self.preset_after,
            "preset_negative_prompt": self.preset_negative_prompt,
            "negative_prompt": self.negative_prompt,
        }
        return expand_variants(
            [(name, texts[name]) for name in _PARTS],
            wildcards=self.wildcards,
            max_variants=self.max_variants,
        )

    def _compile_variant(self, variant: Variant, compiler: _PartCompiler) -> _CompiledVariant:
        texts = dict(zip(_PARTS, variant.texts, strict=True))

        def compile_parts(names: tuple[str, ...]) -> tuple[_Part, ...]:
            # An empty part is skipped, not joined as ", ,".
            return tuple(
                compiler.compile(name, texts[name], variant)
                for name in names
                if texts[name].strip()
            )

        prompt_parts = compile_parts(_PROMPT_PARTS)
        negative_parts = compile_parts(_NEGATIVE_PARTS)
        return _CompiledVariant(
            variant.label, prompt_parts, negative_parts, self._constant_negative(negative_parts)
        )

    def _constant_negative(self, parts: tuple[_Part, ...]) -> str | None:
        """The negative prompt, rendered once, when its parts are literal text."""
        if not _constant(parts):
            return None
        try:
            return self._render_parts(parts, {}, "negative_prompt", "")
        except RenderError:
            return None  # too long: every row reports it, as it always did

    def _compile_when(self) -> None:
        when_fields: frozenset[str] = frozenset()
        when_fn: Callable[..., Any] | None = None
        if self.when is not None:
            when_fn = SANDBOX.compile_expression(self.when, undefined_to_none=False)
            when_fields = _expression_fields(self.when)
        object.__setattr__(self, "_when", when_fn)
        object.__setattr__(self, "_when_fields", when_fields)

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
                text = collapse_spaces(compiled.render(context))
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

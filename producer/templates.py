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
    templates:
      studio:
        prompt: "best quality, product photo of {{ title }}, {{ colour }}"
        steps: 25            # any default may be overridden per template

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
import jinja2.meta
import jinja2.nodes
import jinja2.runtime
import jinja2.sandbox
import yaml

from producer.errors import InputError

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
}

_TOP_KEYS = frozenset({"key", "defaults", "templates"})
_SETTING_KEYS = frozenset(BUILTIN_DEFAULTS)
_TEMPLATE_KEYS = _SETTING_KEYS | {"prompt"}

# Template names end up in job rows, seeds and output paths, so keep them path-safe.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class TemplateError(InputError):
    """A problem in the template file, located by file, YAML line and dotted field path."""


class RenderError(ValueError):
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

# Longest string/list a template may build with "*" (e.g. "{{ title * 10**9 }}").
_MAX_REPEAT_LEN = MAX_PROMPT_CHARS
_MAX_EXPONENT = 64


class _PromptSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox prompts render in.

    On top of Jinja's sandbox (no underscore attributes, no mutation of containers):
    no globals (``range``, ``cycler``, ``lipsum`` ... are not needed and would otherwise be
    reported as catalogue fields), a filter allow-list, no calls except macros (string
    methods such as ``title.center(10**9)`` could exhaust memory; filters cover the
    legitimate uses), and bounded ``*`` / ``**``.
    """

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self) -> None:
        super().__init__(undefined=jinja2.StrictUndefined, autoescape=False)
        self.globals.clear()
        self.filters = {name: self.filters[name] for name in _ALLOWED_FILTERS}

    def is_safe_callable(self, obj: Any) -> bool:
        return isinstance(obj, jinja2.runtime.Macro)

    def call(self, context: jinja2.runtime.Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        # Same as the base class, but without putting the object's repr (with its memory
        # address) into the message.
        if not self.is_safe_callable(obj):
            raise jinja2.sandbox.SecurityError(
                "calling functions or methods is not allowed in prompts (use filters)"
            )
        return context.call(obj, *args, **kwargs)

    def call_binop(self, context: jinja2.runtime.Context, op: str, left: Any, right: Any) -> Any:
        if op == "**" and isinstance(right, int | float) and abs(right) > _MAX_EXPONENT:
            raise jinja2.sandbox.SecurityError(f"exponent {right} is too large")
        if op == "*":
            for seq, count in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(count, int)
                    and len(seq) * count > _MAX_REPEAT_LEN
                ):
                    raise jinja2.sandbox.SecurityError("repetition result is too long")
        binop: Callable[[Any, Any], Any] = {"*": operator.mul, "**": operator.pow}[op]
        return binop(left, right)


# One environment is shared: it holds no per-render state.
_ENV = _PromptSandbox()


def _collapse(text: str) -> str:
    # Multi-line YAML prompts and Jinja blocks leave runs of spaces and newlines; the
    # model does not care and job rows are easier to read on one line.
    return " ".join(text.split())


# --------------------------------------------------------------------------- templates


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
    # Compiled once here: bulk runs render each template for every catalogue row.
    _compiled: tuple[jinja2.Template, jinja2.Template] = field(
        init=False, repr=False, compare=False
    )
    _fields: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names: set[str] = set()
        for source in (self.prompt, self.negative_prompt):
            names |= jinja2.meta.find_undeclared_variables(_ENV.parse(source))
        object.__setattr__(self, "_fields", frozenset(names))
        object.__setattr__(
            self,
            "_compiled",
            (_ENV.from_string(self.prompt), _ENV.from_string(self.negative_prompt)),
        )

    def fields(self) -> frozenset[str]:
        """Catalogue fields referenced by the prompt and negative prompt."""
        return self._fields

    def render(self, fields: Mapping[str, str], *, where: str) -> tuple[str, str]:
        """Returns (prompt, negative_prompt) for one catalogue row.

        Every referenced field must be present and non-empty: an empty cell would silently
        produce a prompt such as "product photo of , white background".
        """
        for name in sorted(self._fields):
            if name not in fields:
                raise RenderError(where, name, "is missing", self.name)
            if not fields[name].strip():
                raise RenderError(where, name, "is empty", self.name)
        context = dict(fields)
        outputs: list[str] = []
        for label, compiled in zip(("prompt", "negative_prompt"), self._compiled, strict=True):
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
            if len(text) > MAX_PROMPT_CHARS:
                raise RenderError(
                    where,
                    label,
                    f"rendered to {len(text)} characters (limit {MAX_PROMPT_CHARS})",
                    self.name,
                )
            outputs.append(text)
        if not outputs[0]:
            raise RenderError(where, "prompt", "rendered to an empty prompt", self.name)
        return outputs[0], outputs[1]


@dataclass(frozen=True)
class TemplateFile:
    path: Path
    key: str
    templates: tuple[Template, ...]


# --------------------------------------------------------------------------- loading


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _Loader:
    """Validates the composed YAML tree of one template file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Used only to turn scalar nodes into Python values with YAML 1.1 safe typing.
        self._constructor = yaml.constructor.SafeConstructor()

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
        self, name: str, key_node: yaml.Node, node: yaml.Node, defaults: dict[str, Any]
    ) -> Template:
        prefix = f"templates.{name}"
        if not _NAME_RE.fullmatch(name):
            raise self.error(
                key_node, prefix, "template name must use only letters, digits, '_', '.', '-'"
            )
        entries = self.mapping(node, prefix, _TEMPLATE_KEYS)
        if "prompt" not in entries:
            raise self.error(node, f"{prefix}.prompt", "is required")
        prompt_node = entries["prompt"][1]
        prompt = self.scalar(prompt_node)
        if not isinstance(prompt, str) or not prompt.strip():
            raise self.error(prompt_node, f"{prefix}.prompt", "must be a non-empty string")
        values = {**BUILTIN_DEFAULTS, **defaults, **self.settings(entries, prefix)}
        # Check Jinja syntax (and unknown filters) here so a broken template fails at load
        # rather than on the first catalogue row.
        for label, source in (("prompt", prompt), ("negative_prompt", values["negative_prompt"])):
            try:
                _ENV.from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                raise self.template_syntax_error(
                    name, label, entries.get(label), node, exc
                ) from None
        return Template(name=name, prompt=prompt, **values)

    def template_syntax_error(
        self,
        name: str,
        label: str,
        entry: tuple[yaml.Node, yaml.Node] | None,
        template_node: yaml.Node,
        exc: jinja2.TemplateSyntaxError,
    ) -> TemplateError:
        if entry is None:
            # The text came from defaults.negative_prompt; point at the template using it.
            field, line = f"defaults.{label}", _line(template_node)
        else:
            value_node = entry[1]
            # Jinja counts lines within the text.  A block scalar (| or >) starts on the line
            # after its indicator; other scalars start on the node's own line.
            style = getattr(value_node, "style", None)
            first = _line(value_node) + (1 if style in ("|", ">") else 0)
            field, line = f"templates.{name}.{label}", first + exc.lineno - 1
        return TemplateError(
            self.path,
            line,
            field,
            f"template {name!r}: Jinja syntax error: {exc.message} "
            f"(line {exc.lineno} of the {label})",
        )

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
                defaults = self.settings(self.mapping(node, "defaults", _SETTING_KEYS), "defaults")

        if "templates" not in top:
            raise self.error(root, "templates", "is required")
        templates_node = top["templates"][1]
        if isinstance(templates_node, yaml.ScalarNode) and self.scalar(templates_node) is None:
            raise self.error(templates_node, "templates", "no templates defined")
        entries = self.mapping(templates_node, "templates", None)
        if not entries:
            raise self.error(templates_node, "templates", "no templates defined")
        templates = tuple(
            self.template(name, key_node, value_node, defaults)
            for name, (key_node, value_node) in entries.items()
        )
        return TemplateFile(path=self.path, key=key, templates=templates)


_INT_RANGES: dict[str, tuple[int, int]] = {
    "steps": (1, 500),
    "width": (64, 4096),
    "height": (64, 4096),
    "seeds": (1, 1000),
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

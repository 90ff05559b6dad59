"""Loading a template file, with every error located by file, YAML line and dotted field.

The file is walked as a YAML node tree (``yaml.compose``) rather than loaded into plain
dicts, so every error can name the line of the node that caused it. The format is described
in :mod:`producer.templates`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from db.limits import string_length, unstorable
from db.models import Job
from pixelmill.errors import InputError
from pixelmill.families import FamilyInputError
from pixelmill.schedulers import KNOWN_SCHEDULERS, canonical_scheduler
from producer import bounds
from producer.conditioning import CONDITIONING_KEYS, Conditioning, ConditioningReader, FileHasher
from producer.templates.families import TRUE_CFG_KEY, check_template_family, read_true_cfg
from producer.templates.few_step import FEW_STEP_KEYS, FewStepReader
from producer.templates.model import Template, TemplateFile
from producer.templates.sandbox import SANDBOX, NotAllowed
from producer.variants import VariantError

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
_DEFAULT_KEYS = _SETTING_KEYS | CONDITIONING_KEYS | FEW_STEP_KEYS | {TRUE_CFG_KEY}
_TEMPLATE_KEYS = _DEFAULT_KEYS | {"prompt"}
_PRESET_KEYS = frozenset({"before", "after", "negative_prompt"})

# Template names end up in job rows, seeds and output paths, so keep them path-safe.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# The jobs table's columns for a template's name and model: a longer value would abort the
# whole produce at the database, so the loader refuses it with the line.
TEMPLATE_NAME_LENGTH = string_length(Job.__table__.c.template)
MODEL_LENGTH = string_length(Job.__table__.c.model)


class TemplateError(InputError):
    """A problem in the template file, located by file, YAML line and dotted field path."""


# (key node, value node) of one mapping entry.
Entry = tuple[yaml.Node, yaml.Node]

# The bounds are producer.bounds', which the command line's options obey too.
_INT_RANGES: dict[str, tuple[int, int]] = {
    name: (bound.low, bound.high)
    for name, bound in (
        ("steps", bounds.STEPS),
        ("width", bounds.SIZE),
        ("height", bounds.SIZE),
        ("seeds", bounds.SEEDS),
        ("max_variants", bounds.MAX_VARIANTS),
    )
}
# Settings that are a text or null, and the rule a wrong value breaks.
_OPTIONAL_TEXTS = {
    "when": "must be a non-empty Jinja expression or null",
    "preset": "must be a preset name or null",
}


def _int_rule(name: str) -> str:
    low, high = _INT_RANGES[name]
    if name in ("width", "height"):
        return f"multiple of 8 in {low}..{high}"
    if name == "seeds":
        return f"in {low}..{high} (or null)"
    return f"in {low}..{high}"


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


@dataclass(frozen=True)
class _Preset:
    # Keyed by template part: "before", "after", "preset_negative_prompt".
    texts: dict[str, str]
    sources: dict[str, tuple[str, yaml.Node]]  # part -> (dotted field, value node)


@dataclass(frozen=True)
class _TemplateNode:
    """Where one template is in the file: its name, dotted field, nodes and entries."""

    name: str
    prefix: str  # "templates.NAME"
    key_node: yaml.Node
    node: yaml.Node
    entries: dict[str, Entry]


class _Loader:
    """Validates the composed YAML tree of one template file."""

    def __init__(self, path: Path, default_model: str | None = None) -> None:
        self.path = path
        # The model of a template that names none (produce's --model): its family's rules
        # hold for that template too.
        self.default_model = default_model
        # Used only to turn scalar nodes into Python values with YAML 1.1 safe typing.
        self._constructor = yaml.constructor.SafeConstructor()
        # Kept so errors about a value inherited from defaults can point at its line.
        self.default_entries: dict[str, Entry] = {}
        # Adapter files are hashed once per load, however many templates use them.
        self.conditioning = ConditioningReader(self, path.parent, FileHasher())
        self.few_step = FewStepReader(self)

    def error(self, node: yaml.Node | None, field: str | None, reason: str) -> TemplateError:
        return TemplateError(self.path, None if node is None else _line(node), field, reason)

    def mapping(
        self, node: yaml.Node, field: str | None, allowed: frozenset[str] | None
    ) -> dict[str, Entry]:
        """Returns {key: (key node, value node)}; rejects duplicate and unknown keys."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, field, "must be a mapping")
        result: dict[str, Entry] = {}
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

    def is_null(self, node: yaml.Node) -> bool:
        """A scalar node holding null: "defaults:" with nothing under it, say."""
        return isinstance(node, yaml.ScalarNode) and self.scalar(node) is None

    # ------------------------------------------------------------------ settings

    def setting(self, name: str, node: yaml.Node, field: str) -> Any:
        """Converts and range-checks one of the settings shared by defaults and templates."""
        value = self.scalar(node)
        if name == "model":
            return self._model(value, node, field)
        if name == "scheduler":
            return self._scheduler(value, node, field)
        if name in _OPTIONAL_TEXTS:
            if value is None:
                return None
            if not isinstance(value, str) or not value.strip():
                raise self.error(node, field, _OPTIONAL_TEXTS[name])
            return value.strip()
        if name == "negative_prompt":
            if value is None:
                return ""
            if not isinstance(value, str):
                raise self.error(node, field, "must be a string")
            return value
        if name == "guidance":
            return self._guidance(value, node, field)
        return self._integer(name, value, node, field)

    def _name_or_null(self, value: Any, node: yaml.Node, field: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.error(node, field, "must be a non-empty string or null")
        return value.strip()

    def _model(self, value: Any, node: yaml.Node, field: str) -> str | None:
        model = self._name_or_null(value, node, field)
        if model is None:
            return None
        if len(model) > MODEL_LENGTH:
            raise self.error(
                node,
                field,
                f"model name is {len(model)} characters; the jobs table holds at most "
                f"{MODEL_LENGTH}",
            )
        if (reason := unstorable(model)) is not None:
            raise self.error(node, field, f"model name {reason}")
        return model

    def _scheduler(self, value: Any, node: yaml.Node, field: str) -> str | None:
        scheduler = self._name_or_null(value, node, field)
        if scheduler is None:
            return None
        # Checked here, not by the worker failing every job; the canonical name (None for
        # the model's own) goes into the job row, so that "Euler a" and "euler_a" share a
        # dedupe key and a spelling change re-renders nothing.
        try:
            return canonical_scheduler(scheduler)
        except ValueError:
            raise self.error(
                node,
                field,
                f"unknown scheduler {scheduler!r} (known: {', '.join(KNOWN_SCHEDULERS)}; "
                "A1111 names such as 'Euler a' work too)",
            ) from None

    def _guidance(self, value: Any, node: yaml.Node, field: str) -> float:
        # bool is an int subclass; "guidance: yes" is a typo, not 1.0.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(node, field, "must be a number between 0 and 50")
        if not 0 <= value <= 50:
            raise self.error(node, field, "must be a number between 0 and 50")
        return float(value)

    def _integer(self, name: str, value: Any, node: yaml.Node, field: str) -> int | None:
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

    def settings(self, entries: dict[str, Entry], prefix: str) -> dict[str, Any]:
        return {
            name: self.setting(name, value_node, f"{prefix}.{name}")
            for name, (_key_node, value_node) in entries.items()
            if name in _SETTING_KEYS
        }

    # ------------------------------------------------------------------ templates

    def template(
        self,
        name: str,
        key_node: yaml.Node,
        node: yaml.Node,
        defaults: dict[str, Any],
        presets: dict[str, _Preset],
    ) -> Template:
        prefix = f"templates.{name}"
        self._check_template_name(name, key_node, prefix)
        where = _TemplateNode(
            name, prefix, key_node, node, self.mapping(node, prefix, _TEMPLATE_KEYS)
        )
        prompt_node, prompt = self._prompt(where)
        values = {**BUILTIN_DEFAULTS, **defaults, **self.settings(where.entries, prefix)}
        few_step = self.few_step.read(where.entries, self.default_entries, values, prefix=prefix)
        values = few_step.values
        # Where each expandable part's text came from: (dotted field, value node).
        sources: dict[str, tuple[str, yaml.Node]] = {
            "prompt": (f"{prefix}.prompt", prompt_node),
            "negative_prompt": self._locate(where, "negative_prompt"),
        }
        texts = {"prompt": prompt, "negative_prompt": values["negative_prompt"]}
        if values["preset"] is not None:
            preset = self._preset_of(where, values["preset"], presets)
            sources.update(preset.sources)
            texts.update(preset.texts)
        self._check_jinja(where, texts, sources, values["when"])
        conditioning = self.conditioning.read(
            {k: v for k, v in where.entries.items() if k in CONDITIONING_KEYS},
            {k: v for k, v in self.default_entries.items() if k in CONDITIONING_KEYS},
            prefix=prefix,
            node=node,
            width=values["width"],
            height=values["height"],
        )
        true_cfg = read_true_cfg(self, where.entries, self.default_entries, prefix=prefix)
        if few_step.sampling is not None or few_step.fast_path is not None or true_cfg:
            options = conditioning.options.model_copy(
                update={
                    "sampling": few_step.sampling,
                    "fast_path": few_step.fast_path,
                    "true_cfg": true_cfg,
                }
            )
            conditioning = dataclasses.replace(conditioning, options=options)
        template = self._make_template(where, texts, sources, conditioning, values)
        self._check_family(where, template, sources)
        return template

    def _check_family(
        self, where: _TemplateNode, template: Template, sources: dict[str, tuple[str, yaml.Node]]
    ) -> None:
        """The model family's rules, where the template's model is a folder to read
        (producer.templates.families): refused here, not by every job in the workers."""
        try:
            check_template_family(template, self.default_model)
        except FamilyInputError as exc:
            field_name, node = self._locate(where, exc.field)
            if exc.field == "negative_prompt" and not template.negative_prompt.strip():
                field_name, node = sources["preset_negative_prompt"]
            elif node is where.node:  # not set in the file: the built-in default is refused
                field_name, node = f"{where.prefix}.{exc.field}", where.key_node
            reason = exc.reason
            if template.model is None:
                reason += f" (the template names no model: it renders with {self.default_model})"
            raise self.error(node, field_name, f"template {where.name!r}: {reason}") from None

    def _check_template_name(self, name: str, key_node: yaml.Node, prefix: str) -> None:
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

    def _prompt(self, where: _TemplateNode) -> tuple[yaml.Node, str]:
        if "prompt" not in where.entries:
            raise self.error(where.node, f"{where.prefix}.prompt", "is required")
        prompt_node = where.entries["prompt"][1]
        prompt = self.scalar(prompt_node)
        if not isinstance(prompt, str) or not prompt.strip():
            raise self.error(prompt_node, f"{where.prefix}.prompt", "must be a non-empty string")
        return prompt_node, prompt

    def _locate(self, where: _TemplateNode, setting: str) -> tuple[str, yaml.Node]:
        """The dotted field and node a setting's value came from: the template's own value
        wins over defaults; point at whichever was used."""
        if setting in where.entries:
            return f"{where.prefix}.{setting}", where.entries[setting][1]
        if setting in self.default_entries:
            return f"defaults.{setting}", self.default_entries[setting][1]
        return where.prefix, where.node

    def _preset_of(self, where: _TemplateNode, preset: str, presets: dict[str, _Preset]) -> _Preset:
        if preset not in presets:
            field_name, preset_node = self._locate(where, "preset")
            known = ", ".join(sorted(presets)) or "none defined"
            raise self.error(
                preset_node,
                field_name,
                f"template {where.name!r}: unknown preset {preset!r} (presets: {known})",
            )
        return presets[preset]

    def _check_jinja(
        self,
        where: _TemplateNode,
        texts: dict[str, str],
        sources: dict[str, tuple[str, yaml.Node]],
        when: str | None,
    ) -> None:
        """Checks Jinja syntax (and unknown filters) on the text as written, so a broken
        template fails at load and the error can point at the line inside the text."""
        for part, source in texts.items():
            try:
                SANDBOX.from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                raise self.jinja_error(where.name, sources[part], exc) from None
        if when is not None:
            try:
                SANDBOX.compile_expression(when)
            except jinja2.TemplateSyntaxError as exc:
                raise self.jinja_error(where.name, self._locate(where, "when"), exc) from None

    def _make_template(
        self,
        where: _TemplateNode,
        texts: dict[str, str],
        sources: dict[str, tuple[str, yaml.Node]],
        conditioning: Conditioning,
        values: dict[str, Any],
    ) -> Template:
        try:
            return Template(
                name=where.name,
                prompt=texts["prompt"],
                preset_before=texts.get("before", ""),
                preset_after=texts.get("after", ""),
                preset_negative_prompt=texts.get("preset_negative_prompt", ""),
                wildcards=self.path.parent / "wildcards",
                conditioning=conditioning,
                **values,
            )
        except VariantError as exc:
            field_name, where_node = (
                (where.prefix, where.key_node) if exc.part is None else sources[exc.part]
            )
            raise self.error(
                where_node, field_name, f"template {where.name!r}: {exc.reason}"
            ) from None
        except jinja2.TemplateSyntaxError as exc:
            raise self.error(
                where.node,
                where.prefix,
                f"template {where.name!r}: Jinja syntax error: {exc.message}",
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
        what = "" if isinstance(exc, NotAllowed) else "Jinja syntax error: "
        return TemplateError(
            self.path,
            first + (exc.lineno or 1) - 1,
            field_name,
            f"template {name!r}: {what}{exc.message} (line {exc.lineno} of the {part})",
        )

    # ------------------------------------------------------------------ the file

    def presets(self, node: yaml.Node) -> dict[str, _Preset]:
        result: dict[str, _Preset] = {}
        for name, (key_node, value_node) in self.mapping(node, "presets", None).items():
            prefix = f"presets.{name}"
            if not _NAME_RE.fullmatch(name):
                raise self.error(
                    key_node, prefix, "preset name must use only letters, digits, '_', '.', '-'"
                )
            # "bare:" with nothing under it is an empty preset (it adds nothing).
            entries: dict[str, Entry] = {}
            if not self.is_null(value_node):
                entries = self.mapping(value_node, prefix, _PRESET_KEYS)
            result[name] = self._preset(prefix, entries)
        return result

    def _preset(self, prefix: str, entries: dict[str, Entry]) -> _Preset:
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
        return _Preset(texts=texts, sources=sources)

    def load(self, text: str) -> TemplateFile:
        root = self._compose(text)
        top = self.mapping(root, None, _TOP_KEYS)
        key = self._key(top)
        defaults: dict[str, Any] = {}
        if "defaults" in top:
            node = top["defaults"][1]
            # "defaults:" with nothing under it is null; treat it like an empty mapping.
            if not self.is_null(node):
                self.default_entries = self.mapping(node, "defaults", _DEFAULT_KEYS)
                defaults = self.settings(self.default_entries, "defaults")
        presets: dict[str, _Preset] = {}
        if "presets" in top:
            node = top["presets"][1]
            if not self.is_null(node):
                presets = self.presets(node)
        templates = tuple(
            self.template(name, key_node, value_node, defaults, presets)
            for name, (key_node, value_node) in self._template_entries(root, top).items()
        )
        return TemplateFile(path=self.path, key=key, templates=templates)

    def _compose(self, text: str) -> yaml.Node:
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
        return root

    def _key(self, top: dict[str, Entry]) -> str:
        if "key" not in top:
            return "sku"
        key_node = top["key"][1]
        key = self.scalar(key_node)
        if not isinstance(key, str) or not key.strip():
            raise self.error(key_node, "key", "must be a non-empty column name")
        return key.strip()

    def _template_entries(self, root: yaml.Node, top: dict[str, Entry]) -> dict[str, Entry]:
        if "templates" not in top:
            raise self.error(root, "templates", "is required")
        templates_node = top["templates"][1]
        if self.is_null(templates_node):
            raise self.error(templates_node, "templates", "no templates defined")
        entries = self.mapping(templates_node, "templates", None)
        if not entries:
            raise self.error(templates_node, "templates", "no templates defined")
        return entries


def load_templates(path: Path, *, default_model: str | None = None) -> TemplateFile:
    """Loads and fully validates a template file; raises TemplateError on any problem.
    ``default_model`` is the model of the templates that name none (its family's rules are
    checked for them as for the others)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateError(path, None, None, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise TemplateError(path, None, None, f"not valid UTF-8: {exc.reason}") from None
    return _Loader(path, default_model).load(text)

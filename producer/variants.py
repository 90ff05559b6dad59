"""Combinatorial expansion of the Stable Diffusion variant syntax in template text.

Supported (via the ``dynamicprompts`` library): ``{a|b|c}``, weights ``{0.7::a|0.3::b}``
(ignored: every option is expanded), ``{2$$a|b|c}`` (dynamicprompts yields the ordered
picks, so 6 variants here), nesting ``{a|{b|c}}`` and wildcards ``__name__`` /
``__colours/warm__`` read from ``name.txt`` (one option per line) under a wildcards folder.
Random (``{~a|b}``) and cyclical (``{@a|b}``) variants are rejected: they would make the
set of variants, and so the labels, differ between runs.  Variables (``${x=...}``) and wraps
(``%{...}``) are not variant syntax here: ``$`` and ``%`` are kept as plain text.

Expansion happens once per template at load time, never per catalogue row.

Jinja (``{{ ... }}``, ``{% ... %}``, ``{# ... #}``) clashes with ``{...}``, so every Jinja
part is swapped for an opaque placeholder before dynamicprompts parses the text and put
back afterwards.  ``#``, ``%`` and a lone ``$`` are protected the same way (see _JINJA_RE).

Labels.  dynamicprompts only returns finished strings, so the choices are recovered by
splitting the parsed text into its top-level tokens ourselves: literal text is fixed and
every top-level construct (a variant or a wildcard) is a "slot" whose options are
enumerated with dynamicprompts' combinatorial sampler (the same machinery
``CombinatorialPromptGenerator`` wraps).  The variants are the cartesian product of all
slots, first slot varying slowest (wildcard options in sorted order, as dynamicprompts
reads them), and a variant's label is its chosen options joined by
" / " (Jinja shown as written in the template, an empty option as "(empty)").  The label
therefore depends only on the template text and wildcard files, never on catalogue rows.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynamicprompts.commands import (
    Command,
    LiteralCommand,
    SequenceCommand,
    VariantCommand,
    WildcardCommand,
)
from dynamicprompts.enums import SamplingMethod
from dynamicprompts.parser.parse import parse
from dynamicprompts.sampling_context import SamplingContext
from dynamicprompts.wildcards import WildcardManager
from dynamicprompts.wildcards.collection import WildcardCollection
from dynamicprompts.wildcards.values import WildcardValues
from pyparsing import ParseBaseException
from pyparsing.warnings import PyparsingDeprecationWarning

from pixelmill.errors import BadInputError, PixelmillError

# One construct with more options than this is certainly a mistake (e.g. a 200-line wildcard
# file nested twice); stop enumerating rather than building millions of strings.
MAX_SLOT_OPTIONS = 10_000

# Shown in a label for an empty option such as the first one of "{|, dramatic}".
EMPTY_OPTION_LABEL = "(empty)"

LABEL_SEPARATOR = " / "

# Private-use characters: never in real prompts, and not syntax to dynamicprompts.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER_RE = re.compile(f"{_OPEN}(\\d+){_CLOSE}")
# Non-greedy: "{{ a }} {{ b }}" is two parts.  "-" whitespace control is inside the match.
# "#", "%" and a lone "$" are protected too: dynamicprompts reads "#" as a comment (silently
# cutting the prompt) and rejects "100% cotton" or "$5" as broken "%{" / "${" syntax.
_JINJA_RE = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}|[#%]|(?<!\$)\$(?!\$)", re.DOTALL)


class VariantError(BadInputError):
    """Variant syntax in one part of a template could not be expanded.

    ``part`` is the name of the template part ("prompt", "negative_prompt", "before", ...)
    or None when the problem concerns the whole template (too many variants).
    """

    def __init__(self, part: str | None, reason: str) -> None:
        self.part = part
        self.reason = reason
        super().__init__(reason if part is None else f"{part}: {reason}")


@dataclass(frozen=True)
class Variant:
    label: str
    texts: tuple[str, ...]  # the expanded Jinja source of each part, in the order given


class _Protector:
    """Swaps Jinja parts (and '#') for placeholders and back.  Same source, same placeholder,
    so "{ {{a}} | {{a}} }" dedupes to one option like "{x|x}" does."""

    def __init__(self) -> None:
        self._sources: list[str] = []
        self._index: dict[str, int] = {}

    def protect(self, text: str) -> str:
        return _JINJA_RE.sub(lambda m: self._token(m.group(0)), text)

    def _token(self, source: str) -> str:
        if source not in self._index:
            self._index[source] = len(self._sources)
            self._sources.append(source)
        return f"{_OPEN}{self._index[source]}{_CLOSE}"

    def restore(self, text: str) -> str:
        return _PLACEHOLDER_RE.sub(lambda m: self._sources[int(m.group(1))], text)


class _MissingWildcard(PixelmillError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(name)


class _BadWildcardValue(PixelmillError):
    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(reason)


class _StrictWildcardManager(WildcardManager):
    """A WildcardManager that fails on unknown wildcards instead of leaving "__name__" in the
    prompt (dynamicprompts only logs a warning), and protects Jinja inside wildcard files."""

    def __init__(self, path: Path | None, protector: _Protector) -> None:
        super().__init__(path)
        self._protector = protector

    def match_collections(self, wildcard: str) -> Iterable[WildcardCollection]:
        """The wildcard's files, all of them inside the wildcards folder: a name with ".."
        is refused here (dynamicprompts would log a traceback and match nothing), and so is
        a file whose real path is elsewhere (a link out of the folder)."""
        name = wildcard.removeprefix("**/")
        if ".." in wildcard or "\\" in wildcard:
            raise _BadWildcardValue(
                name,
                "a wildcard's name may not contain '..' or '\\': wildcards are read "
                "from inside the wildcards folder",
            )
        collections = list(super().match_collections(wildcard))
        root = self.path.resolve() if self.path is not None else None
        for collection in collections:
            path = getattr(collection, "_path", None)
            if root is not None and isinstance(path, Path):
                real = path.resolve()
                if not real.is_relative_to(root):
                    raise _BadWildcardValue(
                        name, f"{path} is {real}, outside the wildcards folder {root}"
                    )
        return collections

    def get_values(self, wildcard: str) -> WildcardValues:
        values = super().get_values(wildcard)
        if not values:
            raise _MissingWildcard(wildcard)
        protected: list[str] = []
        for value in values.string_values:
            text = self._protector.protect(value)
            try:
                _check_command(_parse(text))
            except (ParseBaseException, _Unsupported) as exc:
                raise _BadWildcardValue(wildcard, f"option {value!r}: {_reason(exc)}") from None
            protected.append(text)
        # Weights are dropped on purpose: combinatorial expansion ignores them.
        return WildcardValues.from_items(protected)


class _Unsupported(PixelmillError):
    pass


def _parse(text: str) -> Command:
    # dynamicprompts builds its grammar with pyparsing names deprecated in pyparsing 3.3;
    # not ours to fix, and the test suite turns warnings into errors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PyparsingDeprecationWarning)
        return parse(text)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ParseBaseException):
        return f"variant syntax error: {exc.msg} (at character {exc.loc + 1})"
    return str(exc)


def _check_command(command: Command) -> None:
    """Rejects constructs whose expansion is not a fixed, finite list."""
    method = command.sampling_method
    if method is not None and method != SamplingMethod.COMBINATORIAL:
        raise _Unsupported(
            f"{method.name.lower()} variants ('~' or '@') are not supported: "
            "variants must be the same on every run"
        )
    if isinstance(command, LiteralCommand):
        return
    if isinstance(command, SequenceCommand):
        for token in command.tokens:
            _check_command(token)
    elif isinstance(command, VariantCommand):
        for option in command.variants:
            _check_command(option.value)
    elif isinstance(command, WildcardCommand):
        if isinstance(command.wildcard, Command):
            _check_command(command.wildcard)
        if command.variables:
            raise _Unsupported("wildcard variables are not supported")
    else:
        raise _Unsupported(
            "only {a|b}, {N$$a|b}, {0.5::a|...} and __wildcard__ are supported "
            f"(found {type(command).__name__.removesuffix('Command').lower()} syntax)"
        )


def _has_variant_syntax(protected: str) -> bool:
    # Plain text never goes through the parser: it would reject innocent text such as
    # "costs $5" or "snake__case".
    return "{" in protected or "__" in protected


@dataclass(frozen=True)
class _Slot:
    options: tuple[str, ...]  # protected text; one option for a fixed literal


def _slots(
    name: str, text: str, context: SamplingContext, wildcards: Path | None
) -> list[_Slot | str]:
    """Splits one protected part into fixed text (str) and choice slots."""
    if not _has_variant_syntax(text):
        return [text]
    try:
        command = _parse(text)
        _check_command(command)
    except (ParseBaseException, _Unsupported) as exc:
        raise VariantError(name, _reason(exc)) from None
    if isinstance(command, SequenceCommand) and command.separator == "":
        tokens: Sequence[Command] = command.tokens
    else:
        tokens = [command]
    result: list[_Slot | str] = []
    for token in tokens:
        if isinstance(token, LiteralCommand):
            result.append(token.literal)
            continue
        result.append(_Slot(_options(token, name, context, wildcards)))
    return result


def _options(
    token: Command, name: str, context: SamplingContext, wildcards: Path | None
) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    try:
        for result in context.generator_from_command(token):
            seen[result.text] = None
            if len(seen) > MAX_SLOT_OPTIONS:
                raise VariantError(name, f"one construct has more than {MAX_SLOT_OPTIONS} options")
    except _MissingWildcard as exc:
        if wildcards is None:
            raise VariantError(
                name, f"wildcard __{exc.name}__: wildcards need a template file"
            ) from None
        where = wildcards if wildcards.is_dir() else f"{wildcards} (folder does not exist)"
        raise VariantError(
            name, f"wildcard __{exc.name}__: no file {exc.name}.txt in {where}"
        ) from None
    except _BadWildcardValue as exc:
        raise VariantError(name, f"wildcard __{exc.name}__: {exc.reason}") from None
    if not seen:
        raise VariantError(name, "a variant construct produces no options")
    return tuple(seen)


def _label_text(protector: _Protector, option: str) -> str:
    text = " ".join(protector.restore(option).split())
    return text or EMPTY_OPTION_LABEL


def expand_variants(
    parts: Sequence[tuple[str, str]], *, wildcards: Path | None, max_variants: int
) -> list[Variant]:
    """Expands the variant syntax of all parts jointly (cartesian product).

    ``parts`` is a sequence of (part name, Jinja source text).  Returns at least one variant;
    a template without variant syntax gives exactly one, labelled "".  Raises VariantError.
    """
    protector = _Protector()
    # A folder that does not exist is fine as long as no wildcard is used (dynamicprompts
    # would warn about it; with no root every wildcard is simply missing).
    root = wildcards if wildcards is not None and wildcards.is_dir() else None
    manager = _StrictWildcardManager(root, protector)
    context = SamplingContext(
        wildcard_manager=manager, default_sampling_method=SamplingMethod.COMBINATORIAL
    )
    pieces: list[list[_Slot | str]] = []
    for name, text in parts:
        if _OPEN in text or _CLOSE in text:
            raise VariantError(name, "contains the reserved characters U+E000/U+E001")
        pieces.append(_slots(name, protector.protect(text), context, wildcards))

    slots = [piece for part in pieces for piece in part if isinstance(piece, _Slot)]
    count = math.prod(len(slot.options) for slot in slots)
    if count > max_variants:
        sizes = " x ".join(str(len(slot.options)) for slot in slots)
        raise VariantError(
            None,
            f"variant syntax gives {count} combinations ({sizes}), more than "
            f"max_variants={max_variants} (raise max_variants or use fewer options)",
        )

    variants: list[Variant] = []
    labels: dict[str, tuple[str, ...]] = {}
    for combo in itertools.product(*(slot.options for slot in slots)):
        chosen: Iterator[str] = iter(combo)
        texts: list[str] = []
        for part in pieces:
            # Slots were collected in this same order, so the next choice belongs here.
            joined = "".join(piece if isinstance(piece, str) else next(chosen) for piece in part)
            texts.append(protector.restore(joined))
        label = LABEL_SEPARATOR.join(_label_text(protector, option) for option in combo)
        if label in labels:
            raise VariantError(
                None,
                f"two variants have the same label {label!r} (an option contains "
                f"{LABEL_SEPARATOR.strip()!r} or options differ only in spacing)",
            )
        labels[label] = combo
        variants.append(Variant(label=label, texts=tuple(texts)))
    return variants

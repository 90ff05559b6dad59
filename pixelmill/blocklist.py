"""Prompt blocklist: words, phrases and regular expressions a prompt must not contain.

The producer rejects catalogue rows whose prompt is blocked; the worker refuses to render a
blocked job (a second line of defence for jobs written by older producers or by hand).

File format (UTF-8, one rule per line):

- blank lines and lines starting with ``#`` are ignored (comments are whole lines only,
  because ``#`` can be part of a regular expression); whitespace around a rule is ignored;
- ``re:PATTERN`` is a Python regular expression, compiled with ``re.IGNORECASE``;
- anything else is a plain word or phrase. Words in a phrase match across any run of
  whitespace ("blood bath" matches "blood   bath").

Matching works on normalised text: NFKC, then casefold (so full-width letters, ligatures
and odd cases are caught). Plain rules are normalised the same way; regular expressions are
not (they are code), so write them in lower case without characters that casefolding
changes (``ß`` becomes ``ss``).

Plain rules match whole words in scripts that separate words with spaces (Latin, Cyrillic,
Greek, ...): "gore" blocks "Gore, blood" but not "gorelick" or "algore". Only letters and
digits join a word to its neighbours; ``_`` and punctuation separate words, so "nsfw" does
block "nsfw_style" and "#nsfw". In scripts written without spaces (Chinese, Japanese,
Korean, Thai, Lao, Khmer, Myanmar, Tibetan) no word boundary can be seen, so those rules
match anywhere as substrings. Korean does use spaces but is treated as unspaced: particles
attach to the noun before them ("누드를"), so a whole-word match would miss most uses. This
is decided for each end of a rule: an end that is a letter or digit of a spaced script must
sit at a word boundary, any other end need not.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pixelmill.errors import BadInputError

# Characters of scripts written without spaces between words (see the module docstring).
# NFKC folds half-width katakana and compatibility ideographs into these ranges.
_UNSPACED = (
    "\u0e00-\u0eff"  # Thai, Lao
    "\u0f00-\u0fff"  # Tibetan
    "\u1000-\u109f"  # Myanmar
    "\u1100-\u11ff"  # Hangul Jamo
    "\u1780-\u17ff"  # Khmer
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3130-\u318f"  # Hangul compatibility Jamo
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uac00-\ud7af"  # Hangul syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\U00020000-\U0003134f"  # CJK extensions B to G
)
_UNSPACED_RE = re.compile(f"[{_UNSPACED}]")
# A letter or digit of a spaced script: what joins a word to its neighbours. Underscore is
# deliberately not one, so "nsfw_style" still contains the word "nsfw".
_SPACED_WORD_CHAR = f"[^\\W_{_UNSPACED}]"
_SPACED_WORD_CHAR_RE = re.compile(_SPACED_WORD_CHAR)

_REGEX_PREFIX = "re:"
_DEFAULT_RESOURCE = "default_blocklist.txt"


class BlocklistError(BadInputError):
    """A bad blocklist: ``source`` is "file" or "file:line", ``reason`` says what is wrong."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


@dataclass(frozen=True)
class BlockMatch:
    """Why a text is blocked."""

    rule: str  # the rule as written in the file (e.g. "re:\bgore\b" or "naked")
    source: str  # "file:line" of the rule
    matched: str  # the text that matched, as normalised (NFKC + casefold)


@dataclass(frozen=True)
class _Rule:
    rule: str
    source: str


def normalize(text: str) -> str:
    """NFKC + casefold, the form both rules and texts are matched in.

    NFKC runs again after casefold because casefolding can produce unnormalised sequences.
    ASCII text skips both: for it NFKC is the identity and casefold is ``lower``, and most
    prompts are ASCII, so this keeps the producer's million-prompt checks cheap.
    """
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def _phrase_key(text: str) -> str:
    """A normalised phrase with whitespace runs collapsed: how a plain match finds its rule."""
    return " ".join(text.split())


def _boundaries(key: str) -> tuple[bool, bool]:
    """Whether a normalised plain rule needs a word boundary before it and after it."""
    return (
        _SPACED_WORD_CHAR_RE.fullmatch(key[0]) is not None,
        _SPACED_WORD_CHAR_RE.fullmatch(key[-1]) is not None,
    )


def _combine(keys: Iterable[str]) -> re.Pattern[str] | None:
    """All plain rules as one regex: a search costs one pass however many rules there are.

    Rules are grouped by the boundaries they need so each group's lookarounds are written
    once rather than once per rule (the boundary class is large: five times faster on typical
    prompts). Within a group rules go longest first, so the longest rule at a place wins. The
    leading lookahead on the rules' first characters lets the engine skip most positions
    without trying any group.
    """
    groups: dict[tuple[bool, bool], list[str]] = {}
    for key in keys:
        groups.setdefault(_boundaries(key), []).append(key)
    if not groups:
        return None
    parts: list[str] = []
    for (before, after), members in sorted(groups.items(), reverse=True):
        members.sort(key=lambda key: (-len(key), key))
        alternation = "|".join(
            r"\s+".join(re.escape(word) for word in key.split(" ")) for key in members
        )
        lookbehind = f"(?<!{_SPACED_WORD_CHAR})" if before else ""
        lookahead = f"(?!{_SPACED_WORD_CHAR})" if after else ""
        parts.append(f"{lookbehind}(?:{alternation}){lookahead}")
    first_chars = "".join(
        sorted({re.escape(key[0]) for members in groups.values() for key in members})
    )
    return re.compile(f"(?=[{first_chars}])(?:{'|'.join(parts)})")


class Blocklist:
    """A compiled blocklist. Build it with :meth:`from_file`, :meth:`from_lines` or
    :meth:`default`; it is immutable and safe to share between threads."""

    def __init__(
        self,
        plain: dict[str, _Rule],
        regexes: list[tuple[re.Pattern[str], _Rule]],
        rule_count: int,
    ) -> None:
        # Private: the classmethods validate and normalise what goes in here.
        self._plain = dict(plain)
        self._plain_re = _combine(self._plain)
        self._regexes = tuple(regexes)
        self._rule_count = rule_count

    @classmethod
    def from_lines(cls, lines: Iterable[str], *, source: str) -> Blocklist:
        """Parse rules from ``lines``; ``source`` names them in errors and matches
        ("source:line", lines counted from 1)."""
        plain: dict[str, _Rule] = {}
        regexes: list[tuple[re.Pattern[str], _Rule]] = []
        count = 0
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{source}:{number}"
            count += 1
            if line.startswith(_REGEX_PREFIX):
                regexes.append(
                    (_compile_regex(line[len(_REGEX_PREFIX) :], where), _Rule(line, where))
                )
                continue
            key = _phrase_key(normalize(line))
            if not key:
                # Only possible for characters NFKC turns into whitespace.
                raise BlocklistError(where, f"rule {line!r} is empty once normalised")
            # A duplicate (possibly differing only in case or width) is harmless: the first
            # one is the one reported.
            plain.setdefault(key, _Rule(line, where))
        return cls(plain, regexes, count)

    @classmethod
    def from_file(cls, path: Path) -> Blocklist:
        """Read a blocklist file (UTF-8; a leading BOM is allowed)."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BlocklistError(str(path), f"cannot read the blocklist: {exc.strerror}") from exc
        return cls.from_lines(_decode_lines(data, str(path)), source=str(path))

    @classmethod
    def default(cls) -> Blocklist:
        """The blocklist shipped with pixelmill (``pixelmill/default_blocklist.txt``)."""
        return _default()

    def check(self, *texts: str) -> BlockMatch | None:
        """The first match in ``texts`` (in order), or None if none is blocked.

        Within one text, plain rules are tried first (the leftmost match wins), then the
        regular expressions in file order.
        """
        for text in texts:
            normalized = normalize(text)
            if self._plain_re is not None:
                found = self._plain_re.search(normalized)
                if found is not None:
                    rule = self._plain[_phrase_key(found.group())]
                    return BlockMatch(rule.rule, rule.source, found.group())
            for pattern, rule in self._regexes:
                found = pattern.search(normalized)
                if found is not None:
                    return BlockMatch(rule.rule, rule.source, found.group())
        return None

    def __len__(self) -> int:
        """The number of rules read (a repeated rule counts each time)."""
        return self._rule_count

    def __repr__(self) -> str:
        return f"<Blocklist {self._rule_count} rules>"


def _compile_regex(pattern: str, where: str) -> re.Pattern[str]:
    if not pattern:
        raise BlocklistError(where, "empty regular expression after 're:'")
    try:
        compiled = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        at = "" if exc.pos is None else f" at position {exc.pos}"
        raise BlocklistError(
            where, f"invalid regular expression {pattern!r}: {exc.msg}{at}"
        ) from exc
    # A pattern that matches nothing at all (e.g. "a*" matches "") would block every prompt:
    # certainly a mistake, so refuse it rather than silently stop all production.
    if compiled.search("") is not None:
        raise BlocklistError(
            where,
            f"regular expression {pattern!r} matches empty text, so it would block everything",
        )
    return compiled


def _decode_lines(data: bytes, path: str) -> list[str]:
    """Split ``data`` into lines and decode each, so a bad byte is reported on its line."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines: list[str] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise BlocklistError(
                f"{path}:{number}",
                f"not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})",
            ) from exc
    return lines


@functools.cache
def _default() -> Blocklist:
    # Cached: the worker may ask for it per job, and the shipped file never changes while
    # the process runs. One entry, so the cache is bounded.
    resource = importlib.resources.files("pixelmill").joinpath(_DEFAULT_RESOURCE)
    return Blocklist.from_lines(
        _decode_lines(resource.read_bytes(), str(resource)), source=str(resource)
    )


@functools.cache
def load_blocklist(path: Path | None) -> Blocklist:
    """The blocklist at ``path`` (settings.blocklist_path), or the shipped one for None.
    Read once per file and process: the producer and every worker process share it."""
    return Blocklist.default() if path is None else Blocklist.from_file(path)

"""Counting CLIP tokens, so the producer can warn about prompts the text encoder will cut.

Stable Diffusion's CLIP text encoder reads 77 tokens: a BOS token, at most 75 prompt tokens
and an EOS token. Anything past that is silently dropped by the pipeline, which usually
means the end of a long template (often the product details) never reaches the image.

With the model's tokenizer on disk the count is exact. Without one (a hub id, the built-in
tiny model, a model not present on this machine) it is an *estimate* from CLIP's
pre-tokenizer rules; see :func:`estimate_tokens`.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers takes a second to import; only exact counting needs it
    from transformers import CLIPTokenizer

CLIP_WINDOW = 75  # tokens available to the prompt (77 minus BOS and EOS)

# ASCII whitespace only: CLIP's pre-tokenizer drops it. Other characters Python calls
# whitespace (e.g. \x1c-\x1f) may become tokens, so they must count in the bound below.
_ASCII_SPACE = str.maketrans("", "", " \t\n\r\f\v")

# Han, kana and Hangul: CLIP's byte-level BPE (trained mostly on English) spends one to three
# tokens on each of these characters (three UTF-8 bytes, rarely merged).
_CJK = "\u3040-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK_TOKENS_PER_CHAR = 2

# CLIP's pre-tokenizer, "'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", in
# Python's re (no \p{..}): contractions, letter runs, single digits, punctuation. CJK
# characters are split out one by one, and punctuation runs into single marks, because each
# of those usually costs at least a token of its own.
_PIECES = re.compile(
    rf"(?P<contraction>'(?:s|t|re|ve|m|ll|d))"
    rf"|(?P<cjk>[{_CJK}])"
    rf"|(?P<word>[^\W\d_{_CJK}]+)"
    rf"|\d|_|[^\s\w]"
)
# A word up to this many UTF-8 bytes is usually one token in CLIP's vocabulary; a longer one
# is split, roughly every four bytes.
_SHORT_WORD_BYTES = 8
# The same rules for ASCII text: contractions, letter runs, single digits, "_", punctuation.
_ASCII_PIECES = re.compile(r"'(?:s|t|re|ve|m|ll|d)|[a-z]+|\d|_|[^\s\w]")
_ASCII_LONG_WORDS = re.compile(rf"(?<![a-z])[a-z]{{{_SHORT_WORD_BYTES + 1},}}")
_BYTES_PER_LONG_WORD_TOKEN = 4
# The same pieces without a regex, for ASCII text without contractions (the producer
# estimates every prompt of a bulk run, and this is several times faster): every byte
# becomes "a" (a letter), " " (whitespace, as the regex's \s sees it) or "." (a piece of its
# own: a digit, "_", a punctuation mark); a piece is then a "." or a run of "a".
_ASCII_CLASSES = bytes(
    ord("a") if "a" <= chr(c) <= "z" else ord(" ") if chr(c).isspace() else ord(".")
    for c in range(256)
)
_ASCII_LONG_RUN = b"a" * (_SHORT_WORD_BYTES + 1)


def _clip_normalize(text: str) -> str:
    # What CLIP's tokenizer does first (NFC, then lowercase); ASCII is unchanged by NFC.
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFC", text).lower()


def token_bound(text: str) -> int:
    """An upper bound on the CLIP token count of ``text``, without tokenizing.

    CLIP's BPE is byte-level: every token covers at least one UTF-8 byte of the normalised
    text, and whitespace becomes no token. So the non-whitespace bytes bound the count (a
    Chinese character is three bytes and can be three tokens, which is why characters would
    not do).
    """
    normalized = _clip_normalize(text)
    if normalized.isascii():
        return len(normalized.translate(_ASCII_SPACE))
    return len(normalized.translate(_ASCII_SPACE).encode("utf-8"))


def estimate_tokens(text: str) -> int:
    """An estimate of the CLIP token count of ``text`` (BOS/EOS excluded), no tokenizer needed.

    Each pre-tokenizer piece is counted as at least one token: a word of up to eight bytes
    as one, a longer one as one per four bytes, each digit and punctuation mark as one, each
    CJK character as two. Common English prompts land within a few tokens of the exact count;
    rare words and non-Latin scripts can be off by more in either direction. Never above
    :func:`token_bound`.
    """
    normalized = _clip_normalize(text)
    if normalized.isascii():
        if "'" not in normalized:
            return _estimate_ascii_plain(normalized)
        # One token per piece, plus the extra tokens of long words.
        pieces = _ASCII_PIECES.findall(normalized)
        long_words = _ASCII_LONG_WORDS.findall(normalized)
        return len(pieces) + sum(len(w) // _BYTES_PER_LONG_WORD_TOKEN - 1 for w in long_words)
    total = 0
    for piece in _PIECES.finditer(normalized):
        kind = piece.lastgroup
        if kind == "cjk":
            total += _CJK_TOKENS_PER_CHAR
        elif kind == "word":
            size = len(piece.group().encode("utf-8"))
            total += 1 if size <= _SHORT_WORD_BYTES else size // _BYTES_PER_LONG_WORD_TOKEN
        else:
            total += 1
    return total


def _estimate_ascii_plain(normalized: str) -> int:
    """:func:`estimate_tokens` of lower-case ASCII text without "'" (no contractions)."""
    classes = normalized.encode("ascii").translate(_ASCII_CLASSES)
    words = classes.replace(b".", b" ").split()  # the letter runs
    total = classes.count(b".") + len(words)
    if _ASCII_LONG_RUN in classes:
        total += sum(
            len(word) // _BYTES_PER_LONG_WORD_TOKEN - 1
            for word in words
            if len(word) > _SHORT_WORD_BYTES
        )
    return total


class TokenCounter:
    """Counts the CLIP tokens of prompts: exactly with a tokenizer, else by estimate."""

    def __init__(self, tokenizer_dir: Path | None = None) -> None:
        """``tokenizer_dir``: a folder with a CLIP tokenizer (``tokenizer.json``, or
        ``vocab.json`` and ``merges.txt``; e.g. ``MODEL/tokenizer``). None: estimate only."""
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer: CLIPTokenizer | None = None
        if tokenizer_dir is not None:
            self._tokenizer = _load_tokenizer(tokenizer_dir)

    @classmethod
    def for_model(cls, model: str) -> TokenCounter:
        """An exact counter for a local diffusers folder with a ``tokenizer/`` subfolder, an
        estimating one for anything else (a hub id, the built-in "tiny" model, a folder not
        on this machine). Nothing is ever downloaded."""
        tokenizer_dir = Path(model).expanduser() / "tokenizer"
        if tokenizer_dir.is_dir():
            return cls(tokenizer_dir)
        return cls(None)

    @property
    def exact(self) -> bool:
        """True when counts come from the model's tokenizer, False when they are estimates."""
        return self._tokenizer is not None

    def count(self, text: str) -> int:
        """The number of CLIP tokens in ``text`` (BOS/EOS excluded): exact when a tokenizer is
        loaded, else :func:`estimate_tokens`."""
        if self._tokenizer is None:
            return estimate_tokens(text)
        if self._tokenizer.is_fast:
            # The Rust tokenizer directly: same ids as calling the tokenizer, without the
            # Python wrapper's overhead or its "sequence longer than 77" log line.
            encoding = self._tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
            return len(encoding.ids)
        # transformers 4.x's CLIPTokenizer is the pure-Python one.
        return len(self._tokenizer.tokenize(text))

    def over_window(self, text: str) -> int | None:
        """None if ``text`` fits in :data:`CLIP_WINDOW` tokens, else its token count.

        With a tokenizer, most prompts are short enough that :func:`token_bound` proves they
        fit, which costs far less than tokenizing (about 1 µs against 50 µs for a
        100-character prompt). The estimate is never above that bound and costs about as
        much, so without a tokenizer the estimate alone decides (the same answer, once).
        """
        if self._tokenizer is None:
            tokens = estimate_tokens(text)
        elif token_bound(text) <= CLIP_WINDOW:
            return None
        else:
            tokens = self.count(text)
        return tokens if tokens > CLIP_WINDOW else None

    def __repr__(self) -> str:
        if self.tokenizer_dir is None:
            return "<TokenCounter estimating>"
        return f"<TokenCounter exact: {self.tokenizer_dir}>"


def _load_tokenizer(tokenizer_dir: Path) -> CLIPTokenizer:
    has_json = (tokenizer_dir / "tokenizer.json").is_file()
    has_bpe = (tokenizer_dir / "vocab.json").is_file() and (tokenizer_dir / "merges.txt").is_file()
    if not (has_json or has_bpe):
        raise FileNotFoundError(
            f"{tokenizer_dir}: no CLIP tokenizer here "
            "(expected tokenizer.json, or vocab.json and merges.txt)"
        )
    from transformers import CLIPTokenizer

    try:
        # local_files_only: a folder is never a hub id here, and nothing may be downloaded.
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{tokenizer_dir}: cannot load the CLIP tokenizer: {exc}") from exc
    return tokenizer

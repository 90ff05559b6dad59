from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from producer.tokens import CLIP_WINDOW, TokenCounter, estimate_tokens, token_bound
from worker.tiny_model import build_tokenizer

TEXTS = [
    "",
    "a red handbag",
    "A photo of a red leather handbag on a marble table, studio lighting, 50mm, high detail",
    "it's a DSLR shot -- f/1.8, 85mm!!!",
    "一只红色皮革手提包放在白色大理石桌上",
    "İstanbul café, ﬃ ligature, Straße",
    "tabs\tand\nnewlines  and   runs",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir / "tokenizer"


@pytest.fixture(scope="module")
def reference(tokenizer_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


@pytest.fixture(scope="module")
def counter(tokenizer_dir: Path) -> TokenCounter:
    return TokenCounter(tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_exact_count_matches_the_tokenizer(
    counter: TokenCounter, reference: CLIPTokenizer, text: str
) -> None:
    assert counter.exact
    assert counter.count(text) == len(reference(text).input_ids) - 2


@pytest.mark.parametrize("text", TEXTS)
def test_bound_is_never_below_the_count(counter: TokenCounter, text: str) -> None:
    assert token_bound(text) >= counter.count(text)
    assert token_bound(text) >= estimate_tokens(text)


def test_short_text_fits_without_tokenizing(
    counter: TokenCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_counting(text: str) -> int:
        raise AssertionError("over_window tokenized a text the bound proves fits")

    monkeypatch.setattr(counter, "count", no_counting)
    assert counter.over_window("a red leather handbag on a marble table, studio lighting") is None


def test_long_text_returns_its_count(counter: TokenCounter, reference: CLIPTokenizer) -> None:
    text = " ".join(["handbag"] * 20)  # the tiny tokenizer has no merges: 7 tokens a word
    assert counter.over_window(text) == len(reference(text).input_ids) - 2 == 140


def test_text_over_the_bound_is_counted(
    counter: TokenCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real CLIP vocabulary merges letters, so a text over the byte bound often still fits;
    # the tiny tokenizer has no merges, so a fake count stands in for a real one.
    text = " ".join(["handbag"] * 12)  # 84 bytes: over the bound
    monkeypatch.setattr(counter, "count", lambda text: 12)
    assert counter.over_window(text) is None
    monkeypatch.setattr(counter, "count", lambda text: CLIP_WINDOW + 1)
    assert counter.over_window(text) == CLIP_WINDOW + 1


def test_cjk_text_is_counted_in_bytes_not_characters(counter: TokenCounter) -> None:
    # 30 characters, 90 UTF-8 bytes: a per-character bound would wrongly call this a fit.
    text = "红色皮革手提包" * 4 + "放在桌上"
    assert len(text) < CLIP_WINDOW
    # The tiny tokenizer has no merges: three tokens a character, one per byte.
    assert counter.over_window(text) == 3 * len(text)


def test_window_edge(counter: TokenCounter) -> None:
    assert counter.over_window("a" * CLIP_WINDOW) is None
    assert counter.over_window(" ".join("a" * CLIP_WINDOW)) is None
    assert counter.over_window(" ".join("a" * (CLIP_WINDOW + 1))) == CLIP_WINDOW + 1


def test_for_model_with_a_local_folder_is_exact(tiny_model_dir: Path) -> None:
    counter = TokenCounter.for_model(str(tiny_model_dir))
    assert counter.exact
    assert counter.count("abc") == 3


@pytest.mark.parametrize(
    "model", ["tiny", "runwayml/stable-diffusion-v1-5", "/nonexistent/model/folder"]
)
def test_for_model_otherwise_estimates(model: str) -> None:
    counter = TokenCounter.for_model(model)
    assert not counter.exact
    assert counter.count("a red handbag") == 3


def test_vocab_and_merges_folder_loads(tmp_path: Path, reference: CLIPTokenizer) -> None:
    build_tokenizer(tmp_path)  # writes vocab.json + merges.txt, the transformers 4.x layout
    counter = TokenCounter(tmp_path)
    text = "Hello, World! 一只猫"
    assert counter.count(text) == len(reference(text).input_ids) - 2


def test_folder_without_a_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path}: no CLIP tokenizer here"):
        TokenCounter(tmp_path)


# --- estimates -------------------------------------------------------------------------------


def test_estimate_of_plain_english_words() -> None:
    text = "a red leather handbag on a white marble studio table"
    assert len(text.split()) == 10
    assert 10 <= estimate_tokens(text) <= 14


def test_estimate_counts_punctuation_digits_and_long_words() -> None:
    assert estimate_tokens("red, blue.") == 4
    assert estimate_tokens("50mm") == 3  # CLIP splits numbers into digits
    assert estimate_tokens("photorealistic") == 3  # 14 letters: split, about every 4
    assert estimate_tokens("it's") == 2


def test_estimate_of_chinese_text() -> None:
    text = "一只红色皮革手提包放在白色大理石桌上"  # 18 characters
    assert 18 <= estimate_tokens(text) <= 54


def test_estimating_counter_flags_a_long_prompt() -> None:
    counter = TokenCounter()
    assert not counter.exact
    sentence = "a red leather handbag on a white marble table in soft light"
    prompt = " ".join([sentence] * 9)  # 108 words
    assert len(prompt.split()) == 108
    result = counter.over_window(prompt)
    assert result is not None
    assert 108 <= result <= 150
    assert counter.over_window("a red leather handbag on a white marble table") is None


def _regex_estimate(text: str) -> int:
    """estimate_tokens' ASCII rules through the pre-tokenizer regexes alone: the reference
    the regex-free fast path must agree with."""
    normalized = text.lower()
    pieces = re.findall(r"'(?:s|t|re|ve|m|ll|d)|[a-z]+|\d|_|[^\s\w]", normalized)
    long_words = re.findall(r"(?<![a-z])[a-z]{9,}", normalized)
    return len(pieces) + sum(len(word) // 4 - 1 for word in long_words)


def test_ascii_estimate_agrees_with_the_pre_tokenizer_regexes() -> None:
    rng = random.Random(3)
    # Letters (runs long and short), digits, "_", punctuation, every kind of ASCII whitespace
    # the regex's \s knows (\x1c-\x1f included) and an apostrophe now and then.
    alphabet = [
        *"abcdefghijklmnopqrstuvwxyzABCZ",
        *"0123456789_",
        *',.!-/()#%$\\"',
        *" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f",
        "extraordinarily",
        "photograph",
        "'s",
        "'",
    ]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        assert estimate_tokens(text) == _regex_estimate(text), repr(text)


def test_estimating_counter_decides_by_the_estimate() -> None:
    counter = TokenCounter(None)
    long_prompt = ", ".join(["a red leather handbag on a marble table"] * 10)
    assert estimate_tokens(long_prompt) > CLIP_WINDOW
    assert counter.over_window(long_prompt) == estimate_tokens(long_prompt)
    # Over the byte bound but within the window by estimate: fits.
    spaced_out = "extraordinarily " * 10
    assert token_bound(spaced_out) > CLIP_WINDOW >= estimate_tokens(spaced_out)
    assert counter.over_window(spaced_out) is None

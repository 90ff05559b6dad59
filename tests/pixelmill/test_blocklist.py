from __future__ import annotations

import importlib.resources
import time
from pathlib import Path

import pytest

from pixelmill.blocklist import Blocklist, BlocklistError, BlockMatch


def blocklist(*rules: str) -> Blocklist:
    return Blocklist.from_lines(rules, source="rules.txt")


# --- plain rules ---------------------------------------------------------------------------


def test_plain_word_matches_case_insensitively() -> None:
    rules = blocklist("gore")
    assert rules.check("Gore, blood and guts") == BlockMatch("gore", "rules.txt:1", "gore")
    assert rules.check("GORE") is not None


@pytest.mark.parametrize("text", ["gorelick", "algore", "gore2", "ungored"])
def test_plain_word_matches_whole_words_only(text: str) -> None:
    assert blocklist("gore").check(text) is None


@pytest.mark.parametrize("text", ["nsfw_style", "#nsfw", "(nsfw)", "nsfw-art", "a nsfw."])
def test_underscore_and_punctuation_separate_words(text: str) -> None:
    assert blocklist("nsfw").check(text) is not None


def test_full_width_letters_and_caseless_forms_are_caught() -> None:
    assert blocklist("naked").check("ＮＡＫＥＤ model") is not None
    # casefold, not lower: "ß" and "SS" are the same word.
    assert blocklist("straße").check("STRASSE") is not None
    assert blocklist("STRASSE").check("straße") is not None


def test_phrase_matches_across_any_whitespace() -> None:
    found = blocklist("blood bath").check("a Blood \t\n bath scene")
    assert found == BlockMatch("blood bath", "rules.txt:1", "blood \t\n bath")
    assert blocklist("blood bath").check("bloodbath") is None


def test_longest_rule_at_a_place_wins() -> None:
    found = blocklist("blood", "blood bath").check("a blood bath")
    assert found is not None
    assert found.rule == "blood bath"
    assert found.source == "rules.txt:2"


def test_cjk_rules_match_as_substrings() -> None:
    rules = blocklist("裸体", "血腥")
    assert rules.check("一个裸体模特") == BlockMatch("裸体", "rules.txt:1", "裸体")
    assert rules.check("画面很血腥。") is not None
    assert rules.check("一个穿着红裙的模特") is None


def test_latin_word_next_to_cjk_text_still_matches() -> None:
    assert blocklist("nsfw").check("这是nsfw图片") is not None


def test_rule_is_reported_as_written() -> None:
    found = blocklist("  NSFW  ").check("nsfw")
    assert found == BlockMatch("NSFW", "rules.txt:1", "nsfw")


def test_duplicate_rules_report_the_first() -> None:
    found = blocklist("naked", "Naked").check("naked")
    assert found is not None
    assert found.source == "rules.txt:1"


# --- regular expressions -----------------------------------------------------------------


def test_regex_rule_reports_its_own_rule() -> None:
    rules = blocklist("naked", r"re:\bgor(e|y)\b", r"re:blood\s*bath")
    assert rules.check("A GORY scene") == BlockMatch(r"re:\bgor(e|y)\b", "rules.txt:2", "gory")
    assert rules.check("bloodbath") == BlockMatch(r"re:blood\s*bath", "rules.txt:3", "bloodbath")


def test_regex_rules_see_normalised_text() -> None:
    assert blocklist(r"re:\bnsfw\b").check("ＮＳＦＷ") is not None


def test_invalid_regex_names_file_line_and_error() -> None:
    with pytest.raises(BlocklistError) as info:
        blocklist("# header", "naked", "re:(unclosed")
    message = str(info.value)
    assert message.startswith("rules.txt:3: invalid regular expression '(unclosed'")
    assert "missing )" in message
    assert info.value.source == "rules.txt:3"


@pytest.mark.parametrize("rule", ["re:", "re:a*", "re:(x)?"])
def test_regex_matching_empty_text_is_refused(rule: str) -> None:
    with pytest.raises(BlocklistError, match=r"^rules\.txt:1: .*empty"):
        blocklist(rule)


# --- parsing, files, the default list -------------------------------------------------------


def test_blank_lines_and_comments_are_ignored() -> None:
    rules = blocklist("", "# a comment", "   # indented comment", "naked", "  ", r"re:gor[ey]")
    assert len(rules) == 2
    assert rules.check("a comment") is None


def test_check_returns_first_match_across_texts() -> None:
    rules = blocklist("naked", "gory")
    assert rules.check("clean", "a gory scene", "naked") == BlockMatch(
        "gory", "rules.txt:2", "gory"
    )
    assert rules.check("clean", "also clean") is None
    assert rules.check() is None


def test_empty_blocklist_blocks_nothing() -> None:
    rules = blocklist("# nothing")
    assert len(rules) == 0
    assert rules.check("anything at all") is None


def test_from_file_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "blocked.txt"
    path.write_text("\ufeff# header\n\nnaked\r\n", encoding="utf-8")
    found = Blocklist.from_file(path).check("naked")
    assert found == BlockMatch("naked", f"{path}:3", "naked")


def test_from_file_reports_bad_bytes_on_their_line(tmp_path: Path) -> None:
    path = tmp_path / "blocked.txt"
    path.write_bytes(b"naked\ngor\xe9\n")
    with pytest.raises(BlocklistError, match=rf"^{path}:2: not UTF-8 \(byte 0xe9 at column 4\)"):
        Blocklist.from_file(path)


def test_from_file_reports_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.txt"
    with pytest.raises(BlocklistError, match=rf"^{path}: cannot read the blocklist"):
        Blocklist.from_file(path)


def test_default_list_is_packaged_and_loads() -> None:
    resource = importlib.resources.files("pixelmill").joinpath("default_blocklist.txt")
    assert resource.is_file()
    rules = Blocklist.default()
    assert 10 <= len(rules) <= 40
    assert Blocklist.default() is rules  # loaded once per process


@pytest.mark.parametrize(
    "text", ["a naked man", "NSFW poster", "pornographic", "一个裸体模特", "色情图片"]
)
def test_default_list_blocks(text: str) -> None:
    assert Blocklist.default().check(text) is not None


@pytest.mark.parametrize(
    "text",
    [
        "nude heels on a marble floor",
        "GORE-TEX hiking jacket, studio lighting",
        "blood orange juice in a glass bottle",
        "unisex hoodie, essex flat lay",
        "红色皮革手提包，白色背景",
    ],
)
def test_default_list_passes_ordinary_catalogue_prompts(text: str) -> None:
    assert Blocklist.default().check(text) is None


def test_checking_is_fast() -> None:
    # The producer checks about a million prompts a night; one search per prompt keeps that
    # to seconds. Expected here: well under 0.2 s; the bound only catches a per-rule loop.
    rules = Blocklist.default()
    prompts = [
        f"product {i}: a red leather handbag on a marble table, studio lighting, high detail"
        for i in range(20_000)
    ]
    start = time.perf_counter()
    assert all(rules.check(prompt) is None for prompt in prompts)
    assert time.perf_counter() - start < 2.0

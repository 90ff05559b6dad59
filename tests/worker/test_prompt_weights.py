"""A1111 prompt weights: the parser, and the compel embeddings the worker renders with."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np
import pytest
import torch

from worker.loading import load_pipeline
from worker.pipeline import RenderParams, check_inputs, render_batch
from worker.prompt_weights import (
    DOWN,
    UP,
    encode_prompts,
    needs_weighting,
    parse_prompt_attention,
    plain_text,
)

CPU = torch.device("cpu")
PARAMS = RenderParams(
    prompt="a red sneaker, studio light",
    negative_prompt="blurry",
    steps=2,
    guidance=7.0,
    width=64,
    height=64,
)
# Far beyond CLIP's 77 tokens with the byte-level tiny tokenizer (one token per character).
LONG = "a red sneaker on a white table, soft studio light, " * 4


@pytest.fixture(scope="module")
def sd_pipe(tiny_model_dir: pathlib.Path) -> Any:
    return load_pipeline(str(tiny_model_dir), device=CPU)


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_model_dir: pathlib.Path) -> Any:
    return load_pipeline(str(tiny_sdxl_model_dir), device=CPU)


def _pixels(pipe: Any, params: RenderParams, seed: int = 3) -> np.ndarray:
    return np.asarray(render_batch(pipe, params, [seed])[0].image, dtype=np.int16)


# --- parser ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a red sneaker", [("a red sneaker", 1.0)]),
        ("", [("", 1.0)]),
        ("a (red:1.3) sneaker", [("a ", 1.0), ("red", 1.3), (" sneaker", 1.0)]),
        ("a (red: 0.5 ) shoe", [("a ", 1.0), ("red", 0.5), (" shoe", 1.0)]),
        ("(red)", [("red", UP)]),
        ("((red))", [("red", UP * UP)]),
        ("[red]", [("red", DOWN)]),
        ("[[red]]", [("red", DOWN * DOWN)]),
        ("((red):1.5)", [("red", UP * 1.5)]),
        ("(a [b] c)", [("a ", UP), ("b", UP * DOWN), (" c", UP)]),
        # A round trip up and down again is no weight at all: neighbours merge.
        ("x [(y)] z", [("x y z", 1.0)]),
        # Escapes are literal characters, without weight.
        (r"\(red\) \[b\] a\\b", [(r"(red) [b] a\b", 1.0)]),
        # Unclosed groups weight up to the end, stray closers are text (as in A1111).
        ("a (red", [("a ", 1.0), ("red", UP)]),
        ("a ) b ]", [("a ) b ]", 1.0)]),
        # A colon that does not close a weighted group is text.
        ("style: modern, 16:9", [("style: modern, 16:9", 1.0)]),
        ("(a:b)", [("a:b", UP)]),
    ],
)
def test_parses_a1111_weights(prompt: str, expected: list[tuple[str, float]]) -> None:
    parsed = parse_prompt_attention(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


def test_a_weight_that_is_not_a_number_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"invalid weight '1\.2\.3'"):
        parse_prompt_attention("a (red:1.2.3) sneaker")
    with pytest.raises(ValueError, match=r"negative_prompt: invalid weight '\.\.'"):
        check_inputs(dataclasses.replace(PARAMS, negative_prompt="(blurry:..)"))


def test_plain_text_drops_the_syntax() -> None:
    assert plain_text(parse_prompt_attention(r"a ((red:1.2)) [shoe] \(x\)")) == "a red shoe (x)"


# --- when the compel path is used ---------------------------------------------------------------


def test_only_weighted_or_long_prompts_need_compel(sd_pipe: Any) -> None:
    assert not needs_weighting(sd_pipe, "a red sneaker", "blurry")
    assert not needs_weighting(sd_pipe, r"a \(red\) sneaker", "")  # escapes only: plain text
    assert needs_weighting(sd_pipe, "a (red:1.2) sneaker", "")
    assert needs_weighting(sd_pipe, "a red sneaker", "[blurry]")
    assert needs_weighting(sd_pipe, LONG, "")
    assert needs_weighting(sd_pipe, "a red sneaker", LONG)


def _pipeline_pixels(pipe: Any, params: RenderParams, seed: int = 3) -> np.ndarray:
    """The pipeline called directly with the prompts as text."""
    image = pipe(
        prompt=[params.prompt],
        negative_prompt=[params.negative_prompt],
        num_inference_steps=params.steps,
        guidance_scale=params.guidance,
        width=params.width,
        height=params.height,
        generator=[torch.Generator().manual_seed(seed)],
    ).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_a_plain_prompt_renders_exactly_as_the_pipeline_itself(
    arch: str, sd_pipe: Any, sdxl_pipe: Any
) -> None:
    pipe = sd_pipe if arch == "sd" else sdxl_pipe
    # The worker passes plain prompts to the pipeline as text, as it always did.
    assert np.array_equal(_pixels(pipe, PARAMS), _pipeline_pixels(pipe, PARAMS))


def test_escaped_brackets_reach_the_model_as_brackets(sd_pipe: Any) -> None:
    escaped = dataclasses.replace(PARAMS, prompt=r"a \(red\) sneaker")
    literal = dataclasses.replace(PARAMS, prompt="a (red) sneaker")
    assert np.array_equal(_pixels(sd_pipe, escaped), _pipeline_pixels(sd_pipe, literal))
    # Unescaped, the same brackets are a weight (x1.1): another image.
    assert not np.array_equal(_pixels(sd_pipe, literal), _pixels(sd_pipe, escaped))


# --- embeddings -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_a_weight_changes_the_embeddings_of_its_words_only(
    arch: str, sd_pipe: Any, sdxl_pipe: Any
) -> None:
    pipe = sd_pipe if arch == "sd" else sdxl_pipe
    plain = encode_prompts(pipe, "a red sneaker", "blurry")
    weighted = encode_prompts(pipe, "a (red:1.5) sneaker", "blurry")
    assert weighted.prompt_embeds.shape == plain.prompt_embeds.shape
    assert plain.prompt_embeds.shape[1] == 77
    changed = (weighted.prompt_embeds - plain.prompt_embeds).abs().amax(dim=-1)[0]
    # Byte-level tiny tokenizer: BOS, then "a", " "... "red" is tokens 2-4 (1-based after BOS).
    assert changed.max() > 0.01
    assert torch.count_nonzero(changed) == 3, changed  # "r", "e", "d" and nothing else
    assert torch.equal(weighted.negative_prompt_embeds, plain.negative_prompt_embeds)
    # Down-weighting moves the other way from the plain embedding.
    down = encode_prompts(pipe, "a (red:0.5) sneaker", "blurry")
    assert not torch.equal(down.prompt_embeds, plain.prompt_embeds)
    if arch == "sdxl":
        # SDXL's pooled embedding is of the plain text (CLIP pools one window, unweighted).
        assert plain.pooled_prompt_embeds is not None
        assert weighted.pooled_prompt_embeds is not None
        assert torch.equal(weighted.pooled_prompt_embeds, plain.pooled_prompt_embeds)
    else:
        assert weighted.pooled_prompt_embeds is None


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_unweighted_compel_embeddings_equal_the_pipelines_own(
    arch: str, sd_pipe: Any, sdxl_pipe: Any
) -> None:
    # The compel path encodes exactly as diffusers does: weights are the only difference.
    pipe = sd_pipe if arch == "sd" else sdxl_pipe
    ours = encode_prompts(pipe, "a red sneaker", "blurry")
    with torch.no_grad():
        theirs = pipe.encode_prompt(
            "a red sneaker",
            device=CPU,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt="blurry",
        )
    assert torch.allclose(ours.prompt_embeds, theirs[0], atol=1e-6)
    assert torch.allclose(ours.negative_prompt_embeds, theirs[1], atol=1e-6)
    if arch == "sdxl":
        assert torch.allclose(ours.pooled_prompt_embeds, theirs[2], atol=1e-6)
        assert torch.allclose(ours.negative_pooled_prompt_embeds, theirs[3], atol=1e-6)


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_a_long_prompt_is_not_cut_at_77_tokens(arch: str, sd_pipe: Any, sdxl_pipe: Any) -> None:
    pipe = sd_pipe if arch == "sd" else sdxl_pipe
    tokens = len(pipe.tokenizer(LONG + "x")["input_ids"])
    assert tokens > 2 * 77
    first = encode_prompts(pipe, LONG + "x", "blurry")
    second = encode_prompts(pipe, LONG + "y", "blurry")
    # 77-token chunks (each with its BOS and EOS, split at phrase ends); the negative prompt
    # is padded to the same length (classifier-free guidance needs equal shapes).
    length = first.prompt_embeds.shape[1]
    assert length % 77 == 0 and length >= 3 * 77
    assert first.negative_prompt_embeds.shape == first.prompt_embeds.shape
    # The last character decides between the two: the part past token 77 reaches the model.
    assert not torch.equal(first.prompt_embeds, second.prompt_embeds)
    # ... while diffusers alone would have cut it off.
    with torch.no_grad():
        cut_first, cut_second = (
            pipe.encode_prompt(
                prompt=LONG + end,
                device=CPU,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )[0]
            for end in "xy"
        )
    assert torch.equal(cut_first, cut_second)
    # And the pixels follow.
    params = dataclasses.replace(PARAMS, prompt=LONG + "x", steps=3)
    assert not np.array_equal(
        _pixels(pipe, params), _pixels(pipe, dataclasses.replace(params, prompt=LONG + "y"))
    )


def test_a_long_negative_prompt_pads_the_positive_one(sd_pipe: Any) -> None:
    embeds = encode_prompts(sd_pipe, "a red sneaker", LONG)
    assert embeds.prompt_embeds.shape == embeds.negative_prompt_embeds.shape
    assert embeds.prompt_embeds.shape[1] >= 3 * 77
    # The padding is the empty prompt's embedding, chunk after chunk.
    short = encode_prompts(sd_pipe, "a red sneaker", "blurry")
    assert torch.equal(embeds.prompt_embeds[:, :77], short.prompt_embeds)


def test_sdxl_zeroes_an_empty_negative_prompt_like_diffusers(sdxl_pipe: Any) -> None:
    assert sdxl_pipe.config.force_zeros_for_empty_prompt
    embeds = encode_prompts(sdxl_pipe, "a (red:1.3) sneaker", "")
    assert not embeds.negative_prompt_embeds.any()
    assert embeds.negative_pooled_prompt_embeds is not None
    assert not embeds.negative_pooled_prompt_embeds.any()


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_a_weighted_prompt_renders_other_pixels_and_batches_by_seed(
    arch: str, sd_pipe: Any, sdxl_pipe: Any
) -> None:
    pipe = sd_pipe if arch == "sd" else sdxl_pipe
    weighted = dataclasses.replace(PARAMS, prompt="a ((red)) sneaker, (studio light:1.4)")
    assert not np.array_equal(_pixels(pipe, weighted), _pixels(pipe, PARAMS))
    # The embeddings are repeated per seed: every seed renders, and seeds differ.
    images = render_batch(pipe, weighted, [1, 2])
    assert [image.image.size for image in images] == [(64, 64), (64, 64)]
    assert not np.array_equal(np.asarray(images[0].image), np.asarray(images[1].image))

"""LoRA and Textual Inversion adapters: loaded for one render, gone after it."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from db.job_options import EmbeddingRef, LoraRef
from worker.adapters import (
    AdapterError,
    applied_adapters,
    check_adapter_files,
    file_sha256,
)
from worker.loading import load_pipeline
from worker.pipeline import RenderParams, render_batch
from worker.tiny_adapters import TINY_EMBEDDING_TOKEN

CPU = torch.device("cpu")
TOKEN = TINY_EMBEDDING_TOKEN
PARAMS = RenderParams(
    prompt="a red sneaker, studio light",
    negative_prompt="blurry",
    steps=2,
    guidance=7.0,
    width=64,
    height=64,
)
WITH_TOKEN = dataclasses.replace(PARAMS, prompt=f"a red sneaker in {TOKEN} style")


@pytest.fixture(scope="module")
def sd_pipe(tiny_model_dir: pathlib.Path) -> Any:
    return load_pipeline(str(tiny_model_dir), device=CPU)


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_model_dir: pathlib.Path) -> Any:
    return load_pipeline(str(tiny_sdxl_model_dir), device=CPU)


@pytest.fixture
def arch_pipe(request: pytest.FixtureRequest) -> tuple[str, Any]:
    arch: str = request.param
    return arch, request.getfixturevalue(f"{arch}_pipe")


def lora(path: pathlib.Path, scale: float = 1.0) -> LoraRef:
    return LoraRef(path=str(path), scale=scale, sha256=file_sha256(path))


def embedding(path: pathlib.Path, token: str = TOKEN) -> EmbeddingRef:
    return EmbeddingRef(path=str(path), token=token, sha256=file_sha256(path))


def pixels(pipe: Any, params: RenderParams, seed: int = 4) -> np.ndarray:
    return np.asarray(render_batch(pipe, params, [seed])[0].image, dtype=np.int16)


def state(pipe: Any) -> tuple[Any, ...]:
    """What adapters touch: module structure, tokenizers, token embeddings and which weights
    are frozen (peft freezes what it wraps; frozen weights take other CPU kernels)."""
    encoders = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return (
        [name for name, _ in pipe.unet.named_modules()],
        [dict(tokenizer.get_vocab()) for tokenizer, _ in encoders],
        [encoder.get_input_embeddings().weight.detach().clone() for _, encoder in encoders],
        [
            [(name, p.requires_grad) for name, p in model.named_parameters()]
            for model in [pipe.unet, *(encoder for _, encoder in encoders)]
        ],
    )


def assert_same_state(before: tuple[Any, ...], after: tuple[Any, ...]) -> None:
    assert before[0] == after[0]
    assert before[1] == after[1]
    assert before[3] == after[3]
    for old, new in zip(before[2], after[2], strict=True):
        assert torch.equal(old, new)


def paths(arch: str, request: pytest.FixtureRequest, what: str) -> pathlib.Path:
    prefix = "tiny_sdxl_" if arch == "sdxl" else "tiny_"
    path: pathlib.Path = request.getfixturevalue(f"{prefix}{what}_path")
    return path


# --- LoRA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch_pipe", ["sd", "sdxl"], indirect=True)
def test_a_lora_changes_the_image_and_leaves_nothing_behind(
    arch_pipe: tuple[str, Any], request: pytest.FixtureRequest
) -> None:
    arch, pipe = arch_pipe
    path = paths(arch, request, "lora")
    before = state(pipe)
    never = pixels(pipe, PARAMS)

    with_lora = pixels(pipe, dataclasses.replace(PARAMS, loras=(lora(path),)))
    assert np.abs(with_lora - never).max() > 2, "the tiny LoRA must visibly change the image"
    # The scale is applied: half the LoRA is another image.
    half = pixels(pipe, dataclasses.replace(PARAMS, loras=(lora(path, 0.5),)))
    assert not np.array_equal(half, with_lora) and not np.array_equal(half, never)
    # Scale 0: the LoRA's layers are there but contribute nothing (up to a rounding step:
    # adding zeros changes the memory layout that some kernels see).
    zero = pixels(pipe, dataclasses.replace(PARAMS, loras=(lora(path, 0.0),)))
    assert np.abs(zero - never).max() <= 1

    # The next job without it renders exactly as one that never had it.
    assert np.array_equal(pixels(pipe, PARAMS), never)
    assert_same_state(before, state(pipe))
    assert not getattr(pipe.unet, "peft_config", None)


def test_two_loras_at_once(
    sd_pipe: Any, tiny_lora_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    never = pixels(sd_pipe, PARAMS)
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(tiny_lora_path, copy)
    one = pixels(sd_pipe, dataclasses.replace(PARAMS, loras=(lora(tiny_lora_path, 0.5),)))
    two = pixels(
        sd_pipe,
        dataclasses.replace(PARAMS, loras=(lora(tiny_lora_path, 0.5), lora(copy, 0.5))),
    )
    # Two halves of the same LoRA differ from one half: both are applied.
    assert not np.array_equal(one, two)
    assert np.array_equal(pixels(sd_pipe, PARAMS), never)


# --- Textual Inversion ------------------------------------------------------------------------


@pytest.mark.parametrize("arch_pipe", ["sd", "sdxl"], indirect=True)
def test_an_embedding_changes_the_image_and_leaves_nothing_behind(
    arch_pipe: tuple[str, Any], request: pytest.FixtureRequest
) -> None:
    arch, pipe = arch_pipe
    path = paths(arch, request, "embedding")
    before = state(pipe)
    # Without the embedding the token is just characters.
    never = pixels(pipe, WITH_TOKEN)

    with_embedding = pixels(pipe, dataclasses.replace(WITH_TOKEN, embeddings=(embedding(path),)))
    assert np.abs(with_embedding - never).max() > 2
    # In a weighted prompt too (the compel path expands the token the same way).
    weighted = dataclasses.replace(
        WITH_TOKEN, prompt=f"a red sneaker in ({TOKEN}:1.3) style", embeddings=(embedding(path),)
    )
    assert not np.array_equal(pixels(pipe, weighted), with_embedding)

    # Gone after: the same prompt renders as if it had never been loaded.
    assert np.array_equal(pixels(pipe, WITH_TOKEN), never)
    assert_same_state(before, state(pipe))
    assert TOKEN not in pipe.tokenizer.get_vocab()


def test_a_multi_vector_embedding(
    sd_pipe: Any, tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from worker.tiny_adapters import build_tiny_embedding

    path = build_tiny_embedding(tiny_model_dir, tmp_path / "three.safetensors", vectors=3)
    before = state(sd_pipe)
    never = pixels(sd_pipe, WITH_TOKEN)
    three = pixels(sd_pipe, dataclasses.replace(WITH_TOKEN, embeddings=(embedding(path),)))
    assert not np.array_equal(three, never)
    assert_same_state(before, state(sd_pipe))  # token, token_1 and token_2 all removed


def test_lora_and_embedding_together(
    sd_pipe: Any, tiny_lora_path: pathlib.Path, tiny_embedding_path: pathlib.Path
) -> None:
    before = state(sd_pipe)
    never = pixels(sd_pipe, WITH_TOKEN)
    both = dataclasses.replace(
        WITH_TOKEN, loras=(lora(tiny_lora_path),), embeddings=(embedding(tiny_embedding_path),)
    )
    only_lora = dataclasses.replace(WITH_TOKEN, loras=(lora(tiny_lora_path),))
    assert not np.array_equal(pixels(sd_pipe, both), pixels(sd_pipe, only_lora))
    assert np.array_equal(pixels(sd_pipe, WITH_TOKEN), never)
    assert_same_state(before, state(sd_pipe))


def test_adapters_are_removed_when_the_render_fails(
    sd_pipe: Any, tiny_lora_path: pathlib.Path, tiny_embedding_path: pathlib.Path
) -> None:
    before = state(sd_pipe)
    with (
        pytest.raises(RuntimeError, match="out of memory, say"),
        applied_adapters(sd_pipe, [lora(tiny_lora_path)], [embedding(tiny_embedding_path)]),
    ):
        assert TOKEN in sd_pipe.tokenizer.get_vocab()
        raise RuntimeError("out of memory, say")
    assert_same_state(before, state(sd_pipe))


# --- bad files --------------------------------------------------------------------------------


def test_a_missing_file_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "gone.safetensors"
    with pytest.raises(AdapterError, match=rf"loras\[0\]: file not found: {missing}"):
        check_adapter_files([LoraRef(path=str(missing), sha256="0" * 64)], [])
    with pytest.raises(AdapterError, match=rf"embeddings\[0\]: file not found: {missing}"):
        check_adapter_files([], [EmbeddingRef(path=str(missing), token="<x>", sha256="0" * 64)])


def test_a_changed_file_is_refused(tiny_lora_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    copy = tmp_path / "lora.safetensors"
    shutil.copyfile(tiny_lora_path, copy)
    expected = file_sha256(copy)
    with copy.open("ab") as file:
        file.write(b"\0")
    message = rf"loras\[0\]: {copy}: the file's sha256 is [0-9a-f]{{64}}, the job expects "
    with pytest.raises(AdapterError, match=message + expected):
        check_adapter_files([LoraRef(path=str(copy), sha256=expected)], [])


def test_pickles_are_refused(tmp_path: pathlib.Path) -> None:
    pickle = tmp_path / "style.pt"
    pickle.write_bytes(b"not loaded")
    with pytest.raises(AdapterError, match=r"embeddings\[0\]: .*style\.pt: only \.safetensors"):
        check_adapter_files([], [embedding(pickle)])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage" * 10, "Unable to load weights"),
        ({"foo.weight": torch.zeros(3)}, "Invalid LoRA checkpoint"),
    ],
)
def test_a_file_that_is_no_lora_fails_cleanly(
    sd_pipe: Any, tmp_path: pathlib.Path, content: bytes | dict[str, torch.Tensor], message: str
) -> None:
    path = tmp_path / "bad.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        save_file(content, str(path))
    before = state(sd_pipe)
    never = pixels(sd_pipe, PARAMS)
    with pytest.raises(
        AdapterError, match=rf"loras\[0\]: {path}: cannot be loaded as a LoRA.*{message}"
    ):
        render_batch(sd_pipe, dataclasses.replace(PARAMS, loras=(lora(path),)), [4])
    assert_same_state(before, state(sd_pipe))
    assert np.array_equal(pixels(sd_pipe, PARAMS), never)


def test_a_lora_for_another_model_fails_cleanly(
    sd_pipe: Any, tiny_sdxl_lora_path: pathlib.Path
) -> None:
    before = state(sd_pipe)
    with pytest.raises(
        AdapterError, match=r"loras\[0\]: .* cannot be loaded as a LoRA for this model"
    ):
        render_batch(sd_pipe, dataclasses.replace(PARAMS, loras=(lora(tiny_sdxl_lora_path),)), [4])
    assert_same_state(before, state(sd_pipe))
    assert not getattr(sd_pipe.unet, "peft_config", None)


def test_embedding_errors(
    sd_pipe: Any,
    sdxl_pipe: Any,
    tiny_embedding_path: pathlib.Path,
    tiny_sdxl_embedding_path: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    before = state(sd_pipe)
    cases = [
        # A token the tokenizer already has.
        (sd_pipe, [embedding(tiny_embedding_path, token="a")], "of 'a' .*already in tokenizer"),
        # An SD embedding for an SDXL model (one tensor; SDXL needs one per text encoder).
        (sdxl_pipe, [embedding(tiny_embedding_path)], "needs the tensors clip_l and clip_g"),
        # An SDXL embedding for an SD model.
        (sd_pipe, [embedding(tiny_sdxl_embedding_path)], "the file has clip_g, clip_l"),
    ]
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.ones(1, 7)}, str(wide))
    # The wrong width for the text encoder.
    cases.append((sd_pipe, [embedding(wide)], r"embeddings\[0\]: .*incorrect shape"))
    # The second embedding fails: the first one is unloaded too.
    pair = [embedding(tiny_embedding_path), embedding(wide, token="<w>")]
    cases.append((sd_pipe, pair, r"embeddings\[1\]: .*incorrect shape"))
    for pipe, embeddings, message in cases:
        with pytest.raises(AdapterError, match=message), applied_adapters(pipe, (), embeddings):
            pytest.fail("loaded")  # pragma: no cover
    assert_same_state(before, state(sd_pipe))

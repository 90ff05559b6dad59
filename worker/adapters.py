"""LoRA and Textual Inversion adapters, loaded onto a cached pipeline for one job only.

A worker keeps its base pipelines warm across jobs, so a job's adapters are added for its
render and removed right after, on success or error (:func:`applied_adapters`): the next job
renders exactly as if they had never been there. LoRA layers are injected (not fused) and
removed with ``unload_lora_weights``; embeddings add tokens to the tokenizer and rows to the
text encoder, and ``unload_textual_inversion`` takes both out again. After unloading, the
pipeline is checked to be back in its original shape; if not, :class:`AdapterLeakError` says
the pipeline must be dropped from the cache.

Only ``.safetensors`` files are loaded (``.pt``/``.ckpt``/``.bin`` files are pickles, which can
run code), and each file must still have the sha256 recorded when its run was produced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from db.job_options import EmbeddingRef, LoraRef
from pixelmill import hashing
from pixelmill.errors import BadInputError, PixelmillError

SAFETENSORS_SUFFIX = ".safetensors"
# SDXL embeddings hold one tensor per text encoder under these keys (the kohya/A1111 layout).
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")


def _short(exc: BaseException, limit: int = 300) -> str:
    """The exception in one line of at most ``limit`` characters (a size mismatch lists
    every layer)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AdapterError(BadInputError):
    """An adapter file that cannot be used for this job. The message names the option
    (``loras[0]``, ``embeddings[1]``) and the file."""


class AdapterLeakError(PixelmillError, RuntimeError):
    """Unloading did not restore the pipeline: it must not render another job."""


# --- files ----------------------------------------------------------------------------------

_HASHES: dict[tuple[str, int, int], str] = {}
_HASHES_LOCK = threading.Lock()


def file_sha256(path: pathlib.Path) -> str:
    """sha256 of the file, remembered per (path, size, mtime) so a LoRA used by every job of a
    run is read once, not once per job."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _HASHES_LOCK:
        cached = _HASHES.get(key)
    if cached is not None:
        return cached
    value = hashing.file_sha256(path)
    with _HASHES_LOCK:
        _HASHES[key] = value
    return value


def _checked_file(what: str, path: str, sha256: str) -> pathlib.Path:
    file = pathlib.Path(path)
    if not file.is_file():
        raise AdapterError(f"{what}: file not found: {path}")
    if file.suffix != SAFETENSORS_SUFFIX:
        raise AdapterError(
            f"{what}: {path}: only {SAFETENSORS_SUFFIX} files are loaded (pickled .pt, .ckpt "
            "and .bin files can run code; convert them to safetensors)"
        )
    actual = file_sha256(file)
    if actual != sha256.lower():
        raise AdapterError(
            f"{what}: {path}: the file's sha256 is {actual}, the job expects {sha256} (the "
            "file changed after the run was produced; produce the run again)"
        )
    return file


def check_adapter_files(loras: Sequence[LoraRef], embeddings: Sequence[EmbeddingRef]) -> None:
    """Raise :class:`AdapterError` unless every file exists, is safetensors and has the
    sha256 the job records. Cheap after the first call per file (hashes are remembered)."""
    for index, lora in enumerate(loras):
        _checked_file(f"loras[{index}]", lora.path, lora.sha256)
    for index, embedding in enumerate(embeddings):
        _checked_file(f"embeddings[{index}]", embedding.path, embedding.sha256)


# --- loading and unloading ------------------------------------------------------------------


def _text_encoders(pipe: Any) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) pairs: one for SD 1.x/2.x, two for SDXL."""
    pairs = [
        (getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
        (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)),
    ]
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]


def _lora_models(pipe: Any) -> list[torch.nn.Module]:
    names = ("unet", "transformer", "text_encoder", "text_encoder_2")
    return [model for name in names if (model := getattr(pipe, name, None)) is not None]


@dataclasses.dataclass
class _Snapshot:
    """What loading adapters changes, taken before: compared after unloading."""

    vocabulary: list[int]  # len() of each tokenizer
    embedding_rows: list[int]  # rows of each text encoder's token embedding

    @classmethod
    def of(cls, pipe: Any) -> _Snapshot:
        pairs = _text_encoders(pipe)
        return cls(
            vocabulary=[len(tokenizer) for tokenizer, _ in pairs],
            embedding_rows=[encoder.get_input_embeddings().num_embeddings for _, encoder in pairs],
        )


@dataclasses.dataclass
class _Loaded:
    loras: bool = False
    # (tokens, tokenizer, text encoder) per embedding and encoder, in loading order.
    embeddings: list[tuple[list[str], Any, Any]] = dataclasses.field(default_factory=list)


def _load_loras(pipe: Any, loras: Sequence[LoraRef], loaded: _Loaded) -> None:
    if not loras:
        return
    if not hasattr(pipe, "load_lora_weights"):
        raise AdapterError(f"loras: {type(pipe).__name__} cannot load LoRA weights")
    names = []
    for index, lora in enumerate(loras):
        path = pathlib.Path(lora.path)
        name = f"pixelmill_lora_{index}"
        # Set first: a load that fails half-way may already have injected layers.
        loaded.loras = True
        try:
            with warnings.catch_warnings():
                # peft's notice that a second adapter joins the first: that is the intent.
                warnings.filterwarnings(
                    "ignore",
                    message="Already found a `peft_config` attribute",
                    category=UserWarning,
                )
                pipe.load_lora_weights(
                    str(path.parent),
                    weight_name=path.name,
                    adapter_name=name,
                    local_files_only=True,
                )
        except torch.OutOfMemoryError:
            raise  # the device, not the file: worth another attempt
        except Exception as exc:
            raise AdapterError(
                f"loras[{index}]: {lora.path}: cannot be loaded as a LoRA for this model "
                f"({_short(exc)})"
            ) from exc
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])


def _embedding_tensors(pipe: Any, index: int, embedding: EmbeddingRef) -> list[torch.Tensor]:
    """One tensor per text encoder of ``pipe``, read from the safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    what = f"embeddings[{index}]: {embedding.path}"
    try:
        state = load_file(embedding.path, device="cpu")
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{what}: not a readable safetensors file ({exc})") from exc
    encoders = len(_text_encoders(pipe))
    if encoders == 2:
        missing = [key for key in SDXL_EMBEDDING_KEYS if key not in state]
        if missing:
            raise AdapterError(
                f"{what}: an SDXL embedding needs the tensors {' and '.join(SDXL_EMBEDDING_KEYS)}"
                f" (one per text encoder); the file has {', '.join(sorted(state)) or 'none'}"
            )
        return [state[key] for key in SDXL_EMBEDDING_KEYS]
    if len(state) != 1:
        raise AdapterError(
            f"{what}: expected one embedding tensor (e.g. 'emb_params'), the file has "
            f"{', '.join(sorted(state)) or 'none'}"
        )
    return list(state.values())


def _vector_tokens(token: str, tensor: torch.Tensor) -> list[str]:
    """The tokens diffusers adds for an embedding: ``token``, then ``token_1``... for each
    further vector of a multi-vector embedding."""
    vectors = tensor.shape[0] if tensor.dim() > 1 else 1
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def _load_embeddings(pipe: Any, embeddings: Sequence[EmbeddingRef], loaded: _Loaded) -> None:
    if embeddings and not hasattr(pipe, "load_textual_inversion"):
        raise AdapterError(f"embeddings: {type(pipe).__name__} cannot load embeddings")
    for index, embedding in enumerate(embeddings):
        tensors = _embedding_tensors(pipe, index, embedding)
        for (tokenizer, encoder), tensor in zip(_text_encoders(pipe), tensors, strict=True):
            try:
                pipe.load_textual_inversion(
                    tensor, token=embedding.token, tokenizer=tokenizer, text_encoder=encoder
                )
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                raise AdapterError(
                    f"embeddings[{index}]: {embedding.path}: cannot be loaded as the embedding "
                    f"of {embedding.token!r} ({_short(exc)})"
                ) from exc
            loaded.embeddings.append((_vector_tokens(embedding.token, tensor), tokenizer, encoder))


def _has_lora_layers(pipe: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(
        isinstance(module, BaseTunerLayer)
        for model in _lora_models(pipe)
        for module in model.modules()
    )


def _requires_grad(pipe: Any) -> list[dict[str, bool]]:
    return [
        {name: parameter.requires_grad for name, parameter in model.named_parameters()}
        for model in _lora_models(pipe)
    ]


def _restore_requires_grad(pipe: Any, flags: list[dict[str, bool]]) -> None:
    """peft freezes the base weights it wraps and unloading leaves them frozen. Frozen or not
    makes no difference to what is computed, but it does to which CPU kernels compute it (a
    rounding step apart), so they are put back as they were: a job after the adapters then
    renders bit-identically to one before them."""
    for model, model_flags in zip(_lora_models(pipe), flags, strict=True):
        for name, parameter in model.named_parameters():
            if name in model_flags and parameter.requires_grad != model_flags[name]:
                parameter.requires_grad_(model_flags[name])


def _unload(pipe: Any, loaded: _Loaded, before: _Snapshot, flags: list[dict[str, bool]]) -> None:
    for tokens, tokenizer, encoder in reversed(loaded.embeddings):
        pipe.unload_textual_inversion(tokens, tokenizer=tokenizer, text_encoder=encoder)
    if loaded.loras:
        pipe.unload_lora_weights()
    _restore_requires_grad(pipe, flags)
    after = _Snapshot.of(pipe)
    if after != before or (loaded.loras and _has_lora_layers(pipe)):
        raise AdapterLeakError(
            f"the pipeline still holds a job's adapters after unloading (tokenizer sizes "
            f"{before.vocabulary} -> {after.vocabulary}, embedding rows {before.embedding_rows}"
            f" -> {after.embedding_rows}); it must be reloaded"
        )


@contextlib.contextmanager
def applied_adapters(
    pipe: Any, loras: Sequence[LoraRef] = (), embeddings: Sequence[EmbeddingRef] = ()
) -> Iterator[None]:
    """Load the job's LoRAs (with their scales) and embeddings onto ``pipe`` for the body of
    the ``with``, and always remove them after. Pipelines made from ``pipe`` with
    ``from_pipe`` share its models and so see the adapters too.

    Raises :class:`AdapterError` for a file that is missing, not safetensors, changed since
    the run was produced (sha256) or not loadable onto this model.
    """
    if not loras and not embeddings:
        yield
        return
    check_adapter_files(loras, embeddings)
    before = _Snapshot.of(pipe)
    flags = _requires_grad(pipe)
    loaded = _Loaded()
    try:
        _load_loras(pipe, loras, loaded)
        _load_embeddings(pipe, embeddings, loaded)
        yield
    finally:
        _unload(pipe, loaded, before, flags)

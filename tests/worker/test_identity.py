"""The model's identity (sha256 of its weights), cached across processes."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import pytest

from worker import identity
from worker.identity import library_versions, model_sha256, short_hash


def _folder(root: pathlib.Path) -> pathlib.Path:
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet weights")
    (root / "vae").mkdir()
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"vae weights")
    (root / "model_index.json").write_text("{}")  # not a weight file
    return root


def test_single_file_hash_is_the_files_sha256(tmp_path: pathlib.Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(b"weights" * 1000).hexdigest()
    assert model_sha256(str(checkpoint)) == expected
    assert short_hash(expected) == expected[:10]  # A1111's "Model hash"
    assert short_hash(None) is None


def test_folder_hash_covers_weights_and_their_paths_only(tmp_path: pathlib.Path) -> None:
    model = _folder(tmp_path / "model")
    first = model_sha256(str(model))
    assert first is not None and len(first) == 64
    (model / "model_index.json").write_text('{"reformatted": true}')
    assert model_sha256(str(model)) == first  # configs do not count
    (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"other weights")
    assert model_sha256(str(model)) != first
    # A weight file moved to another component is another model.
    other = _folder(tmp_path / "other")
    (other / "vae" / "diffusion_pytorch_model.safetensors").rename(other / "vae" / "x.safetensors")
    assert model_sha256(str(other)) != model_sha256(str(_folder(tmp_path / "third")))


def test_hub_ids_and_empty_folders_have_no_local_identity(tmp_path: pathlib.Path) -> None:
    assert model_sha256("org/model-that-is-not-here") is None
    assert model_sha256(str(tmp_path)) is None


def test_hash_is_computed_once_and_cached_in_a_file(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _folder(tmp_path / "model")
    cache_file = tmp_path / "cache" / "model-hashes.json"
    first = model_sha256(str(model), cache_file=cache_file)
    assert json.loads(cache_file.read_text())[str(model.resolve())]["sha256"] == first

    # A second process reads the cache instead of hashing again.
    def no_hashing(*args: object) -> str:
        raise AssertionError("hashed again")

    monkeypatch.setattr(identity, "_digest", no_hashing)
    assert model_sha256(str(model), cache_file=cache_file) == first

    # Rewriting a weight file (new size or mtime) invalidates the cached entry.
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"retrained unet weights")
    os.utime(weights, ns=(1, 1))
    with pytest.raises(AssertionError, match="hashed again"):
        model_sha256(str(model), cache_file=cache_file)


def test_library_versions_name_what_renders() -> None:
    versions = library_versions()
    assert {"pixelmill", "torch", "diffusers", "transformers"} <= set(versions)
    import torch

    assert versions["torch"].startswith(torch.__version__.split("+")[0])

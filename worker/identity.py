"""What rendered an image: the model's weights (sha256) and the library versions.

A model name ("tiny", a folder, a hub id) says nothing about the bytes behind it: a folder can
be replaced overnight. Each image records the sha256 of the model's weight files instead, so a
keeper can be reproduced, and A1111-style tools show the usual short "Model hash".

Hashing a 2-7 GB model takes seconds to a minute, so the digest is computed once per model and
cached in a small JSON file keyed by the files' sizes and modification times: a worker that
restarts, or a second worker on the host, reads it back instead of hashing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from functools import cache
from importlib import metadata
from pathlib import Path

from pixelmill.hashing import update_with_file

log = logging.getLogger(__name__)

# Files that hold weights. Configs and tokenizers are left out: tools rewrite them freely
# (save_pretrained reformats JSON), and what they decide that matters (the scheduler, size,
# steps) is recorded on the job itself.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")

_lock = threading.Lock()


def weight_files(path: Path) -> list[Path]:
    """The weight files of a model: the file itself, or every weight file under a folder."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _fingerprint(path: Path, files: list[Path]) -> str:
    """Changes whenever a weight file is added, removed, resized or rewritten."""
    parts = []
    for file in files:
        stat = file.stat()
        name = file.relative_to(path).as_posix() if path.is_dir() else file.name
        parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _digest(path: Path, files: list[Path]) -> str:
    """sha256 of a single file's bytes (what civitai and A1111 call the model's hash); for a
    folder, the sha256 over each weight file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        update_with_file(digest, file)
    return digest.hexdigest()


def _read_cache(cache_file: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache_file: Path, data: dict[str, dict[str, str]]) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: a reader never sees half a file, whichever worker writes last wins.
    fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".model-hashes-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
    os.replace(tmp, cache_file)


def model_sha256(model: str, *, cache_file: Path | None = None) -> str | None:
    """The sha256 identity of a local model (folder or single file); None for a model that is
    not on disk here (a hub id resolved by diffusers' own cache) or that has no weight files.
    """
    path = Path(model).expanduser()
    if not path.exists():
        return None
    path = path.resolve()
    files = weight_files(path)
    if not files:
        return None
    fingerprint = _fingerprint(path, files)
    with _lock:
        cached = _read_cache(cache_file) if cache_file is not None else {}
        entry = cached.get(str(path))
        if entry is not None and entry.get("fingerprint") == fingerprint:
            return entry["sha256"]
        log.info("hashing model %s (%d weight files)", path, len(files))
        sha256 = _digest(path, files)
        if cache_file is not None:
            cached = _read_cache(cache_file)  # re-read: another process may have written
            cached[str(path)] = {"fingerprint": fingerprint, "sha256": sha256}
            _write_cache(cache_file, cached)
    return sha256


def short_hash(sha256: str | None) -> str | None:
    """The 10-character "Model hash" A1111 writes (its AutoV2 hash: the sha256's prefix)."""
    return None if sha256 is None else sha256[:10]


@cache
def library_versions() -> dict[str, str]:
    """The versions of what renders: recorded on every image row and in its PNG."""
    versions = {}
    for name in ("pixelmill", "torch", "diffusers", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    import torch

    if torch.version.cuda is not None:
        versions["cuda"] = str(torch.version.cuda)
    return versions

"""Keeping torch.compile's work on disk, so a restarted worker does not compile again.

Two layers, both under one settings folder (``Settings.resolved_compile_cache_dir``):

- ``inductor/``: TorchInductor's own caches (the FX graph cache, the AOTAutograd cache and
  the compiled kernels; ``TORCHINDUCTOR_CACHE_DIR``), with Triton's kernels in ``triton/``
  (``TRITON_CACHE_DIR``). A restarted process still traces the model with Dynamo (seconds),
  but finds every graph compiled already and skips Inductor's code generation and the C++ /
  Triton compilers (minutes on a large model).
- ``artifacts.bin``: torch's "mega-cache" (``torch.compiler.save_cache_artifacts``), the same
  entries in one portable file, loaded into the local caches at start
  (``load_cache_artifacts``). A fleet can bake it into the image or share it, and a new
  host's first compile is then warm too.

benchmarks/fast_path.py measures the first compiled render cold and warm.
"""

from __future__ import annotations

import logging
import os
import pathlib
import threading

log = logging.getLogger(__name__)

ARTIFACTS_FILE = "artifacts.bin"

_LOCK = threading.Lock()
# Folders whose artifacts this process loaded already (loading twice is harmless but slow).
_LOADED: set[pathlib.Path] = set()


def use_compile_cache(folder: pathlib.Path) -> pathlib.Path:
    """Point TorchInductor's and Triton's caches into ``folder`` and load its mega-cache file
    (once per process). Call before the first compile: the caches are looked up then."""
    folder = pathlib.Path(folder).resolve()
    with _LOCK:
        inductor = folder / "inductor"
        inductor.mkdir(parents=True, exist_ok=True)
        (folder / "triton").mkdir(exist_ok=True)
        # Read by Inductor at every lookup: setting them now takes effect for the next compile.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
        os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
        if folder not in _LOADED:
            _LOADED.add(folder)
            _load_artifacts(folder / ARTIFACTS_FILE)
    return folder


def _load_artifacts(path: pathlib.Path) -> None:
    import torch

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    try:
        torch.compiler.load_cache_artifacts(data)
    except Exception as exc:  # a file from another torch version: compile afresh
        log.warning("compile cache %s not loaded (%s): compiling afresh", path, exc)


def save_compile_cache(folder: pathlib.Path) -> int:
    """Write what this process compiled (and loaded) into ``folder``'s mega-cache file, as a
    whole (written aside, then renamed: a reader never sees half a file). Returns its size in
    bytes (0: nothing compiled yet)."""
    import torch

    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return 0
    data, _info = artifacts
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / ARTIFACTS_FILE
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    partial.replace(target)
    return len(data)

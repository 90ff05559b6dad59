"""sha256 of files, read in blocks (model weights and adapters are gigabytes)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

BLOCK = 1 << 20


def update_with_file(digest: Any, path: Path) -> None:
    """Feed the bytes of ``path`` to ``digest`` (a hashlib object)."""
    with open(path, "rb") as file:
        while block := file.read(BLOCK):
            digest.update(block)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    update_with_file(digest, path)
    return digest.hexdigest()

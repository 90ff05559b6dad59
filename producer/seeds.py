"""Deterministic per-item seeds, so a re-run of the same catalogue reproduces its images."""

from __future__ import annotations

import hashlib

SEED_MAX = 2**32  # A1111 and most tools use 32-bit seeds

# Bumping this changes every seed; only do it deliberately.
_DOMAIN = b"pixelmill-seed-v1"


def _part(data: bytes) -> bytes:
    # Length-prefixing each part makes the encoding unambiguous: ("ab", "c") and ("a", "bc")
    # hash differently, whatever characters the keys contain.
    return len(data).to_bytes(8, "big") + data


def derive_seed(item_key: str, template: str, index: int, *, variant: str = "") -> int:
    """Seed for sweep position ``index`` of (item, template, variant), in [0, SEED_MAX).

    Uses sha256, not hash(), so the value does not depend on PYTHONHASHSEED or the host.
    """
    if index < 0:
        raise ValueError(f"seed index must be >= 0, got {index}")
    digest = hashlib.sha256()
    for part in (_DOMAIN, item_key.encode(), template.encode(), variant.encode()):
        digest.update(_part(part))
    digest.update(_part(str(index).encode()))
    return int.from_bytes(digest.digest()[:8], "big") % SEED_MAX


def seed_sweep(item_key: str, template: str, count: int, *, variant: str = "") -> list[int]:
    """The first ``count`` seeds for (item, template, variant)."""
    if count < 1:
        raise ValueError(f"seed count must be >= 1, got {count}")
    return [derive_seed(item_key, template, i, variant=variant) for i in range(count)]

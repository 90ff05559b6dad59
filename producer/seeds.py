"""Deterministic per-item seeds, so a re-run of the same catalogue reproduces its images."""

from __future__ import annotations

import hashlib

SEED_MAX = 2**32  # A1111 and most tools use 32-bit seeds

# Bumping this changes every seed; only do it deliberately.
_DOMAIN = b"pixelmill-seed-v2"


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
    return _seed(_prefix(item_key, template, variant), index)


def _prefix(item_key: str, template: str, variant: str) -> hashlib._Hash:
    digest = hashlib.sha256()
    for part in (_DOMAIN, item_key.encode(), template.encode(), variant.encode()):
        digest.update(_part(part))
    return digest


# One sha256 block gives four 64-bit words: seeds 4b..4b+3 come from block b, so a sweep of
# four costs one hash, and seed i does not depend on the sweep's length.
_SEEDS_PER_BLOCK = 4


def _block(prefix: hashlib._Hash, block: int) -> bytes:
    digest = prefix.copy()
    digest.update(_part(str(block).encode()))
    return digest.digest()


def _seed(prefix: hashlib._Hash, index: int) -> int:
    block, slot = divmod(index, _SEEDS_PER_BLOCK)
    return int.from_bytes(_block(prefix, block)[8 * slot : 8 * slot + 8], "big") % SEED_MAX


def seed_sweep(item_key: str, template: str, count: int, *, variant: str = "") -> list[int]:
    """The first ``count`` seeds for (item, template, variant)."""
    if count < 1:
        raise ValueError(f"seed count must be >= 1, got {count}")
    # The shared prefix is hashed once: the producer derives millions of seeds.
    prefix = _prefix(item_key, template, variant)
    seeds: list[int] = []
    for block in range((count + _SEEDS_PER_BLOCK - 1) // _SEEDS_PER_BLOCK):
        data = _block(prefix, block)
        for slot in range(min(_SEEDS_PER_BLOCK, count - block * _SEEDS_PER_BLOCK)):
            seeds.append(int.from_bytes(data[8 * slot : 8 * slot + 8], "big") % SEED_MAX)
    return seeds

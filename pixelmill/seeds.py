"""Deterministic per-item seeds, so a re-run of the same catalogue reproduces its images."""

from __future__ import annotations

import hashlib
import struct

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
    This is the reference definition, written out step by step; :class:`SweepPlan` computes
    the same values faster and the tests hold the two together.
    """
    if index < 0:
        raise ValueError(f"seed index must be >= 0, got {index}")
    digest = hashlib.sha256()
    for part in (_DOMAIN, item_key.encode(), template.encode(), variant.encode()):
        digest.update(_part(part))
    block, slot = divmod(index, _SEEDS_PER_BLOCK)
    digest.update(_part(str(block).encode()))
    word = digest.digest()[8 * slot : 8 * slot + 8]
    return int.from_bytes(word, "big") % SEED_MAX


# One sha256 block gives four 64-bit words: seeds 4b..4b+3 come from block b, so a sweep of
# four costs one hash, and seed i does not depend on the sweep's length.
_SEEDS_PER_BLOCK = 4
# A seed is a 64-bit big-endian word modulo 2**32, i.e. the word's low (second) 32-bit half:
# unpacking the digest as eight 32-bit halves and keeping every second one gives all four.
_HALVES = struct.Struct(">8I")

# sha256 state after the domain part, shared by every item: copying it skips that block.
_DOMAIN_STATE = hashlib.sha256(_part(_DOMAIN))


def item_seed_state(item_key: str) -> hashlib._Hash:
    """The hash state every sweep of ``item_key`` starts from (see :meth:`SweepPlan.seeds`).

    The producer computes it once per catalogue row and reuses it for each of the row's
    templates and variants.
    """
    digest = _DOMAIN_STATE.copy()
    digest.update(_part(item_key.encode()))
    return digest


class SweepPlan:
    """The seeds of one (template, variant) sweep of ``count``, for any item.

    Everything that does not depend on the item (the template and variant parts, the block
    numbers) is encoded once here, so a sweep costs one hash-state copy, one update and one
    digest per block of four seeds. The values are exactly those of :func:`derive_seed`.
    """

    __slots__ = ("_tails", "count")

    def __init__(self, template: str, count: int, *, variant: str = "") -> None:
        if count < 1:
            raise ValueError(f"seed count must be >= 1, got {count}")
        self.count = count
        shared = _part(template.encode()) + _part(variant.encode())
        blocks = (count + _SEEDS_PER_BLOCK - 1) // _SEEDS_PER_BLOCK
        self._tails = tuple(shared + _part(str(block).encode()) for block in range(blocks))

    def seeds(self, item_state: hashlib._Hash) -> list[int]:
        """The sweep of the item whose :func:`item_seed_state` is ``item_state``."""
        seeds: list[int] = []
        for tail in self._tails:
            digest = item_state.copy()
            digest.update(tail)
            seeds.extend(_HALVES.unpack(digest.digest())[1::2])
        if len(seeds) > self.count:
            del seeds[self.count :]
        return seeds


def seed_sweep(item_key: str, template: str, count: int, *, variant: str = "") -> list[int]:
    """The first ``count`` seeds for (item, template, variant)."""
    return SweepPlan(template, count, variant=variant).seeds(item_seed_state(item_key))

"""The bounds of every number a produce is given, from the template file or the command line.

One definition of each serves the template loader, the producer's own arguments and the
command line's options, so ``--seeds 1000000`` is refused as ``seeds: 1000000`` is.
"""

from __future__ import annotations

from dataclasses import dataclass

from pixelmill.errors import BadInputError


@dataclass(frozen=True)
class Bound:
    """An inclusive range of integers."""

    low: int
    high: int

    def rule(self) -> str:
        return f"in {self.low}..{self.high}"

    def check(self, value: int, what: str) -> int:
        """``value``, or a BadInputError naming ``what`` (such as ``--seeds``)."""
        if isinstance(value, bool) or not self.low <= value <= self.high:
            raise BadInputError(f"{what} must be an integer {self.rule()}, not {value!r}")
        return value


# Per template (or its defaults) and per job.
SEEDS = Bound(1, 1000)
STEPS = Bound(1, 500)
SIZE = Bound(64, 4096)  # width and height, multiples of 8
MAX_VARIANTS = Bound(1, 1000)

# Per produce.
MAX_JOBS = Bound(1, 10_000_000)
# A run's priority: the runs table holds a 32-bit integer; this leaves room either way.
PRIORITY = Bound(-1_000_000, 1_000_000)
# --budget: the run's images in all (at most every job's seeds at the most jobs).
BUDGET = Bound(1, MAX_JOBS.high * SEEDS.high)
# --keepers-per-item: no more than one item's seeds could find.
KEEPERS_PER_ITEM = Bound(1, SEEDS.high)

"""Spending a run's seeds where keepers come from.

Each (template, variant) is an arm with a keep rate learned from people's decisions on
earlier runs of the same catalogue source, held as a Beta posterior (a uniform Beta(1, 1)
prior plus keeps and rejects). Seeds are handed out one at a time by Thompson sampling: for
each seed, draw a keep rate from every arm's posterior and give the seed to the highest draw.

Why Thompson sampling rather than UCB: the budget is allocated in one batch before anything
renders, and UCB is deterministic, so it would give every seed of the batch to the same arm;
Thompson's draws spread a batch over the arms in proportion to how likely each is to be the
best, which keeps exploring arms with few decisions while sending most seeds to the proven
ones. A floor of seeds per arm and item keeps every template rendering, so a template that
starts badly can still show that it got better (a new prompt, a new model).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from db.keep_rates import ArmRecord, keep_records
from pixelmill.errors import BadInputError
from producer.bounds import SEEDS
from producer.report import ArmSeeds, BudgetReport

Arm = tuple[str, str]  # (template, variant)

PRIOR_KEPT = 1.0
PRIOR_REJECTED = 1.0


@dataclass(frozen=True)
class Allocation:
    """Seeds per item for each arm, and the keep rate each was allocated by."""

    seeds: dict[Arm, int]
    expected_keep_rate: dict[Arm, float]

    @property
    def per_item(self) -> int:
        return sum(self.seeds.values())


def _posterior(record: ArmRecord | None) -> tuple[float, float]:
    kept = 0 if record is None else record.kept
    rejected = 0 if record is None else record.rejected
    return PRIOR_KEPT + kept, PRIOR_REJECTED + rejected


def _rng(seed_text: str) -> np.random.Generator:
    """Draws fixed by the run's name: producing the same run again allocates the same way."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8]))


def allocate(
    arms: Sequence[Arm],
    records: Mapping[Arm, ArmRecord],
    per_item: int,
    *,
    floor: int = 1,
    seed_text: str = "",
) -> Allocation:
    """Share ``per_item`` seeds among ``arms`` (each gets at least ``floor``)."""
    if not arms:
        raise BadInputError("no templates to allocate seeds to")
    floor = min(floor, per_item // len(arms))
    seeds = {arm: floor for arm in arms}
    posteriors = {arm: _posterior(records.get(arm)) for arm in arms}
    alpha = np.array([posteriors[arm][0] for arm in arms])
    beta = np.array([posteriors[arm][1] for arm in arms])
    rng = _rng(seed_text)
    for _ in range(per_item - floor * len(arms)):
        draws = rng.beta(alpha, beta)
        seeds[arms[int(np.argmax(draws))]] += 1
    expected = {arm: float(alpha[i] / (alpha[i] + beta[i])) for i, arm in enumerate(arms)}
    return Allocation(seeds=seeds, expected_keep_rate=expected)


def per_item_for_keepers(
    arms: Sequence[Arm], records: Mapping[Arm, ArmRecord], keepers: int, *, maximum: int
) -> int:
    """Seeds per item expected to give ``keepers`` keepers at the best arms' rates (at most
    ``maximum``): the posterior mean of the best arm, blended with the others' by the floor."""
    means = sorted(
        (alpha / (alpha + beta) for alpha, beta in (_posterior(records.get(a)) for a in arms)),
        reverse=True,
    )
    rate = max(means[0], 1e-3)
    return max(len(arms), min(maximum, math.ceil(keepers / rate)))


def per_item_for_budget(budget: int, items: int, arms: int) -> int:
    """Seeds per item from a run's image budget (at least one per arm)."""
    if items <= 0:
        return arms
    return max(arms, budget // items)


def spend(
    arms: Sequence[Arm],
    records: Mapping[Arm, ArmRecord],
    *,
    budget: int | None,
    keepers_per_item: int | None,
    items: int,
    seed_text: str,
) -> Allocation:
    """Seeds per item for each arm from a run's image budget over ``items`` items, or from
    the keepers wanted per item; each arm's sweep obeys the bounds of ``--seeds``."""
    most = SEEDS.high * len(arms)
    if keepers_per_item is not None:
        per_item = per_item_for_keepers(arms, records, keepers_per_item, maximum=most)
    elif budget is not None:
        per_item = min(most, per_item_for_budget(budget, items, len(arms)))
    else:
        raise BadInputError("give --budget or --keepers-per-item")
    allocation = allocate(arms, records, per_item, floor=1, seed_text=seed_text)
    seeds = {arm: max(SEEDS.low, min(SEEDS.high, count)) for arm, count in allocation.seeds.items()}
    return Allocation(seeds=seeds, expected_keep_rate=allocation.expected_keep_rate)


def spend_budget(
    session: Session | None,
    arms: Sequence[Arm],
    *,
    source: str,
    budget: int | None,
    keepers_per_item: int | None,
    items: int,
    seed_text: str,
) -> tuple[BudgetReport, dict[Arm, int]]:
    """The seeds of every arm, by the decisions on earlier runs of ``source`` (read with
    ``session``; None, as on a dry run without a database: no decisions, an even split),
    and what the report says of them."""
    records = {} if session is None else keep_records(session, source=source)
    allocation = spend(
        arms,
        records,
        budget=budget,
        keepers_per_item=keepers_per_item,
        items=items,
        seed_text=seed_text,
    )
    shares = []
    for arm in arms:
        record = records.get(arm)
        shares.append(
            ArmSeeds(
                template=arm[0],
                variant=arm[1],
                seeds=allocation.seeds[arm],
                keep_rate=allocation.expected_keep_rate[arm],
                kept=0 if record is None else record.kept,
                decided=0 if record is None else record.decided,
            )
        )
    asked = (
        f"--budget {budget:,}" if budget is not None else f"--keepers-per-item {keepers_per_item}"
    )
    report = BudgetReport(
        asked=asked, per_item=sum(allocation.seeds.values()), arms=shares, source=source
    )
    return report, allocation.seeds

"""Seeds allocated by keep rate: Thompson sampling over Beta posteriors, with a floor."""

from __future__ import annotations

import pytest

from db.keep_rates import ArmRecord
from pixelmill.errors import BadInputError
from producer.budget import allocate, per_item_for_budget, per_item_for_keepers

ARMS = [("studio", ""), ("street", ""), ("beach", "")]


def _records(rates: dict[str, float], decided: int) -> dict[tuple[str, str], ArmRecord]:
    return {
        (name, ""): ArmRecord(name, "", round(rate * decided), decided - round(rate * decided))
        for name, rate in rates.items()
    }


def test_proven_arms_get_most_seeds_and_none_starves() -> None:
    records = _records({"studio": 0.30, "street": 0.06, "beach": 0.10}, decided=400)

    allocation = allocate(ARMS, records, 40, floor=2, seed_text="run-1")

    assert allocation.per_item == 40
    assert min(allocation.seeds.values()) >= 2
    assert allocation.seeds[("studio", "")] >= 30
    assert allocation.expected_keep_rate[("studio", "")] == pytest.approx(121 / 402)


def test_without_decisions_the_seeds_spread_over_every_arm() -> None:
    allocation = allocate(ARMS, {}, 300, floor=0, seed_text="new")
    assert all(60 <= count <= 140 for count in allocation.seeds.values())


def test_the_same_run_allocates_the_same_way() -> None:
    records = _records({"studio": 0.2, "street": 0.15, "beach": 0.1}, decided=20)
    first = allocate(ARMS, records, 24, seed_text="run-7")
    assert first == allocate(ARMS, records, 24, seed_text="run-7")


def test_floor_gives_way_when_the_budget_is_smaller_than_the_arms() -> None:
    allocation = allocate(ARMS, {}, 2, floor=1, seed_text="x")
    assert allocation.per_item == 2
    with pytest.raises(BadInputError):
        allocate([], {}, 4)


def test_seeds_per_item_from_a_budget_or_a_keeper_goal() -> None:
    assert per_item_for_budget(1000, 100, 3) == 10
    assert per_item_for_budget(10, 100, 3) == 3
    records = _records({"studio": 0.25, "street": 0.05, "beach": 0.05}, decided=1000)
    assert per_item_for_keepers(ARMS, records, 2, maximum=100) == 8
    assert per_item_for_keepers(ARMS, {}, 200, maximum=100) == 100

"""Prometheus metrics of the review app, on the default registry (served at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter

DECISIONS = Counter(
    "pixelmill_review_decisions",
    "Review decisions recorded, by kind: keep, reject, undo, reroll.",
    ["decision"],
)
for _decision in ("keep", "reject", "undo", "reroll"):
    DECISIONS.labels(decision=_decision)  # export every series at 0 from the start

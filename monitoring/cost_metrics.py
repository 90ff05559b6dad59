"""The exporter's cost-per-keeper families: per recent run, and per (run, template, variant).

db.keeper_costs defines every figure. Totals are exported beside the ratios so a dashboard
can add templates or runs up with PromQL (sum the seconds, sum the keepers, then divide); a
ratio with nothing to divide by (no image, no keeper, no ranked keeper) is left out rather
than exported as 0. Template and variant labels come from the templates file: a handful per
run, never per job or image.
"""

from __future__ import annotations

from prometheus_client.metrics_core import GaugeMetricFamily

from db.keeper_costs import RECALL_TOP_K, REVIEW_GAP_CAP_SECONDS, CostFigures, RunCosts

_RECALL = (
    f"Kept images ranked within the first {RECALL_TOP_K} of their item by predicted keep "
    "probability, over kept images with a prediction"
)
_REVIEW = (
    "Reviewer-seconds: the gaps between a reviewer's consecutive actions, each capped at "
    f"{int(REVIEW_GAP_CAP_SECONDS)} s"
)

BOTH = ("run", "variant")
# (key, metric name after the scope's prefix, help, scopes). A run's images and keepers are
# pixelmill_run_images and pixelmill_run_images_kept already.
_FIGURES = (
    ("images", "images", "Images rendered", ("variant",)),
    ("gpu_seconds", "gpu_seconds", "GPU-seconds its images took to render (flagged too)", BOTH),
    ("gpu_seconds_per_image", "gpu_seconds_per_image", "GPU-seconds per image", BOTH),
    (
        "gpu_seconds_per_keeper",
        "gpu_seconds_per_keeper",
        "GPU-seconds over the keepers found so far (high until review is done)",
        BOTH,
    ),
    ("kept", "images_kept", "Images people kept", ("variant",)),
    ("reviewer_seconds", "reviewer_seconds", _REVIEW, BOTH),
    ("reviewer_seconds_per_keeper", "reviewer_seconds_per_keeper", _REVIEW + ", per keeper", BOTH),
    ("auto_rejected", "auto_rejected_images", "Standing rejections by the keeper model", BOTH),
    ("skipped_seeds", "early_stop_skipped_seeds", "Seeds early stop left unrendered", BOTH),
    (
        "gpu_seconds_saved",
        "early_stop_gpu_seconds_saved",
        "Skipped seeds times their job's mean render seconds",
        BOTH,
    ),
    ("keeper_recall", "keeper_recall_top_k", _RECALL, BOTH),
)

_SCOPES = {
    "run": ("pixelmill_run_", ["run"], "A recent run's"),
    "variant": ("pixelmill_variant_", ["run", "template", "variant"], "A template variant's"),
}

Families = dict[tuple[str, str], GaugeMetricFamily]


def cost_families() -> Families:
    """The cost families, still empty, keyed by (scope, figure)."""
    families: Families = {}
    for key, name, documentation, scopes in _FIGURES:
        for scope in scopes:
            prefix, labels, whose = _SCOPES[scope]
            families[(scope, key)] = GaugeMetricFamily(
                prefix + name, f"{whose} cost per keeper: {documentation}.", labels=labels
            )
    return families


def _add(families: Families, scope: str, labels: list[str], figures: CostFigures) -> None:
    for key, _name, _help, scopes in _FIGURES:
        value = getattr(figures, key)
        if scope in scopes and value is not None:
            families[(scope, key)].add_metric(labels, float(value))


def add_run_costs(families: Families, run: str, costs: RunCosts) -> None:
    _add(families, "run", [run], costs.total)
    for (template, variant), figures in sorted(costs.variants.items()):
        _add(families, "variant", [run, template, variant], figures)

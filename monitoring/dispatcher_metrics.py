"""The dispatcher's metrics (``pixelmill dispatch --watch``, PIXELMILL_DISPATCH_METRICS_PORT).

Apart from the workers' (:mod:`monitoring.metrics`): a process serves only the metrics of
what it does.
"""

from __future__ import annotations

from prometheus_client import Counter

JOBS_PUBLISHED = Counter(
    "pixelmill_jobs_published_total",
    "Job ids the dispatcher published to the broker (pending -> queued).",
)
JOBS_REPUBLISHED = Counter(
    "pixelmill_jobs_republished_total",
    "Queued job ids published again because their message was not picked up in time.",
)

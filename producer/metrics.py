"""The dispatcher's metrics (``pixelmill dispatch --watch``, PIXELMILL_DISPATCH_METRICS_PORT).

Defined here, by the part that emits them, and apart from the workers' (in monitoring): a
process serves only the metrics of what it does.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

JOBS_PUBLISHED = Counter(
    "pixelmill_jobs_published_total",
    "Job ids the dispatcher published to the broker (pending -> queued).",
)
JOBS_REPUBLISHED = Counter(
    "pixelmill_jobs_republished_total",
    "Queued job ids published again because the broker no longer held their message.",
)
JOBS_UNPUBLISHED = Counter(
    "pixelmill_jobs_unpublished_total",
    "Jobs marked queued whose publish then failed (the broker away), returned to pending.",
)
BROKER_MESSAGES = Gauge(
    "pixelmill_dispatch_broker_messages",
    "Messages the broker held in the render queue when the dispatcher last asked.",
)
JOBS_QUEUED = Gauge(
    "pixelmill_dispatch_jobs_queued",
    "Jobs queued in the database (published, not yet started) when the dispatcher last "
    "counted; more than the broker holds, plus one a running job's worker may have taken, "
    "means messages were lost.",
)
OUTAGES = Counter(
    "pixelmill_dispatch_outages_total",
    "Dispatcher rounds that failed because a service was unreachable, by service (database, "
    "broker); the dispatcher waits (backoff) and tries again.",
    ["service"],
)
LAST_ROUND = Gauge(
    "pixelmill_dispatch_last_round_timestamp_seconds",
    "When the dispatcher last completed a round (reap, publish, re-publish).",
)
EXPIRED_LEASES = Counter(
    "pixelmill_expired_leases_total",
    "Running jobs whose lease expired (their worker was lost), by what the reaper made of "
    "them: requeued (another attempt), dead (out of attempts), cancelled (their run was).",
    ["outcome"],
)
for _outcome in ("requeued", "dead", "cancelled"):
    EXPIRED_LEASES.labels(_outcome)
for _service in ("database", "broker"):
    OUTAGES.labels(_service)


def count_reaped(*, requeued: int, dead: int, cancelled: int) -> None:
    """Count one reaper pass's jobs (worker.claim.reap_expired's report)."""
    EXPIRED_LEASES.labels("requeued").inc(requeued)
    EXPIRED_LEASES.labels("dead").inc(dead)
    EXPIRED_LEASES.labels("cancelled").inc(cancelled)

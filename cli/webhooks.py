"""`pixelmill webhooks ...`: telling other systems when a run is rendered, reviewed or
exported (PIXELMILL_WEBHOOK_URLS, PIXELMILL_WEBHOOK_SECRET)."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from cli import common
from cli.common import EXIT_BAD_INPUT, console, err, fail

if TYPE_CHECKING:
    from monitoring.webhooks.delivery import PassReport

app = typer.Typer(
    help="Webhooks: signed JSON events when a run is rendered, reviewed or exported.",
    no_args_is_help=True,
)


def _print_pass(report: PassReport) -> None:
    if not (report.recorded or report.fanned_out or report.delivered or report.failed):
        return
    console.print(
        f"{report.recorded} events recorded, {report.delivered} delivered, "
        f"{report.failed} attempts failed ({report.given_up} given up)"
    )
    for error in report.errors:
        err.print(f"not delivered: {error}", markup=False, highlight=False)


@app.command("deliver")
def deliver(
    once: Annotated[
        bool, typer.Option("--once", help="One pass (record, then send what is due), then exit.")
    ] = False,
) -> None:
    """Record the events of runs that finished rendering or whose review is complete, and post
    every due event to each PIXELMILL_WEBHOOK_URLS, retrying failed ones with backoff; every
    PIXELMILL_WEBHOOK_POLL_SECONDS until stopped (SIGTERM, Ctrl-C), or once."""
    from monitoring.webhooks.delivery import (
        WebhookConfig,
        deliver_forever,
        deliver_pass,
        display_url,
    )

    settings = common.settings()
    if not settings.webhook_urls:
        fail("PIXELMILL_WEBHOOK_URLS is empty: there is nowhere to deliver to", EXIT_BAD_INPUT)
    config = WebhookConfig.from_settings(settings)
    sessions = common.sessions(settings)
    if once:
        _print_pass(deliver_pass(sessions, config))
        return
    urls = ", ".join(display_url(url) for url in config.urls)
    console.print(f"delivering webhooks to {urls} every {config.poll_seconds:g} s")
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    deliver_forever(sessions, config, stop, on_pass=_print_pass)


@app.command("list")
def list_undelivered(
    limit: Annotated[int, typer.Option(min=1, help="Rows shown at most.")] = 50,
) -> None:
    """The deliveries not yet accepted by their receiver: pending (with when they are tried
    next) and given up (`pixelmill webhooks retry` tries them again)."""
    from monitoring.webhooks.delivery import display_url
    from monitoring.webhooks.outbox import undelivered

    with common.sessions(common.settings())() as session:
        total, rows = undelivered(session, limit=limit)
    if not total:
        console.print("every webhook event has been delivered")
        return
    for row in rows:
        state = (
            "given up"
            if row.next_attempt_at is None
            else f"next try {row.next_attempt_at:%Y-%m-%d %H:%M:%S}"
        )
        last = f", last: {row.last_error}" if row.last_error else ""
        console.print(
            f"{row.event_type} {row.event_id} (run {row.run_name}) to {display_url(row.url)}: "
            f"{row.attempts} attempts, {state}{last}",
            markup=False,
            highlight=False,
        )
    if total > len(rows):
        console.print(f"... and {total - len(rows)} more ({total} undelivered in all)")


@app.command("retry")
def retry() -> None:
    """Try the deliveries that were given up (after PIXELMILL_WEBHOOK_MAX_ATTEMPTS) again, from
    their first attempt, on the deliverer's next pass."""
    from monitoring.webhooks.delivery import utc_now
    from monitoring.webhooks.outbox import retry_given_up

    with common.sessions(common.settings())() as session:
        count = retry_given_up(session, now=utc_now())
    console.print(f"{count} deliveries given up are due again")

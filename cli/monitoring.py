"""`pixelmill exporter`: run progress from the database as Prometheus metrics."""

from __future__ import annotations

import signal
import threading
from datetime import timedelta
from types import FrameType
from typing import Annotated

import typer

from cli import common
from cli.common import console


def exporter(
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Default: PIXELMILL_EXPORTER_PORT.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
) -> None:
    """Serve run progress from the database as Prometheus metrics (read on every scrape)."""
    from db.session import make_engine
    from monitoring.exporter import exporter_registry
    from pixelmill.metrics_server import start_metrics_server

    settings = common.settings()
    engine = make_engine(settings.resolved_database_url)
    registry = exporter_registry(engine, deadline=timedelta(hours=settings.run_deadline_hours))
    # A port in use is bad input (MetricsPortError): one line, exit 2.
    server = start_metrics_server(
        settings.exporter_port if port is None else port, addr=host, registry=registry
    )
    console.print(
        f"exporter for {common.safe_url(settings.resolved_database_url)} "
        f"on http://{host}:{server.port}/metrics"
    )
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    while not stop.wait(1.0):
        pass
    server.stop()
    engine.dispose()

"""`pixelmill exporter`: registered on the main command line by pixelmill/cli.py."""

from __future__ import annotations

import signal
import threading
from datetime import timedelta
from types import FrameType
from typing import Annotated

import typer


def exporter(
    port: Annotated[int | None, typer.Option(help="Default: PIXELMILL_EXPORTER_PORT.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
) -> None:
    """Serve run progress from the database as Prometheus metrics (read on every scrape)."""
    from db.session import make_engine
    from monitoring.exporter import exporter_registry
    from monitoring.server import MetricsPortError, start_metrics_server
    from pixelmill.cli import _safe_url, _settings, console, err

    settings = _settings()
    engine = make_engine(settings.resolved_database_url)
    registry = exporter_registry(engine, deadline=timedelta(hours=settings.run_deadline_hours))
    try:
        server = start_metrics_server(
            settings.exporter_port if port is None else port, addr=host, registry=registry
        )
    except MetricsPortError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(
        f"exporter for {_safe_url(settings.resolved_database_url)} "
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


def register(app: typer.Typer) -> None:
    app.command()(exporter)

"""The ``/metrics`` HTTP endpoint of a process (or of a whole worker host).

Shared by every process that serves metrics (a worker host, the dispatcher, the exporter):
which metrics it serves is the caller's; how they are served is here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.registry import CollectorRegistry

from pixelmill.errors import BadInputError
from pixelmill.metrics_multiprocess import multiprocess_dir, multiprocess_registry

log = logging.getLogger(__name__)


class MetricsPortError(BadInputError):
    pass


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serving_registry() -> CollectorRegistry:
    """What to serve: every process's metrics in multiprocess mode, else this process's."""
    path = multiprocess_dir()
    return multiprocess_registry(path) if path is not None else REGISTRY


def start_metrics_server(
    port: int, *, addr: str = "0.0.0.0", registry: CollectorRegistry | None = None
) -> MetricsServer:
    """Serve ``registry`` (default: :func:`serving_registry`) on ``addr:port`` in a daemon
    thread. Port 0 picks a free port (see ``MetricsServer.port``)."""
    try:
        server, thread = start_http_server(
            port, addr=addr, registry=registry if registry is not None else serving_registry()
        )
    except OSError as exc:
        raise MetricsPortError(
            f"cannot serve metrics on {addr}:{port} ({exc}); "
            "set PIXELMILL_METRICS_PORT (or the command's port option) to a free port"
        ) from exc
    metrics = MetricsServer(server, thread)
    log.info("serving Prometheus metrics on http://%s:%s/metrics", addr, metrics.port)
    return metrics

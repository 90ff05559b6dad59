"""kombu's SQLAlchemy transport (the embedded broker) with a short polling interval.

The stock transport sleeps a second between polls of an empty queue; with prefetch 1 that
left the GPU idle for up to a second after every job. Virtual transports read
``polling_interval`` from the transport options, but the SQLAlchemy channel hands every
option it does not know to ``create_engine``, which refuses it; this channel drops it first.
:func:`use_fast_polling` points kombu's ``sqla`` scheme at this transport.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy import create_engine

# Seconds between polls of an empty queue: a SQLite poll costs well under a millisecond.
POLLING_INTERVAL = 0.05


class Channel(kombu_sqla.Channel):
    def _engine_from_config(self) -> Any:
        conninfo = self.connection.client
        options = dict(conninfo.transport_options)
        for transport_only in (
            "polling_interval",
            "queue_tablename",
            "message_tablename",
            "callback",
            "errback",
            "max_retries",
            "interval_start",
            "interval_step",
            "interval_max",
            "retry_errors",
        ):
            options.pop(transport_only, None)
        return create_engine(conninfo.hostname, **options)


class Transport(kombu_sqla.Transport):
    Channel = Channel
    polling_interval = POLLING_INTERVAL


def use_fast_polling() -> None:
    """Resolve ``sqla+...`` broker URLs to :class:`Transport` in this process."""
    TRANSPORT_ALIASES["sqla"] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["sqlalchemy"] = f"{__name__}:Transport"

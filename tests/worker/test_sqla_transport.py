"""The embedded broker (kombu's SQLAlchemy transport on SQLite) polls fast and still works."""

from __future__ import annotations

from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue

from pixelmill.settings import get_settings
from worker.celery_app import create_app
from worker.sqla_transport import POLLING_INTERVAL, Transport

# kombu's own table mappings use SQLAlchemy 2.1's deprecated ``noload``: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


def test_embedded_broker_polls_fast_and_delivers(tmp_path: Path) -> None:
    settings = get_settings(data_dir=tmp_path, render_queue="render-test")
    app = create_app(settings)
    try:
        with app.connection_for_write() as conn:
            transport = conn.transport
            assert isinstance(transport, Transport)
            assert transport.polling_interval == POLLING_INTERVAL < 1.0
            queue = Queue("render-test", Exchange("render-test"), routing_key="render-test")
            with conn.Producer() as producer:
                producer.publish(
                    {"job": 7}, exchange=queue.exchange, routing_key="render-test", declare=[queue]
                )
            received: list[object] = []
            with conn.Consumer(
                queue, callbacks=[lambda body, msg: (received.append(body), msg.ack())]
            ):
                conn.drain_events(timeout=5)
            assert received == [{"job": 7}]
    finally:
        app.close()


def test_transport_options_for_create_engine_still_pass(tmp_path: Path) -> None:
    # Options the channel does not know go to create_engine, as with the stock transport.
    url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    from worker.sqla_transport import use_fast_polling

    use_fast_polling()
    with Connection(url, transport_options={"echo": False, "polling_interval": 0.01}) as conn:
        channel = conn.default_channel
        assert conn.transport.polling_interval == 0.01
        assert channel._engine_from_config().url.database == str(tmp_path / "broker.db")

"""Outages a fault test (or benchmarks/soak.py) can cause without touching the shared services:
a RabbitMQ node of its own to stop and start, a TCP proxy in front of Postgres to cut and
drop connections, the database's connections terminated, and ``pixelmill dispatch --watch``
as the real process it is in production.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


def wait_for_port(port: int, *, up: bool, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise AssertionError(f"port {port} did not go {'up' if up else 'down'} in {timeout} s")


# --- RabbitMQ ---------------------------------------------------------------------------------


class PrivateRabbitMQ:
    """A RabbitMQ node of the test's own (its own name, port and data folder), which can be
    stopped and started (``rabbitmqctl stop_app``/``start_app``) without stopping the shared
    one on 5672. Durable queues and persistent messages survive the restart, as they would
    on a production broker; unacknowledged ones are given out again.

    rabbitmq-server runs as the ``rabbitmq`` user (its wrapper switches to it when started
    by root), so the data folder is made in /tmp and handed to that user."""

    def __init__(self) -> None:
        self.port = free_port()
        self.node = f"pixelmill-{uuid.uuid4().hex[:8]}@localhost"
        self.base = Path(tempfile.mkdtemp(prefix="pixelmill-rabbitmq-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    @staticmethod
    def can_start() -> bool:
        """A private node needs root (or the rabbitmq user) and the server installed."""
        if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
            return False
        return os.geteuid() == 0 or pwd.getpwuid(os.geteuid()).pw_name == "rabbitmq"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq.conf"),
            RABBITMQ_DIST_PORT=str(free_port()),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_PID_FILE=str(self.base / "pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_FEATURE_FLAGS_FILE=str(self.base / "feature_flags"),
        )
        return env

    def start(self) -> None:
        (self.base / "mnesia").mkdir()
        (self.base / "log").mkdir()
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        if os.geteuid() == 0:
            owner = pwd.getpwnam("rabbitmq")
            for path in [self.base, *self.base.rglob("*")]:
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._log = (self.base / "server.out").open("wb")
        self.process = subprocess.Popen(
            ["rabbitmq-server"], env=self._env(), stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_for_port(self.port, up=True, timeout=90)

    def _ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stop_app(self) -> None:
        """The broker goes away: every connection to it drops, new ones are refused."""
        result = self._ctl("stop_app")
        assert result.returncode == 0, result.stderr
        wait_for_port(self.port, up=False)

    def start_app(self) -> None:
        # Its listener's old socket may not be free the moment stop_app returns: try again.
        deadline = time.monotonic() + 60
        while True:
            result = self._ctl("start_app")
            if result.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"rabbitmqctl start_app failed: {result.stderr}")
            time.sleep(1)
        wait_for_port(self.port, up=True)

    def stop(self) -> None:
        """Stop the node for good (teardown: whatever state it was left in)."""
        if self.process is not None:
            self._ctl("stop")
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.base, ignore_errors=True)


class SharedRabbitMQ:
    """The shared node on 5672, for a machine where a private one cannot start (not root):
    stopped and started with rabbitmqctl, and always started again (see stop())."""

    url = "amqp://guest:guest@127.0.0.1:5672//"
    port = 5672

    def start(self) -> None:
        wait_for_port(self.port, up=True)

    def stop_app(self) -> None:
        subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=60)
        wait_for_port(self.port, up=False)

    def start_app(self) -> None:
        deadline = time.monotonic() + 60
        while subprocess.run(["rabbitmqctl", "-q", "start_app"], timeout=60).returncode != 0:
            if time.monotonic() > deadline:
                raise AssertionError("rabbitmqctl start_app keeps failing")
            time.sleep(1)
        wait_for_port(self.port, up=True)

    def stop(self) -> None:
        with contextlib.suppress(AssertionError):
            wait_for_port(self.port, up=True, timeout=1)
            return
        self.start_app()


@contextlib.contextmanager
def rabbitmq_to_restart() -> Iterator[PrivateRabbitMQ | SharedRabbitMQ]:
    """A RabbitMQ broker the caller may stop and start: a private node where one can run,
    else the shared one. It is running again (or gone, if private) afterwards, whatever
    happened."""
    broker: PrivateRabbitMQ | SharedRabbitMQ
    broker = PrivateRabbitMQ() if PrivateRabbitMQ.can_start() else SharedRabbitMQ()
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


# --- Postgres -------------------------------------------------------------------------------


class DatabaseProxy:
    """A TCP proxy in front of Postgres for the processes under test. ``cut()`` makes the
    database unreachable through it (open connections closed, new ones closed at once) until
    ``restore()``; ``drop()`` only closes the open ones, as a restarted server or a network
    blip would."""

    def __init__(self, database_url: str) -> None:
        parsed = make_url(database_url)
        self.target = (parsed.host or "127.0.0.1", parsed.port or 5432)
        self.port = free_port()
        self.url = parsed.set(host="127.0.0.1", port=self.port).render_as_string(
            hide_password=False
        )
        self._reachable = threading.Event()
        self._reachable.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        self.connections = 0
        threading.Thread(target=self._accept, name="db-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._reachable.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
                self.connections += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def drop(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def cut(self) -> None:
        self._reachable.clear()
        self.drop()

    def restore(self) -> None:
        self._reachable.set()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.drop()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def drop_database_connections(database_url: str) -> int:
    """Terminate every other connection to the database (pg_terminate_backend), as a server
    restart or a failover does to its clients; how many there were."""
    name = make_url(database_url).database
    admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            return len(
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                ).all()
            )
    finally:
        admin.dispose()


# --- the dispatcher as a process ----------------------------------------------------------------


class WatchingDispatcher:
    """``pixelmill dispatch --watch INTERVAL`` in a process of its own, serving its metrics."""

    def __init__(self, env: dict[str, str], log_path: Path, *, interval: float = 0.5) -> None:
        self.metrics_port = free_port()
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli", "dispatch", "--watch", str(interval)],
            env={**env, "PIXELMILL_DISPATCH_METRICS_PORT": str(self.metrics_port)},
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-8000:]

    def alive(self) -> bool:
        return self.process.poll() is None

    def metric(self, name: str, **labels: str) -> float:
        """One sample of its /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                matches = all(sample.labels.get(k) == v for k, v in labels.items())
                if sample.name == name and matches:
                    return float(sample.value)
        return 0.0

    def kill(self) -> None:
        """As a crash would: no chance to clean up."""
        if self.alive():
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

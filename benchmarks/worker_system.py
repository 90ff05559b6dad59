"""The services of benchmarks/worker.py: a fresh Postgres database, a moto S3 server, and a
Celery worker subprocess rendering against them (with the CPU time its processes use)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from db.migrate import upgrade

    name = f"pixelmill_bench_worker_{os.getpid()}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def moto_s3() -> Iterator[dict[str, str]]:
    """A moto S3 server in a process of its own, as a real S3 endpoint is: in this one its
    requests would take the benchmark's interpreter lock and slow what it times."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    bucket = "pixelmill-bench"
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    try:
        wait_for_port(port, server)
        client.create_bucket(Bucket=bucket)
        yield {
            "storage": "s3",
            "s3_bucket": bucket,
            "s3_endpoint_url": endpoint,
            "s3_region": "us-east-1",
            "s3_access_key_id": "testing",
            "s3_secret_access_key": "testing",
        }
    finally:
        server.terminate()
        server.wait(30)


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the moto server exited ({process.returncode})")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"the moto server did not listen on port {port} within 60 s")


class System:
    """A Celery worker subprocess against Postgres, the broker and moto S3."""

    def __init__(self, values: dict[str, str], args: Any, log_path: Path) -> None:
        from pixelmill.settings import get_settings
        from worker.launch import CELERY_APP, worker_argv

        self.settings = get_settings(**values)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELMILL_")}
        env.update({f"PIXELMILL_{key.upper()}": value for key, value in values.items()})
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        self.log_path = log_path
        self._log = log_path.open("wb")
        queue = self.settings.render_queue
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                CELERY_APP,
                *worker_argv(queue=queue, hostname=f"bench-{uuid.uuid4().hex[:6]}@%h"),
            ],
            env=env,
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def run(self, run_id: int, *, timeout: float) -> float:
        """Dispatch the run's jobs (all at once: with a window, a worker faster than the
        poll below would wait for the next top-up, and the null run would measure the poll)
        and wait until every one is done; the seconds from the first dispatch to the last
        job's ``finished_at``. (Polling is slow, as the real dispatcher's is: on a small
        machine its queries would take CPU from the render; the end time comes from the
        rows.)"""
        from datetime import UTC, datetime

        from sqlalchemy import create_engine, func, select
        from sqlalchemy.orm import Session

        from db.models import Job, JobStatus
        from pixelmill.tasks import publisher_app
        from producer.dispatch import celery_publisher, dispatch

        app = publisher_app(self.settings)
        publish = celery_publisher(app, self.settings.render_queue)
        engine = create_engine(self.settings.resolved_database_url)
        requeue_after = timedelta(seconds=self.settings.requeue_after_seconds)
        by_status = select(Job.status, func.count()).where(Job.run_id == run_id)
        started_at = datetime.now(UTC)
        started = time.perf_counter()
        try:
            while True:
                with Session(engine) as session:
                    dispatch(
                        session,
                        publish,
                        requeue_after=requeue_after,
                        run_id=run_id,
                        window=None,
                    )
                    counts = dict(session.execute(by_status.group_by(Job.status)).all())
                    if set(counts) == {JobStatus.DONE}:
                        finished_at = session.scalar(
                            select(func.max(Job.finished_at)).where(Job.run_id == run_id)
                        )
                        assert finished_at is not None
                        if finished_at.tzinfo is None:  # SQLite keeps no time zone
                            finished_at = finished_at.replace(tzinfo=UTC)
                        return (finished_at - started_at).total_seconds()
                ended_badly = {s: n for s, n in counts.items() if s in ("failed", "dead")}
                if ended_badly:
                    raise SystemExit(f"jobs ended badly: {ended_badly}; see {self.log_path}")
                if self.process.poll() is not None:
                    raise SystemExit(f"the worker exited; see {self.log_path}")
                if time.perf_counter() - started > timeout:
                    raise SystemExit(f"not done after {timeout} s ({counts}); see {self.log_path}")
                time.sleep(1.0)
        finally:
            engine.dispose()
            app.close()

    def cpu_seconds(self) -> float | None:
        """CPU seconds the worker's processes (Celery's main process and its pool) have used so
        far; None where /proc is not there to say."""
        try:
            return sum(_cpu_seconds(pid) for pid in _process_tree(self.process.pid))
        except OSError:
            return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def _process_tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in children:
            pids += _process_tree(int(child))
    return pids


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_seconds(
    values: dict[str, str], args: Any, work: Path, warm_up: int, run: int
) -> tuple[float, float | None]:
    """A worker subprocess renders the warm-up run (model loaded, first job rendered), then
    ``run``: the seconds of the latter, and the CPU seconds the worker's processes used for it
    (None without /proc)."""
    system = System(values, args, work / f"worker-{run}.log")
    try:
        system.run(warm_up, timeout=args.timeout)
        cpu_before = system.cpu_seconds()
        seconds = system.run(run, timeout=args.timeout)
        cpu_after = system.cpu_seconds()
        cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        return seconds, cpu
    finally:
        system.stop()


@dataclass(frozen=True)
class Services:
    """Where the system's run keeps its rows, its messages and its images."""

    database_url: str
    broker: str
    storage: dict[str, str]  # the storage settings
    label: str


def start_services(stack: contextlib.ExitStack, args: Any, work: Path) -> Services:
    if args.embedded:
        from db.migrate import upgrade

        database_url = f"sqlite:///{work / 'bench.db'}"
        upgrade(database_url)
        return Services(
            database_url,
            f"sqla+sqlite:///{work / 'broker.db'}",
            {"storage": "local", "storage_dir": str(work / "images")},
            "embedded (SQLite, sqla broker, local folder)",
        )
    database_url = stack.enter_context(fresh_database(args.postgres))
    return Services(
        database_url, args.broker, stack.enter_context(moto_s3()), "Postgres, broker, moto S3"
    )

"""Soak: a few hundred tiny-model jobs through the whole system while its parts are faulted.

Postgres (a fresh database), a broker (a private Redis without persistence), a moto S3 server,
two Celery worker processes and ``pixelmill dispatch --watch``, all real processes. Once the
first image is in, the schedule runs (seconds after that first image, all adjustable):

- every ``--kill-every`` s (30) a worker's pool process is killed (SIGKILL), the workers in
  turn;
- at 10 s the dispatcher is killed and started again 3 s later;
- at 25 s the broker is killed, losing every message, and started again 3 s later;
- at 40 s S3 stops for ``--s3-outage`` s (20);
- at 70 s every database connection is dropped (pg_terminate_backend).

When every job has ended it checks that each planned (job, seed) has exactly one image row and
one object with the recorded size and sha256, that no object is an orphan (no row names it)
and that no job is left pending, queued or running; it prints the faults injected, the images
lost, duplicated and orphaned, the seconds from each fault to the next image recorded after
it, and ``met``/``NOT met`` against zero lost and zero duplicated (exit status 1 if not).

    .venv/bin/python benchmarks/soak.py                      # 200 jobs x 2 seeds, a few minutes
    .venv/bin/python benchmarks/soak.py --jobs 1000 --kill-every 30

It uses the fault helpers of the tests (tests/integration/faults.py and outages.py).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from sqlalchemy import Engine, create_engine, func, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from db.migrate import upgrade  # noqa: E402
from db.models import Image, Job, JobStatus  # noqa: E402
from tests.conftest import POSTGRES_URL, WorkerProcess  # noqa: E402
from tests.integration.faults import (  # noqa: E402
    JobSpec,
    PrivateRedis,
    PrivateS3,
    insert_jobs,
    pool_pids,
    s3_client,
    worker_env,
)
from tests.integration.outages import WatchingDispatcher, drop_database_connections  # noqa: E402

OPEN = (JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass
class Fault:
    name: str
    started: datetime
    ended: datetime | None = None  # when the service came back (None: an instant fault)


@dataclass
class Rig:
    """The services and processes of one soak."""

    workdir: Path
    database_url: str
    engine: Engine
    redis: PrivateRedis
    s3: PrivateS3
    values: dict[str, str | Path]
    workers: list[WorkerProcess] = field(default_factory=list)
    dispatcher: WatchingDispatcher | None = None
    dispatchers_started: int = 0

    def env(self) -> dict[str, str]:
        return worker_env(self.values)

    def start_dispatcher(self) -> None:
        self.dispatchers_started += 1
        log = self.workdir / f"dispatch-{self.dispatchers_started}.log"
        self.dispatcher = WatchingDispatcher(self.env(), log)


def now() -> datetime:
    return datetime.now(UTC)


# --- services ----------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(admin_url: str, *, keep: bool) -> Iterator[str]:
    name = f"pixelmill_soak_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        if not keep:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def services(args: argparse.Namespace, workdir: Path) -> Iterator[Rig]:
    from worker.tiny_model import build_tiny_pipeline

    model = build_tiny_pipeline(workdir / "tiny-sd")
    redis, s3 = PrivateRedis(workdir / "redis.log"), PrivateS3()
    redis.start()
    s3.start()
    try:
        with fresh_database(args.postgres_url, keep=args.keep) as url:
            engine = create_engine(url, pool_pre_ping=True)
            values: dict[str, str | Path] = {
                "database_url": url,
                "broker_url": redis.url,
                "model": str(model),
                "device": "cpu",
                "data_dir": workdir / "data",
                "job_lease_seconds": "10",
                "requeue_after_seconds": "10",
                "retry_backoff_seconds": "1",
                "retry_backoff_max_seconds": "8",
                "max_attempts": "3",
                "dispatch_window": "4",
                "render_batch_size": "1",
                "safety_checker": "false",
                **s3.settings(),
            }
            rig = Rig(workdir, url, engine, redis, s3, values)
            try:
                yield rig
            finally:
                if rig.dispatcher is not None:
                    rig.dispatcher.stop()
                for worker in rig.workers:
                    worker.stop()
                engine.dispose()
    finally:
        s3.stop()
        redis.stop()


# --- the fault schedule ----------------------------------------------------------------------


def kill_a_render(rig: Rig, turn: int) -> Fault | None:
    """SIGKILL the pool process of the next worker in turn (Celery forks another)."""
    for offset in range(len(rig.workers)):
        worker = rig.workers[(turn + offset) % len(rig.workers)]
        for pid in pool_pids(worker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                return Fault(
                    f"worker {(turn + offset) % len(rig.workers)} pool process killed", now()
                )
    return None


def restart_dispatcher(rig: Rig) -> Fault:
    fault = Fault("dispatcher killed and restarted", now())
    assert rig.dispatcher is not None
    rig.dispatcher.kill()
    time.sleep(3)
    rig.start_dispatcher()
    fault.ended = now()
    return fault


def restart_broker(rig: Rig) -> Fault:
    fault = Fault("broker killed (messages lost) and restarted", now())
    rig.redis.kill()
    time.sleep(3)
    rig.redis.start()
    fault.ended = now()
    return fault


def stop_storage(rig: Rig, seconds: float) -> Fault:
    fault = Fault(f"S3 stopped for {seconds:g} s", now())
    rig.s3.stop()
    time.sleep(seconds)
    rig.s3.start()
    fault.ended = now()
    return fault


def drop_connections(rig: Rig) -> Fault:
    count = drop_database_connections(rig.database_url)
    return Fault(f"database connections dropped ({count})", now())


def schedule(args: argparse.Namespace) -> list[tuple[float, str, Callable[[Rig], Fault]]]:
    """The one-off faults, by seconds after the first image."""
    return [
        (args.dispatcher_at, "dispatcher restart", restart_dispatcher),
        (args.broker_at, "broker restart", restart_broker),
        (args.s3_at, "S3 outage", lambda rig: stop_storage(rig, args.s3_outage)),
        (args.database_at, "database connections dropped", drop_connections),
    ]


def open_jobs(engine: Engine) -> int:
    with Session(engine) as session:
        return int(
            session.scalar(select(func.count()).select_from(Job).where(Job.status.in_(OPEN))) or 0
        )


def image_rows(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(Image)) or 0)


def wait_for_first_image(rig: Rig, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while image_rows(rig.engine) == 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"no image after {timeout} s; see the logs in {rig.workdir}")
        time.sleep(0.5)


def run_faults(rig: Rig, args: argparse.Namespace) -> list[Fault]:
    """Inject the schedule while jobs remain; the faults the run outlasted are returned."""
    faults: list[Fault] = []
    started = time.monotonic()
    pending = sorted(schedule(args), key=lambda entry: entry[0])
    next_kill, turn = args.kill_every, 0
    deadline = started + args.timeout
    while open_jobs(rig.engine) and time.monotonic() < deadline:
        elapsed = time.monotonic() - started
        if pending and elapsed >= pending[0][0]:
            faults.append(pending.pop(0)[2](rig))
            print(f"  {elapsed:6.1f} s  {faults[-1].name}", flush=True)
        elif args.kill_every > 0 and elapsed >= next_kill:
            fault = kill_a_render(rig, turn)
            turn, next_kill = turn + 1, next_kill + args.kill_every
            if fault is not None:
                faults.append(fault)
                print(f"  {elapsed:6.1f} s  {fault.name}", flush=True)
        else:
            time.sleep(0.5)
    for _, name, _ in pending:
        print(f"  not injected (the run ended first): {name}")
    return faults


def settle(rig: Rig, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while open_jobs(rig.engine):
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


# --- the checks --------------------------------------------------------------------------------


@dataclass
class Findings:
    planned: int = 0
    recorded: int = 0
    lost: int = 0
    duplicated: int = 0
    orphaned: int = 0
    mismatched: int = 0  # rows whose object is missing or has other bytes than recorded
    open_jobs: int = 0
    jobs: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    outages: int = 0


def bucket_objects(settings: dict[str, Any]) -> dict[str, int]:
    client = s3_client(str(settings["s3_endpoint_url"]))
    objects: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=settings["s3_bucket"]):
        for entry in page.get("Contents", []):
            objects[entry["Key"]] = int(entry["Size"])
    return objects


def check(rig: Rig) -> Findings:
    findings = Findings()
    with Session(rig.engine) as session:
        jobs = session.execute(select(Job.id, Job.seeds, Job.status, Job.attempts, Job.outages))
        planned: set[tuple[int, int]] = set()
        for job_id, seeds, status, attempts, outages in jobs:
            planned |= {(job_id, int(seed)) for seed in seeds}
            findings.jobs[status] += 1
            findings.attempts += attempts
            findings.outages += outages
        rows = session.execute(
            select(Image.job_id, Image.seed, Image.storage_key, Image.thumbnail_key,
                   Image.bytes, Image.sha256)
        ).all()  # fmt: skip
    findings.open_jobs = sum(findings.jobs[status] for status in OPEN)
    per_seed = Counter((job_id, int(seed)) for job_id, seed, *_ in rows)
    findings.planned, findings.recorded = len(planned), len(rows)
    findings.lost = len(planned - set(per_seed))
    findings.duplicated = sum(count - 1 for count in per_seed.values() if count > 1)
    values = rig.values
    objects = bucket_objects(values)
    client = s3_client(str(values["s3_endpoint_url"]))
    referenced: set[str] = set()
    for _, _, key, thumb, size, sha256 in rows:
        referenced |= {key, thumb} - {None, ""}
        if objects.get(key) != size:
            findings.mismatched += 1
            continue
        body = client.get_object(Bucket=values["s3_bucket"], Key=key)["Body"].read()
        findings.mismatched += hashlib.sha256(body).hexdigest() != sha256
    findings.orphaned = len(set(objects) - referenced)
    return findings


def recovery_seconds(engine: Engine, fault: Fault) -> float | None:
    """From the fault to the first image recorded after it was over (None: none was)."""
    with Session(engine) as session:
        first = session.scalar(
            select(func.min(Image.created_at)).where(
                Image.created_at > (fault.ended or fault.started)
            )
        )
    if first is None:
        return None
    first = first if first.tzinfo is not None else first.replace(tzinfo=UTC)
    return (first - fault.started).total_seconds()


def report(rig: Rig, faults: list[Fault], findings: Findings, seconds: float) -> bool:
    print(f"\n{len(faults)} faults injected in {seconds:.0f} s:")
    for fault in faults:
        to_progress = recovery_seconds(rig.engine, fault)
        after = "no image after it" if to_progress is None else f"{to_progress:.1f} s to progress"
        print(f"  {fault.name:<52} {after}")
    jobs = ", ".join(f"{count} {status}" for status, count in sorted(findings.jobs.items()))
    print(f"\njobs: {jobs}; attempts {findings.attempts}, of them outages {findings.outages}")
    print(f"images planned {findings.planned}, recorded {findings.recorded}")
    print(f"images lost {findings.lost}, duplicated {findings.duplicated}, "
          f"orphaned objects {findings.orphaned}, rows without their object {findings.mismatched}, "
          f"jobs left open {findings.open_jobs}")  # fmt: skip
    results = [
        ("zero images lost", findings.lost == 0),
        ("zero images duplicated", findings.duplicated == 0),
        ("zero orphaned objects", findings.orphaned == 0),
        ("every row's object stored as recorded", findings.mismatched == 0),
        ("no job left pending, queued or running", findings.open_jobs == 0),
    ]
    for name, ok in results:
        print(f"{name}: {'met' if ok else 'NOT met'}")
    return all(ok for _, ok in results[:2])


# --- main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=2, help="seeds (images) per job")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--kill-every", type=float, default=30, help="0: kill no worker")
    parser.add_argument("--dispatcher-at", type=float, default=10)
    parser.add_argument("--broker-at", type=float, default=25)
    parser.add_argument("--s3-at", type=float, default=40)
    parser.add_argument("--s3-outage", type=float, default=20)
    parser.add_argument("--database-at", type=float, default=70)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds for the whole run")
    parser.add_argument("--postgres-url", default=POSTGRES_URL, help="an admin connection")
    parser.add_argument("--keep", action="store_true", help="keep the database and the logs")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    # moto's server logs every request: the soak's own lines are what matter here.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="pixelmill-soak-"))
    print(f"soak: {args.jobs} jobs x {args.seeds} seeds; logs in {workdir}", flush=True)
    with services(args, workdir) as rig:
        spec = JobSpec(str(rig.values["model"]), seeds=tuple(range(1, args.seeds + 1)),
                       steps=args.steps, width=args.size, height=args.size)  # fmt: skip
        insert_jobs(rig.engine, [spec] * args.jobs)
        rig.workers = [
            WorkerProcess(rig.env(), "render", workdir / f"worker-{index}.log") for index in (0, 1)
        ]
        rig.start_dispatcher()
        started = time.monotonic()
        wait_for_first_image(rig, timeout=300)
        faults = run_faults(rig, args)
        settled = settle(rig, timeout=max(60.0, args.timeout - (time.monotonic() - started)))
        if not settled:
            print("the run did not settle in time: jobs are still open")
        ok = report(rig, faults, check(rig), time.monotonic() - started)
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The system's own cost per job in benchmarks/worker.py: the null model renders flat images
without compute, through the whole system, on the services' storage and on a local folder;
for S3, what the S3 server on the same cores takes alone."""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.worker_runs import NEGATIVE, produce_run, render_seconds, worker_settings
from benchmarks.worker_system import Services, system_seconds


@dataclass(frozen=True)
class Overhead:
    """The null model's cost per job on one storage backend (ms, wall clock), and for S3
    the floor the S3 server on the same cores puts under it (ms per job; None otherwise)."""

    storage: str
    per_job: float
    storage_floor: float | None


def null_overheads(args: Any, work: Path, services: Services) -> list[Overhead]:
    """The null model's overhead with the services' storage and, where that is S3, again
    with a local folder on the same database and broker: the two tell the system's own cost
    from the S3 server's on a machine that also hosts it."""
    found = [null_overhead(args, work, services)]
    if services.storage.get("storage") == "s3":
        local = {"storage": "local", "storage_dir": str(work / "null-images")}
        label = services.label.replace("moto S3", "local folder")
        found.append(
            null_overhead(
                args, work, Services(services.database_url, services.broker, local, label)
            )
        )
    return found


def null_overhead(args: Any, work: Path, services: Services) -> Overhead:
    """The system's own cost per job: the null model renders flat images without compute, so
    the time is the claim, heartbeat, PNG encoding, uploads, rows and done. Milliseconds per
    job, wall clock (everything on this machine's cores: the services too)."""
    jobs = args.jobs if args.null else args.null_jobs
    url = services.database_url
    tag = uuid.uuid4().hex[:6]
    warm_up = produce_run(url, work, f"null-warm-up-{tag}", "null", args, 1, negative=NEGATIVE)
    run = produce_run(url, work, f"null-bench-{tag}", "null", args, jobs, negative=NEGATIVE)
    settings = worker_settings(args, "null", services, work)
    seconds, cpu = system_seconds(settings, args, work, warm_up, run)
    per_job = seconds / jobs * 1000
    storage = services.storage.get("storage", "local")
    print(
        f"null model ({services.label}): {jobs} jobs x {args.seeds} seeds, "
        f"{jobs * args.seeds / seconds:.1f} images/s; of its pipeline calls "
        f"{render_seconds(url, run):.2f} s"
    )
    print(f"job overhead:        {per_job:8.1f} ms per job (wall clock)", flush=True)
    if cpu is not None:
        print(
            f"  the worker's processes used {cpu / jobs * 1000:.1f} ms CPU per job; the rest "
            "of the machine's time went to the services on the same cores"
        )
    floor = s3_floor(services, jobs, upload_workers()) if storage == "s3" else None
    return Overhead(storage, per_job, floor)


def s3_floor(services: Services, jobs: int, upload_workers: int) -> float:
    """What the S3 server alone takes per job: the objects stored per job (PNGs and
    thumbnails, the warm-up job's too) times one PUT of their mean size, timed from here
    against the same server, as many at a time as the worker sends them."""
    from pixelmill.settings import get_settings
    from pixelmill.storage import make_s3_client

    values = services.storage
    client = make_s3_client(get_settings(**values))  # the worker's own client and its config
    sizes = [
        entry["Size"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=values["s3_bucket"])
        for entry in page.get("Contents", [])
        if not entry["Key"].startswith("floor/")
    ]
    body = os.urandom(max(1, sum(sizes) // max(1, len(sizes))))
    puts = 64

    def put(index: int) -> None:
        client.put_object(Bucket=values["s3_bucket"], Key=f"floor/{index}", Body=body)

    # As many at a time as the worker's upload pool sends.
    with ThreadPoolExecutor(max_workers=upload_workers) as pool:
        started = time.perf_counter()
        list(pool.map(put, range(puts)))
        per_put = (time.perf_counter() - started) / puts * 1000
    objects = len(sizes) / (jobs + 1)
    print(
        f"  moto S3 on these cores: {per_put:.1f} ms per PUT of {len(body):,} B; "
        f"{objects:.0f} objects per job: {objects * per_put:.1f} ms per job of the server's "
        "time alone"
    )
    return objects * per_put


def upload_workers() -> int:
    from pixelmill.settings import Settings

    workers: int = Settings.model_fields["upload_workers"].default
    return workers


def print_overhead_goals(overheads: list[Overhead]) -> None:
    label = "  null overhead <= 10 ms per job (CPU machine"
    if not overheads:
        print(f"{label}): not measured here (--no-null)")
    for found in overheads:
        verdict = "met" if found.per_job <= 10 else "NOT met"
        floor = ""
        if found.storage_floor is not None:
            floor = f" (the S3 server on the same cores alone: {found.storage_floor:.1f} ms)"
        print(f"{label}, {found.storage} storage): {found.per_job:.1f} ms{floor}: {verdict}")

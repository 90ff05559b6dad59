"""Worker benchmark: the whole system against a bare diffusers loop, same images, same run.

Renders the same (prompt, seed) pairs (default 8 jobs x 4 seeds = 32) twice:

- ``bare``: one fresh process (a child of the benchmark, which also hosts the moto server and
  has the heap of the services' clients), the model loaded with
  ``DiffusionPipeline.from_pretrained``, a plain loop of pipeline calls (the worker's batch
  size, one generator per seed), PIL images out; once before and once after the system's run
  (their mean is the baseline, so a steady drift in a shared machine's load cancels out).
- ``system``: Postgres (a fresh database), the broker, a real Celery worker subprocess, a moto
  S3 server: the jobs are produced, dispatched, rendered, encoded, uploaded and recorded. The
  clock runs from the first dispatch to the last job ``done`` (the worker has already loaded
  its model and rendered a warm-up job, as the bare loop has).

It prints images/s for both and the ratio system/bare (target >= 0.95 where rendering
dominates). Scoring (``--scorer``, default the built-in tiny one): the system runs once more
with the scorer, and a fresh process renders the pairs through the worker's pipeline code and
scores each batch on the render device as the worker does, timing both per batch, so images/s
with and without scoring come from the same batches (goal: at most 3% slower). With
``--null`` the worker renders with ``PIXELMILL_MODEL=null`` (blank images, no
compute) and it prints the system's own overhead in ms per job instead.

    .venv/bin/python benchmarks/worker.py                      # tiny model, CPU, 128x128
    .venv/bin/python benchmarks/worker.py --null --jobs 64     # job overhead
    pixelmill model synthetic --arch sd15 --out /tmp/sd15
    .venv/bin/python benchmarks/worker.py --model /tmp/sd15 --size 512 --steps 25 --device cuda

``--embedded`` swaps the services for the embedded defaults (a SQLite database, kombu's
SQLAlchemy transport on SQLite, a local storage folder): for a GPU host that has no Postgres,
broker or S3 endpoint. The worker, dispatcher, encode/upload pool and rows are the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

TEMPLATES = """\
key: sku
defaults:
  model: {model}
  steps: {steps}
  width: {size}
  height: {size}
  guidance: 7.0
templates:
  studio:
    prompt: "product photo of a {{{{ colour }}}} {{{{ title }}}}, white background"
    negative_prompt: "lowres, blurry, watermark"
"""

TITLES = ["canvas sneaker", "leather tote", "desk lamp", "ceramic mug", "wool scarf", "armchair"]
COLOURS = ["red", "navy", "sage green", "cognac", "matte black", "ivory", "mustard"]


@dataclass(frozen=True)
class Pair:
    """What one pipeline call of the worker renders: one job's prompt and a batch of seeds."""

    prompt: str
    negative_prompt: str
    seeds: list[int]


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
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    bucket = "pixelmill-bench"
    boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)
    try:
        yield {
            "storage": "s3",
            "s3_bucket": bucket,
            "s3_endpoint_url": endpoint,
            "s3_region": "us-east-1",
            "s3_access_key_id": "testing",
            "s3_secret_access_key": "testing",
        }
    finally:
        server.stop()


def produce_run(database_url: str, work: Path, name: str, model: str, args: Any, jobs: int) -> int:
    """Write a catalogue of ``jobs`` items and produce them as run ``name``; its id."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from db.models import Run
    from producer.produce import produce

    catalogue = work / f"{name}.csv"
    lines = ["sku,title,colour"]
    for i in range(jobs):
        lines.append(f"{name}-{i:04d},{TITLES[i % len(TITLES)]},{COLOURS[i % len(COLOURS)]}")
    catalogue.write_text("\n".join(lines) + "\n", encoding="utf-8")
    templates = work / "templates.yaml"
    templates.write_text(TEMPLATES.format(model=model, steps=args.steps, size=args.size))
    engine = create_engine(database_url)
    with Session(engine) as session:
        report = produce(
            session,
            catalogue_path=catalogue,
            templates_path=templates,
            seeds=args.seeds,
            default_model=model,
            run_name=name,
        )
        if report.jobs_new != jobs:
            raise SystemExit(f"produce wrote {report.jobs_new} jobs, expected {jobs}")
        run = session.query(Run).filter_by(name=name).one()
        run_id = run.id
    engine.dispose()
    return run_id


def pairs_of(database_url: str, run_id: int, batch_size: int) -> list[Pair]:
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from db.models import Job

    engine = create_engine(database_url)
    with Session(engine) as session:
        jobs = session.scalars(select(Job).where(Job.run_id == run_id).order_by(Job.id)).all()
        pairs = [
            Pair(job.prompt, job.negative_prompt, list(job.seeds[i : i + batch_size]))
            for job in jobs
            for i in range(0, len(job.seeds), batch_size)
        ]
    engine.dispose()
    return pairs


def render_seconds(database_url: str, run_id: int) -> float:
    """The time the worker spent inside pipeline calls for the run (from its image rows)."""
    from sqlalchemy import create_engine, func, select

    from db.models import Image, Job

    engine = create_engine(database_url)
    with engine.connect() as conn:
        total = conn.scalar(
            select(func.sum(Image.render_seconds))
            .join(Job, Job.id == Image.job_id)
            .where(Job.run_id == run_id)
        )
    engine.dispose()
    return float(total or 0.0)


# --- bare ----------------------------------------------------------------------------------


def bare_images_per_second(model_dir: str, pairs: list[Pair], args: Any) -> float:
    """The same pairs through a plain loop of pipeline calls in this process."""
    import torch
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

    from worker.loading import default_dtype

    device = torch.device(args.device)
    kwargs: dict[str, Any] = {"dtype": default_dtype(device), "local_files_only": True}
    if not args.safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe: Any = DiffusionPipeline.from_pretrained(model_dir, **kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)

    def call(pipe: Any, pair: Pair) -> list[Any]:
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in pair.seeds]
        count = len(pair.seeds)
        images: list[Any] = pipe(
            prompt=[pair.prompt] * count,
            negative_prompt=[pair.negative_prompt] * count if pair.negative_prompt else None,
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            width=args.size,
            height=args.size,
            generator=generators,
            output_type="pil",
        ).images
        return images

    # First-call costs (allocations, kernel and algorithm choices per batch shape) are not
    # the loop's: warm up with a full batch, as the system's warm-up job does.
    call(pipe, Pair("warm-up", pairs[0].negative_prompt, [0] * len(pairs[0].seeds)))
    synchronize(device)
    started = time.perf_counter()
    rendered = sum(len(call(pipe, pair)) for pair in pairs)
    synchronize(device)
    seconds = time.perf_counter() - started
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rendered / seconds


def scored_images_per_second(model_dir: str, pairs: list[Pair], args: Any) -> list[float]:
    """Images/s of the worker's render loop without and with scoring, from the same batches:
    each is rendered (worker.pipeline.render_batch, tensors on the device) and then scored as
    the worker scores it (the prompt's embedding cached, one transfer back per batch)."""
    import torch

    from pixelmill.settings import get_settings
    from worker.loading import PipelineCache
    from worker.pipeline import RenderParams, render_batch
    from worker.scoring.configured import scorer_from_settings

    device = torch.device(args.device)
    pipe = PipelineCache(device=device, safety_checker=args.safety_checker).get(model_dir)
    settings = get_settings(scorer=args.scorer, device=args.device, data_dir=args.data_dir)
    scorer = scorer_from_settings(settings)
    assert scorer is not None

    def render_and_score(pair: Pair) -> tuple[float, float]:
        params = RenderParams(
            prompt=pair.prompt, negative_prompt=pair.negative_prompt, steps=args.steps,
            guidance=7.0, width=args.size, height=args.size,
        )  # fmt: skip
        started = time.perf_counter()
        rendered = render_batch(pipe, params, pair.seeds)
        synchronize(device)
        rendered_at = time.perf_counter()
        pixels = torch.stack([image.pixels for image in rendered if image.pixels is not None])
        scorer.score_against(pixels, pair.prompt, None)  # returns on the CPU: synchronised
        return rendered_at - started, time.perf_counter() - rendered_at

    render_and_score(Pair("warm-up", pairs[0].negative_prompt, [0] * len(pairs[0].seeds)))
    times = [render_and_score(pair) for pair in pairs]
    images = sum(len(pair.seeds) for pair in pairs)
    rendering = sum(render for render, _ in times)
    return [images / rendering, images / (rendering + sum(score for _, score in times))]


def in_child(mode: str, model_dir: str, pairs: list[Pair], args: Any, work: Path) -> list[float]:
    """:func:`bare_images_per_second` (``--bare-child``) or :func:`scored_images_per_second`
    (``--score-child``) in a fresh process of its own, as the worker's child is: measured in
    this process the loop was 5-10% slower (on a 2-core machine) than in a clean one, which
    flattered the system's ratio."""
    pairs_path = work / "pairs.json"
    pairs_path.write_text(json.dumps([vars(pair) for pair in pairs]))
    command = [
        sys.executable, __file__, mode, str(pairs_path), "--model", model_dir,
        "--size", str(args.size), "--steps", str(args.steps), "--device", args.device,
        "--threads", str(args.threads), "--scorer", args.scorer,
        "--data-dir", str(work / "data"),
        "--safety-checker" if args.safety_checker else "--no-safety-checker",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stdout}\n{done.stderr[-4000:]}")
    return [float(value) for value in done.stdout.split()[-1].split(",")]


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- system --------------------------------------------------------------------------------


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
        """Dispatch the run's jobs (topping up the window, as ``dispatch --watch`` does) and
        wait until every one is done; the seconds from the first dispatch to the last job's
        ``finished_at``. (Polling is slow, as the real dispatcher's is: on a small machine its
        queries would take CPU from the render; the end time comes from the rows.)"""
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
                        window=self.settings.dispatch_window,
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

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers folder (default: the tiny random model)")
    parser.add_argument("--null", action="store_true", help="PIXELMILL_MODEL=null: job overhead")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per job")
    # The tiny model at 128x128, 20 steps: rendering dominates on a CPU, as it does for a real
    # model on a GPU (at 64x64, 8 steps a 2-core machine's PNG encoding and services compete
    # with the render for the same cores).
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4, help="PIXELMILL_RENDER_BATCH_SIZE")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--safety-checker", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14")
    parser.add_argument(
        "--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="SQLite database, SQLAlchemy-transport broker and local storage (no services)",
    )
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument(
        "--scorer", default="tiny", help="PIXELMILL_SCORER for the scoring figures (tiny)"
    )
    parser.add_argument("--bare-child", metavar="PAIRS_JSON", help=argparse.SUPPRESS)
    parser.add_argument("--score-child", metavar="PAIRS_JSON", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default="var", help=argparse.SUPPRESS)
    return parser.parse_args()


@dataclass(frozen=True)
class Services:
    """Where the system's run keeps its rows, its messages and its images."""

    database_url: str
    broker: str
    storage: dict[str, str]  # the storage settings
    label: str


def the_model(args: Any, work: Path) -> str:
    if args.null:
        return "null"
    if args.model:
        return str(Path(args.model).resolve())
    from worker.tiny_model import build_tiny_pipeline

    return str(build_tiny_pipeline(work / "tiny-model"))


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


def worker_settings(args: Any, model: str, services: Services, work: Path) -> dict[str, str]:
    return {
        "database_url": services.database_url,
        "broker_url": services.broker,
        "render_queue": f"bench-{uuid.uuid4().hex[:8]}",
        "model": model,
        "device": args.device,
        "data_dir": str(work / "data"),
        "render_batch_size": str(args.batch_size),
        "safety_checker": str(args.safety_checker).lower(),
        **services.storage,
    }


def benchmark(args: Any, work: Path, model: str, services: Services) -> None:
    """The bare loop, the system (without, then with scoring), the bare loop again (unless
    --null), the scoring loop; prints the figures."""
    database_url = services.database_url
    warm_up = produce_run(database_url, work, "warm-up", model, args, jobs=1)
    run_id = produce_run(database_url, work, "bench", model, args, jobs=args.jobs)
    scored_warm_up = produce_run(database_url, work, "warm-up-scored", model, args, jobs=1)
    scored_run = produce_run(database_url, work, "scored", model, args, jobs=args.jobs)
    images = args.jobs * args.seeds
    print(
        f"{args.jobs} jobs x {args.seeds} seeds = {images} images, model {model}, "
        f"{args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}, "
        f"device {args.device}, threads {args.threads or 'default'}, "
        f"services {services.label}",
        flush=True,
    )
    bare: list[float] = []
    pairs = pairs_of(database_url, run_id, args.batch_size)
    if not args.null:
        bare.append(in_child("--bare-child", model, pairs, args, work)[0])
        print(f"bare diffusers loop: {bare[-1]:8.3f} images/s", flush=True)
    settings = worker_settings(args, model, services, work)
    seconds = system_seconds(settings, args, work, warm_up, run_id)
    rate = images / seconds
    print(f"system:              {rate:8.3f} images/s ({seconds:.2f} s)", flush=True)
    rendering = render_seconds(database_url, run_id)
    print(f"  of which the pipeline calls: {rendering:.2f} s (the worker's render_seconds)")
    if args.null:
        print(f"job overhead:        {seconds / args.jobs * 1000:8.1f} ms per job")
        return
    scored = {**settings, "scorer": args.scorer}
    scored_rate = images / system_seconds(scored, args, work, scored_warm_up, scored_run)
    print(
        f"system, scoring:     {scored_rate:8.3f} images/s ({args.scorer} scorer: "
        f"{scored_rate / rate - 1:+.1%} images/s in one run of each; the paired loop below "
        "measures scoring without the run-to-run noise)"
    )
    # The bare loop again, after: on a shared machine the load drifts during a run, and
    # the mean of a run before and one after the system's cancels a steady drift.
    bare.append(in_child("--bare-child", model, pairs, args, work)[0])
    print(f"bare diffusers loop: {bare[-1]:8.3f} images/s (again, after)", flush=True)
    mean = sum(bare) / len(bare)
    print(f"ratio system/bare:   {rate / mean:8.3f}  (target >= 0.95; bare = mean of both)")
    plain, with_scores = in_child("--score-child", model, pairs, args, work)
    slower = 1 - with_scores / plain
    print(f"render loop: {plain:.3f} images/s unscored, {with_scores:.3f} scored (same batches)")
    verdict = "met" if slower <= 0.03 else "NOT met"
    print(f"scoring ({args.scorer}, {args.device}): {slower:.2%} slower (goal <= 3%): {verdict}")
    print("scoring (ViT-L/14, GPU): not measured here (no GPU; on one: --device cuda --scorer "
          "openai/clip-vit-large-patch14 with a real model)")  # fmt: skip


def system_seconds(values: dict[str, str], args: Any, work: Path, warm_up: int, run: int) -> float:
    """A worker subprocess renders the warm-up run (model loaded, first job rendered), then
    ``run``: the seconds of the latter."""
    system = System(values, args, work / f"worker-{run}.log")
    try:
        system.run(warm_up, timeout=args.timeout)
        return system.run(run, timeout=args.timeout)
    finally:
        system.stop()


def main() -> int:
    args = parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.bare_child or args.score_child:
        pairs_path = Path(args.bare_child or args.score_child)
        pairs = [Pair(**pair) for pair in json.loads(pairs_path.read_text())]
        if args.bare_child:
            print(bare_images_per_second(args.model, pairs, args))
        else:
            print(",".join(str(rate) for rate in scored_images_per_second(args.model, pairs, args)))
        return 0

    from pixelmill.logs import configure_logging

    configure_logging("WARNING")
    # moto's server logs every request through werkzeug.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pixelmill-bench-")))
        model = the_model(args, work)
        benchmark(args, work, model, start_services(stack, args, work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

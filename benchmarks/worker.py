"""Worker benchmark: the whole system against bare diffusers loops, same images, same run.

For each model family (``--families``, default sd15, sdxl, sd3, flux: their tiny random
models; with ``--model DIR`` the one family that model is), the same (prompt, seed) pairs
(default 8 jobs x 4 seeds = 32) render:

- ``bare``: in one fresh process (a child of the benchmark, which also hosts the moto server
  and has the heap of the services' clients), the model loaded by the worker's own
  ``worker.loading.load_pipeline`` (its dtype and from_pretrained keyword), a plain loop of
  pipeline calls (the worker's batch size, one generator per seed), PIL images out: first
  with the plain defaults, then with the fast path the worker would use for the model
  (``worker.fast_path``, from the same settings); once before and once after the system's run
  (their mean is the baseline, so a steady drift in a shared machine's load cancels out).
- ``system``: Postgres (a fresh database), the broker, a real Celery worker subprocess, a moto
  S3 server: the jobs are produced, dispatched, rendered, encoded, uploaded and recorded. The
  clock runs from the first dispatch to the last job ``done`` (the worker has already loaded
  its model and rendered a warm-up job, as the bare loop has).

It prints images/s for each and the ratios system/bare-fast (the system's cost) and
fast/default (the fast path's gain). Scoring (``--scorer``, default the built-in tiny one),
for the first family: the system runs once more with the scorer, and a fresh process renders
the pairs through the worker's pipeline code and scores each batch as the worker does, so
images/s with and without scoring come from the same batches (goal: at most 3% slower).
Then the null model (``PIXELMILL_MODEL=null``: blank images, no compute, ``--null-jobs``)
gives the system's own overhead in ms per job (wall clock, and the CPU its worker processes
used). ``--null`` runs only that; ``--no-null`` skips it. Last, the goals, each line ending
``met``, ``NOT met`` or ``not measured here``.

    .venv/bin/python benchmarks/worker.py                      # tiny models, CPU, 128x128
    .venv/bin/python benchmarks/worker.py --null --jobs 64     # job overhead only
    pixelmill model synthetic --arch sd15 --out /tmp/sd15
    .venv/bin/python benchmarks/worker.py --model /tmp/sd15 --families sd15 --size 512 \
        --steps 25 --device cuda

``--embedded`` swaps the services for the embedded defaults (a SQLite database, kombu's
SQLAlchemy transport on SQLite, a local storage folder): for a GPU host that has no Postgres,
broker or S3 endpoint. The worker, dispatcher, encode/upload pool and rows are the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.worker_overhead import (  # noqa: E402
    Overhead,
    null_overheads,
    print_overhead_goals,
)
from benchmarks.worker_runs import (  # noqa: E402
    NEGATIVE,
    produce_run,
    render_seconds,
    worker_settings,
)
from benchmarks.worker_system import Services, start_services, system_seconds  # noqa: E402

# Each family's tiny random model (worker.tiny_model.build_tiny's arch) on a CPU machine.
FAMILIES = {"sd15": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}


@dataclass(frozen=True)
class Pair:
    """What one pipeline call of the worker renders: one job's prompt and a batch of seeds."""

    prompt: str
    negative_prompt: str
    seeds: list[int]


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


# --- bare ----------------------------------------------------------------------------------


def bare_images_per_second(model_dir: str, pairs: list[Pair], args: Any) -> list[float]:
    """The same pairs through a plain loop of pipeline calls in this process: images/s with the
    plain defaults, then with the worker's fast path (NaN where this tree has none). The model
    is loaded by the worker's own function (worker.loading.load_pipeline: its dtype per device
    and family, and the from_pretrained keyword this diffusers takes for it), so both loops
    render in the precision the system renders in."""
    import torch

    from worker.loading import load_pipeline

    device = torch.device(args.device)
    pipe: Any = load_pipeline(model_dir, device=device, safety_checker=args.safety_checker)
    default = _bare_loop(pipe, pairs, args, device)
    fast_path = _worker_fast_path(model_dir, device)
    if fast_path is None:
        return [default, float("nan")]
    from worker.fast_path import applied_fast_path

    with applied_fast_path(pipe, fast_path):
        fast = _bare_loop(pipe, pairs, args, device)
    return [default, fast]


def _worker_fast_path(model_dir: str, device: Any) -> Any:
    """The fast path the system's worker renders a plain job of ``model_dir`` with (its
    settings come through the environment), or None without worker.fast_path."""
    try:
        from worker.fast_path import job_fast_path
    except ImportError:
        return None
    from db.job_options import JobOptions
    from pixelmill.settings import get_settings

    return job_fast_path(get_settings(), model_dir, JobOptions(), device)


def _bare_loop(pipe: Any, pairs: list[Pair], args: Any, device: Any) -> float:
    import torch

    def call(pair: Pair) -> list[Any]:
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

    # First-call costs (allocations, kernel and algorithm choices per batch shape, a
    # compile) are not the loop's: warm up with a full batch, as the system's warm-up job does.
    call(Pair("warm-up", pairs[0].negative_prompt, [0] * len(pairs[0].seeds)))
    synchronize(device)
    started = time.perf_counter()
    rendered = sum(len(call(pair)) for pair in pairs)
    synchronize(device)
    seconds = time.perf_counter() - started
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


def in_child(
    mode: str,
    model_dir: str,
    pairs: list[Pair],
    args: Any,
    work: Path,
    settings: dict[str, str] | None = None,
) -> list[float]:
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
    # The worker's settings (its fast path) through the environment, as the worker gets them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELMILL_")}
    env.update({f"PIXELMILL_{key.upper()}": value for key, value in (settings or {}).items()})
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stdout}\n{done.stderr[-4000:]}")
    return [float(value) for value in done.stdout.split()[-1].split(",")]


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- system --------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers folder (default: each family's tiny model)")
    parser.add_argument(
        "--families",
        default=",".join(FAMILIES),
        help="families to render, comma-separated (with --model: the one it belongs to)",
    )
    parser.add_argument("--null", action="store_true", help="only the job overhead (null model)")
    parser.add_argument("--null-jobs", type=int, default=64, help="jobs of the overhead run")
    parser.add_argument("--no-null", action="store_true", help="skip the overhead run")
    parser.add_argument("--jobs", type=int, default=8, help="jobs per run (with --null: its)")
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


def the_model(args: Any, work: Path, family: str) -> str:
    if args.model:
        return str(Path(args.model).resolve())
    from worker.tiny_model import build_tiny

    return str(build_tiny(work / f"tiny-{family}", arch=FAMILIES[family]))


@dataclass(frozen=True)
class FamilyRates:
    """One family's images/s: through the system, and the bare loops (means of before and
    after the system's run)."""

    system: float
    bare_default: float
    bare_fast: float  # NaN: no fast path in this tree


def benchmark(args: Any, work: Path, services: Services) -> None:
    """Each family (bare loops, the system, the bare loops again; scoring for the first),
    then the null model's overhead; then the goals."""
    runs = "the null model only" if args.null else f"{args.jobs * args.seeds} images per family"
    print(
        f"{args.jobs} jobs x {args.seeds} seeds ({runs}), {args.size}x{args.size}, "
        f"{args.steps} steps, batch {args.batch_size}, device {args.device} "
        f"({device_name(args.device)}), threads {args.threads or 'default'}, "
        f"{os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f}), services {services.label}",
        flush=True,
    )
    rates: dict[str, FamilyRates] = {}
    families = [] if args.null else [f.strip() for f in args.families.split(",") if f.strip()]
    for index, family in enumerate(families):
        model = the_model(args, work, family)
        rates[family] = benchmark_family(args, work, family, model, services, score=index == 0)
    overheads = [] if args.no_null else null_overheads(args, work, services)
    print_goals(args, rates, overheads)


def benchmark_family(
    args: Any, work: Path, family: str, model: str, services: Services, *, score: bool
) -> FamilyRates:
    database_url = services.database_url
    negative = "" if family == "flux" else NEGATIVE  # FLUX.1 takes no negative prompt
    runs = [
        produce_run(database_url, work, f"{family}-{name}", model, args, jobs, negative=negative)
        for name, jobs in (("warm-up", 1), ("bench", args.jobs))
    ]
    pairs = pairs_of(database_url, runs[1], args.batch_size)
    settings = worker_settings(args, model, services, work)
    bare = [in_child("--bare-child", model, pairs, args, work, settings)]
    print(
        f"[{family}] bare loop:   {bare[0][0]:8.3f} images/s default, {bare[0][1]:8.3f} fast path",
        flush=True,
    )
    seconds, _ = system_seconds(settings, args, work, runs[0], runs[1])
    rate = args.jobs * args.seeds / seconds
    rendering = render_seconds(database_url, runs[1])
    print(
        f"[{family}] system:      {rate:8.3f} images/s ({seconds:.2f} s, of which the "
        f"pipeline calls {rendering:.2f} s)",
        flush=True,
    )
    # Again after: on a shared machine the load drifts, and the mean of a run before and
    # one after the system's cancels a steady drift.
    bare.append(in_child("--bare-child", model, pairs, args, work, settings))
    print(
        f"[{family}] bare again:  {bare[1][0]:8.3f} images/s default, {bare[1][1]:8.3f} fast path",
        flush=True,
    )
    default = (bare[0][0] + bare[1][0]) / 2
    fast = (bare[0][1] + bare[1][1]) / 2
    print(
        f"[{family}] ratio system/bare-fast {rate / fast:.3f}, system/bare-default "
        f"{rate / default:.3f}, fast/default {fast / default:.3f} (bare: mean of both)"
    )
    if score:
        scoring_figures(args, work, family, model, services, settings, pairs, rate)
    return FamilyRates(rate, default, fast)


def scoring_figures(
    args: Any,
    work: Path,
    family: str,
    model: str,
    services: Services,
    settings: dict[str, str],
    pairs: list[Pair],
    rate: float,
) -> None:
    """The system with the scorer (one run) and the paired render loop with and without it."""
    url = services.database_url
    warm_up = produce_run(url, work, f"{family}-warm-up-scored", model, args, 1, negative=NEGATIVE)
    run = produce_run(url, work, f"{family}-scored", model, args, args.jobs, negative=NEGATIVE)
    seconds, _ = system_seconds({**settings, "scorer": args.scorer}, args, work, warm_up, run)
    scored_rate = args.jobs * args.seeds / seconds
    print(
        f"[{family}] system, scoring: {scored_rate:8.3f} images/s ({args.scorer} scorer: "
        f"{scored_rate / rate - 1:+.1%} images/s in one run of each; the paired loop below "
        "measures scoring without the run-to-run noise)"
    )
    plain, with_scores = in_child("--score-child", model, pairs, args, work)
    slower = 1 - with_scores / plain
    print(f"render loop: {plain:.3f} images/s unscored, {with_scores:.3f} scored (same batches)")
    verdict = "met" if slower <= 0.03 else "NOT met"
    print(f"scoring ({args.scorer}, {args.device}): {slower:.2%} slower (goal <= 3%): {verdict}")
    if not args.device.startswith("cuda"):
        print(
            "scoring (ViT-L/14, GPU): not measured here (no GPU; on one: --device cuda "
            "--scorer DIR, a real CLIP ViT-L/14 or `pixelmill model synthetic --arch "
            "clip-vit-l14`)"
        )


def device_name(device: str) -> str:
    if not device.startswith("cuda"):
        return "CPU"
    import torch

    return str(torch.cuda.get_device_name(torch.device(device)))


def print_goals(args: Any, rates: dict[str, FamilyRates], overheads: list[Overhead]) -> None:
    print("goals:")
    card = device_name(args.device)
    for family, size, steps, target in (("sd15", 512, 25, 8.0), ("sdxl", 1024, 30, 1.2)):
        label = f"  {family} {size}x{size} {steps} steps >= {target} images/s per H100:"
        found = rates.get(family)
        if found is None or "H100" not in card or not args.model:
            needs = "this family not run" if args.model else "needs a full-size model: --model"
            print(f"{label} not measured here ({card}; {needs})")
        elif (args.size, args.steps) != (size, steps):
            print(f"{label} not measured here (ran {args.size}x{args.size}, {args.steps} steps)")
        else:
            verdict = "met" if found.system >= target else "NOT met"
            print(f"{label} {found.system:.2f} on {card}: {verdict}")
    ratios = {f: r.system / r.bare_fast for f, r in rates.items() if r.bare_fast == r.bare_fast}
    label = "  system/bare-fast >= 0.97:"
    if not ratios:
        print(f"{label} not measured here (no family run, or no fast path in this tree)")
    else:
        listed = ", ".join(f"{f} {ratio:.3f}" for f, ratio in ratios.items())
        verdict = "met" if min(ratios.values()) >= 0.97 else "NOT met"
        print(f"{label} {listed} ({card}{', tiny models' if not args.model else ''}): {verdict}")
    print_overhead_goals(overheads)


def main() -> int:
    args = parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.bare_child or args.score_child:
        pairs_path = Path(args.bare_child or args.score_child)
        pairs = [Pair(**pair) for pair in json.loads(pairs_path.read_text())]
        if args.bare_child:
            print(",".join(str(rate) for rate in bare_images_per_second(args.model, pairs, args)))
        else:
            print(",".join(str(rate) for rate in scored_images_per_second(args.model, pairs, args)))
        return 0

    from pixelmill.logs import configure_logging

    configure_logging("WARNING")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pixelmill-bench-")))
        benchmark(args, work, start_services(stack, args, work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

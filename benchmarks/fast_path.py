"""Fast-path benchmark: each option's effect on pixels and CLIP score, its speed, and the
compile cache's warm start.

For each fast-path option it renders the same seeds as the plain render (the worker's
pipeline code, worker.pipeline.render_batch) and prints the largest and mean pixel
difference (8-bit levels) and the mean absolute CLIP-score difference (the worker's scorer,
worker.scoring: a local CLIP folder with --scorer, else the built-in tiny random one), then
images/s against the plain render measured in the same run. With --warm-start it compiles
the denoiser and VAE decoder in two fresh processes sharing one cache folder and prints the
first compiled render's seconds, cold and warm.

    .venv/bin/python benchmarks/fast_path.py                      # tiny model, CPU, 64x64
    .venv/bin/python benchmarks/fast_path.py --compile --warm-start
    .venv/bin/python benchmarks/fast_path.py --model /tmp/sd15 --size 512 --steps 25 \\
        --device cuda --scorer /models/clip-vit-l-14 --compile

On CPU the speed lines end ``not measured here``: the GPU figures the fast path is for stay
open until a GPU runs this.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.fast_path import EXACT_TOLERANCE, PLAIN, FastPath  # noqa: E402
from worker.fp8 import fp8_unavailable  # noqa: E402
from worker.loading import default_dtype, load_pipeline  # noqa: E402
from worker.pipeline import RenderParams, render_batch  # noqa: E402

PROMPTS = ("a ceramic teapot, studio lighting", "a red sneaker on a marble table")


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a diffusers folder (default: the tiny model, built)")
    parser.add_argument("--scorer", help="a CLIP folder (default: the tiny random one, built)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="include torch.compile (slow)")
    parser.add_argument("--mode", default="default", help="torch.compile mode for --compile")
    parser.add_argument("--warm-start", action="store_true")
    parser.add_argument("--child-compile", help=argparse.SUPPRESS)  # a cache folder
    return parser.parse_args(argv)


def _tiny(kind: str, work: pathlib.Path) -> str:
    if kind == "model":
        from worker.tiny_model import build_tiny_pipeline

        return str(build_tiny_pipeline(work / "tiny-sd"))
    from worker.scoring.tiny import build_tiny_scorer

    return str(build_tiny_scorer(work / "tiny-scorer"))


def _variants(args: argparse.Namespace) -> list[tuple[str, FastPath]]:
    variants = [
        ("channels_last", FastPath(channels_last=True)),
        ("fuse_qkv", FastPath(fuse_qkv=True)),
        ("channels_last+fuse_qkv", FastPath(channels_last=True, fuse_qkv=True)),
        ("deepcache interval 2", FastPath(deepcache_interval=2)),
        ("deepcache interval 3", FastPath(deepcache_interval=3)),
    ]
    if args.compile:
        cache = pathlib.Path(tempfile.mkdtemp(prefix="pixelmill-compile-"))
        variants.append(
            (
                f"compile {args.mode} (+channels_last+fuse_qkv)",
                FastPath(True, True, args.mode, compile_vae=True, cache_dir=cache),
            )
        )
    return variants


@dataclasses.dataclass
class _Render:
    pixels: np.ndarray  # (N, H, W, 3) int16
    tensors: torch.Tensor  # (N, 3, H, W) in [0, 1]
    seconds: float


def _render(pipe: Any, params: RenderParams, seeds: list[int], repeats: int = 1) -> _Render:
    rendered: list[Any] = []
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        rendered = render_batch(pipe, params, seeds)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return _Render(
        np.stack([np.asarray(r.image, dtype=np.int16) for r in rendered]),
        torch.stack([r.pixels for r in rendered]).float(),
        best,
    )


def _clip_scores(scorer: Any, render: _Render, prompt: str) -> np.ndarray:
    return np.array([score.clip_score for score in scorer.score(render.tensors, prompt)])


def _quality(args: argparse.Namespace, pipe: Any, scorer: Any) -> None:
    seeds = list(range(1, args.seeds + 1))
    base = RenderParams(
        prompt=PROMPTS[0],
        negative_prompt="blurry",
        steps=args.steps,
        guidance=7.0,
        width=args.size,
        height=args.size,
        scheduler="ddim",
    )
    gpu = pipe.device.type == "cuda"
    print(f"device {pipe.device}, {args.size}x{args.size}, {args.steps} steps, {len(seeds)} seeds")
    print("option | max px diff | mean px diff | mean |CLIP diff| | images/s | vs plain | exact")
    for prompt in PROMPTS[:1]:
        params = dataclasses.replace(base, prompt=prompt)
        _render(pipe, params, seeds)  # warm-up
        plain = _render(pipe, params, seeds, repeats=2)
        plain_clip = _clip_scores(scorer, plain, prompt)
        plain_rate = len(seeds) / plain.seconds
        print(f"plain | 0 | 0 | 0 | {plain_rate:.2f} | 1.00 | -")
        for name, fast in _variants(args):
            chosen = dataclasses.replace(params, fast_path=fast)
            _render(pipe, chosen, seeds)  # warm-up (and compile)
            out = _render(pipe, chosen, seeds, repeats=2)
            diff = np.abs(out.pixels - plain.pixels)
            clip = np.abs(_clip_scores(scorer, out, prompt) - plain_clip).mean()
            rate = len(seeds) / out.seconds
            exact = "yes" if diff.max() <= EXACT_TOLERANCE else "no (approximate)"
            print(
                f"{name} | {diff.max()} | {diff.mean():.3f} | {clip:.5f} | {rate:.2f} | "
                f"{rate / plain_rate:.2f} | {exact}"
            )
        render_batch(pipe, dataclasses.replace(params, fast_path=PLAIN), seeds[:1])
    reason = fp8_unavailable(pipe.device)
    print(f"fp8 | {'not measured here: ' + reason if reason else 'run with --device cuda on H100'}")
    speed = "measured above" if gpu else "not measured here"
    print(f"fast path images/s on a GPU (fp16): {speed}")


def _child_compile(folder: str, model: str, size: int) -> None:
    """In a fresh process: the first compiled render's seconds, as JSON."""
    warnings.simplefilter("ignore")
    pipe = load_pipeline(model, device=torch.device("cpu"), safety_checker=False)
    fast = FastPath(compile="default", compile_vae=True, cache_dir=pathlib.Path(folder))
    params = RenderParams(
        prompt=PROMPTS[0],
        negative_prompt="",
        steps=2,
        guidance=7.0,
        width=size,
        height=size,
        fast_path=fast,
    )
    started = time.perf_counter()
    render_batch(pipe, params, [1])
    first = time.perf_counter() - started
    started = time.perf_counter()
    render_batch(pipe, params, [1])
    print(json.dumps({"first": first, "second": time.perf_counter() - started}))


def _warm_start(model: str, size: int) -> None:
    folder = tempfile.mkdtemp(prefix="pixelmill-compile-cache-")
    runs = []
    for label in ("cold", "warm"):
        output = (
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child-compile",
                    folder,
                    "--model",
                    model,
                    "--size",
                    str(size),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        runs.append(json.loads(output))
        print(
            f"compile {label}: first render {runs[-1]['first']:.1f} s, "
            f"then {runs[-1]['second']:.2f} s"
        )
    ratio = runs[0]["first"] / runs[1]["first"]
    print(f"warm start: first compiled render {ratio:.1f}x faster with the disk cache")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    work = pathlib.Path(tempfile.mkdtemp(prefix="pixelmill-fast-path-"))
    model = args.model or _tiny("model", work)
    if args.child_compile:
        _child_compile(args.child_compile, model, args.size)
        return 0
    from worker.scoring.scorer import load_scorer

    device = torch.device(args.device)
    pipe = load_pipeline(model, device=device, safety_checker=False)
    scorer = load_scorer(
        args.scorer or _tiny("scorer", work), device=device, dtype=default_dtype(device)
    )
    _quality(args, pipe, scorer)
    if args.warm_start:
        _warm_start(model, args.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

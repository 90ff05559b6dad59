"""`pixelmill model ...`: models written from code, for tests, the demo and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import EXIT_BAD_INPUT, console, fail

app = typer.Typer(help="Models.", no_args_is_help=True)


@app.command("tiny")
def model_tiny(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the model to.")],
    arch: Annotated[str, typer.Option("--arch", help="Architecture: sd or sdxl.")] = "sd",
) -> None:
    """Write a tiny random Stable Diffusion (or SDXL) pipeline (for tests and the demo)."""
    from worker.tiny_model import ARCHITECTURES, build_tiny

    if arch not in ARCHITECTURES:
        fail(f"--arch: unknown architecture {arch!r}; known: sd, sdxl", EXIT_BAD_INPUT)
    path = build_tiny(out, arch=arch)
    console.print(f"tiny {arch} model written to {path}")


@app.command("synthetic")
def model_synthetic(
    arch: Annotated[str, typer.Option("--arch", help="Architecture: sd15 or sdxl.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the model to.")],
    dtype: Annotated[str, typer.Option("--dtype", help="Weights: fp16, bf16 or fp32.")] = "fp16",
    seed: Annotated[
        int, typer.Option(min=0, max=2**32 - 1, help="Seed of the random weights.")
    ] = 0,
) -> None:
    """Write a full-size SD 1.5 or SDXL pipeline with random weights (for GPU benchmarks)."""
    from worker.synthetic_model import ARCHES, build_synthetic_pipeline, parse_dtype

    known = next((name for name in ARCHES if name == arch), None)
    if known is None:
        fail(f"--arch: unknown architecture {arch!r}; known: sd15, sdxl", EXIT_BAD_INPUT)
    try:
        path = build_synthetic_pipeline(out, arch=known, dtype=parse_dtype(dtype), seed=seed)
    except (ValueError, OSError) as exc:
        # An unknown --dtype, or an --out folder that is in use or on a disk too small.
        fail(str(exc), EXIT_BAD_INPUT)
    console.print(f"synthetic {arch} model written to {path}")

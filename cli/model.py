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
    arch: Annotated[
        str,
        typer.Option(
            "--arch", help="Architecture: sd, sdxl, sd3, flux (FLUX.1-dev) or flux-schnell."
        ),
    ] = "sd",
) -> None:
    """Write a tiny random SD, SDXL, SD3 or FLUX.1 pipeline (for tests and the demo)."""
    from worker.tiny_model import ARCHITECTURES, build_tiny

    if arch not in ARCHITECTURES:
        fail(
            f"--arch: unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}",
            EXIT_BAD_INPUT,
        )
    path = build_tiny(out, arch=arch)
    console.print(f"tiny {arch} model written to {path}")


@app.command("synthetic")
def model_synthetic(
    arch: Annotated[
        str,
        typer.Option(
            "--arch",
            help="Architecture: sd15, sdxl, sd35 (SD3.5 Large), sd35-medium, flux-dev, "
            "flux-schnell, or clip-vit-l14 (a scorer: PIXELMILL_SCORER).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the model to.")],
    dtype: Annotated[
        str, typer.Option("--dtype", help="Weights: fp16, bf16 or fp32 (SD3.5 and FLUX: bf16).")
    ] = "",
    seed: Annotated[
        int, typer.Option(min=0, max=2**32 - 1, help="Seed of the random weights.")
    ] = 0,
) -> None:
    """Write a full-size pipeline with random weights (for GPU benchmarks without a download):
    the released architectures of SD 1.5, SDXL, SD3.5 (Large, Medium) and FLUX.1 (dev,
    schnell), text encoders included; or the CLIP ViT-L/14 scorer with an aesthetic head."""
    from worker.scoring.synthetic import SCORER_ARCH, build_synthetic_scorer
    from worker.synthetic_model import (
        ARCHES,
        FAMILY_ARCHES,
        build_synthetic_pipeline,
        parse_dtype,
    )

    known = next((name for name in (*ARCHES, SCORER_ARCH) if name == arch), None)
    if known is None:
        names = ", ".join((*ARCHES, SCORER_ARCH))
        fail(f"--arch: unknown architecture {arch!r}; known: {names}", EXIT_BAD_INPUT)
    # The released precision: fp16 for SD 1.5/SDXL and CLIP, bf16 for SD3.5 and FLUX.1.
    dtype = dtype or ("bf16" if known in FAMILY_ARCHES else "fp16")
    try:
        if known == SCORER_ARCH:
            path = build_synthetic_scorer(out, dtype=parse_dtype(dtype), seed=seed)
        else:
            pipeline_arch = next(name for name in ARCHES if name == known)
            path = build_synthetic_pipeline(
                out, arch=pipeline_arch, dtype=parse_dtype(dtype), seed=seed
            )
    except (ValueError, OSError) as exc:
        # An unknown --dtype, or an --out folder that is in use or on a disk too small.
        fail(str(exc), EXIT_BAD_INPUT)
    console.print(f"synthetic {arch} model written to {path}")

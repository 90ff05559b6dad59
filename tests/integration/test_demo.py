"""The README's promise: `pixelmill demo` runs the nightly job on embedded defaults (SQLite,
a local folder, a real Celery worker on kombu's SQLAlchemy transport, the tiny model)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image as PILImage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NOISE = (
    "Traceback",
    "Warning",  # SecurityWarning (a worker as root), FutureWarning, ...
    "[transformers]",
    "requires torchvision",
    "Loading weights",
    "Writing model shards",
    "[queues]",  # Celery's banner
    "Warm shutdown",
)


# The demo catalogue, and the product-photo one (img2img, inpaint, ControlNet on the tiny
# model and the built-in tiny ControlNet): both README examples run as they are.
@pytest.mark.parametrize("examples", ["examples", "examples/product-scenes"])
def test_demo_on_embedded_defaults(tmp_path: Path, examples: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELMILL_")}
    result = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--examples", str(REPO / examples)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    data = tmp_path / "var"
    assert f"images:   {data / 'images'}" in result.stdout
    assert f"database: sqlite:///{data / 'pixelmill.db'}" in result.stdout
    # What a newcomer sees is progress and results: no library banners, warnings or bars.
    output = result.stdout + result.stderr
    for noise in NOISE:
        assert noise not in output, f"{noise!r} in the demo's output:\n{output[-4000:]}"

    with sqlite3.connect(data / "pixelmill.db") as db:
        jobs = db.execute("SELECT id, status, seeds, width, height FROM jobs").fetchall()
        images = db.execute("SELECT job_id, seed, storage_key FROM images").fetchall()
    assert jobs and {status for _, status, *_ in jobs} == {"done"}
    expected = {(job_id, seed) for job_id, _, seeds, *_ in jobs for seed in eval_seeds(seeds)}
    assert {(job_id, seed) for job_id, seed, _ in images} == expected
    sizes = {job_id: (w, h) for job_id, _, _, w, h in jobs}
    for job_id, _, key in images:
        with PILImage.open(data / "images" / key) as png:
            assert png.format == "PNG" and png.size == sizes[job_id]


def eval_seeds(raw: str) -> list[int]:
    import json

    seeds: list[int] = json.loads(raw)
    return seeds

"""The README's promise: `pixelmill demo` runs the nightly job on embedded defaults (SQLite,
a local folder, a real Celery worker on kombu's SQLAlchemy transport, the tiny model), keeps
each item's top-ranked image as the reviewer 'demo', finishes the keepers on the worker's
finishing queue (tiny upscaler and captioner) and exports them for the built-in channels: the
files are read back here (size, format, bytes, XMP, C2PA) against the presets and manifests."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image as PILImage
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from db.models import ReviewItem
from review.bulk import item_grid
from review.channels.marking import TRAINED_ALGORITHMIC_MEDIA, digital_source_type, read_c2pa
from review.channels.presets import Preset, load_presets
from tests.review.c2pa_chain import SIGNER_NAME, actions_of, make_chain, untrusted

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
FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}
CONTENT_TYPES = {"jpeg": "image/jpeg", "webp": "image/webp", "png": "image/png"}
SCALE = 4  # PIXELMILL_UPSCALE_SCALE's default, which the demo leaves as it is


# The demo catalogue, and the product-photo one (img2img, inpaint, ControlNet on the tiny
# model and the built-in tiny ControlNet): both README examples run as they are.
# The first is given a (test) C2PA signing chain, the second none: its files carry XMP only.
@pytest.mark.parametrize(
    ("examples", "signed"), [("examples", True), ("examples/product-scenes", False)]
)
def test_demo_on_embedded_defaults(tmp_path: Path, examples: str, signed: bool) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELMILL_")}
    if signed:
        chain = make_chain(tmp_path / "chain")
        env["PIXELMILL_C2PA_CERT_PATH"] = str(chain.cert_path)
        env["PIXELMILL_C2PA_KEY_PATH"] = str(chain.key_path)
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

    keepers = check_keepers(data)
    assert f"reviewer 'demo' kept the top-ranked image of each of {len(keepers)} items" in (
        result.stdout
    )
    assert "a stand-in for a person's choice in the review app" in result.stdout
    check_finished(data, keepers)
    exports = check_exports(data, keepers, signed=signed)
    marking = "XMP and C2PA" if signed else "XMP (no C2PA certificate configured)"
    assert f"in {exports}, marked as AI-generated in {marking}" in result.stdout
    assert f"manifest: {(exports / 'manifest.csv').as_uri()}" in result.stdout


def refused_demo(folder: Path, **variables: str) -> list[str]:
    """The output lines of `pixelmill demo` run in ``folder`` with these settings, which it
    must refuse (exit status 2)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELMILL_")}
    result = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--examples", str(REPO / "examples")],
        cwd=folder,
        env={**env, **variables},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    return (result.stdout + result.stderr).strip().splitlines()


def test_a_bad_presets_file_stops_the_demo_before_anything_is_written(tmp_path: Path) -> None:
    presets = tmp_path / "channels.yaml"
    presets.write_text("channels:\n  shop:\n    size: 800\n    format: gif\n")
    lines = refused_demo(tmp_path, PIXELMILL_CHANNEL_PRESETS_PATH=str(presets))
    assert lines == [f"error: {presets}:4: field 'channels.shop.format': 'gif': use one of "
                     "jpeg, webp, png"]  # fmt: skip
    assert sorted(path.name for path in tmp_path.iterdir()) == ["channels.yaml"]


@pytest.mark.parametrize(
    ("variable", "value", "error"),
    [
        ("PIXELMILL_UPSCALE_MODEL", "nope.pth", "nope.pth: no such file"),
        ("PIXELMILL_CAPTION_MODEL", "./no-captioner", "./no-captioner: no such folder"),
    ],
)
def test_a_bad_finishing_model_stops_the_demo_before_anything_is_written(
    tmp_path: Path, variable: str, value: str, error: str
) -> None:
    """Before, the worker only logged it and the demo waited out its timeout for finishing."""
    lines = refused_demo(tmp_path, **{variable: value})
    assert len(lines) == 1 and lines[0].startswith(f"error: {variable} "), lines
    assert error in lines[0]
    assert list(tmp_path.iterdir()) == []


def eval_seeds(raw: str) -> list[int]:
    import json

    seeds: list[int] = json.loads(raw)
    return seeds


def query(data: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(data / "pixelmill.db") as db:
        return db.execute(sql).fetchall()


def check_keepers(data: Path) -> dict[int, dict[str, Any]]:
    """Every review item submitted by the reviewer 'demo' with one keeper, the first image
    of its grid as the review app ranks it; returns the keepers by image id."""
    items = query(
        data,
        "SELECT ri.id, ri.status, r.name FROM review_items ri "
        "JOIN reviewers r ON r.id = ri.submitted_by",
    )
    assert items and {(status, name) for _, status, name in items} == {("done", "demo")}
    assert len(items) == query(data, "SELECT COUNT(DISTINCT item_id) FROM jobs")[0][0]
    rows = query(
        data,
        "SELECT ir.image_id, ir.review_item_id, j.width, j.height, c.external_key "
        "FROM image_reviews ir JOIN images i ON i.id = ir.image_id "
        "JOIN jobs j ON j.id = i.job_id JOIN catalogue_items c ON c.id = j.item_id "
        "WHERE ir.decision = 'keep'",
    )
    keepers = {
        image_id: {"review_item": item, "size": (w, h), "item_key": key}
        for image_id, item, w, h, key in rows
    }
    assert sorted(k["review_item"] for k in keepers.values()) == sorted(i for i, *_ in items)
    engine = create_engine(f"sqlite:///{data / 'pixelmill.db'}")
    try:
        with Session(engine) as session:
            for image_id, keeper in keepers.items():
                item = session.get(ReviewItem, keeper["review_item"])
                assert item is not None
                grid = item_grid(session, item, duplicate_similarity=0.97)
                assert grid.ranked_by == "scores"  # the tiny scorer's, from the render
                assert grid.images[0].scored.image_id == image_id
    finally:
        engine.dispose()
    return keepers


def check_finished(data: Path, keepers: dict[int, dict[str, Any]]) -> None:
    """Each keeper upscaled (a PNG of SCALE times its render's size) and captioned."""
    upscaled = query(
        data, "SELECT image_id, storage_key, width, height, scale FROM upscaled_images"
    )
    assert sorted(image_id for image_id, *_ in upscaled) == sorted(keepers)
    for image_id, key, width, height, scale in upscaled:
        render_width, render_height = keepers[image_id]["size"]
        expected = (SCALE * render_width, SCALE * render_height)
        assert scale == SCALE and (width, height) == expected
        with PILImage.open(data / "images" / key) as png:
            assert png.format == "PNG" and png.size == expected
        keepers[image_id]["upscaled"] = expected
    captions = query(data, "SELECT image_id, caption, alt_text FROM image_captions")
    assert sorted(image_id for image_id, *_ in captions) == sorted(keepers)
    for image_id, caption, alt in captions:
        assert caption.strip() and alt.endswith(".")
        keepers[image_id]["alt_text"] = alt


def check_exports(data: Path, keepers: dict[int, dict[str, Any]], *, signed: bool) -> Path:
    """The export folder's files: one per keeper and built-in channel, each as its manifest
    rows (CSV and JSONL alike) describe it and as its preset promises."""
    (exports,) = (data / "exports").iterdir()
    presets = load_presets()
    records = [json.loads(line) for line in (exports / "manifest.jsonl").read_text().splitlines()]
    with (exports / "manifest.csv").open(newline="", encoding="utf-8") as text:
        rows = list(csv.DictReader(text))
    assert rows == [{key: str(value) for key, value in r.items()} for r in records]
    on_disk = {str(p.relative_to(exports)) for p in exports.rglob("*") if p.is_file()}
    assert on_disk == {r["file"] for r in records} | {"manifest.csv", "manifest.jsonl"}
    assert sorted((r["image_id"], r["channel"]) for r in records) == sorted(
        (image_id, channel) for image_id in keepers for channel in presets
    )
    for record in records:
        keeper = keepers[record["image_id"]]
        preset = presets[record["channel"]]
        data_bytes = (exports / record["file"]).read_bytes()
        check_file(data_bytes, preset, record, keeper["upscaled"])
        assert record["item_key"] == keeper["item_key"]
        assert record["alt_text"] == keeper["alt_text"]
        assert record["c2pa"] is signed
        manifest = read_c2pa(data_bytes, CONTENT_TYPES[preset.format])
        if signed:
            check_c2pa(manifest)
        else:
            assert manifest is None
    return exports


def check_file(
    data: bytes, preset: Preset, record: dict[str, Any], source: tuple[int, int]
) -> None:
    """The file's bytes, format and size as the record says, within the preset's promise: its
    canvas (or the source's aspect at its longer side, down to min_size to fit max_bytes),
    its byte limit, and the XMP digital source type."""
    assert record["bytes"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
    with PILImage.open(io.BytesIO(data)) as image:
        assert image.format == FORMATS[preset.format] == FORMATS[record["format"]]
        size = image.size
    assert (record["width"], record["height"]) == size
    if preset.width is not None:
        assert size == (preset.width, preset.height)
    else:
        assert (preset.min_size or preset.longer_side) <= max(size) <= preset.longer_side
        assert abs(size[0] / size[1] - source[0] / source[1]) < 0.01
    assert preset.max_bytes is None or len(data) <= preset.max_bytes
    assert digital_source_type(data) == TRAINED_ALGORITHMIC_MEDIA


def check_c2pa(manifest: dict[str, Any] | None) -> None:
    """A manifest c2pa.Reader reads back: made by the tiny model as trained algorithmic
    media, then resized; signed by the test chain (sound, on no trust list)."""
    assert manifest is not None
    created, resized = actions_of(manifest)
    assert created["action"] == "c2pa.created"
    assert created["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert created["parameters"]["model"] == "tiny"
    assert resized["action"] == "c2pa.resized"
    assert manifest["signature_info"]["common_name"] == SIGNER_NAME
    assert manifest["validation_state"] == "Valid"
    assert untrusted(manifest)

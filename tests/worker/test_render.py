"""render_job end to end: claim, render with the tiny model on CPU, store PNGs, record rows."""

from __future__ import annotations

import hashlib
import io
import pathlib
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Image, Job, JobStatus, RunStatus, SafetyStatus, utcnow
from pixelmill.settings import Settings
from pixelmill.storage import LocalStorage, S3Storage, Storage, storage_from_settings
from pixelmill.thumbnails import thumbnail_key
from tests.worker.support import PROMPT, STEPS, images_of, make_job, make_settings, reload_job
from worker.claim import ClaimedJob, claim_job
from worker.image_writer import image_key, safe_key_part
from worker.loading import PipelineCache
from worker.png import read_parameters, read_pixelmill
from worker.render import WorkerRuntime, render_job


@pytest.fixture(scope="module")
def pipelines() -> PipelineCache:
    # Shared by the module's tests: loading the tiny model once keeps the file fast.
    return PipelineCache(device=torch.device("cpu"))


@pytest.fixture
def settings(tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path) -> Settings:
    return make_settings(tiny_model_dir, tmp_path)


@pytest.fixture
def runtime(
    settings: Settings, pg_sessions: sessionmaker[Session], pipelines: PipelineCache
) -> WorkerRuntime:
    return WorkerRuntime(
        settings=settings,
        sessions=pg_sessions,
        storage=LocalStorage(settings.resolved_storage_dir),
        pipelines=pipelines,
        name="test-worker",
    )


def pixels(png: bytes) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).copy()


def assert_same_render(a: np.ndarray, b: np.ndarray) -> None:
    """Pixel arrays of one (model, params, seed) rendered in different batches: at most one
    level apart, in a tiny share of the values."""
    difference = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert difference.max() <= 1
    assert np.count_nonzero(difference) <= difference.size // 200


def check_images(
    session: Session, storage: Storage, job: Job, seeds: list[int], *, thumbnails: bool = False
) -> list[Image]:
    """Exactly one valid image row per seed, each matching its stored PNG (and its thumbnail,
    where ``thumbnails`` says they were made at render time)."""
    rows = images_of(session, job.id)
    assert sorted(row.seed for row in rows) == sorted(seeds)
    for row in rows:
        png = storage.get(row.storage_key)
        item_key = job.item.external_key
        assert row.storage_key == (
            f"runs/{job.run_id}/{item_key}/{job.id}/{row.seed}-{row.sha256[:16]}.png"
        )
        if thumbnails:  # a JPEG beside it, no larger than the setting allows
            assert row.thumbnail_key == (
                f"thumbs/runs/{job.run_id}/{item_key}/{job.id}/{row.seed}-{row.sha256[:16]}.jpg"
            )
            with PIL.Image.open(io.BytesIO(storage.get(row.thumbnail_key))) as thumbnail:
                assert thumbnail.format == "JPEG"
                assert thumbnail.size == (64, 64)  # already within the 256 px bound
        else:  # the review app makes it on first view
            assert row.thumbnail_key is None
        # What rendered it: the model's weights and the libraries.
        assert row.model_sha256 is not None and len(row.model_sha256) == 64
        assert row.versions is not None and {"torch", "diffusers", "pixelmill"} <= set(row.versions)
        assert row.sha256 == hashlib.sha256(png).hexdigest()
        assert row.bytes == len(png)
        assert (row.width, row.height) == (64, 64)
        assert row.safety == SafetyStatus.SAFE  # the tiny model has a (non-firing) checker
        assert row.render_seconds > 0
        with PIL.Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG"
            assert image.size == (64, 64)
        array = pixels(png)
        assert array.shape == (64, 64, 3)
        assert np.ptp(array) > 0, "a blank image: the comparisons below would prove nothing"
        parameters = read_parameters(png)
        assert parameters is not None
        assert parameters.startswith(PROMPT + "\n")
        assert "Negative prompt: blurry" in parameters
        assert f"Seed: {row.seed}," in parameters
        assert "Size: 64x64" in parameters
        assert f"Steps: {STEPS}," in parameters
        assert f"Model hash: {row.model_sha256[:10]}," in parameters
        chunk = read_pixelmill(png)
        assert chunk is not None
        assert chunk["job_id"] == job.id and chunk["run_id"] == job.run_id
        assert chunk["item_key"] == item_key and chunk["seed"] == row.seed
        assert chunk["model_sha256"] == row.model_sha256
        assert chunk["safety"] == {"status": row.safety, "score": None}
        assert chunk["versions"] == row.versions
    return rows


def test_renders_every_seed(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: pathlib.Path
) -> None:
    seeds = [11, 22, 2**32 + 7]
    job = make_job(db_session, model=str(tiny_model_dir), seeds=seeds)

    assert render_job(runtime, job.id) == "done"

    row = reload_job(db_session, job.id)
    assert row.status == JobStatus.DONE
    assert row.finished_at is not None
    assert row.lease_expires_at is None
    assert row.error is None
    assert row.attempts == 1
    assert row.worker == "test-worker"
    images = check_images(db_session, runtime.storage, job, seeds)
    # Different seeds give different images.
    assert len({image.sha256 for image in images}) == len(seeds)
    # The files really are on disk under the configured folder.
    root = runtime.settings.resolved_storage_dir
    for image in images:
        assert (root / image.storage_key).is_file()


def test_same_seed_alone_or_in_a_sweep_is_within_one_level(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: pathlib.Path
) -> None:
    a, b, c = 101, 202, 303
    alone = make_job(db_session, model=str(tiny_model_dir), seeds=[b])
    sweep = make_job(db_session, model=str(tiny_model_dir), seeds=[a, b, c])

    # The sweep first, so seed b is rendered after another seed in the same pipeline.
    assert render_job(runtime, sweep.id) == "done"
    assert render_job(runtime, alone.id) == "done"

    storage = runtime.storage
    sweep_rows = {row.seed: row for row in check_images(db_session, storage, sweep, [a, b, c])}
    (alone_row,) = check_images(db_session, storage, alone, [b])

    alone_png = storage.get(alone_row.storage_key)
    sweep_png = storage.get(sweep_rows[b].storage_key)
    # Rendered alone and in a batch of three: the same image up to float rounding (PyTorch
    # kernels are not batch-invariant; see test_pipeline's batch tests for the exact bound).
    assert_same_render(pixels(alone_png), pixels(sweep_png))
    # ... while the neighbours in the sweep differ from it.
    assert not np.array_equal(pixels(storage.get(sweep_rows[a].storage_key)), pixels(sweep_png))


def test_resume_renders_only_missing_seeds(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: pathlib.Path
) -> None:
    seeds = [7, 8, 9]
    job = make_job(db_session, model=str(tiny_model_dir), seeds=seeds)
    # Seed 8 was recorded by an earlier, interrupted attempt: object stored, row committed.
    key = f"runs/{job.run_id}/jobs/{job.id}/8.png"
    earlier = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), (200, 10, 10)).save(earlier, format="PNG")
    earlier_png = earlier.getvalue()
    runtime.storage.put(key, earlier_png, content_type="image/png")
    created = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    existing = Image(
        job_id=job.id,
        seed=8,
        storage_key=key,
        sha256=hashlib.sha256(earlier_png).hexdigest(),
        width=64,
        height=64,
        bytes=len(earlier_png),
        safety=SafetyStatus.SAFE,
        render_seconds=1.5,
        created_at=created,
    )
    db_session.add(existing)
    db_session.commit()
    existing_id = existing.id

    assert render_job(runtime, job.id) == "done"

    assert reload_job(db_session, job.id).status == JobStatus.DONE
    rows = {row.seed: row for row in images_of(db_session, job.id)}
    assert sorted(rows) == seeds
    kept = rows[8]
    assert kept.id == existing_id
    assert kept.created_at == created
    assert kept.render_seconds == 1.5
    assert kept.sha256 == hashlib.sha256(earlier_png).hexdigest()
    # The stored object was not re-rendered or overwritten.
    assert runtime.storage.get(key) == earlier_png
    for seed in (7, 9):
        png = runtime.storage.get(rows[seed].storage_key)
        assert rows[seed].sha256 == hashlib.sha256(png).hexdigest()
        assert f"Seed: {seed}," in (read_parameters(png) or "")
        assert rows[seed].created_at > created

    # A done job is not claimable: a redelivered message is a no-op.
    ids_before = sorted(row.id for row in rows.values())
    finished_at = reload_job(db_session, job.id).finished_at
    assert render_job(runtime, job.id) == "skipped"
    assert sorted(row.id for row in images_of(db_session, job.id)) == ids_before
    again = reload_job(db_session, job.id)
    assert again.status == JobStatus.DONE
    assert again.attempts == 1
    assert again.finished_at == finished_at


def test_all_seeds_already_recorded_finishes_without_rendering(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: pathlib.Path
) -> None:
    job = make_job(db_session, model=str(tiny_model_dir), seeds=[1, 2])
    assert render_job(runtime, job.id) == "done"
    rows_before = [(row.id, row.sha256) for row in images_of(db_session, job.id)]
    # Simulate a worker that died after its last image but before finish_job (so its run
    # was never marked finished either).
    row = reload_job(db_session, job.id)
    row.status = JobStatus.QUEUED
    row.run.status = RunStatus.ACTIVE
    db_session.commit()

    assert render_job(runtime, job.id) == "done"

    job_row = reload_job(db_session, job.id)
    assert job_row.status == JobStatus.DONE
    assert job_row.attempts == 2
    assert [(row.id, row.sha256) for row in images_of(db_session, job.id)] == rows_before


def test_missing_model_fails_the_job(
    runtime: WorkerRuntime, db_session: Session, tmp_path: pathlib.Path
) -> None:
    missing = str(tmp_path / "no-such-model")
    job = make_job(db_session, model=missing, seeds=[1, 2])

    assert render_job(runtime, job.id) == "failed"

    row = reload_job(db_session, job.id)
    assert row.status == JobStatus.FAILED
    assert row.error is not None
    assert missing in row.error
    assert row.finished_at is not None
    assert row.lease_expires_at is None
    assert images_of(db_session, job.id) == []
    # A failed job is not picked up again by a redelivered message.
    assert render_job(runtime, job.id) == "skipped"
    assert reload_job(db_session, job.id).attempts == 1


def test_unknown_scheduler_fails_the_job_before_rendering(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: pathlib.Path
) -> None:
    job = make_job(db_session, model=str(tiny_model_dir), seeds=[1], scheduler="warp_drive")

    assert render_job(runtime, job.id) == "failed"

    row = reload_job(db_session, job.id)
    assert row.status == JobStatus.FAILED
    assert row.error is not None
    assert row.error.startswith("ValueError: ")
    assert "unknown scheduler 'warp_drive'" in row.error
    assert images_of(db_session, job.id) == []
    assert not (runtime.settings.resolved_storage_dir / "runs").exists()


def test_renders_to_s3(
    s3_settings: dict[str, str],
    tiny_model_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    pg_sessions: sessionmaker[Session],
    db_session: Session,
    pipelines: PipelineCache,
) -> None:
    settings = make_settings(tiny_model_dir, tmp_path, **s3_settings, thumbnails_at_render=True)
    storage = storage_from_settings(settings)
    assert isinstance(storage, S3Storage)
    runtime = WorkerRuntime(
        settings=settings,
        sessions=pg_sessions,
        storage=storage,
        pipelines=pipelines,
        name="s3-worker",
    )
    seeds = [31, 32, 33]
    job = make_job(db_session, model=str(tiny_model_dir), seeds=seeds)

    assert render_job(runtime, job.id) == "done"

    assert reload_job(db_session, job.id).status == JobStatus.DONE
    images = check_images(db_session, storage, job, seeds, thumbnails=True)
    listed = storage.client.list_objects_v2(Bucket=s3_settings["s3_bucket"])
    objects = {obj["Key"]: obj for obj in listed.get("Contents", [])}
    assert set(objects) == {image.storage_key for image in images} | {
        image.thumbnail_key for image in images
    }
    for image in images:
        assert storage.exists(image.storage_key)
        head = storage.client.head_object(Bucket=s3_settings["s3_bucket"], Key=image.storage_key)
        assert head["ContentType"] == "image/png"
        assert head["ContentLength"] == image.bytes
        body = storage.client.get_object(Bucket=s3_settings["s3_bucket"], Key=image.storage_key)
        assert hashlib.sha256(body["Body"].read()).hexdigest() == image.sha256
    # Nothing was written to local disk.
    assert not (tmp_path / "images").exists()


def _render_with_takeover(
    runtime: WorkerRuntime,
    db_session: Session,
    tiny_model_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[str, Job]:
    """Render a job whose first batch outlives its lease: another worker takes it over
    while the batch renders, as if this worker had stalled."""
    import worker.pipeline

    job = make_job(db_session, model=str(tiny_model_dir), seeds=[41, 42, 43])
    real_render_batch = worker.pipeline.render_batch
    takeovers: list[ClaimedJob] = []

    def render_then_lose_the_lease(*args: Any) -> Any:
        rendered = real_render_batch(*args)
        if not takeovers:
            with runtime.sessions() as session:
                session.execute(
                    update(Job)
                    .where(Job.id == job.id)
                    .values(lease_expires_at=utcnow() - timedelta(seconds=1))
                )
                session.commit()
                claimed = claim_job(session, job.id, worker="worker-b", lease=timedelta(minutes=30))
            assert claimed is not None
            takeovers.append(claimed)
        return rendered

    monkeypatch.setattr(worker.pipeline, "render_batch", render_then_lose_the_lease)
    return render_job(runtime, job.id), job


def test_lease_lost_mid_render_stops_and_leaves_new_owner_alone(
    runtime: WorkerRuntime,
    db_session: Session,
    tiny_model_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _result, job = _render_with_takeover(runtime, db_session, tiny_model_dir, monkeypatch)

    # The old worker stored its batch's objects but recorded no row for them (rows are
    # fenced on the lease), and rendered no more ...
    assert images_of(db_session, job.id) == []
    root = runtime.settings.resolved_storage_dir
    assert len(list(root.rglob(f"runs/{job.run_id}/*/{job.id}/*.png"))) == 3
    # ... and did not touch the job now owned by worker-b.
    row = reload_job(db_session, job.id)
    assert row.status == JobStatus.RUNNING
    assert row.worker == "worker-b"
    assert row.attempts == 2
    assert row.error is None
    assert row.finished_at is None


def test_lease_lost_mid_render_is_reported_as_skipped(
    runtime: WorkerRuntime,
    db_session: Session,
    tiny_model_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The job did not fail (it is running elsewhere and fail_job was fenced off), so the
    # result must be "skipped", as when finish_job loses the race.
    result, _job = _render_with_takeover(runtime, db_session, tiny_model_dir, monkeypatch)

    assert result == "skipped"


@pytest.mark.parametrize(
    ("item_key", "segment"),
    [
        ("SKU-001", "SKU-001"),
        ("../../etc/passwd", "_.._etc_passwd"),  # one segment: its dots are plain text
        ("/abs/path", "_abs_path"),
        ("..", "_"),
        ("", "_"),
        ("茶壶 red/blue", "_red_blue"),
        ("x" * 300, "x" * 80),
    ],
)
def test_item_keys_become_one_safe_path_segment(item_key: str, segment: str) -> None:
    assert safe_key_part(item_key) == segment
    claimed = ClaimedJob(
        id=9, run_id=3, attempt=1, prompt="", negative_prompt="", model="",
        scheduler=None, steps=1, guidance=0, width=8, height=8, seeds=[],
    )  # fmt: skip
    key = image_key(claimed, item_key, 42, "f" * 64)
    assert key == f"runs/3/{segment}/9/42-{'f' * 16}.png"
    assert ".." not in key.split("/") and not key.startswith("/")
    assert thumbnail_key(key) == f"thumbs/runs/3/{segment}/9/42-{'f' * 16}.jpg"
    assert thumbnail_key("quarantine/" + key).startswith("quarantine/thumbs/runs/3/")

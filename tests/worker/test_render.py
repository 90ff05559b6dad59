"""render_job end to end: claim, render with the tiny model on CPU, store PNGs, record rows."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pathlib
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import PIL.Image
import pytest
import torch
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import CatalogueItem, Image, Job, JobStatus, Run, RunStatus, SafetyStatus, utcnow
from pixelmill.settings import Settings
from pixelmill.storage import LocalStorage, S3Storage, Storage, storage_from_settings
from worker.claim import ClaimedJob, claim_job
from worker.pipeline import PipelineCache
from worker.png import read_parameters
from worker.render import WorkerRuntime, render_job

PROMPT = "a ceramic teapot, studio lighting"
STEPS = 2


@pytest.fixture(scope="module")
def pipelines() -> PipelineCache:
    # Shared by the module's tests: loading the tiny model once keeps the file fast.
    return PipelineCache(device=torch.device("cpu"))


def make_settings(
    tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path, **extra: object
) -> Settings:
    values: dict[str, object] = {
        "model": str(tiny_model_dir),
        "device": "cpu",
        "storage": "local",
        "storage_dir": tmp_path / "images",
        "data_dir": tmp_path / "data",
        **extra,
    }
    return Settings(**values)  # type: ignore[arg-type]


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


def make_job(
    session: Session,
    *,
    model: str,
    seeds: list[int],
    scheduler: str | None = None,
    prompt: str = PROMPT,
) -> Job:
    run = Run(name=f"run-{uuid.uuid4().hex}", source="test")
    item = CatalogueItem(
        source="test",
        external_key=f"sku-{uuid.uuid4().hex[:8]}",
        fields={"name": "teapot"},
        content_hash=uuid.uuid4().hex * 2,
    )
    session.add_all([run, item])
    session.flush()
    job = Job(
        run_id=run.id,
        item_id=item.id,
        template="studio",
        prompt=prompt,
        negative_prompt="blurry",
        model=model,
        scheduler=scheduler,
        steps=STEPS,
        guidance=7.0,
        width=64,
        height=64,
        seeds=seeds,
        status=JobStatus.QUEUED,
        dedupe_key=uuid.uuid4().hex * 2,
    )
    session.add(job)
    session.commit()
    return job


def reload_job(session: Session, job_id: int) -> Job:
    session.expire_all()
    job = session.get(Job, job_id)
    assert job is not None
    return job


def images_of(session: Session, job_id: int) -> list[Image]:
    session.expire_all()
    return list(session.scalars(select(Image).where(Image.job_id == job_id).order_by(Image.seed)))


def pixels(png: bytes) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).copy()


def check_images(session: Session, storage: Storage, job: Job, seeds: list[int]) -> list[Image]:
    """Exactly one valid image row per seed, each matching its stored PNG."""
    rows = images_of(session, job.id)
    assert sorted(row.seed for row in rows) == sorted(seeds)
    for row in rows:
        png = storage.get(row.storage_key)
        assert (
            row.storage_key == f"runs/{job.run_id}/jobs/{job.id}/{row.seed}-{row.sha256[:16]}.png"
        )
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


def test_same_seed_alone_or_in_a_sweep_is_pixel_identical(
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
    np.testing.assert_array_equal(pixels(alone_png), pixels(sweep_png))
    assert alone_row.sha256 == sweep_rows[b].sha256
    assert hashlib.sha256(alone_png).hexdigest() == hashlib.sha256(sweep_png).hexdigest()
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
    settings = make_settings(tiny_model_dir, tmp_path, **s3_settings)
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
    images = check_images(db_session, storage, job, seeds)
    listed = storage.client.list_objects_v2(Bucket=s3_settings["s3_bucket"])
    objects = {obj["Key"]: obj for obj in listed.get("Contents", [])}
    assert set(objects) == {image.storage_key for image in images}
    for image in images:
        assert storage.exists(image.storage_key)
        head = storage.client.head_object(Bucket=s3_settings["s3_bucket"], Key=image.storage_key)
        assert head["ContentType"] == "image/png"
        assert head["ContentLength"] == image.bytes
        body = storage.client.get_object(Bucket=s3_settings["s3_bucket"], Key=image.storage_key)
        assert hashlib.sha256(body["Body"].read()).hexdigest() == image.sha256
    # Nothing was written to local disk.
    assert not (tmp_path / "images").exists()


class TakeoverOnFirstPut:
    """Storage that lets another worker take the job over right after the first upload,
    as if this worker had stalled past its lease."""

    def __init__(self, inner: Storage, sessions: sessionmaker[Session], job_id: int) -> None:
        self.inner = inner
        self.sessions = sessions
        self.job_id = job_id
        self.puts: list[str] = []
        self.takeover: ClaimedJob | None = None

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        self.inner.put(key, data, content_type=content_type)
        self.puts.append(key)
        if self.takeover is None:
            with self.sessions() as session:
                session.execute(
                    update(Job)
                    .where(Job.id == self.job_id)
                    .values(lease_expires_at=utcnow() - timedelta(seconds=1))
                )
                session.commit()
                self.takeover = claim_job(
                    session, self.job_id, worker="worker-b", lease=timedelta(minutes=30)
                )
            assert self.takeover is not None

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def url(self, key: str) -> str:
        return self.inner.url(key)


def _render_with_takeover(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: pathlib.Path
) -> tuple[str, Job, TakeoverOnFirstPut]:
    job = make_job(db_session, model=str(tiny_model_dir), seeds=[41, 42, 43])
    storage = TakeoverOnFirstPut(runtime.storage, runtime.sessions, job.id)
    result = render_job(dataclasses.replace(runtime, storage=storage), job.id)
    return result, job, storage


def test_lease_lost_mid_render_stops_and_leaves_new_owner_alone(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: pathlib.Path
) -> None:
    _result, job, storage = _render_with_takeover(runtime, db_session, tiny_model_dir)

    # The old worker stopped after the seed during which it lost the lease ...
    rows = images_of(db_session, job.id)
    assert [row.seed for row in rows] == [41]
    assert storage.puts == [rows[0].storage_key]
    # ... and did not touch the job now owned by worker-b.
    row = reload_job(db_session, job.id)
    assert row.status == JobStatus.RUNNING
    assert row.worker == "worker-b"
    assert row.attempts == 2
    assert row.error is None
    assert row.finished_at is None


def test_lease_lost_mid_render_is_reported_as_skipped(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: pathlib.Path
) -> None:
    # The job did not fail (it is running elsewhere and fail_job was fenced off), so the
    # result must be "skipped", as when finish_job loses the race.
    result, _job, _storage = _render_with_takeover(runtime, db_session, tiny_model_dir)

    assert result == "skipped"

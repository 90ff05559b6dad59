"""`pixelmill reproduce`: an image re-rendered from its record, on Postgres with a local
folder, the tiny model on the CPU."""

from __future__ import annotations

import io
import pathlib
from collections.abc import Iterator

import numpy as np
import PIL.Image
import pytest
import torch
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from cli.main import app
from db.models import Image, Job
from pixelmill.settings import Settings
from pixelmill.storage import LocalStorage
from tests.worker.support import images_of, make_job, make_settings
from worker.loading import PipelineCache
from worker.png import read_pixelmill
from worker.render import WorkerRuntime, render_job
from worker.reproduce import ImageNotFoundError, find_image, reproduce_image


@pytest.fixture(scope="module")
def pipelines() -> PipelineCache:
    return PipelineCache(device=torch.device("cpu"))


@pytest.fixture
def runtime(
    tiny_model_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    pg_sessions: sessionmaker[Session],
    pipelines: PipelineCache,
) -> WorkerRuntime:
    settings: Settings = make_settings(tiny_model_dir, tmp_path, render_batch_size=2)
    return WorkerRuntime(
        settings=settings,
        sessions=pg_sessions,
        storage=LocalStorage(settings.resolved_storage_dir),
        pipelines=pipelines,
        name="test-worker",
    )


def _rendered(runtime: WorkerRuntime, session: Session, model: pathlib.Path) -> list[Image]:
    job = make_job(session, model=str(model), seeds=[11, 12, 13])
    assert render_job(runtime, job.id) == "done"
    return images_of(session, job.id)


def test_each_image_records_its_batch_and_reproduces_bit_identically(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: pathlib.Path
) -> None:
    images = _rendered(runtime, db_session, tiny_model_dir)

    # Batches of two: seeds 11 and 12 together, 13 alone; the PNG says so too.
    assert [image.batch_seeds for image in images] == [[11, 12], [11, 12], [13]]
    png = runtime.storage.get(images[1].storage_key)
    assert (read_pixelmill(png) or {})["batch_seeds"] == [11, 12]

    for image in images:
        result = reproduce_image(runtime, db_session, image)
        assert result.identical, result
        assert result.max_difference == 0 and result.changes == ()
        assert result.batch_seeds == tuple(image.batch_seeds or ())


def test_a_lone_render_of_a_batched_seed_is_within_one_level(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: pathlib.Path
) -> None:
    # What holds when the batch is not known (images rendered before it was recorded): the
    # seed rendered alone, which batched kernels may round differently by one 8-bit level.
    image = _rendered(runtime, db_session, tiny_model_dir)[0]
    db_session.execute(update(Image).where(Image.id == image.id).values(batch_seeds=None))
    db_session.commit()
    db_session.refresh(image)

    result = reproduce_image(runtime, db_session, image)

    assert result.batch_seeds == (image.seed,)
    assert result.max_difference <= 1
    assert result.differing_values <= result.total_values // 200
    assert result.changes == ("its batch was not recorded: rendered alone",)


def test_a_changed_image_or_record_is_reported(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: pathlib.Path
) -> None:
    image = _rendered(runtime, db_session, tiny_model_dir)[2]
    stored = runtime.storage.get(image.storage_key)
    with PIL.Image.open(io.BytesIO(stored)) as png:
        pixels = np.asarray(png.convert("RGB")).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    out = io.BytesIO()
    PIL.Image.fromarray(pixels).save(out, format="PNG")
    runtime.storage.put(image.storage_key, out.getvalue(), content_type="image/png")
    db_session.execute(
        update(Image)
        .where(Image.id == image.id)
        .values(versions={**(image.versions or {}), "torch": "1.0"}, model_sha256="0" * 64)
    )
    db_session.commit()
    db_session.refresh(image)

    result = reproduce_image(runtime, db_session, image)

    assert not result.identical
    assert result.differing_values == 3  # the one pixel's three channels
    assert result.max_difference == max(abs(255 - 2 * int(v)) for v in pixels[0, 0])
    assert any(change.startswith("torch 1.0 -> ") for change in result.changes)
    assert any(
        change.startswith("model weights changed: 000000000000") for change in result.changes
    )


def test_images_are_found_by_id_or_storage_key(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: pathlib.Path
) -> None:
    image = _rendered(runtime, db_session, tiny_model_dir)[0]

    assert find_image(db_session, str(image.id)).id == image.id
    assert find_image(db_session, image.storage_key).id == image.id
    with pytest.raises(ImageNotFoundError, match=r"'nope\.png': no image has this id"):
        find_image(db_session, "nope.png")


@pytest.fixture
def cli_env(
    fresh_database_url: str,
    tiny_model_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[WorkerRuntime]:
    for name, value in {
        "PIXELMILL_DATABASE_URL": fresh_database_url,
        "PIXELMILL_DATA_DIR": str(tmp_path / "var"),
        "PIXELMILL_STORAGE": "local",
        "PIXELMILL_STORAGE_DIR": str(tmp_path / "images"),
        "PIXELMILL_MODEL": str(tiny_model_dir),
        "PIXELMILL_DEVICE": "cpu",
    }.items():
        monkeypatch.setenv(name, value)
    engine = create_engine(fresh_database_url)
    settings = make_settings(tiny_model_dir, tmp_path, database_url=fresh_database_url)
    yield WorkerRuntime(
        settings=settings,
        sessions=sessionmaker(engine),
        storage=LocalStorage(tmp_path / "images"),
        pipelines=PipelineCache(device=torch.device("cpu")),
        name="test-worker",
    )
    engine.dispose()


def test_the_command_says_identical_or_names_what_is_missing(cli_env: WorkerRuntime) -> None:
    with cli_env.sessions() as session:
        images = _rendered(cli_env, session, pathlib.Path(cli_env.settings.model))
        key = images[1].storage_key

    result = CliRunner().invoke(app, ["reproduce", key])
    assert result.exit_code == 0, result.output
    assert "re-rendering its batch of 3" in result.output  # the default batch size, 4
    assert "pixels identical" in result.output

    result = CliRunner().invoke(app, ["reproduce", "999999"])
    assert result.exit_code == 2
    assert result.output.strip().endswith("image '999999': no image has this id or storage key")
    assert "Traceback" not in result.output
    with cli_env.sessions() as session:
        assert session.scalar(select(Job.status).where(Job.id == images[0].job_id)) == "done"

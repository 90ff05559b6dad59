"""render_job for the job kinds beyond text-to-image (img2img, inpaint, ControlNet, adapters):
staged input images read from storage, adapters, the metadata chunks, and clear per-item
errors for bad inputs."""

from __future__ import annotations

import hashlib
import io
import pathlib
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.job_options import ControlNetSpec, EmbeddingRef, JobOptions, LoraRef, MaskSpec
from db.models import CatalogueItem, Image, InputImage, Job, JobStatus
from pixelmill.settings import Settings
from pixelmill.storage import LocalStorage
from tests import factories
from worker.adapters import file_sha256
from worker.conditioning import fit_image, fitted_rgb
from worker.loading import PipelineCache
from worker.png import read_parameters, read_pixelmill
from worker.render import WorkerRuntime, render_job
from worker.tiny_adapters import TINY_EMBEDDING_TOKEN

W, H = 64, 48


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
    settings = Settings(  # type: ignore[call-arg]
        model=str(tiny_model_dir),
        device="cpu",
        storage="local",
        storage_dir=tmp_path / "images",
        data_dir=tmp_path / "data",
    )
    return WorkerRuntime(
        settings=settings,
        sessions=pg_sessions,
        storage=LocalStorage(settings.resolved_storage_dir),
        pipelines=pipelines,
        name="test-worker",
    )


def product_png(size: tuple[int, int] = (120, 90)) -> bytes:
    """An RGBA product cut-out: textured, opaque in its middle third."""
    width, height = size
    rng = np.random.default_rng(1)
    pixels = np.zeros((height, width, 4), dtype=np.uint8)
    pixels[..., :3] = rng.integers(0, 256, (height, width, 3))
    pixels[height // 3 : 2 * height // 3, width // 3 : 2 * width // 3, 3] = 255
    return png_bytes(PIL.Image.fromarray(pixels))


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def stage(session: Session, runtime: WorkerRuntime, data: bytes) -> str:
    """Stage image bytes like the producer: into storage under their hash, plus the row."""
    sha256 = hashlib.sha256(data).hexdigest()
    if session.get(InputImage, sha256) is None:
        key = f"inputs/{sha256[:2]}/{sha256}.png"
        runtime.storage.put(key, data, content_type="image/png")
        with PIL.Image.open(io.BytesIO(data)) as image:
            size, mode = image.size, image.mode
        session.add(
            InputImage(
                sha256=sha256,
                storage_key=key,
                width=size[0],
                height=size[1],
                mode=mode,
                bytes=len(data),
            )
        )
        session.flush()
    return sha256


def make_job(
    session: Session,
    *,
    model: str,
    kind: str = "txt2img",
    options: JobOptions | None = None,
    input_image: str | None = None,
    mask_image: str | None = None,
    prompt: str = "a red sneaker on a marble table",
    seeds: tuple[int, ...] = (1, 2),
) -> Job:
    return factories.make_job(
        session,
        item=factories.make_item(session, fields={"name": "sneaker"}),
        template="scene",
        prompt=prompt,
        model=model,
        steps=3,
        guidance=6.0,
        width=W,
        height=H,
        seeds=seeds,
        kind=kind,
        input_image=input_image,
        mask_image=mask_image,
        options=(options or JobOptions()).to_json(),
    )


def outcome(session: Session, job: Job) -> tuple[str, str | None]:
    session.expire_all()
    row = session.get(Job, job.id)
    assert row is not None
    return row.status, row.error


def stored(session: Session, runtime: WorkerRuntime, job: Job) -> list[tuple[Image, bytes]]:
    rows = session.scalars(select(Image).where(Image.job_id == job.id).order_by(Image.seed))
    return [(row, runtime.storage.get(row.storage_key)) for row in rows]


def array(png: bytes) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- each kind ------------------------------------------------------------------------------


def test_img2img_job(runtime: WorkerRuntime, db_session: Session, tiny_model_dir: Any) -> None:
    image = stage(db_session, runtime, product_png())
    job = make_job(
        db_session,
        model=str(tiny_model_dir),
        kind="img2img",
        input_image=image,
        options=JobOptions(strength=0.7),
        prompt="a (red:1.3) sneaker",
    )
    assert render_job(runtime, job.id) == "done"
    images = stored(db_session, runtime, job)
    assert [row.seed for row, _ in images] == [1, 2]
    for row, png in images:
        assert (row.width, row.height) == (W, H)
        assert array(png).shape == (H, W, 3)
        parameters = read_parameters(png)
        assert parameters is not None
        # The user's own prompt text, weights included; the strength as A1111 writes it.
        assert parameters.startswith("a (red:1.3) sneaker\n")
        assert ", Denoising strength: 0.7, " in parameters
        chunk = read_pixelmill(png)
        assert chunk is not None
        assert chunk["kind"] == "img2img"
        assert chunk["input_image"] == image
        assert chunk["strength"] == 0.7
        assert "mask" not in chunk and "loras" not in chunk


def test_inpaint_job_keeps_the_products_pixels(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: Any
) -> None:
    data = product_png()
    image = stage(db_session, runtime, data)
    job = make_job(
        db_session,
        model=str(tiny_model_dir),
        kind="inpaint",
        input_image=image,
        options=JobOptions(mask=MaskSpec(source="alpha")),
    )
    assert render_job(runtime, job.id) == "done"
    with PIL.Image.open(io.BytesIO(data)) as photo:
        fitted = np.asarray(fitted_rgb(photo, W, H), dtype=np.int16)
        opaque = np.asarray(fit_image(photo, W, H).getchannel("A")) == 255
    assert opaque.sum() > 150
    for row, png in stored(db_session, runtime, job):
        result = array(png)
        assert result.shape == (H, W, 3)
        # The opaque product is kept exactly, the transparent background is generated.
        assert np.array_equal(result[opaque], fitted[opaque])
        assert not np.array_equal(result[:4], fitted[:4])
        chunk = read_pixelmill(png)
        assert chunk is not None
        assert chunk["kind"] == "inpaint" and chunk["mask"] == {"source": "alpha"}
        assert chunk["strength"] == 1.0
        assert row.safety == "safe"


def test_inpaint_job_with_a_mask_column(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: Any
) -> None:
    photo = PIL.Image.new("RGB", (128, 96), (20, 90, 200))
    mask = PIL.Image.new("L", (128, 96), 255)
    mask.paste(0, (32, 24, 96, 72))  # keep the middle
    job = make_job(
        db_session,
        model=str(tiny_model_dir),
        kind="inpaint",
        input_image=stage(db_session, runtime, png_bytes(photo)),
        mask_image=stage(db_session, runtime, png_bytes(mask)),
        options=JobOptions(mask=MaskSpec(source="column")),
    )
    assert render_job(runtime, job.id) == "done"
    for _, png in stored(db_session, runtime, job):
        result = array(png)
        assert (result[14:34, 18:46] == (20, 90, 200)).all()  # the kept box, fitted to 64x48
        chunk = read_pixelmill(png)
        assert chunk is not None and chunk["mask_image"] == job.mask_image


def test_controlnet_job(
    runtime: WorkerRuntime,
    db_session: Session,
    tiny_model_dir: Any,
    tiny_controlnet_dir: pathlib.Path,
) -> None:
    spec = ControlNetSpec(model=str(tiny_controlnet_dir), scale=0.8, low_threshold=50)
    job = make_job(
        db_session,
        model=str(tiny_model_dir),
        kind="controlnet",
        input_image=stage(db_session, runtime, product_png()),
        options=JobOptions(controlnet=spec),
    )
    assert render_job(runtime, job.id) == "done"
    images = stored(db_session, runtime, job)
    assert len(images) == 2
    for row, png in images:
        assert (row.width, row.height) == (W, H)
        chunk = read_pixelmill(png)
        assert chunk is not None
        assert chunk["controlnet"] == spec.model_dump(mode="json")
        parameters = read_parameters(png)
        assert parameters is not None
        assert f'ControlNet 0: "Module: canny, Model: {spec.model}, Weight: 0.8"' in parameters


def test_adapters_job_then_a_plain_job(
    runtime: WorkerRuntime,
    db_session: Session,
    tiny_model_dir: Any,
    tiny_lora_path: pathlib.Path,
    tiny_embedding_path: pathlib.Path,
) -> None:
    prompt = f"a red sneaker, {TINY_EMBEDDING_TOKEN} style"
    plain_before = make_job(db_session, model=str(tiny_model_dir), prompt=prompt, seeds=(5,))
    assert render_job(runtime, plain_before.id) == "done"
    lora = LoraRef(path=str(tiny_lora_path), scale=0.7, sha256=file_sha256(tiny_lora_path))
    embedding = EmbeddingRef(
        path=str(tiny_embedding_path),
        token=TINY_EMBEDDING_TOKEN,
        sha256=file_sha256(tiny_embedding_path),
    )
    adapted = make_job(
        db_session,
        model=str(tiny_model_dir),
        prompt=prompt,
        seeds=(5,),
        options=JobOptions(loras=(lora,), embeddings=(embedding,)),
    )
    assert render_job(runtime, adapted.id) == "done"
    plain_after = make_job(db_session, model=str(tiny_model_dir), prompt=prompt, seeds=(5,))
    assert render_job(runtime, plain_after.id) == "done"

    ((_, before),) = stored(db_session, runtime, plain_before)
    ((_, with_adapters),) = stored(db_session, runtime, adapted)
    ((_, after),) = stored(db_session, runtime, plain_after)
    assert not np.array_equal(array(with_adapters), array(before))
    assert np.array_equal(array(after), array(before))  # nothing leaked into the next job
    chunk = read_pixelmill(with_adapters)
    assert chunk is not None
    assert chunk["kind"] == "txt2img"
    assert chunk["loras"] == [lora.model_dump(mode="json")]
    assert chunk["embeddings"] == [embedding.model_dump(mode="json")]
    parameters = read_parameters(with_adapters)
    assert parameters is not None
    assert f'Lora hashes: "{tiny_lora_path.stem}: {lora.sha256[:12]}"' in parameters
    assert f'TI hashes: "{TINY_EMBEDDING_TOKEN}: {embedding.sha256[:12]}"' in parameters
    plain_chunk = read_pixelmill(after)
    assert plain_chunk is not None and plain_chunk["kind"] == "txt2img"
    assert "loras" not in plain_chunk and "input_image" not in plain_chunk


# --- bad inputs: the job fails at once, naming the item and what is wrong ------------------------


def item_key(session: Session, job: Job) -> str:
    return session.scalars(
        select(CatalogueItem.external_key).where(CatalogueItem.id == job.item_id)
    ).one()


def test_a_missing_adapter_file_fails_the_job(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: Any, tmp_path: pathlib.Path
) -> None:
    missing = tmp_path / "deleted-lora.safetensors"
    job = make_job(
        db_session,
        model=str(tiny_model_dir),
        options=JobOptions(loras=(LoraRef(path=str(missing), sha256="a" * 64),)),
    )
    assert render_job(runtime, job.id) == "failed"
    status, error = outcome(db_session, job)
    assert status == JobStatus.FAILED
    assert error == (
        f"AdapterError: item '{item_key(db_session, job)}': loras[0]: file not found: {missing}"
    )
    assert stored(db_session, runtime, job) == []


def test_an_adapter_that_does_not_load_fails_the_job(
    runtime: WorkerRuntime,
    db_session: Session,
    tiny_model_dir: Any,
    tiny_sdxl_lora_path: pathlib.Path,
) -> None:
    # An SDXL LoRA for an SD model: found and intact, but it cannot be loaded.
    lora = LoraRef(path=str(tiny_sdxl_lora_path), sha256=file_sha256(tiny_sdxl_lora_path))
    job = make_job(db_session, model=str(tiny_model_dir), options=JobOptions(loras=(lora,)))
    assert render_job(runtime, job.id) == "failed"
    status, error = outcome(db_session, job)
    assert status == JobStatus.FAILED and error is not None
    assert error.startswith(
        f"AdapterError: item '{item_key(db_session, job)}': loras[0]: {tiny_sdxl_lora_path}: "
        "cannot be loaded as a LoRA for this model"
    )
    # The worker's cached pipeline is clean for the next job.
    plain = make_job(db_session, model=str(tiny_model_dir))
    assert render_job(runtime, plain.id) == "done"


def test_a_mask_of_the_wrong_size_fails_the_job(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: Any
) -> None:
    job = make_job(
        db_session,
        model=str(tiny_model_dir),
        kind="inpaint",
        input_image=stage(db_session, runtime, png_bytes(PIL.Image.new("RGB", (128, 96)))),
        mask_image=stage(db_session, runtime, png_bytes(PIL.Image.new("L", (100, 96)))),
        options=JobOptions(mask=MaskSpec(source="column")),
    )
    assert render_job(runtime, job.id) == "failed"
    status, error = outcome(db_session, job)
    assert status == JobStatus.FAILED
    assert error == (
        f"ConditioningError: item '{item_key(db_session, job)}': mask: the mask image is "
        "100x96, the input image 128x96; they must have the same size"
    )


def test_a_missing_staged_image_fails_the_job(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: Any
) -> None:
    image = stage(db_session, runtime, product_png((50, 50)))
    key = db_session.get(InputImage, image).storage_key  # type: ignore[union-attr]
    (runtime.settings.resolved_storage_dir / key).unlink()
    job = make_job(db_session, model=str(tiny_model_dir), kind="img2img", input_image=image)
    assert render_job(runtime, job.id) == "failed"
    _, error = outcome(db_session, job)
    assert error is not None
    assert error.startswith(f"ConditioningError: item '{item_key(db_session, job)}': input image")
    assert f"no object '{key}'" in error


def test_an_input_that_is_not_an_image_fails_the_job(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: Any
) -> None:
    image = stage(db_session, runtime, product_png((40, 40)))
    key = db_session.get(InputImage, image).storage_key  # type: ignore[union-attr]
    runtime.storage.put(key, b"<html>oops</html>", content_type="image/png")
    job = make_job(db_session, model=str(tiny_model_dir), kind="img2img", input_image=image)
    assert render_job(runtime, job.id) == "failed"
    _, error = outcome(db_session, job)
    assert error is not None and f"input image {key}: not a readable image" in error


def test_a_strength_too_low_for_the_steps_fails_the_job(
    runtime: WorkerRuntime, db_session: Session, tiny_model_dir: Any
) -> None:
    job = make_job(
        db_session,
        model=str(tiny_model_dir),
        kind="img2img",
        input_image=stage(db_session, runtime, product_png((30, 30))),
        options=JobOptions(strength=0.2),
    )
    assert render_job(runtime, job.id) == "failed"
    _, error = outcome(db_session, job)
    assert error == (
        "ValueError: steps x strength must be at least 1 (got 3 x 0.2): raise the steps or "
        "the strength"
    )


def test_a_controlnet_for_another_model_fails_the_job(
    runtime: WorkerRuntime,
    db_session: Session,
    tiny_model_dir: Any,
    tiny_sdxl_controlnet_dir: pathlib.Path,
) -> None:
    job = make_job(
        db_session,
        model=str(tiny_model_dir),
        kind="controlnet",
        input_image=stage(db_session, runtime, product_png((30, 30))),
        options=JobOptions(controlnet=ControlNetSpec(model=str(tiny_sdxl_controlnet_dir))),
    )
    assert render_job(runtime, job.id) == "failed"
    _, error = outcome(db_session, job)
    assert error is not None and "made for another base model" in error
    missing = make_job(
        db_session,
        model=str(tiny_model_dir),
        kind="controlnet",
        input_image=job.input_image,
        options=JobOptions(controlnet=ControlNetSpec(model="/nowhere/controlnet")),
    )
    assert render_job(runtime, missing.id) == "failed"
    _, error = outcome(db_session, missing)
    assert error is not None
    assert "controlnet: /nowhere/controlnet: cannot be loaded (ControlNet folder not found" in error

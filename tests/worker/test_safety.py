"""Safety on real Postgres with the tiny model: the prompt blocklist before rendering, the
safety checker's flag after it, and the PNG metadata read back by another tool (sd-parsers)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pathlib

import numpy as np
import PIL.Image
import pytest
import torch
from sd_parsers import ParserManager
from sqlalchemy.orm import Session, sessionmaker

from db.models import Job, JobStatus, RunStatus, SafetyStatus
from pixelmill.blocklist import Blocklist
from pixelmill.storage import LocalStorage
from pixelmill.thumbnails import QUARANTINE_PREFIX
from tests.worker.flagging_model import make_flagging_model
from tests.worker.support import images_of, make_job, make_settings, reload_job
from worker.image_writer import image_key
from worker.loading import PipelineCache
from worker.render import WorkerRuntime, render_job


@pytest.fixture(scope="module")
def flagging_model_dir(
    tiny_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    return make_flagging_model(tiny_model_dir, tmp_path_factory.mktemp("flagging") / "model")


@pytest.fixture(scope="module")
def pipelines() -> PipelineCache:
    return PipelineCache(device=torch.device("cpu"))


def make_runtime(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    sessions: sessionmaker[Session],
    pipelines: PipelineCache,
    **settings: object,
) -> WorkerRuntime:
    values = make_settings(tiny_model_dir, tmp_path, **settings)
    return WorkerRuntime(
        settings=values,
        sessions=sessions,
        storage=LocalStorage(values.resolved_storage_dir),
        pipelines=pipelines,
        name="safety-worker",
    )


# --- the blocklist ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "negative", "rule"),
    [
        ("a GORE-splattered teapot", "blurry", "gore"),
        ("a teapot", "blurry, Blood Bath", "blood bath"),
        ("一个茶壶, 裸体", "", "裸体"),
        ("teapot, nsfw_style", "", "re:nsfw"),
    ],
)
def test_blocked_prompt_is_never_rendered(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    pg_sessions: sessionmaker[Session],
    db_session: Session,
    pipelines: PipelineCache,
    prompt: str,
    negative: str,
    rule: str,
) -> None:
    rules = tmp_path / "blocklist.txt"
    rules.write_text("# test rules\ngore\nblood bath\n裸体\nre:nsfw\n", encoding="utf-8")
    runtime = make_runtime(tmp_path, tiny_model_dir, pg_sessions, pipelines, blocklist_path=rules)
    job = make_job(db_session, model=str(tiny_model_dir), seeds=[1, 2], prompt=prompt)
    row = reload_job(db_session, job.id)
    row.negative_prompt = negative
    db_session.commit()

    assert render_job(runtime, job.id) == "blocked"

    row = reload_job(db_session, job.id)
    assert row.status == JobStatus.BLOCKED
    assert row.error is not None
    assert f"rule {rule!r}" in row.error
    assert str(rules) in row.error
    assert row.finished_at is not None and row.lease_expires_at is None
    assert row.attempts == 1
    assert images_of(db_session, job.id) == []
    assert not runtime.settings.resolved_storage_dir.exists()  # nothing rendered or stored
    # A blocked job ends its run like any other end, and is never claimed again.
    assert row.run.status == RunStatus.FINISHED
    assert render_job(runtime, job.id) == "skipped"
    assert reload_job(db_session, job.id).attempts == 1


def test_default_blocklist_applies_without_a_setting(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    pg_sessions: sessionmaker[Session],
    db_session: Session,
    pipelines: PipelineCache,
) -> None:
    runtime = make_runtime(tmp_path, tiny_model_dir, pg_sessions, pipelines)
    assert runtime.settings.blocklist_path is None
    blocked_term = next(
        line.strip()
        for line in (pathlib.Path("pixelmill/default_blocklist.txt")).read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith("re:")
    )
    job = make_job(db_session, model=str(tiny_model_dir), seeds=[1], prompt=f"a {blocked_term}")

    assert render_job(runtime, job.id) == "blocked"
    assert reload_job(db_session, job.id).status == JobStatus.BLOCKED


def test_explicit_blocklist_on_the_runtime_wins(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    pg_sessions: sessionmaker[Session],
    db_session: Session,
    pipelines: PipelineCache,
) -> None:
    runtime = make_runtime(tmp_path, tiny_model_dir, pg_sessions, pipelines)
    runtime = dataclasses.replace(
        runtime, blocklist=Blocklist.from_lines(["teapot"], source="inline")
    )
    job = make_job(db_session, model=str(tiny_model_dir), seeds=[1])  # "a ceramic teapot, ..."

    assert render_job(runtime, job.id) == "blocked"
    assert "inline:1" in (reload_job(db_session, job.id).error or "")


# --- the safety checker -------------------------------------------------------------------


def _black(png: bytes) -> bool:
    with PIL.Image.open(io.BytesIO(png)) as image:
        return bool(np.asarray(image.convert("RGB")).max() == 0)


def test_flagged_images_go_to_quarantine(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    flagging_model_dir: pathlib.Path,
    pg_sessions: sessionmaker[Session],
    db_session: Session,
    pipelines: PipelineCache,
) -> None:
    runtime = make_runtime(
        tmp_path, tiny_model_dir, pg_sessions, pipelines, thumbnails_at_render=True
    )
    assert runtime.settings.flagged_images == "quarantine"
    job = make_job(db_session, model=str(flagging_model_dir), seeds=[5, 6])

    assert render_job(runtime, job.id) == "done"

    rows = images_of(db_session, job.id)
    assert [row.seed for row in rows] == [5, 6]
    root = runtime.settings.resolved_storage_dir
    for row in rows:
        assert row.safety == SafetyStatus.FLAGGED
        assert row.storage_key.startswith(QUARANTINE_PREFIX)
        png = runtime.storage.get(row.storage_key)
        assert row.storage_key == QUARANTINE_PREFIX + image_key_of(job, row.seed, png)
        assert row.bytes == len(png)
        # The real pixels are kept for review, not diffusers' black replacement.
        assert not _black(png)
    # Nothing outside the quarantine prefix.
    assert not (root / "runs").exists()
    assert {p.relative_to(root).parts[0] for p in root.rglob("*.png")} == {"quarantine"}
    # The thumbnails made at render time too.
    assert {p.relative_to(root).parts[:2] for p in root.rglob("*.jpg")} == {
        ("quarantine", "thumbs")
    }


def image_key_of(job: Job, seed: int, png: bytes) -> str:
    from worker.claim import ClaimedJob

    claimed = ClaimedJob(
        id=job.id, run_id=job.run_id, attempt=1, prompt="", negative_prompt="", model="",
        scheduler=None, steps=1, guidance=0, width=8, height=8, seeds=[],
    )  # fmt: skip
    return image_key(claimed, job.item.external_key, seed, hashlib.sha256(png).hexdigest())


def test_flagged_images_dropped(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    flagging_model_dir: pathlib.Path,
    pg_sessions: sessionmaker[Session],
    db_session: Session,
    pipelines: PipelineCache,
) -> None:
    runtime = make_runtime(tmp_path, tiny_model_dir, pg_sessions, pipelines, flagged_images="drop")
    job = make_job(db_session, model=str(flagging_model_dir), seeds=[5, 6])

    assert render_job(runtime, job.id) == "done"

    rows = images_of(db_session, job.id)
    assert [row.seed for row in rows] == [5, 6]
    for row in rows:
        assert row.safety == SafetyStatus.FLAGGED
        assert row.storage_key == ""
        assert row.bytes > 0 and len(row.sha256) == 64
    assert not runtime.settings.resolved_storage_dir.exists()  # nothing stored at all
    # Same pixels as the quarantined copy would have had: the seed is reproducible.
    assert reload_job(db_session, job.id).status == JobStatus.DONE


def test_safety_checker_off_records_unchecked(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    flagging_model_dir: pathlib.Path,
    pg_sessions: sessionmaker[Session],
    db_session: Session,
) -> None:
    pipelines = PipelineCache(device=torch.device("cpu"), safety_checker=False)
    runtime = make_runtime(tmp_path, tiny_model_dir, pg_sessions, pipelines, safety_checker=False)
    job = make_job(db_session, model=str(flagging_model_dir), seeds=[5])

    assert render_job(runtime, job.id) == "done"

    pipe = pipelines.get(str(flagging_model_dir))
    assert getattr(pipe, "safety_checker", None) is None
    (row,) = images_of(db_session, job.id)
    assert row.safety == SafetyStatus.UNCHECKED
    assert row.storage_key.startswith("runs/")
    assert runtime.storage.exists(row.storage_key)


def test_safe_images_are_stored_normally(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    pg_sessions: sessionmaker[Session],
    db_session: Session,
    pipelines: PipelineCache,
) -> None:
    runtime = make_runtime(tmp_path, tiny_model_dir, pg_sessions, pipelines)
    job = make_job(db_session, model=str(tiny_model_dir), seeds=[5])
    assert render_job(runtime, job.id) == "done"
    (row,) = images_of(db_session, job.id)
    assert row.safety == SafetyStatus.SAFE
    assert row.storage_key.startswith("runs/")


# --- metadata read back by another tool ---------------------------------------------------


@pytest.mark.parametrize(
    ("scheduler", "sampler"), [("euler_a", "Euler a"), ("dpmpp_2m_karras", "DPM++ 2M Karras")]
)
def test_png_parameters_read_back_with_sd_parsers(
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    pg_sessions: sessionmaker[Session],
    db_session: Session,
    pipelines: PipelineCache,
    scheduler: str,
    sampler: str,
) -> None:
    runtime = make_runtime(tmp_path, tiny_model_dir, pg_sessions, pipelines)
    prompt = "a ceramic teapot, (studio lighting:1.2), white background"
    job = make_job(
        db_session, model=str(tiny_model_dir), seeds=[4_294_967_301], prompt=prompt,
        scheduler=scheduler,
    )  # fmt: skip
    row = reload_job(db_session, job.id)
    row.negative_prompt = "blurry, lowres, watermark"
    row.guidance = 6.5
    row.width, row.height = 64, 48
    db_session.commit()

    assert render_job(runtime, job.id) == "done"
    (image,) = images_of(db_session, job.id)
    png = runtime.storage.get(image.storage_key)

    info = ParserManager().parse(io.BytesIO(png))

    assert info is not None
    assert info.generator.value == "AUTOMATIC1111"
    assert info.full_prompt == prompt
    assert info.full_negative_prompt == "blurry, lowres, watermark"
    (parsed,) = info.samplers
    assert parsed.name == sampler
    assert int(parsed.parameters["seed"]) == 4_294_967_301
    assert int(parsed.parameters["steps"]) == 2
    assert float(parsed.parameters["cfg_scale"]) == 6.5
    assert info.metadata["Size"] == "64x48"
    assert parsed.model is not None and parsed.model.name == str(tiny_model_dir)

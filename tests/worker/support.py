"""What the worker tests share: settings for the tiny model on CPU, the render tests' job, and
reading rows back after the worker (in another session) has written them."""

from __future__ import annotations

import pathlib
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import Image, Job, utcnow
from pixelmill.settings import Settings
from tests.factories import make_item
from tests.factories import make_job as make_row_job

PROMPT = "a ceramic teapot, studio lighting"
STEPS = 2


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


def make_job(
    session: Session,
    *,
    model: str,
    seeds: list[int],
    scheduler: str | None = None,
    prompt: str = PROMPT,
) -> Job:
    """A committed, queued job of a new run that renders ``prompt`` with ``model``."""
    return make_row_job(
        session,
        item=make_item(session, fields={"name": "teapot"}),
        model=model,
        seeds=seeds,
        scheduler=scheduler,
        prompt=prompt,
        steps=STEPS,
        guidance=7.0,
    )


def reload_job(session: Session, job_id: int) -> Job:
    session.expire_all()
    job = session.get(Job, job_id)
    assert job is not None
    return job


def reload(session: Session, job: Job) -> Job:
    return reload_job(session, job.id)


def images_of(session: Session, job_id: int) -> list[Image]:
    session.expire_all()
    return list(session.scalars(select(Image).where(Image.job_id == job_id).order_by(Image.seed)))


def expire_lease(session: Session, job_id: int) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(lease_expires_at=utcnow() - timedelta(seconds=5))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    session.expire_all()

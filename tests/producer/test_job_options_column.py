"""A job's options column keeps every choice of its template, the exact fast-path ones too
(the worker renders with them), while its dedupe key leaves those out: turning an exact
option on or off re-renders nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Job
from pixelmill.identity import dedupe_key
from producer.produce import produce
from producer.report import NothingToProduceError

TEMPLATES = """key: sku
defaults: {{steps: 4, width: 64, height: 64}}
templates:
  studio:
    prompt: "photo of a {{{{ title }}}}"
{fast_path}"""


def produce_with(tmp_path: Path, session: Session, fast_path: str, run: str) -> None:
    (tmp_path / "catalogue.csv").write_text("sku,title\nA-1,mug\n")
    (tmp_path / "templates.yaml").write_text(TEMPLATES.format(fast_path=fast_path))
    produce(
        session,
        catalogue_path=tmp_path / "catalogue.csv",
        templates_path=tmp_path / "templates.yaml",
        seeds=2,
        default_model="default/model",
        run_name=run,
    )


def test_exact_fast_path_choices_reach_the_job_and_stay_out_of_its_dedupe_key(
    tmp_path: Path, db_session: Session
) -> None:
    exact = "    fast_path: {channels_last: false, fuse_qkv: false, compile: reduce-overhead}\n"
    produce_with(tmp_path, db_session, exact, "exact")
    job = db_session.scalars(select(Job)).one()
    assert job.options == {
        "fast_path": {"channels_last": False, "fuse_qkv": False, "compile": "reduce-overhead"}
    }
    row = {column.name: getattr(job, column.key) for column in Job.__table__.columns}
    assert job.dedupe_key == dedupe_key(row)

    # The same template without them is the same job: nothing new to render.
    with pytest.raises(NothingToProduceError):
        produce_with(tmp_path, db_session, "", "plain")

    # An option that changes pixels is a new job.
    produce_with(tmp_path, db_session, "    fast_path: {deepcache: 3}\n", "deepcache")
    deepcache = db_session.scalars(select(Job).where(Job.id != job.id)).one()
    assert deepcache.options == {"fast_path": {"deepcache_interval": 3}}
    assert deepcache.dedupe_key != job.dedupe_key

"""Staging: COPY text encoding, chunked merging (in order, deduplicated, a cancelled run's
jobs taken over) on Postgres and SQLite, and errors from the Postgres writer thread reaching
the producer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.migrate import upgrade
from db.models import CatalogueItem, Image, Job, Run
from db.session import make_sessionmaker
from producer import staging
from producer.produce import produce
from producer.report import NothingToProduceError
from producer.runs import cancel_run
from producer.staging import JobShape, copy_text, open_staging

AWKWARD = [
    "plain",
    "back\\slash and \\N and \\.",
    "tab\there",
    "new\nline and carriage\rreturn",
    "\\t is not a tab",
    "ünïcödé 一只 🙂",
    "",
]


def test_copy_text_round_trips_through_postgres(db_session: Session) -> None:
    db_session.execute(text("CREATE TEMPORARY TABLE copy_text_probe (n INT, value TEXT)"))
    raw = db_session.connection().connection.driver_connection
    data = "".join(f"{n}\t{copy_text(value)}\n" for n, value in enumerate(AWKWARD))
    with raw.cursor() as cursor, cursor.copy("COPY copy_text_probe FROM STDIN") as copy:  # type: ignore[union-attr]
        copy.write(data.encode())
    rows = db_session.execute(text("SELECT value FROM copy_text_probe ORDER BY n")).scalars()
    assert list(rows) == AWKWARD


def test_job_shape_encodes_its_columns_once() -> None:
    shape = JobShape("t", "a\\b", "m\tx", None, 25, 7.0, 512, 512)
    assert shape.copy_fields == "t\ta\\\\b\tm\\tx\t\\N\t25\t7.0\t512\t512"
    assert shape.values == ("t", "a\\b", "m\tx", None, 25, 7.0, 512, 512)


TEMPLATES = """\
key: sku
defaults: {steps: 2, width: 64, height: 64, seeds: 2}
templates:
  studio:
    prompt: "photo of {{ title }}, {white|grey} background"
  plain:
    prompt: "{{ title }}"
"""


def write_catalogue(tmp_path: Path, titles: list[str]) -> tuple[Path, Path]:
    catalogue = tmp_path / "catalogue.csv"
    rows = [f"S{n},{title}" for n, title in enumerate(titles)]
    catalogue.write_text("sku,title\n" + "\n".join(rows) + "\n", encoding="utf-8")
    templates = tmp_path / "templates.yaml"
    templates.write_text(TEMPLATES, encoding="utf-8")
    return catalogue, templates


@pytest.fixture
def sqlite_session(tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{tmp_path / 'staging.db'}"
    upgrade(url)
    engine = create_engine(url)
    with make_sessionmaker(engine)() as session:
        yield session
    engine.dispose()


@pytest.fixture(params=["postgres", "sqlite"])
def session(request: pytest.FixtureRequest) -> Session:
    name = "db_session" if request.param == "postgres" else "sqlite_session"
    return request.getfixturevalue(name)


def test_many_chunks_merge_in_catalogue_order_and_deduplicate(
    tmp_path: Path, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 3 jobs per item and a chunk every 4 jobs: items straddle chunk boundaries.
    monkeypatch.setattr(staging, "CHUNK_JOBS", 4)
    titles = [f"item {n} \\ with\ttab" for n in range(11)]
    catalogue, templates = write_catalogue(tmp_path, titles)

    report = produce(session, catalogue_path=catalogue, templates_path=templates, run_name="r1")

    assert (report.jobs, report.jobs_new, report.jobs_unchanged) == (33, 33, 0)
    rows = session.execute(
        select(CatalogueItem.external_key, Job.template, Job.variant, Job.prompt)
        .join(CatalogueItem, CatalogueItem.id == Job.item_id)
        .order_by(Job.id)
    ).all()
    spaced = [" ".join(title.split()) for title in titles]  # prompts collapse whitespace
    expected = [
        (f"S{n}", template, variant, prompt)
        for n, title in enumerate(spaced)
        for template, variant, prompt in (
            ("studio", "white", f"photo of {title}, white background"),
            ("studio", "grey", f"photo of {title}, grey background"),
            ("plain", "", title),
        )
    ]
    assert [tuple(row) for row in rows] == expected
    fields = session.scalars(select(CatalogueItem.fields).order_by(CatalogueItem.id)).all()
    assert fields == [{"sku": f"S{n}", "title": title} for n, title in enumerate(titles)]

    # One item changed, two added: their jobs alone are new, across chunks again.
    titles[5] = "changed"
    catalogue, _ = write_catalogue(tmp_path, [*titles, "new a", "new b"])
    again = produce(session, catalogue_path=catalogue, templates_path=templates, run_name="r2")
    assert (again.jobs, again.jobs_new, again.jobs_unchanged) == (39, 9, 30)
    assert session.scalar(select(func.count()).select_from(Job)) == 42


def test_a_failing_merge_is_raised_in_the_producer_thread(db_session: Session) -> None:
    run = Run(name="broken", source="test", status="active")
    db_session.add(run)
    db_session.flush()
    before = db_session.scalar(select(func.count()).select_from(Job))
    stage = open_staging(db_session, run_id=run.id, source="test")
    bad = JobShape("t", "", "m", None, 0, 7.0, 64, 64)  # steps 0 breaks a CHECK constraint
    with pytest.raises(IntegrityError, match="steps_positive"):
        try:
            for n in range(3 * staging.CHUNK_JOBS):
                stage.add(f"K{n}", "h", {"sku": f"K{n}"}, "{}", [(bad, "p", "", "[1]", f"d{n}")])
            stage.finish()
        except BaseException:
            stage.abort()
            raise
    db_session.rollback()
    assert db_session.scalar(select(func.count()).select_from(Job)) == before


# --------------------------------------------------------------------------- cancelled jobs


def test_a_cancelled_runs_jobs_are_taken_over_by_the_next_run(
    tmp_path: Path, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Several chunks: the count of taken-over jobs adds up across merges (and, on Postgres,
    # in the writer thread).
    monkeypatch.setattr(staging, "CHUNK_JOBS", 4)
    catalogue, templates = write_catalogue(tmp_path, [f"item {n}" for n in range(5)])
    first = produce(session, catalogue_path=catalogue, templates_path=templates, run_name="a")
    assert first.jobs_new == 15
    jobs = session.scalars(select(Job).order_by(Job.id)).all()
    ids = [job.id for job in jobs]
    done, failed, dead, retried = jobs[0], jobs[1], jobs[2], jobs[3]
    done.status, failed.status, dead.status = "done", "failed", "dead"
    # A job that ran, lost its lease and went back to the queue, with one seed rendered.
    earlier = datetime(2024, 1, 1, tzinfo=UTC)
    retried.status, retried.attempts, retried.error = "queued", 2, "CUDA out of memory"
    retried.worker, retried.queued_at, retried.started_at = "gpu-1", earlier, earlier
    retried.lease_expires_at = earlier
    created_in_a = retried.created_at
    session.add(
        Image(
            job_id=retried.id,
            seed=retried.seeds[0],
            storage_key="images/x.png",
            sha256="0" * 64,
            width=64,
            height=64,
            bytes=100,
            safety="unchecked",
            render_seconds=0.1,
        )
    )
    session.commit()
    run_a = session.scalars(select(Run).where(Run.name == "a")).one()
    assert cancel_run(session, run_a) == 12

    second = produce(session, catalogue_path=catalogue, templates_path=templates, run_name="b")

    # The cancelled jobs are this run's now (the same rows: no second job for a key); the
    # done, failed and dead ones stay with run a.
    assert (second.jobs, second.jobs_new, second.jobs_unchanged) == (15, 12, 3)
    session.expire_all()
    jobs = session.scalars(select(Job).order_by(Job.id)).all()
    assert [job.id for job in jobs] == ids
    by_run = {job.id: (job.run_id, job.status) for job in jobs}
    assert [by_run[job_id] for job_id in ids[:3]] == [
        (first.run_id, "done"),
        (first.run_id, "failed"),
        (first.run_id, "dead"),
    ]
    assert {by_run[job_id] for job_id in ids[3:]} == {(second.run_id, "pending")}
    retried = jobs[3]
    assert (retried.attempts, retried.error, retried.worker) == (0, None, None)
    assert (retried.queued_at, retried.started_at) == (None, None)
    assert (retried.lease_expires_at, retried.finished_at) == (None, None)
    assert retried.created_at > created_in_a  # as new as the run's other new jobs
    # Its rendered seed keeps its row: the worker renders only the others.
    assert session.scalar(select(func.count()).where(Image.job_id == retried.id)) == 1

    # Nothing is left to take over: no run "c" at all.
    with pytest.raises(NothingToProduceError) as nothing_new:
        produce(session, catalogue_path=catalogue, templates_path=templates, run_name="c")
    assert (nothing_new.value.report.jobs_new, nothing_new.value.report.jobs_unchanged) == (0, 15)
    assert session.scalar(select(func.count()).where(Run.name == "c")) == 0


def test_a_key_twice_in_one_chunk_is_merged_once(session: Session) -> None:
    # "d1" is a cancelled job of an earlier run, "d2" is new; the chunk holds each twice, and
    # the first of each in catalogue order is the one merged (on either database).
    earlier = Run(name="earlier", source="test", status="cancelled")
    run = Run(name="twice", source="test", status="active")
    session.add_all([earlier, run])
    session.flush()
    stage = open_staging(session, run_id=earlier.id, source="test")
    shape = JobShape("t", "", "m", None, 2, 7.0, 64, 64)
    stage.add("K0", "h0", {"sku": "K0"}, '{"sku": "K0"}', [(shape, "p1", "", "[1]", "d1")])
    assert stage.finish() == 1
    session.execute(update(Job).values(status="cancelled"))

    stage = open_staging(session, run_id=run.id, source="test")
    try:
        stage.add("K1", "h1", {"sku": "K1"}, '{"sku": "K1"}', [(shape, "p1", "", "[1]", "d1")])
        stage.add(
            "K2",
            "h2",
            {"sku": "K2"},
            '{"sku": "K2"}',
            [(shape, "p1", "", "[1]", "d1"), (shape, "p2", "", "[2]", "d2")],
        )
        stage.add("K3", "h3", {"sku": "K3"}, '{"sku": "K3"}', [(shape, "p2", "", "[2]", "d2")])
        new = stage.finish()
    except BaseException:
        stage.abort()
        raise
    assert new == 2  # d1 taken over once, d2 inserted once
    rows = session.execute(
        select(Job.dedupe_key, Job.run_id, Job.status, CatalogueItem.external_key)
        .join(CatalogueItem, CatalogueItem.id == Job.item_id)
        .order_by(Job.id)
    ).all()
    assert [tuple(row) for row in rows] == [
        ("d1", run.id, "pending", "K1"),
        ("d2", run.id, "pending", "K2"),
    ]


# --------------------------------------------------------------------------- memory


def test_items_without_jobs_are_merged_in_chunks_too(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging, "CHUNK_JOBS", 4)
    run = Run(name="jobless", source="test", status="active")
    session.add(run)
    session.flush()
    stage = open_staging(session, run_id=run.id, source="test")
    chunks: list[int] = []
    flush = stage._flush

    def counting_flush() -> None:
        chunks.append(1)
        flush()

    monkeypatch.setattr(stage, "_flush", counting_flush)
    try:
        for n in range(10):
            stage.add(f"K{n}", f"h{n}", {"sku": f"K{n}"}, json.dumps({"sku": f"K{n}"}), [])
        # Every 4 items a chunk goes, though no item has a job.
        assert len(chunks) == 2
        stage.finish()
    except BaseException:
        stage.abort()
        raise
    assert len(chunks) == 3
    keys = session.scalars(select(CatalogueItem.external_key).order_by(CatalogueItem.id)).all()
    assert keys == [f"K{n}" for n in range(10)]

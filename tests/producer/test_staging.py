"""Staging: COPY text encoding, chunked merging (in order, deduplicated) on Postgres and
SQLite, and errors from the Postgres writer thread reaching the producer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.migrate import upgrade
from db.models import CatalogueItem, Job, Run
from db.session import make_sessionmaker
from producer import staging
from producer.produce import produce
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

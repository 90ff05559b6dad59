"""Nothing to do is not a run: a catalogue with no rows, every row refused, no template
applying, or every job made already (by an earlier or a concurrent produce) writes nothing
and says why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import Session

from db.models import CatalogueItem, Job, Run
from db.session import make_engine
from producer.produce import produce
from producer.report import NothingToProduceError, ProduceReport
from tests.producer.spreadsheets import write_xlsx
from tests.races import race

TEMPLATES = """\
key: sku
defaults: {steps: 2, width: 64, height: 64, seeds: 2}
templates:
  studio:
    when: "kind != 'service'"
    prompt: "photo of a {{ title }}"
"""


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    (tmp_path / "templates.yaml").write_text(TEMPLATES)
    return path


def counts(session: Session) -> tuple[int, int, int]:
    return tuple(  # type: ignore[return-value]
        session.scalar(select(func.count()).select_from(table))
        for table in (Run, CatalogueItem, Job)
    )


def refused(session: Session | None, catalogue: Path, **options: object) -> NothingToProduceError:
    with pytest.raises(NothingToProduceError) as info:
        produce(
            session,
            catalogue_path=catalogue,
            templates_path=catalogue.parent / "templates.yaml",
            run_name="nothing",
            **options,  # type: ignore[arg-type]
        )
    assert str(info.value).endswith("; no run was written")
    return info.value


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("header.csv", "sku,title,kind\n"),
        ("header-blank-lines.csv", "sku,title,kind\n\n,,\n\n"),
        ("header-crlf.csv", "sku;title;kind\r\n"),
    ],
)
def test_a_header_alone(tmp_path: Path, db_session: Session, name: str, content: str) -> None:
    error = refused(db_session, write(tmp_path, name, content))
    assert "nothing to produce: the catalogue has no rows (a header alone)" in str(error)
    assert counts(db_session) == (0, 0, 0)
    # A dry run says the same: it validates what a real run would do.
    assert "a header alone" in str(refused(None, tmp_path / name, dry_run=True))


def test_a_header_alone_in_a_spreadsheet_and_an_empty_table(
    tmp_path: Path, db_session: Session, fresh_database_url: str
) -> None:
    sheet = write_xlsx(tmp_path / "cat.xlsx", [("S", [["sku", "title", "kind"], [None, None]])])
    write(tmp_path, "unused.csv", "")
    assert "a header alone" in str(refused(db_session, sheet))

    engine = create_engine(fresh_database_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE products (sku TEXT, title TEXT, kind TEXT)"))
    engine.dispose()
    with pytest.raises(NothingToProduceError, match="no rows"):
        produce(
            db_session,
            catalogue_path=fresh_database_url,
            table="products",
            templates_path=tmp_path / "templates.yaml",
            run_name="nothing",
        )
    assert counts(db_session) == (0, 0, 0)


@pytest.mark.parametrize(
    ("content", "bad"),
    [
        ("sku,title,kind\nA,,x\nB,,y\n", 2),  # the prompt's field is empty
        ("sku,title,kind\nA,mug\nB,lamp,x,extra\n", 2),  # ragged rows
        ("sku,title,kind\n,mug,x\n,lamp,x\n", 2),  # no key
        ("sku,title,kind\nA,mug\x00,x\n", 1),  # a NUL the database cannot store
    ],
    ids=["empty-field", "ragged", "keys", "nul"],
)
def test_every_row_refused(tmp_path: Path, db_session: Session, content: str, bad: int) -> None:
    error = refused(db_session, write(tmp_path, "cat.csv", content))

    assert f"every row was refused ({bad} bad rows)" in str(error)
    assert error.report.problems_total == bad
    assert counts(db_session) == (0, 0, 0)


def test_one_good_row_among_bad_ones_is_a_run(tmp_path: Path, db_session: Session) -> None:
    catalogue = write(tmp_path, "cat.csv", "sku,title,kind\n,mug,x\nA,lamp,x\nA,cup,x\n")
    report = produce(
        db_session,
        catalogue_path=catalogue,
        templates_path=tmp_path / "templates.yaml",
        run_name="some",
    )
    assert (report.items, report.rows_skipped, report.jobs_new) == (1, 2, 1)


def test_no_template_applies(tmp_path: Path, db_session: Session) -> None:
    catalogue = write(tmp_path, "cat.csv", "sku,title,kind\nA,repair,service\nB,setup,service\n")
    error = refused(db_session, catalogue)
    assert "no template applies to any of the 2 items" in str(error)
    assert counts(db_session) == (0, 0, 0)


def test_every_job_made_by_an_earlier_run(tmp_path: Path, db_session: Session) -> None:
    catalogue = write(tmp_path, "cat.csv", "sku,title,kind\nA,mug,x\nB,lamp,x\n")
    first = produce(
        db_session, catalogue_path=catalogue, templates_path=tmp_path / "templates.yaml"
    )
    before = counts(db_session)

    error = refused(db_session, catalogue)

    assert "all 2 jobs were made already" in str(error) and "--force" in str(error)
    assert counts(db_session) == before
    assert db_session.scalar(select(func.count()).where(Run.id != first.run_id)) == 0


@pytest.fixture
def engine(fresh_database_url: str) -> Iterator[Engine]:
    engine = make_engine(fresh_database_url)
    yield engine
    engine.dispose()


def test_every_job_made_by_a_concurrent_produce(tmp_path: Path, engine: Engine) -> None:
    catalogue = write(tmp_path, "cat.csv", "sku,title,kind\nA,mug,x\nB,lamp,x\nC,cup,x\n")
    templates = tmp_path / "templates.yaml"

    def first(session: Session) -> ProduceReport:
        return produce(session, catalogue_path=catalogue, templates_path=templates, run_name="a")

    def second(session: Session) -> NothingToProduceError | ProduceReport:
        try:
            return produce(
                session, catalogue_path=catalogue, templates_path=templates, run_name="b"
            )
        except NothingToProduceError as exc:
            return exc

    # The first holds its transaction open once its jobs are merged (at the run's lock);
    # the second meets its uncommitted jobs, waits for them, then finds them all made.
    result = race(engine, first, second, hold_after="for no key update")

    assert result.second_waited
    assert result.first.jobs_new == 3
    assert isinstance(result.second, NothingToProduceError)
    assert "all 3 jobs were made already" in str(result.second)
    with Session(engine) as session:
        assert session.scalars(select(Run.name)).all() == ["a"]
        assert session.scalar(select(func.count()).select_from(Job)) == 3

"""produce() features: variants, wildcards, presets, ``when``, dedupe across runs, ``force``,
``max_jobs``, dry runs, the blocklist, token warnings, JSONL and SQL catalogues, priority.

Runs against the real (migrated) Postgres database through ``db_session``; assertions read
the rows back from the database rather than trusting the report alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Table,
    Text,
    create_engine,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from db.models import CatalogueItem, Job, Run, RunStatus
from db.session import make_engine, make_sessionmaker
from pixelmill.blocklist import Blocklist
from pixelmill.errors import InputError
from pixelmill.seeds import seed_sweep
from producer.produce import produce
from producer.report import (
    ExpansionLimitError,
    NothingToProduceError,
    ProduceReport,
    StrictModeError,
)
from producer.runs import cancel_run

DEFAULT_MODEL = "default/model"

CATALOGUE = """\
sku,title,colour,category
A1,mug,red,mugs
A2,lamp,blue,lamps
A3,chair,green,chairs
"""

TWO_TEMPLATES = """\
key: sku
defaults: {steps: 2, width: 64, height: 64, seeds: 2}
templates:
  studio:
    prompt: "photo of a {{ colour }} {{ title }}"
  scene:
    prompt: "{{ title }} in a kitchen"
    seeds: 3
"""


def write_inputs(
    tmp_path: Path,
    catalogue: str = CATALOGUE,
    templates: str = TWO_TEMPLATES,
    *,
    name: str = "catalogue.csv",
) -> tuple[Path, Path]:
    catalogue_path = tmp_path / name
    catalogue_path.write_text(catalogue, encoding="utf-8")
    templates_path = tmp_path / "templates.yaml"
    templates_path.write_text(templates, encoding="utf-8")
    return catalogue_path, templates_path


def run_produce(
    session: Session | None,
    catalogue_path: Path | str,
    templates_path: Path,
    *,
    run_name: str = "run-1",
    **kwargs: Any,
) -> ProduceReport:
    return produce(
        session,
        catalogue_path=catalogue_path,
        templates_path=templates_path,
        default_model=DEFAULT_MODEL,
        run_name=run_name,
        **kwargs,
    )


def row_counts(session: Session) -> dict[str, int]:
    return {
        model.__tablename__: session.scalar(select(func.count()).select_from(model)) or 0
        for model in (Run, CatalogueItem, Job)
    }


def job_rows(session: Session, run_id: int | None = None) -> list[dict[str, Any]]:
    query = (
        select(Job.__table__, CatalogueItem.external_key, CatalogueItem.source.label("item_source"))
        .join(CatalogueItem, CatalogueItem.id == Job.item_id)
        .order_by(Job.id)
    )
    if run_id is not None:
        query = query.where(Job.run_id == run_id)
    return [dict(row) for row in session.execute(query).mappings()]


# --------------------------------------------------------------------------- variants


VARIANT_TEMPLATES = """\
key: sku
defaults: {steps: 2, width: 64, height: 64, seeds: 2}
templates:
  art:
    prompt: "{{ title }}, {oil painting|watercolour}"
"""


def test_variants_make_one_job_per_label_with_their_own_seeds(
    tmp_path: Path, db_session: Session
) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path, templates=VARIANT_TEMPLATES)

    report = run_produce(db_session, catalogue_path, templates_path)

    jobs = job_rows(db_session)
    assert (report.items, report.jobs, report.jobs_new) == (3, 6, 6)
    assert report.images_planned == 12
    by_key = {(job["external_key"], job["variant"]): job for job in jobs}
    assert len(by_key) == 6
    for sku, title in (("A1", "mug"), ("A2", "lamp"), ("A3", "chair")):
        oil = by_key[(sku, "oil painting")]
        water = by_key[(sku, "watercolour")]
        assert oil["prompt"] == f"{title}, oil painting"
        assert water["prompt"] == f"{title}, watercolour"
        assert oil["seeds"] == seed_sweep(sku, "art", 2, variant="oil painting")
        assert water["seeds"] == seed_sweep(sku, "art", 2, variant="watercolour")
        assert set(oil["seeds"]).isdisjoint(water["seeds"])
        assert oil["dedupe_key"] != water["dedupe_key"]


def test_wildcard_file_next_to_the_template_file(tmp_path: Path, db_session: Session) -> None:
    templates = """\
key: sku
defaults: {steps: 2, width: 64, height: 64, seeds: 1}
templates:
  tinted:
    prompt: "__tints__ {{ title }}"
"""
    catalogue_path, templates_path = write_inputs(
        tmp_path, catalogue="sku,title\nA1,mug\n", templates=templates
    )
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "tints.txt").write_text("pastel\nneon\n", encoding="utf-8")

    report = run_produce(db_session, catalogue_path, templates_path)

    assert report.jobs_new == 2
    jobs = {job["variant"]: job for job in job_rows(db_session)}
    assert set(jobs) == {"pastel", "neon"}
    assert jobs["pastel"]["prompt"] == "pastel mug"
    assert jobs["neon"]["prompt"] == "neon mug"
    assert jobs["pastel"]["seeds"] == seed_sweep("A1", "tinted", 1, variant="pastel")
    assert jobs["neon"]["seeds"] == seed_sweep("A1", "tinted", 1, variant="neon")


def test_preset_before_after_and_negative_reach_the_job(
    tmp_path: Path, db_session: Session
) -> None:
    templates = """\
key: sku
defaults: {steps: 2, width: 64, height: 64, seeds: 1}
presets:
  photo:
    before: "best quality"
    after: "soft light"
    negative_prompt: "text, watermark"
templates:
  shot:
    prompt: "{{ colour }} {{ title }}"
    preset: photo
    negative_prompt: "blurry"
"""
    catalogue_path, templates_path = write_inputs(tmp_path, templates=templates)

    run_produce(db_session, catalogue_path, templates_path)

    jobs = {job["external_key"]: job for job in job_rows(db_session)}
    assert set(jobs) == {"A1", "A2", "A3"}
    assert jobs["A1"]["prompt"] == "best quality, red mug, soft light"
    assert jobs["A2"]["prompt"] == "best quality, blue lamp, soft light"
    assert jobs["A1"]["negative_prompt"] == "text, watermark, blurry"
    assert jobs["A1"]["variant"] == ""


# --------------------------------------------------------------------------- when


def test_when_selects_items_and_items_without_jobs_are_counted(
    tmp_path: Path, db_session: Session
) -> None:
    templates = """\
key: sku
defaults: {steps: 2, width: 64, height: 64, seeds: 1}
templates:
  mugshot:
    prompt: "{{ title }} on a table"
    when: "category == 'mugs'"
  lampshot:
    prompt: "{{ title }} at night"
    when: "category == 'lamps'"
"""
    catalogue_path, templates_path = write_inputs(tmp_path, templates=templates)

    report = run_produce(db_session, catalogue_path, templates_path)

    assert (report.items, report.jobs, report.items_without_jobs) == (3, 2, 1)
    made = {(job["external_key"], job["template"]) for job in job_rows(db_session)}
    assert made == {("A1", "mugshot"), ("A2", "lampshot")}
    # The item without jobs is still stored as a catalogue item.
    keys = set(db_session.scalars(select(CatalogueItem.external_key)))
    assert keys == {"A1", "A2", "A3"}


# --------------------------------------------------------------------------- dedupe, force


def test_dedupe_across_runs_and_force(tmp_path: Path, db_session: Session) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path)
    first = run_produce(db_session, catalogue_path, templates_path, run_name="run-1")
    assert (first.jobs, first.jobs_new, first.jobs_unchanged) == (6, 6, 0)
    originals = job_rows(db_session)

    with pytest.raises(NothingToProduceError) as nothing_new:
        run_produce(db_session, catalogue_path, templates_path, run_name="run-2")
    assert nothing_new.value.report.jobs == 6
    assert row_counts(db_session)["jobs"] == 6
    assert db_session.scalar(select(func.count()).where(Run.name == "run-2")) == 0

    catalogue_path.write_text(CATALOGUE.replace("A2,lamp,blue", "A2,lamp,yellow"))
    third = run_produce(db_session, catalogue_path, templates_path, run_name="run-3")
    # Only the "studio" template uses the colour: one new job, for A2 alone.
    assert (third.jobs, third.jobs_new, third.jobs_unchanged) == (6, 1, 5)
    new_jobs = job_rows(db_session, third.run_id)
    assert [(job["external_key"], job["template"]) for job in new_jobs] == [("A2", "studio")]
    assert new_jobs[0]["prompt"] == "photo of a yellow lamp"

    forced = run_produce(db_session, catalogue_path, templates_path, run_name="run-4", force=True)
    assert (forced.jobs, forced.jobs_new, forced.jobs_unchanged) == (6, 6, 0)
    forced_jobs = job_rows(db_session, forced.run_id)
    assert len(forced_jobs) == 6
    earlier = {
        (job["external_key"], job["template"], job["prompt"]): job for job in originals + new_jobs
    }
    for job in forced_jobs:
        before = earlier[(job["external_key"], job["template"], job["prompt"])]
        assert job["seeds"] == before["seeds"]
        assert job["dedupe_key"] != before["dedupe_key"]
    assert row_counts(db_session)["jobs"] == 13


# --------------------------------------------------------------------------- max_jobs


def test_expansion_beyond_max_jobs_writes_nothing(tmp_path: Path, db_session: Session) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path)  # 3 items x 2 templates

    with pytest.raises(ExpansionLimitError) as excinfo:
        run_produce(db_session, catalogue_path, templates_path, max_jobs=5)

    assert excinfo.value.line == 4  # the third item pushes it over
    assert "5" in str(excinfo.value) and "--max-jobs" in str(excinfo.value)
    assert row_counts(db_session) == {"runs": 0, "catalogue_items": 0, "jobs": 0}


def test_expansion_exactly_at_max_jobs_is_fine(tmp_path: Path, db_session: Session) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path)

    report = run_produce(db_session, catalogue_path, templates_path, max_jobs=6)

    assert report.jobs_new == 6
    assert row_counts(db_session) == {"runs": 1, "catalogue_items": 3, "jobs": 6}


# --------------------------------------------------------------------------- dry run


def test_dry_run_reports_totals_and_samples_and_writes_nothing(
    tmp_path: Path, db_session: Session
) -> None:
    catalogue = CATALOGUE + "A4,vase,white,vases\nA5,desk,oak,desks\n"
    catalogue_path, templates_path = write_inputs(tmp_path, catalogue=catalogue)

    report = run_produce(None, catalogue_path, templates_path, dry_run=True)

    assert report.dry_run is True
    assert report.run_id is None
    assert (report.rows, report.rows_skipped, report.items, report.jobs) == (5, 0, 5, 10)
    assert report.images_planned == 5 * 2 + 5 * 3
    assert report.jobs_new == 0
    assert set(report.samples) == {"studio", "scene"}
    assert report.samples["studio"] == [
        "photo of a red mug",
        "photo of a blue lamp",
        "photo of a green chair",
    ]
    assert len(report.samples["scene"]) == 3
    assert row_counts(db_session) == {"runs": 0, "catalogue_items": 0, "jobs": 0}


LONG_LABEL_TEMPLATES = f"""\
key: sku
defaults: {{steps: 2, width: 64, height: 64, seeds: 1}}
templates:
  fits:
    prompt: "{{{{ title }}}}, {{{"a" * 500}|b}}"
  too_long:
    prompt: "{{{{ title }}}}, {{{"c" * 501}|d}}"
    when: "category == 'mugs'"
"""


def assert_unstorable_rows_reported(report: ProduceReport, catalogue_path: Path) -> None:
    """What a catalogue with a NUL, an over-long key and an over-long variant label gives."""
    assert not report.complete
    assert (report.rows, report.rows_skipped, report.items) == (5, 3, 2)
    where = {(problem.line, problem.field): str(problem) for problem in report.problems}
    assert set(where) == {(2, None), (4, "sku"), (5, "category")}
    assert all(problem.path == str(catalogue_path) for problem in report.problems)
    assert "template 'too_long': variant label 'ccc" in where[(2, None)]
    assert "is 501 characters; the jobs table holds at most 500" in where[(2, None)]
    assert "is 201 characters; the database holds at most 200" in where[(4, "sku")]
    assert "NUL character" in where[(5, "category")]


def unstorable_catalogue(tmp_path: Path) -> tuple[Path, Path]:
    catalogue = (
        "sku,title,colour,category\n"
        "A1,mug,red,mugs\n"  # the over-long label: too_long applies to mugs alone
        "A2,lamp,blue,lamps\n"
        f"{'K' * 201},chair,green,chairs\n"
        "A4,vase,white,va\x00ses\n"  # a field no template uses
        "A5,desk,oak,desks\n"
    )
    return write_inputs(tmp_path, catalogue=catalogue, templates=LONG_LABEL_TEMPLATES)


def test_rows_the_database_cannot_store_are_bad_rows(tmp_path: Path, db_session: Session) -> None:
    catalogue_path, templates_path = unstorable_catalogue(tmp_path)

    report = run_produce(db_session, catalogue_path, templates_path)

    assert_unstorable_rows_reported(report, catalogue_path)
    jobs = job_rows(db_session, report.run_id)
    assert [(job["external_key"], job["variant"]) for job in jobs] == [
        (sku, variant) for sku in ("A2", "A5") for variant in ("a" * 500, "b")
    ]


def test_a_nul_character_from_the_template_makes_its_rows_bad(
    tmp_path: Path, db_session: Session
) -> None:
    templates = TWO_TEMPLATES.replace('"{{ title }} in a kitchen"', '"{{ title }} in a\\0 kitchen"')
    catalogue_path, templates_path = write_inputs(tmp_path, templates=templates)

    with pytest.raises(NothingToProduceError, match=r"every row was refused \(3 bad rows\)") as exc:
        run_produce(db_session, catalogue_path, templates_path)

    report = exc.value.report
    assert (report.rows_skipped, report.items, report.jobs_new) == (3, 0, 0)
    assert db_session.scalar(select(func.count()).select_from(Run)) == 0
    assert [(problem.line, problem.field) for problem in report.problems] == [
        (2, None),
        (3, None),
        (4, None),
    ]
    assert "template 'scene': the prompt of item 'A1' contains a NUL character" in str(
        report.problems[0]
    )


def test_dry_run_reports_rows_the_database_cannot_store(tmp_path: Path) -> None:
    catalogue_path, templates_path = unstorable_catalogue(tmp_path)

    report = run_produce(None, catalogue_path, templates_path, dry_run=True)

    assert_unstorable_rows_reported(report, catalogue_path)


def test_dry_run_still_refuses_an_expansion_over_max_jobs(tmp_path: Path) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path)

    with pytest.raises(ExpansionLimitError):
        run_produce(None, catalogue_path, templates_path, dry_run=True, max_jobs=2)


def test_session_required_without_dry_run(tmp_path: Path) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path)

    with pytest.raises(ValueError, match="session"):
        run_produce(None, catalogue_path, templates_path)


# --------------------------------------------------------------------------- blocklist


BLOCKED_CATALOGUE = """\
sku,title,colour,category
A1,mug,red,mugs
A2,Forbidden lamp,blue,lamps
A3,chair,green,chairs
"""


def test_blocked_prompt_skips_the_row_with_a_located_problem(
    tmp_path: Path, db_session: Session
) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path, catalogue=BLOCKED_CATALOGUE)
    blocklist = Blocklist.from_lines(["forbidden"], source="test")

    report = run_produce(db_session, catalogue_path, templates_path, blocklist=blocklist)

    assert (report.rows, report.rows_skipped, report.items) == (3, 1, 2)
    assert report.problems_total == 1
    problem = report.problems[0]
    assert problem.line == 3
    assert f"{catalogue_path}:3" in str(problem)
    assert "'forbidden'" in str(problem)  # the rule
    assert "blocked" in str(problem)
    assert not report.complete
    assert {job["external_key"] for job in job_rows(db_session)} == {"A1", "A3"}
    assert set(db_session.scalars(select(CatalogueItem.external_key))) == {"A1", "A3"}


def test_blocked_prompt_in_strict_mode_writes_nothing(tmp_path: Path, db_session: Session) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path, catalogue=BLOCKED_CATALOGUE)
    blocklist = Blocklist.from_lines(["forbidden"], source="test")

    with pytest.raises(StrictModeError) as excinfo:
        run_produce(db_session, catalogue_path, templates_path, blocklist=blocklist, strict=True)

    assert excinfo.value.total == 1
    assert excinfo.value.problems[0].line == 3
    assert row_counts(db_session) == {"runs": 0, "catalogue_items": 0, "jobs": 0}


# --------------------------------------------------------------------------- token warnings


def test_long_prompt_warns_about_tokens_but_still_makes_the_job(
    tmp_path: Path, db_session: Session
) -> None:
    long_title = " ".join(["ceramic"] * 120)
    catalogue = f"sku,title,colour,category\nA1,mug,red,mugs\nA2,{long_title},blue,lamps\n"
    catalogue_path, templates_path = write_inputs(tmp_path, catalogue=catalogue)

    report = run_produce(db_session, catalogue_path, templates_path)

    assert report.rows_skipped == 0
    assert report.warnings_total >= 1
    assert report.warnings
    for warning in report.warnings:
        assert warning.line == 3
        assert f"{catalogue_path}:3" in str(warning)
        assert "tokens" in str(warning)
    jobs = {(job["external_key"], job["template"]): job for job in job_rows(db_session)}
    assert len(jobs) == 4
    assert jobs[("A2", "studio")]["prompt"] == f"photo of a blue {long_title}"


# --------------------------------------------------------------------------- sources


def test_jsonl_catalogue(tmp_path: Path, db_session: Session) -> None:
    lines = [
        {"sku": "J1", "title": "mug", "colour": "red", "category": "mugs"},
        {"sku": "J2", "title": "lamp", "colour": "blue", "category": "lamps", "price": 12},
    ]
    catalogue_path, templates_path = write_inputs(
        tmp_path,
        catalogue="".join(json.dumps(line) + "\n" for line in lines),
        name="catalogue.jsonl",
    )

    report = run_produce(db_session, catalogue_path, templates_path)

    assert (report.rows, report.items, report.jobs_new) == (2, 2, 4)
    jobs = {(job["external_key"], job["template"]): job for job in job_rows(db_session)}
    assert jobs[("J1", "studio")]["prompt"] == "photo of a red mug"
    assert jobs[("J2", "scene")]["prompt"] == "lamp in a kitchen"
    assert jobs[("J2", "scene")]["seeds"] == seed_sweep("J2", "scene", 3)
    assert {job["item_source"] for job in jobs.values()} == {"catalogue.jsonl"}
    fields = db_session.scalar(
        select(CatalogueItem.fields).where(CatalogueItem.external_key == "J2")
    )
    assert fields is not None and fields["price"] == "12"


def test_sql_catalogue(tmp_path: Path, db_session: Session, fresh_database_url: str) -> None:
    engine = create_engine(fresh_database_url)
    metadata = MetaData()
    products = Table(
        "products",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("sku", Text, nullable=False),
        Column("title", Text, nullable=False),
        Column("colour", Text, nullable=False),
    )
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                insert(products),
                [
                    {"id": 1, "sku": "S1", "title": "mug", "colour": "red"},
                    {"id": 2, "sku": "S2", "title": "lamp", "colour": "blue"},
                ],
            )
    finally:
        engine.dispose()
    _, templates_path = write_inputs(tmp_path)

    report = run_produce(db_session, fresh_database_url, templates_path, table="products")

    assert (report.rows, report.items, report.jobs_new) == (2, 2, 4)
    jobs = {(job["external_key"], job["template"]): job for job in job_rows(db_session)}
    assert set(jobs) == {(sku, t) for sku in ("S1", "S2") for t in ("studio", "scene")}
    assert jobs[("S2", "studio")]["prompt"] == "photo of a blue lamp"
    assert {job["item_source"] for job in jobs.values()} == {"sql:products"}
    run = db_session.get(Run, report.run_id)
    assert run is not None and run.source == "sql:products"


# --------------------------------------------------------------------------- priority


def test_priority_is_stored_on_the_run(tmp_path: Path, db_session: Session) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path)

    report = run_produce(db_session, catalogue_path, templates_path, priority=5)

    priorities = db_session.execute(select(Run.id, Run.priority)).all()
    assert priorities == [(report.run_id, 5)]

    # Producing into the run again keeps its priority unless one is given.
    run_produce(db_session, catalogue_path, templates_path)
    assert db_session.scalar(select(Run.priority)) == 5
    run_produce(db_session, catalogue_path, templates_path, priority=-2)
    assert db_session.scalar(select(Run.priority)) == -2
    # A new run without one gets 0.
    run_produce(db_session, catalogue_path, templates_path, run_name="run-2", force=True)
    assert db_session.scalar(select(Run.priority).where(Run.name == "run-2")) == 0


# --------------------------------------------------------------------------- runs


@pytest.fixture
def committed_sessions(fresh_database_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on a database of their own, whose commits other connections see."""
    engine = make_engine(fresh_database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_a_run_cancelled_while_the_catalogue_is_read_refuses_the_produce(
    tmp_path: Path, committed_sessions: sessionmaker[Session]
) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path)
    with committed_sessions() as session:
        run_produce(session, catalogue_path, templates_path, run_name="nightly")
    catalogue_path.write_text(CATALOGUE.replace("A2,lamp,blue", "A2,lamp,yellow"))
    cancelled: list[int] = []

    def cancel_meanwhile(_rows: int, _jobs: int) -> None:
        # `run cancel` from another connection, while the produce's jobs are not committed.
        if not cancelled:
            with committed_sessions() as other:
                run = other.scalars(select(Run).where(Run.name == "nightly")).one()
                cancelled.append(cancel_run(other, run))

    with (
        committed_sessions() as session,
        pytest.raises(InputError, match="'nightly' was cancelled"),
    ):
        run_produce(
            session, catalogue_path, templates_path, run_name="nightly", progress=cancel_meanwhile
        )
    assert cancelled == [6]
    with committed_sessions() as session:
        statuses = session.scalars(
            select(Job.status).join(Run, Run.id == Job.run_id).where(Run.name == "nightly")
        ).all()
        assert sorted(statuses) == ["cancelled"] * 6  # the produce's seventh job is not there


def test_a_run_finished_while_the_catalogue_is_read_is_active_again(
    tmp_path: Path, committed_sessions: sessionmaker[Session]
) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path)
    with committed_sessions() as session:
        run_produce(session, catalogue_path, templates_path, run_name="nightly")
    catalogue_path.write_text(CATALOGUE.replace("A2,lamp,blue", "A2,lamp,yellow"))

    def finish_meanwhile(_rows: int, _jobs: int) -> None:
        # What a worker ending the run's last earlier job writes: it cannot see the
        # produce's new jobs yet.
        with committed_sessions() as other:
            other.execute(
                update(Run)
                .where(Run.name == "nightly")
                .values(status=RunStatus.FINISHED, finished_at=func.now())
            )
            other.commit()

    with committed_sessions() as session:
        report = run_produce(
            session, catalogue_path, templates_path, run_name="nightly", progress=finish_meanwhile
        )
    assert report.jobs_new == 1
    with committed_sessions() as session:
        run = session.scalars(select(Run).where(Run.name == "nightly")).one()
        assert (run.status, run.finished_at) == (RunStatus.ACTIVE, None)

        # Producing nothing new into a finished run leaves it finished: no job would end it.
        session.execute(update(Run).values(status=RunStatus.FINISHED, finished_at=func.now()))
        session.commit()
        again = run_produce(session, catalogue_path, templates_path, run_name="nightly")
        assert again.jobs_new == 0
        session.refresh(run)
        assert run.status == RunStatus.FINISHED


# --------------------------------------------------------------------------- known bugs


def test_producing_into_a_cancelled_run_is_refused(tmp_path: Path, db_session: Session) -> None:
    from pixelmill.errors import InputError
    from producer.runs import cancel_run

    catalogue_path, templates_path = write_inputs(tmp_path)
    first = run_produce(db_session, catalogue_path, templates_path, run_name="nightly")
    run = db_session.get(Run, first.run_id)
    assert run is not None
    cancel_run(db_session, run)
    catalogue_path.write_text(CATALOGUE.replace("A2,lamp,blue", "A2,lamp,yellow"))

    with pytest.raises(InputError, match="cancelled"):
        run_produce(db_session, catalogue_path, templates_path, run_name="nightly")

    statuses = db_session.scalars(select(Job.status).where(Job.run_id == run.id)).all()
    assert "pending" not in statuses


# --------------------------------------------------------------------------- persisted keys

PINNED_TEMPLATES = """\
key: sku
defaults: {model: tiny, steps: 25, guidance: 7, width: 512, height: 512, seeds: 2}
templates:
  studio:
    prompt: "photo of a {{ colour }} {{ title }}"
    negative_prompt: "lowres, blurry"
"""
# Computed by the producer before its hot path was reworked: dedupe keys, content hashes and
# seeds are stored, so a change here would re-render every catalogue.
PINNED_DEDUPE_KEY = "179142ca6c41b92b9418e8279e2c5a9dd6e633d872be62f9212354d67ce814f0"
PINNED_JOB: dict[str, Any] = {
    "model": "tiny",
    "scheduler": None,
    "steps": 25,
    "guidance": 7,
    "width": 512,
    "height": 512,
    "prompt": "photo of a red mug, ünï \\ 一",
    "negative_prompt": "lowres, blurry",
    "seeds": [1116485785, 3034591822],
}


def test_dedupe_keys_and_content_hashes_are_the_persisted_ones(
    tmp_path: Path, db_session: Session
) -> None:
    from pixelmill.identity import content_hash, dedupe_key

    assert dedupe_key(PINNED_JOB) == PINNED_DEDUPE_KEY
    assert (
        dedupe_key({**PINNED_JOB, "scheduler": "euler_a"}, "force:x")
        == "662c2f26cfeeb23132f43f8857121c64c050e7bdf4bf454c45e9a6022a1a591c"
    )
    fields = {"sku": "A1", "title": "mug", "colour": "ünï"}
    assert content_hash(fields) == (
        "66b86d66a32f07d711bd4a5f48b9310d5de102f0c33480dce8505b91f3515356"
    )

    # The producer's own path (hash states prepared per template variant) stores the same.
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text('sku,title,colour\nSKU-1,"mug, ünï \\ 一",red\n', encoding="utf-8")
    templates = tmp_path / "templates.yaml"
    templates.write_text(PINNED_TEMPLATES, encoding="utf-8")
    report = run_produce(db_session, catalogue, templates)
    [job] = job_rows(db_session, report.run_id)
    assert (job["prompt"], job["seeds"]) == (PINNED_JOB["prompt"], PINNED_JOB["seeds"])
    assert job["dedupe_key"] == PINNED_DEDUPE_KEY

"""produce(): catalogue + templates -> one run, catalogue item versions and deduplicated jobs.

Runs against the real (migrated) Postgres database through ``db_session``; every assertion
reads the rows back from the database rather than trusting the report alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import CatalogueItem, Job, JobStatus, Run, RunStatus
from pixelmill.errors import InputError
from pixelmill.identity import content_hash, dedupe_key
from pixelmill.seeds import seed_sweep
from producer.catalogue import CatalogueError
from producer.plan import DEFAULT_SEEDS
from producer.produce import default_run_name, produce
from producer.report import NothingToProduceError, ProduceReport, StrictModeError
from producer.templates import TemplateError

DEFAULT_MODEL = "default/model"

TEMPLATES = """\
key: sku
defaults:
  steps: 2
  guidance: 5.0
  width: 64
  height: 64
  seeds: 2
  negative_prompt: "lowres, blurry"
templates:
  studio:
    prompt: "photo of {{ title }}, {{ colour }}"
  scene:
    prompt: "{{ title }} in {{ scene }}"
    model: custom/model
    scheduler: euler_a
    steps: 3
    seeds: 3
"""

CATALOGUE = """\
sku,title,colour,scene,notes
A1,mug,red,a kitchen,x
A2,lamp,blue,an office,y
A3,chair,green,a garden,z
"""

ITEMS = {
    "A1": {"sku": "A1", "title": "mug", "colour": "red", "scene": "a kitchen", "notes": "x"},
    "A2": {"sku": "A2", "title": "lamp", "colour": "blue", "scene": "an office", "notes": "y"},
    "A3": {"sku": "A3", "title": "chair", "colour": "green", "scene": "a garden", "notes": "z"},
}
SEEDS_PER_TEMPLATE = {"studio": 2, "scene": 3}


def write_inputs(
    tmp_path: Path,
    catalogue: str | bytes = CATALOGUE,
    templates: str = TEMPLATES,
    *,
    name: str = "catalogue.csv",
) -> tuple[Path, Path]:
    catalogue_path = tmp_path / name
    if isinstance(catalogue, bytes):
        catalogue_path.write_bytes(catalogue)
    else:
        catalogue_path.write_text(catalogue, encoding="utf-8")
    templates_path = tmp_path / "templates.yaml"
    templates_path.write_text(templates, encoding="utf-8")
    return catalogue_path, templates_path


def run_produce(
    session: Session,
    catalogue_path: Path,
    templates_path: Path,
    *,
    seeds: int | None = None,
    run_name: str = "run-1",
    strict: bool = False,
    force: bool = False,
) -> ProduceReport:
    return produce(
        session,
        catalogue_path=catalogue_path,
        templates_path=templates_path,
        seeds=seeds,
        default_model=DEFAULT_MODEL,
        run_name=run_name,
        strict=strict,
        force=force,
    )


def row_counts(session: Session) -> dict[str, int]:
    return {
        model.__tablename__: session.scalar(select(func.count()).select_from(model)) or 0
        for model in (Run, CatalogueItem, Job)
    }


def jobs_by_item_and_template(session: Session) -> dict[tuple[str, str], dict[str, Any]]:
    rows = session.execute(
        select(Job.__table__, CatalogueItem.external_key).join(
            CatalogueItem, CatalogueItem.id == Job.item_id
        )
    ).mappings()
    result: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["external_key"], row["template"])
        assert key not in result, f"two jobs for {key}"
        result[key] = dict(row)
    return result


# --------------------------------------------------------------------------- happy path


def test_produce_writes_run_items_and_jobs(tmp_path: Path, db_session: Session) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path)

    report = run_produce(db_session, catalogue_path, templates_path)

    runs = db_session.execute(select(Run.id, Run.name, Run.status, Run.source)).all()
    assert len(runs) == 1
    run_id, run_name, run_status, run_source = runs[0]
    assert (report.run_id, report.run_name) == (run_id, "run-1")
    assert run_name == "run-1"
    assert run_status == RunStatus.ACTIVE
    assert run_source == str(catalogue_path)

    items = {
        external_key: (item_id, source, fields, hash_)
        for item_id, external_key, source, fields, hash_ in db_session.execute(
            select(
                CatalogueItem.id,
                CatalogueItem.external_key,
                CatalogueItem.source,
                CatalogueItem.fields,
                CatalogueItem.content_hash,
            )
        )
    }
    assert set(items) == set(ITEMS)
    for key, (_item_id, source, fields, hash_) in items.items():
        assert source == "catalogue.csv"
        assert fields == ITEMS[key]  # every column is kept, referenced or not
        assert hash_ == content_hash(ITEMS[key])

    jobs = jobs_by_item_and_template(db_session)
    assert set(jobs) == {(sku, t) for sku in ITEMS for t in SEEDS_PER_TEMPLATE}
    for (sku, template), job in jobs.items():
        fields = ITEMS[sku]
        assert job["run_id"] == run_id
        assert job["item_id"] == items[sku][0]
        assert job["status"] == JobStatus.PENDING
        assert job["attempts"] == 0
        assert job["queued_at"] is None
        assert job["negative_prompt"] == "lowres, blurry"
        assert (job["width"], job["height"], job["guidance"]) == (64, 64, 5.0)
        assert len(job["seeds"]) == SEEDS_PER_TEMPLATE[template]
        if template == "studio":
            assert job["prompt"] == f"photo of {fields['title']}, {fields['colour']}"
            assert job["model"] == DEFAULT_MODEL  # no model in the template: the default
            assert job["scheduler"] is None
            assert job["steps"] == 2
        else:
            assert job["prompt"] == f"{fields['title']} in {fields['scene']}"
            assert job["model"] == "custom/model"
            assert job["scheduler"] == "euler_a"
            assert job["steps"] == 3
        assert job["dedupe_key"] == dedupe_key(job)

    assert report.items == 3
    assert report.jobs_new == 6
    assert report.jobs_unchanged == 0
    assert report.images_planned == 3 * (2 + 3)
    new_ids = db_session.scalars(select(Job.id).where(Job.run_id == report.run_id)).all()
    assert sorted(new_ids) == sorted(job["id"] for job in jobs.values())
    assert row_counts(db_session) == {"runs": 1, "catalogue_items": 3, "jobs": 6}


def test_example_files_produce(db_session: Session) -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    report = run_produce(db_session, examples / "catalogue.csv", examples / "templates.yaml")
    items = db_session.scalar(select(func.count()).select_from(CatalogueItem))
    assert report.items == items and items > 0
    # studio has two variants (backgrounds), lifestyle one; two seeds each.
    assert report.jobs_new == 3 * items
    assert report.images_planned == 3 * 2 * items
    models = set(db_session.scalars(select(Job.model)))
    assert models == {"tiny"}
    variants = set(db_session.scalars(select(Job.variant)))
    assert variants == {"white", "light grey", ""}


# --------------------------------------------------------------------------- seeds


def test_seeds_are_deterministic_and_distinct(tmp_path: Path, db_session: Session) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path)
    run_produce(db_session, catalogue_path, templates_path)

    jobs = jobs_by_item_and_template(db_session)
    for (sku, template), job in jobs.items():
        assert job["seeds"] == seed_sweep(sku, template, SEEDS_PER_TEMPLATE[template])
        assert all(isinstance(s, int) and 0 <= s < 2**32 for s in job["seeds"])

    all_seeds = [seed for job in jobs.values() for seed in job["seeds"]]
    # Different items and different templates get different seeds (no collisions at all).
    assert len(set(all_seeds)) == len(all_seeds)


def test_same_input_in_another_database_state_gives_same_seeds(
    tmp_path: Path, db_session: Session
) -> None:
    """Seeds depend on (item key, template, index) only, not on row order or other rows."""
    catalogue_path, templates_path = write_inputs(tmp_path)
    run_produce(db_session, catalogue_path, templates_path)
    first = {k: j["seeds"] for k, j in jobs_by_item_and_template(db_session).items()}

    # Same items in another order, with one extra row, in another file and run.
    reordered = "sku,title,colour,scene,notes\nA9,vase,white,a hall,q\n" + "".join(
        reversed(CATALOGUE.splitlines(keepends=True)[1:])
    )
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    catalogue2, templates2 = write_inputs(other_dir, reordered, name="other.csv")
    run_produce(db_session, catalogue2, templates2, run_name="run-2")

    rows = db_session.execute(
        select(CatalogueItem.external_key, Job.template, Job.seeds)
        .join(CatalogueItem, CatalogueItem.id == Job.item_id)
        .where(CatalogueItem.source == "other.csv")
    ).all()
    # A different source file gives new item rows, but the jobs of A1..A3 are the same
    # pixels, so only A9's jobs are new; their seeds are the sweep of their own key.
    assert {(key, template) for key, template, _ in rows} == {("A9", "studio"), ("A9", "scene")}
    for key, template, seeds in rows:
        assert seeds == seed_sweep(key, template, SEEDS_PER_TEMPLATE[template])
        assert not set(seeds) & {s for v in first.values() for s in v}


@pytest.mark.parametrize(
    ("cli_seeds", "template_seeds", "expected"),
    [
        (None, "seeds: 2", 2),  # the template's value
        (5, "seeds: 2", 5),  # --seeds overrides the template
        (1, "seeds: 7", 1),
        (None, "seeds: null", DEFAULT_SEEDS),  # neither: the built-in default
        (3, "seeds: null", 3),
    ],
)
def test_seeds_override(
    tmp_path: Path,
    db_session: Session,
    cli_seeds: int | None,
    template_seeds: str,
    expected: int,
) -> None:
    templates = (
        "key: sku\ndefaults:\n  width: 64\n  height: 64\n  steps: 2\n"
        f"  {template_seeds}\n"
        "templates:\n  studio:\n    prompt: 'photo of {{ title }}'\n"
    )
    catalogue_path, templates_path = write_inputs(tmp_path, templates=templates)

    report = run_produce(db_session, catalogue_path, templates_path, seeds=cli_seeds)

    rows = db_session.execute(
        select(CatalogueItem.external_key, Job.seeds).join(
            CatalogueItem, CatalogueItem.id == Job.item_id
        )
    ).all()
    assert len(rows) == 3
    for key, seeds in rows:
        assert seeds == seed_sweep(key, "studio", expected)
    assert report.images_planned == 3 * expected


# --------------------------------------------------------------------------- re-runs


def test_reproducing_unchanged_catalogue_creates_no_jobs_and_no_run(
    tmp_path: Path, db_session: Session
) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path)
    first = run_produce(db_session, catalogue_path, templates_path, run_name="night-1")
    before = row_counts(db_session)
    job_rows_before = set(db_session.execute(select(Job.id, Job.run_id, Job.item_id)).all())

    with pytest.raises(NothingToProduceError) as refused:
        run_produce(db_session, catalogue_path, templates_path, run_name="night-2")

    assert "all 6 jobs were made already" in str(refused.value)
    assert "no run was written" in str(refused.value)
    second = refused.value.report
    assert second.items == 3
    assert (second.jobs_new, second.jobs_unchanged) == (0, 6)
    assert second.images_planned == first.images_planned
    # Nothing at all: an empty run would stay active forever.
    assert row_counts(db_session) == before
    assert db_session.scalar(select(func.count()).where(Run.name == "night-2")) == 0
    assert set(db_session.execute(select(Job.id, Job.run_id, Job.item_id)).all()) == (
        job_rows_before
    )
    # Into the run that has the jobs, producing again is no error: nothing is new.
    again = run_produce(db_session, catalogue_path, templates_path, run_name="night-1")
    assert (again.run_id, again.jobs_new, again.jobs_unchanged) == (first.run_id, 0, 6)


def test_changing_one_item_creates_jobs_for_that_item_alone(
    tmp_path: Path, db_session: Session
) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path)
    run_produce(db_session, catalogue_path, templates_path, run_name="night-1")
    old_a2 = db_session.scalar(select(CatalogueItem.id).where(CatalogueItem.external_key == "A2"))

    catalogue_path.write_text(CATALOGUE.replace("A2,lamp,", "A2,floor lamp,"), encoding="utf-8")
    report = run_produce(db_session, catalogue_path, templates_path, run_name="night-2")

    assert report.jobs_new == 2
    assert report.jobs_unchanged == 4
    new_jobs = db_session.execute(
        select(Job.id, Job.template, Job.prompt, Job.seeds, CatalogueItem.external_key)
        .join(CatalogueItem, CatalogueItem.id == Job.item_id)
        .where(Job.run_id == report.run_id)
    ).all()
    new_ids = db_session.scalars(select(Job.id).where(Job.run_id == report.run_id)).all()
    assert sorted(new_ids) == sorted(job.id for job in new_jobs)
    assert {(j.external_key, j.template) for j in new_jobs} == {("A2", "studio"), ("A2", "scene")}
    prompts = {j.template: j.prompt for j in new_jobs}
    assert prompts == {"studio": "photo of floor lamp, blue", "scene": "floor lamp in an office"}
    # Same key and template: the same seeds, so only the prompt differs from the old job.
    for job in new_jobs:
        assert job.seeds == seed_sweep("A2", job.template, SEEDS_PER_TEMPLATE[job.template])

    # The old version of A2 is kept (its jobs still point at it); a new version was added.
    versions = db_session.execute(
        select(CatalogueItem.id, CatalogueItem.fields).where(CatalogueItem.external_key == "A2")
    ).all()
    assert len(versions) == 2
    assert old_a2 in {v.id for v in versions}
    assert {v.fields["title"] for v in versions} == {"lamp", "floor lamp"}
    assert row_counts(db_session) == {"runs": 2, "catalogue_items": 4, "jobs": 8}


def test_changing_an_unreferenced_field_creates_no_jobs(
    tmp_path: Path, db_session: Session
) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path)
    run_produce(db_session, catalogue_path, templates_path, run_name="night-1")

    catalogue_path.write_text(CATALOGUE.replace("an office,y", "an office,CHANGED"), "utf-8")
    with pytest.raises(NothingToProduceError) as refused:
        run_produce(db_session, catalogue_path, templates_path, run_name="night-2")

    # The pixels do not depend on "notes": no new job, so no run (nor item version) at all.
    assert refused.value.report.jobs == 6
    assert row_counts(db_session) == {"runs": 1, "catalogue_items": 3, "jobs": 6}


@pytest.mark.parametrize(
    ("change", "new_jobs"),
    [
        ({"seeds": 5}, 6),  # a different seed sweep is different pixels
        ({"templates": TEMPLATES.replace("steps: 3", "steps: 4")}, 3),  # "scene" only
        ({"templates": TEMPLATES.replace("guidance: 5.0", "guidance: 6.5")}, 6),
        ({"templates": TEMPLATES.replace("width: 64", "width: 128")}, 6),
        ({"templates": TEMPLATES.replace("lowres, blurry", "lowres")}, 6),
        ({"templates": TEMPLATES.replace("scheduler: euler_a", "scheduler: ddim")}, 3),
        ({"templates": TEMPLATES.replace("model: custom/model", "model: other/model")}, 3),
        ({"default_model": "other/default"}, 3),  # "studio" uses the default model
    ],
)
def test_anything_that_changes_pixels_creates_new_jobs(
    tmp_path: Path, db_session: Session, change: dict[str, Any], new_jobs: int
) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path)
    run_produce(db_session, catalogue_path, templates_path, run_name="night-1")
    if "templates" in change:
        templates_path.write_text(change["templates"], encoding="utf-8")

    report = produce(
        db_session,
        catalogue_path=catalogue_path,
        templates_path=templates_path,
        seeds=change.get("seeds"),
        default_model=change.get("default_model", DEFAULT_MODEL),
        run_name="night-2",
    )

    assert (report.jobs_new, report.jobs_unchanged) == (new_jobs, 6 - new_jobs)
    assert row_counts(db_session)["jobs"] == 6 + new_jobs
    assert db_session.scalar(select(func.count()).where(Job.run_id == report.run_id)) == new_jobs


# --------------------------------------------------------------------------- bad input


def assert_catalogue_error(
    exc: pytest.ExceptionInfo[CatalogueError],
    path: Path,
    line: int,
    field: str | None,
) -> None:
    error = exc.value
    assert Path(error.path) == path
    assert error.line == line
    assert error.field == field
    message = str(error)
    assert f"{path}:{line}" in message
    if field is not None:
        assert repr(field) in message


@pytest.fixture
def existing_rows(tmp_path: Path, db_session: Session) -> dict[str, int]:
    """A committed earlier run, so "nothing written" is checked against non-empty tables."""
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    catalogue_path, templates_path = write_inputs(earlier, name="earlier.csv")
    run_produce(db_session, catalogue_path, templates_path, run_name="earlier")
    counts = row_counts(db_session)
    assert counts == {"runs": 1, "catalogue_items": 3, "jobs": 6}
    return counts


def test_missing_column_named_by_template(
    tmp_path: Path, db_session: Session, existing_rows: dict[str, int]
) -> None:
    catalogue = "sku,title,scene\nB1,mug,a kitchen\n"  # "colour" is used by "studio"
    catalogue_path, templates_path = write_inputs(tmp_path, catalogue)
    with pytest.raises(CatalogueError) as exc:
        run_produce(db_session, catalogue_path, templates_path, run_name="bad")
    assert_catalogue_error(exc, catalogue_path, 1, "colour")
    assert row_counts(db_session) == existing_rows


def test_missing_key_column(
    tmp_path: Path, db_session: Session, existing_rows: dict[str, int]
) -> None:
    catalogue = "id,title,colour,scene\nB1,mug,red,a kitchen\n"
    catalogue_path, templates_path = write_inputs(tmp_path, catalogue)
    with pytest.raises(CatalogueError) as exc:
        run_produce(db_session, catalogue_path, templates_path, run_name="bad")
    assert_catalogue_error(exc, catalogue_path, 1, "sku")
    assert row_counts(db_session) == existing_rows


def test_empty_file(tmp_path: Path, db_session: Session, existing_rows: dict[str, int]) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path, b"")
    with pytest.raises(CatalogueError) as exc:
        run_produce(db_session, catalogue_path, templates_path, run_name="bad")
    assert_catalogue_error(exc, catalogue_path, 1, None)
    assert "empty" in str(exc.value)
    assert row_counts(db_session) == existing_rows


def test_non_utf8_bytes(tmp_path: Path, db_session: Session, existing_rows: dict[str, int]) -> None:
    data = (
        b"sku,title,colour,scene\n"
        b"B1,mug,red,a kitchen\n"
        b"B2,caf\xe9 table,brown,a bistro\n"  # Latin-1, not UTF-8
        b"B3,lamp,blue,an office\n"
    )
    catalogue_path, templates_path = write_inputs(tmp_path, data)
    with pytest.raises(CatalogueError) as exc:
        run_produce(db_session, catalogue_path, templates_path, run_name="bad")
    assert_catalogue_error(exc, catalogue_path, 3, None)
    assert "0xe9" in str(exc.value)
    assert row_counts(db_session) == existing_rows
    assert db_session.scalar(select(func.count()).where(Run.name == "bad")) == 0


BAD_ROWS = {
    # name: (catalogue, bad line, field, text in the reason, good items)
    "empty-referenced-field": (
        "sku,title,colour,scene\n"
        "B1,mug,red,a kitchen\n"
        "B2,lamp,blue,an office\n"
        "B3,chair,   ,a garden\n"
        "B4,vase,white,a hall\n",
        4,
        "colour",
        "empty",
        {"B1", "B2", "B4"},
    ),
    "duplicate-key": (
        "sku,title,colour,scene\n"
        "B1,mug,red,a kitchen\n"
        "B2,lamp,blue,an office\n"
        "B3,chair,green,a garden\n"
        "B2,other lamp,black,a hall\n",
        5,
        "sku",
        "duplicate item key 'B2' (first seen on line 3)",
        {"B1", "B2", "B3"},
    ),
    "empty-key": (
        "sku,title,colour,scene\nB1,mug,red,a kitchen\n  ,lamp,blue,an office\n",
        3,
        "sku",
        "empty",
        {"B1"},
    ),
    "ragged-row": (
        "sku,title,colour,scene\nB1,mug,red,a kitchen\nB2,lamp,blue\nB3,cup,red,a cafe\n",
        3,
        None,
        "row has 3 cells but the header has 4 columns",
        {"B1", "B3"},
    ),
    # Postgres stores no NUL character (SQLite does): every field is stored with the item,
    # so a field no template uses counts too.
    "nul-in-an-unused-field": (
        "sku,title,colour,scene,notes\n"
        "B1,mug,red,a kitchen,fine\n"
        "B2,lamp,blue,an office,bad\x00note\n"
        "B3,cup,red,a cafe,fine\n",
        3,
        "notes",
        "NUL character",
        {"B1", "B3"},
    ),
    "nul-in-a-prompt-field": (
        "sku,title,colour,scene\nB1,mug,red,a kitchen\nB2,la\x00mp,blue,an office\n",
        3,
        "title",
        "NUL character",
        {"B1"},
    ),
    # catalogue_items.external_key holds 200 characters: 200 fit, 201 do not.
    "over-long-key": (
        f"sku,title,colour,scene\n{'K' * 200},mug,red,a kitchen\n{'L' * 201},lamp,blue,an office\n",
        3,
        "sku",
        "is 201 characters; the database holds at most 200",
        {"K" * 200},
    ),
}


@pytest.mark.parametrize("case", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_bad_rows_are_skipped_and_reported(
    tmp_path: Path,
    db_session: Session,
    existing_rows: dict[str, int],
    case: tuple[str, int, str | None, str, set[str]],
) -> None:
    catalogue, line, field, reason, good_items = case
    catalogue_path, templates_path = write_inputs(tmp_path, catalogue)
    report = run_produce(db_session, catalogue_path, templates_path, run_name="partial")
    assert not report.complete
    assert (report.rows_skipped, report.problems_total) == (1, 1)
    [problem] = report.problems
    assert isinstance(problem, CatalogueError)
    assert (Path(problem.path), problem.line, problem.field) == (catalogue_path, line, field)
    assert reason in str(problem)
    written = db_session.scalars(
        select(CatalogueItem.external_key)
        .join(Job, Job.item_id == CatalogueItem.id)
        .where(Job.run_id == report.run_id)
        .distinct()
    ).all()
    assert set(written) == good_items
    assert report.jobs_new == 2 * len(good_items)


@pytest.mark.parametrize("case", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_bad_rows_in_strict_mode_write_nothing(
    tmp_path: Path,
    db_session: Session,
    existing_rows: dict[str, int],
    case: tuple[str, int, str | None, str, set[str]],
) -> None:
    catalogue, line, field, reason, _good = case
    catalogue_path, templates_path = write_inputs(tmp_path, catalogue)
    with pytest.raises(StrictModeError) as exc:
        run_produce(db_session, catalogue_path, templates_path, run_name="bad", strict=True)
    assert exc.value.total == 1
    [problem] = exc.value.problems
    assert (Path(problem.path), problem.line, problem.field) == (catalogue_path, line, field)
    assert reason in str(problem)
    assert row_counts(db_session) == existing_rows


def test_over_long_run_name_is_refused_before_anything_is_written(
    tmp_path: Path, db_session: Session, existing_rows: dict[str, int]
) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path)
    with pytest.raises(InputError) as exc:
        run_produce(db_session, catalogue_path, templates_path, run_name="r" * 201)
    assert "the --run name" in str(exc.value)
    assert "is 201 characters; the database holds at most 200" in str(exc.value)
    assert row_counts(db_session) == existing_rows

    # A dry run refuses it too: it must not call a catalogue good that cannot be written.
    with pytest.raises(InputError, match="--run name"):
        produce(
            None,
            catalogue_path=catalogue_path,
            templates_path=templates_path,
            run_name="r" * 201,
            dry_run=True,
        )

    report = run_produce(db_session, catalogue_path, templates_path, run_name="r" * 200, force=True)
    assert db_session.scalar(select(Run.name).where(Run.id == report.run_id)) == "r" * 200


def test_default_run_name_fits_the_runs_table() -> None:
    name = default_run_name(Path("c" * 240 + ".csv"))  # a file name most file systems allow
    assert len(name) == 200 and name.startswith("c" * 150)


def test_over_long_catalogue_name_is_refused(tmp_path: Path, db_session: Session) -> None:
    # catalogue_items.source (the file name) holds 200 characters.
    catalogue_path, templates_path = write_inputs(tmp_path, name="c" * 197 + ".csv")
    with pytest.raises(InputError) as exc:
        run_produce(db_session, catalogue_path, templates_path)
    assert "the catalogue's name" in str(exc.value) and "201 characters" in str(exc.value)
    assert row_counts(db_session) == {"runs": 0, "catalogue_items": 0, "jobs": 0}


def test_empty_unreferenced_field_is_fine(tmp_path: Path, db_session: Session) -> None:
    catalogue = "sku,title,colour,scene,notes\nB1,mug,red,a kitchen,\n"
    catalogue_path, templates_path = write_inputs(tmp_path, catalogue)
    report = run_produce(db_session, catalogue_path, templates_path)
    assert (report.items, report.jobs_new) == (1, 2)


@pytest.mark.parametrize(
    ("templates", "line", "field"),
    [
        ("key: sku\ntemplates:\n  studio:\n    prompt: '{{ title'\n", 4, "templates.studio.prompt"),
        (
            "key: sku\ntemplates:\n  studio:\n    prompt: x\n    width: 100\n",
            5,
            "templates.studio.width",
        ),
        ("key: sku\ntemplates: {}\n", 2, "templates"),
        ("", 1, None),
    ],
)
def test_bad_template_file(
    tmp_path: Path,
    db_session: Session,
    existing_rows: dict[str, int],
    templates: str,
    line: int,
    field: str | None,
) -> None:
    catalogue_path, templates_path = write_inputs(tmp_path, templates=templates)
    with pytest.raises(TemplateError) as exc:
        run_produce(db_session, catalogue_path, templates_path, run_name="bad")
    assert Path(exc.value.path) == templates_path
    assert (exc.value.line, exc.value.field) == (line, field)
    assert row_counts(db_session) == existing_rows


# --------------------------------------------------------------------------- schema


def _item(session: Session) -> CatalogueItem:
    item = CatalogueItem(source="s.csv", external_key="K", fields={"sku": "K"}, content_hash="h")
    session.add(item)
    return item


def _job_values(run: Run, item: CatalogueItem, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "run": run,
        "item": item,
        "template": "t",
        "prompt": "p",
        "negative_prompt": "",
        "model": "m",
        "scheduler": None,
        "steps": 2,
        "guidance": 5.0,
        "width": 64,
        "height": 64,
        "seeds": [1],
        "dedupe_key": "d" * 64,
    }
    values.update(overrides)
    return values


def test_schema_accepts_a_valid_job(db_session: Session) -> None:
    run = Run(name="r", source="s")
    job = Job(**_job_values(run, _item(db_session)))
    db_session.add(job)
    db_session.flush()
    assert db_session.scalar(select(Job.status).where(Job.id == job.id)) == JobStatus.PENDING


def test_schema_rejects_bad_run_status(db_session: Session) -> None:
    db_session.add(Run(name="r", source="s", status="running"))
    with pytest.raises(IntegrityError, match="ck_runs_status"):
        db_session.flush()
    db_session.rollback()


@pytest.mark.parametrize(
    ("overrides", "constraint"),
    [
        ({"status": "bogus"}, "ck_jobs_status"),
        ({"width": 100}, "ck_jobs_size"),
        ({"height": 63}, "ck_jobs_size"),
        ({"width": 0}, "ck_jobs_size"),
        ({"steps": 0}, "ck_jobs_steps_positive"),
        ({"guidance": -1.0}, "ck_jobs_guidance_non_negative"),
    ],
)
def test_schema_rejects_bad_job(
    db_session: Session, overrides: dict[str, Any], constraint: str
) -> None:
    run = Run(name="r", source="s")
    db_session.add(Job(**_job_values(run, _item(db_session), **overrides)))
    with pytest.raises(IntegrityError, match=constraint):
        db_session.flush()
    db_session.rollback()

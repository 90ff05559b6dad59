"""`produce` with a budget: seeds allocated across templates and variants by their keep rate
on earlier runs of the same catalogue source, on real Postgres with real decisions."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import CatalogueItem, Decision, ImageReview, Job, ReviewItem
from pixelmill.errors import BadInputError
from pixelmill.seeds import seed_sweep
from producer.produce import produce
from producer.report import ProduceReport
from tests.factories import image_row, make_item, make_job, make_reviewer, make_run

# Three template variants: studio [white], studio [grey] and street.
TEMPLATES = """\
key: sku
defaults: {steps: 2, width: 64, height: 64, seeds: 4}
templates:
  studio:
    prompt: "photo of a {{ title }}, {white|grey} background"
  street:
    prompt: "a {{ title }} in a busy street"
"""
ARMS = [("studio", "white"), ("studio", "grey"), ("street", "")]
CATALOGUE = "sku,title\n" + "".join(f"S{n},item {n}\n" for n in range(10))


def write(tmp_path: Path, catalogue: str = CATALOGUE) -> tuple[Path, Path]:
    (tmp_path / "catalogue.csv").write_text(catalogue)
    (tmp_path / "templates.yaml").write_text(TEMPLATES)
    return tmp_path / "catalogue.csv", tmp_path / "templates.yaml"


def decide(
    session: Session, source: str, template: str, variant: str, kept: int, rejected: int
) -> None:
    """Decisions on an earlier run's images of one template variant of ``source``."""
    run = make_run(session, source=source)
    item = make_item(session, source=source)
    reviewer = make_reviewer(session)
    review_item = ReviewItem(run_id=run.id, item_id=item.id)
    session.add(review_item)
    seeds = list(range(kept + rejected))
    job = make_job(
        session, run, item=item, template=template, variant=variant, seeds=seeds, commit=False
    )
    session.flush()
    for index, seed in enumerate(seeds):
        image = image_row(job.id, seed)
        session.add(image)
        session.flush()
        decision = Decision.KEEP if index < kept else Decision.REJECT
        session.add(
            ImageReview(
                image_id=image.id,
                run_id=run.id,
                review_item_id=review_item.id,
                decision=decision,
                reviewer_id=reviewer.id,
            )
        )
    session.flush()


def seeds_by_arm(session: Session, report: ProduceReport) -> dict[tuple[str, str], set[int]]:
    rows = session.execute(
        select(Job.template, Job.variant, Job.seeds).where(Job.run_id == report.run_id)
    ).all()
    counts: dict[tuple[str, str], set[int]] = {}
    for template, variant, seeds in rows:
        counts.setdefault((template, variant), set()).add(len(seeds))
    return counts


def run_budget(session: Session, paths: tuple[Path, Path], **options: object) -> ProduceReport:
    return produce(
        session,
        catalogue_path=paths[0],
        templates_path=paths[1],
        run_name="budgeted",
        **options,  # type: ignore[arg-type]
    )


def test_without_decisions_the_budget_splits_evenly_ish(
    tmp_path: Path, db_session: Session
) -> None:
    report = run_budget(db_session, write(tmp_path), budget=300)

    assert report.budget is not None
    assert report.budget.per_item == 30  # 300 images over 10 items
    assert [arm.decided for arm in report.budget.arms] == [0, 0, 0]
    assert all(arm.keep_rate == pytest.approx(0.5) for arm in report.budget.arms)
    seeds = {(arm.template, arm.variant): arm.seeds for arm in report.budget.arms}
    assert sum(seeds.values()) == 30
    assert all(5 <= count <= 15 for count in seeds.values())
    # Each job's sweep is its arm's allocation, the same for every item.
    assert seeds_by_arm(db_session, report) == {arm: {seeds[arm]} for arm in ARMS}
    assert report.images_planned == 300


def test_proven_templates_get_most_seeds_and_none_starves(
    tmp_path: Path, db_session: Session
) -> None:
    decide(db_session, "catalogue.csv", "studio", "white", kept=60, rejected=140)
    decide(db_session, "catalogue.csv", "studio", "grey", kept=6, rejected=194)
    decide(db_session, "catalogue.csv", "street", "", kept=12, rejected=188)
    # Decisions on another source do not count.
    decide(db_session, "other.csv", "street", "", kept=190, rejected=10)

    report = run_budget(db_session, write(tmp_path), budget=200)

    assert report.budget is not None
    by_arm = {(arm.template, arm.variant): arm for arm in report.budget.arms}
    assert by_arm["studio", "white"].kept == 60 and by_arm["studio", "white"].decided == 200
    assert by_arm["studio", "white"].keep_rate == pytest.approx(61 / 202)
    assert by_arm["street", ""].decided == 200  # other.csv's are left out
    assert by_arm["studio", "white"].seeds >= 14
    assert min(arm.seeds for arm in report.budget.arms) >= 1
    assert report.budget.per_item == 20
    assert seeds_by_arm(db_session, report) == {arm: {by_arm[arm].seeds} for arm in ARMS}


def test_seeds_are_the_same_whatever_the_count(tmp_path: Path, db_session: Session) -> None:
    decide(db_session, "catalogue.csv", "street", "", kept=90, rejected=10)

    report = run_budget(db_session, write(tmp_path), budget=120)

    rows = db_session.execute(
        select(CatalogueItem.external_key, Job.template, Job.variant, Job.seeds)
        .join(CatalogueItem, CatalogueItem.id == Job.item_id)
        .where(Job.run_id == report.run_id)
    ).all()
    for key, template, variant, seeds in rows:
        assert seeds == seed_sweep(key, template, len(seeds), variant=variant)


def test_keepers_per_item_sizes_the_sweep_by_the_best_keep_rate(
    tmp_path: Path, db_session: Session
) -> None:
    decide(db_session, "catalogue.csv", "studio", "white", kept=49, rejected=49)

    report = run_budget(db_session, write(tmp_path), keepers_per_item=3)

    # The best arm keeps half (posterior mean 50/100): 6 seeds per item find 3 keepers.
    assert report.budget is not None
    assert report.budget.asked == "--keepers-per-item 3"
    assert report.budget.per_item == 6
    assert report.images_planned == 60


def test_a_dry_run_shows_the_allocation_and_writes_nothing(
    tmp_path: Path, db_session: Session
) -> None:
    decide(db_session, "catalogue.csv", "studio", "grey", kept=1, rejected=99)
    before = db_session.scalars(select(Job.id)).all()

    report = produce(
        db_session,
        catalogue_path=write(tmp_path)[0],
        templates_path=tmp_path / "templates.yaml",
        budget=90,
        dry_run=True,
    )

    assert report.budget is not None and report.budget.per_item == 9
    grey = next(arm for arm in report.budget.arms if arm.variant == "grey")
    assert (grey.kept, grey.decided) == (1, 100)
    assert db_session.scalars(select(Job.id)).all() == before
    # Without a database a dry run allocates by the prior alone.
    blind = produce(
        None,
        catalogue_path=tmp_path / "catalogue.csv",
        templates_path=tmp_path / "templates.yaml",
        budget=90,
        dry_run=True,
    )
    assert blind.budget is not None
    assert [arm.decided for arm in blind.budget.arms] == [0, 0, 0]


def test_a_budget_below_one_seed_per_item_and_variant_warns(
    tmp_path: Path, db_session: Session
) -> None:
    report = run_budget(db_session, write(tmp_path), budget=12)

    assert report.budget is not None and report.budget.per_item == 3
    assert report.images_planned == 30
    assert any("--budget 12 is less than one seed" in str(w) for w in report.warnings)


def test_every_arm_obeys_the_seeds_bound(tmp_path: Path, db_session: Session) -> None:
    decide(db_session, "catalogue.csv", "street", "", kept=500, rejected=0)

    report = run_budget(db_session, write(tmp_path, "sku,title\nA,mug\n"), budget=10_000)

    assert report.budget is not None
    assert max(arm.seeds for arm in report.budget.arms) <= 1000


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"budget": 0}, "--budget must be an integer in 1..10000000000, not 0"),
        ({"keepers_per_item": 1001}, "--keepers-per-item must be an integer in 1..1000"),
        ({"budget": 100, "seeds": 2}, "give one of --seeds, --budget, not both"),
        ({"budget": 100, "keepers_per_item": 2}, "give one of --budget, --keepers-per-item"),
    ],
)
def test_budget_options_obey_their_bounds(
    tmp_path: Path, db_session: Session, options: dict[str, int], message: str
) -> None:
    with pytest.raises(BadInputError, match=message):
        run_budget(db_session, write(tmp_path), **options)

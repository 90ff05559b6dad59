"""Keep-rate figures, reviewer speed, cost per keeper, and the export (CSV escaping, JSONL,
approved/ copies)."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import Decision, Image, Job, Reviewer, ReviewEvent, ReviewItem, utcnow
from pixelmill.storage import Storage
from review.export import ExportError, escape_cell, export_lines, open_items_left_out
from review.queue import claim_next, decide, submit, sync_queue
from review.reroll import reroll
from review.stats import IDLE_GAP_SECONDS, MIN_RATE_SECONDS, reviewer_speeds, run_stats
from tests.cost_rows import DUSK_REVIEW, REVIEWER_SECONDS, make_costed_run
from tests.review.conftest import log_in
from tests.review.factory import MadeRun, make_run

LEASE = timedelta(minutes=10)


def _review(session: Session, made: MadeRun, reviewer: Reviewer, keep: dict[str, int]) -> None:
    """Review every item: keep the first ``keep[template]`` images of each template."""
    sync_queue(session)
    while (
        item_id := claim_next(session, run_id=made.run.id, reviewer_id=reviewer.id, lease=LEASE)
    ) is not None:
        item = next(i for i in made.items if i.id == _item_of(session, item_id))
        per_template: dict[str, int] = {}
        for image in made.images_of(item):
            if image.safety == "flagged":
                continue  # hidden in the grid: nobody decides on them
            job = next(j for j in made.jobs if j.id == image.job_id)
            seen = per_template.get(job.template, 0)
            per_template[job.template] = seen + 1
            decision = Decision.KEEP if seen < keep.get(job.template, 0) else Decision.REJECT
            decide(session, item_id, image.id, decision, reviewer_id=reviewer.id, lease=LEASE)
        submit(session, item_id, reviewer_id=reviewer.id, lease=LEASE)


def _item_of(session: Session, review_item_id: int) -> int:
    item = session.get(ReviewItem, review_item_id)
    assert item is not None
    return item.item_id


def test_keep_rates_per_run_template_and_variant(session: Session, alice: Reviewer) -> None:
    made = make_run(
        session, items=4, templates=("studio", "outdoor"), variants=("a", "b"), seeds=4,
        flagged_seeds=1,
    )  # fmt: skip
    # Per item and template: variants a and b, 4 seeds each, 1 flagged each: 6 visible.
    _review(session, made, alice, keep={"studio": 3, "outdoor": 0})

    stats = run_stats(session, made.run)
    assert stats.totals.images == 4 * 2 * 2 * 4 == 64
    assert stats.flagged == 16
    assert stats.totals.reviewed == 48  # flagged images are not reviewed
    assert stats.totals.kept == 12
    assert stats.totals.keep_rate == pytest.approx(12 / 48)
    assert stats.templates["studio"].kept == 12
    assert stats.templates["studio"].keep_rate == pytest.approx(0.5)
    assert stats.templates["outdoor"].keep_rate == 0.0
    # The first 3 studio images of each item are variant a's 3 visible seeds.
    assert stats.variants[("studio", "a")].keep_rate == pytest.approx(1.0)
    assert stats.variants[("studio", "b")].keep_rate == pytest.approx(0.0)
    assert stats.items == {"done": 4}


def test_an_unreviewed_run_has_no_keep_rate(session: Session) -> None:
    made = make_run(session, items=1)
    stats = run_stats(session, made.run)
    assert stats.totals.reviewed == 0 and stats.totals.keep_rate is None


def test_decisions_per_hour_count_work_not_breaks(session: Session, alice: Reviewer) -> None:
    made = make_run(session, items=1, templates=("studio",), seeds=4)
    sync_queue(session)
    item_id = claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE)
    assert item_id is not None
    for image in made.images:
        decide(session, item_id, image.id, Decision.REJECT, reviewer_id=alice.id, lease=LEASE)
    # Decisions 10 s apart, then a one-hour lunch before the last.
    start = utcnow()
    offsets = [0, 10, 20, 20 + 3600]
    for event_id, offset in zip(
        sorted(e.id for e in session.query(ReviewEvent).all()), offsets, strict=True
    ):
        session.execute(
            update(ReviewEvent)
            .where(ReviewEvent.id == event_id)
            .values(created_at=start + timedelta(seconds=offset))
        )
    session.commit()
    (speed,) = run_stats(session, made.run).reviewers
    assert speed.name == "alice" and speed.decisions == 4
    assert speed.active_seconds == pytest.approx(20 + IDLE_GAP_SECONDS)
    assert speed.decisions_per_hour == pytest.approx(4 * 3600 / (20 + IDLE_GAP_SECONDS))


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+1+2", "'+1+2"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tcmd", "'\tcmd"),
        ("red shoe", "red shoe"),
        (12, 12),
    ],
)
def test_formula_cells_are_escaped(value: object, escaped: object) -> None:
    assert escape_cell(value) == escaped


def test_export_csv_and_jsonl_with_approved_copies(
    session: Session, storage: Storage, alice: Reviewer
) -> None:
    made = make_run(session, items=2, templates=("studio",), seeds=2, storage=storage,
                    key_prefix="=cmd|' /C calc'!A")  # fmt: skip
    _review(session, made, alice, keep={"studio": 1})

    text = "".join(export_lines(session, made.run, storage, "csv", copy=True))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 2
    for row in rows:
        assert row["item_key"].startswith("'=cmd")  # a spreadsheet shows it as text
        assert row["prompt"].startswith("photo of item")
        assert row["model"] == "tiny" and int(row["seed"]) >= 0
        assert row["storage_url"].startswith("file://")
        key = row["approved_url"].split("/images/", 1)[1]
        assert key.startswith("approved/runs/")
        assert storage.get(key) == storage.get(key.removeprefix("approved/"))

    lines = list(export_lines(session, made.run, storage, "jsonl"))
    records = [json.loads(line) for line in lines]
    assert [r["item_key"] for r in records] == [r["item_key"].lstrip("'") for r in rows]
    assert records[0]["item_key"].startswith("=cmd")  # JSON is data, not a spreadsheet
    assert {r["seed"] for r in records} == {int(r["seed"]) for r in rows}
    with pytest.raises(ExportError, match="'xlsx'"):
        list(export_lines(session, made.run, storage, "xlsx"))


def test_a_kept_image_without_a_file_does_not_break_the_export(
    session: Session, storage: Storage, alice: Reviewer
) -> None:
    made = make_run(session, items=2, templates=("studio",), seeds=2, storage=storage)
    _review(session, made, alice, keep={"studio": 2})
    # A keep recorded on an image whose file was dropped (flagged, PIXELMILL_FLAGGED_IMAGES=
    # drop) before decide() refused that: it is left out, every other keeper is exported.
    first = min(made.images, key=lambda image: image.id)
    session.execute(
        update(Image).where(Image.id == first.id).values(storage_key="", safety="flagged")
    )
    session.commit()

    lines = list(export_lines(session, made.run, storage, "jsonl", copy=True))

    exported = [json.loads(line)["image_id"] for line in lines]
    assert sorted(exported) == sorted(image.id for image in made.images if image.id != first.id)


def test_admins_export_and_read_stats_in_the_app(
    client: TestClient, session: Session, storage: Storage, alice: Reviewer, boss: Reviewer
) -> None:
    made = make_run(session, items=1, templates=("studio",), seeds=2, storage=storage)
    _review(session, made, alice, keep={"studio": 1})
    token = log_in(client, "boss")
    download = client.get(f"/runs/{made.run.id}/export?format=csv")
    assert download.status_code == 200
    assert "attachment" in download.headers["content-disposition"]
    assert len(list(csv.DictReader(io.StringIO(download.text)))) == 1
    copied = client.post(
        f"/runs/{made.run.id}/export",
        data={"csrf_token": token, "format": "jsonl", "copy_approved": "true"},
    )
    record = json.loads(copied.text.splitlines()[0])
    assert "approved/" in record["approved_url"]
    stats = client.get(f"/api/runs/{made.run.id}/stats").json()
    assert stats["totals"] == {"images": 2, "reviewed": 2, "kept": 1, "keep_rate": 0.5}
    assert stats["templates"][0]["template"] == "studio"
    page = client.get(f"/runs/{made.run.id}/stats")
    assert page.status_code == 200 and "50.0%" in page.text


def test_export_takes_submitted_items_only_and_counts_those_left_out(
    client: TestClient, session: Session, storage: Storage, alice: Reviewer, boss: Reviewer
) -> None:
    made = make_run(session, items=4, templates=("studio",), seeds=2, storage=storage)
    sync_queue(session)

    def keep_one(reviewer: Reviewer) -> tuple[int, int]:
        item_id = claim_next(session, run_id=made.run.id, reviewer_id=reviewer.id, lease=LEASE)
        assert item_id is not None
        image_id = _image_ids(session, item_id)[0]
        decide(session, item_id, image_id, Decision.KEEP, reviewer_id=reviewer.id, lease=LEASE)
        return item_id, image_id

    # A keep on each of three items: one submitted, one re-rolling, one still held; the
    # fourth item open and untouched.
    first, first_keep = keep_one(alice)
    submit(session, first, reviewer_id=alice.id, lease=LEASE)
    second, _ = keep_one(alice)
    third, _ = keep_one(boss)
    reroll(session, third, reviewer_id=boss.id, lease=LEASE)

    lines = list(export_lines(session, made.run, storage, "jsonl"))
    assert [json.loads(line)["image_id"] for line in lines] == [first_keep]
    assert open_items_left_out(session, made.run) == 3

    log_in(client, "boss")
    download = client.get(f"/runs/{made.run.id}/export?format=csv")
    assert download.headers["x-open-items-left-out"] == "3"
    assert len(list(csv.DictReader(io.StringIO(download.text)))) == 1
    page = client.get(f"/runs/{made.run.id}/stats").text
    assert "3 items not submitted yet" in page
    submit(session, second, reviewer_id=alice.id, lease=LEASE)
    assert open_items_left_out(session, made.run) == 2
    assert len(list(export_lines(session, made.run, storage, "jsonl"))) == 2


def _image_ids(session: Session, review_item_id: int) -> list[int]:
    item = session.get_one(ReviewItem, review_item_id)
    return list(
        session.scalars(
            select(Image.id)
            .join(Job, Job.id == Image.job_id)
            .where(Job.run_id == item.run_id, Job.item_id == item.item_id)
            .order_by(Image.id)
        )
    )


@pytest.mark.parametrize(
    ("gaps", "shown"),
    [
        ([1.0], False),  # two decisions a second apart: not 7,200 an hour
        ([10.0] * 20, False),  # 200 s of work
        ([10.0] * 30, True),  # 300 s: enough to mean something
        ([2000.0], True),  # a break counts as 5 minutes: 300 s
    ],
)
def test_decisions_per_hour_wait_for_enough_review_time(
    session: Session, alice: Reviewer, gaps: list[float], shown: bool
) -> None:
    made = make_run(session, items=1, templates=("studio",), seeds=len(gaps) + 1)
    sync_queue(session)
    item_id = claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE)
    assert item_id is not None
    for image in made.images:
        decide(session, item_id, image.id, Decision.REJECT, reviewer_id=alice.id, lease=LEASE)
    start = utcnow()
    offsets = [0.0]
    for gap in gaps:
        offsets.append(offsets[-1] + gap)
    events = sorted(e.id for e in session.query(ReviewEvent).all())
    for event_id, offset in zip(events, offsets, strict=True):
        session.execute(
            update(ReviewEvent)
            .where(ReviewEvent.id == event_id)
            .values(created_at=start + timedelta(seconds=offset))
        )
    session.commit()
    (speed,) = run_stats(session, made.run).reviewers
    assert (speed.decisions_per_hour is not None) is shown
    assert speed.active_seconds >= MIN_RATE_SECONDS or not shown
    (own,) = reviewer_speeds(session, made.run.id, alice.id)
    assert own.decisions_per_hour == speed.decisions_per_hour


def test_cost_per_keeper_in_the_stats_json_and_page(
    client: TestClient, session: Session, boss: Reviewer
) -> None:
    made = make_costed_run(session)
    session.commit()
    log_in(client, "boss")

    costs = client.get(f"/api/runs/{made.run.id}/stats").json()["costs"]
    assert (costs["top_k"], costs["review_gap_cap_seconds"]) == (4, IDLE_GAP_SECONDS)
    totals = costs["totals"]
    assert (totals["images"], totals["kept"], totals["auto_rejected"]) == (7, 3, 1)
    assert totals["gpu_seconds_per_image"] == pytest.approx(22 / 7)
    assert totals["gpu_seconds_per_keeper"] == pytest.approx(22 / 3)
    assert totals["reviewer_seconds_per_keeper"] == pytest.approx(REVIEWER_SECONDS / 3)
    assert (totals["skipped_seeds"], totals["gpu_seconds_saved"]) == (5, pytest.approx(24.0))
    assert totals["keeper_recall"] == 1.0
    by_template = {row["template"]: row for row in costs["templates"]}
    assert by_template["studio"]["gpu_seconds_per_keeper"] == pytest.approx(7.0)
    (dusk,) = [row for row in costs["variants"] if row["variant"] == "dusk"]
    assert dusk["reviewer_seconds_per_keeper"] == pytest.approx(DUSK_REVIEW)
    assert dusk["auto_rejected"] == 0  # overridden by a person's decision

    page = client.get(f"/runs/{made.run.id}/stats").text
    assert "Cost per keeper" in page and "keepers in their item's top 4" in page
    assert "<th>GPU-seconds per keeper</th><td>7.33</td>" in page
    assert "<th>GPU-seconds saved</th><td>24.00</td>" in page
    assert "<td>outdoor</td><td>dusk</td><td>2</td><td>1</td><td>0</td>" in page
    # The keep rates count people's decisions only: the model's auto-reject is not one.
    assert client.get(f"/api/runs/{made.run.id}/stats").json()["totals"]["reviewed"] == 5


def test_decisions_per_hour_and_review_time_count_every_action(
    session: Session, alice: Reviewer
) -> None:
    made = make_costed_run(session)
    speeds = {speed.name: speed for speed in run_stats(session, made.run).reviewers}
    # ann: 5 decisions and 2 submits; bo: an undo and a submit, no decision.
    assert (speeds["ann"].decisions, speeds["ann"].active_seconds) == (5, pytest.approx(360.0))
    assert (speeds["bo"].decisions, speeds["bo"].active_seconds) == (0, pytest.approx(60.0))
    assert sum(s.active_seconds for s in speeds.values()) == pytest.approx(REVIEWER_SECONDS)

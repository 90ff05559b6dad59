"""What the grid page carries for the reviewer: each image's settings for the enlarged view,
the kept/undecided counter, the pace once it means something, and the next item claimed
ahead of time (never the one on screen)."""

from __future__ import annotations

import re
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from db.models import Decision, Job, Reviewer, ReviewEvent, utcnow
from pixelmill.storage import Storage
from review.queue import claim_next, decide, sync_queue
from tests.review.conftest import log_in
from tests.review.factory import make_run

LEASE = timedelta(minutes=10)


def test_every_card_carries_the_settings_it_was_rendered_with(
    client: TestClient, session: Session, storage: Storage, alice: Reviewer
) -> None:
    made = make_run(session, items=1, templates=("studio", "outdoor"), seeds=2, storage=storage)
    studio = next(job for job in made.jobs if job.template == "studio")
    session.execute(
        update(Job)
        .where(Job.id == studio.id)
        .values(scheduler="euler_a", steps=31, guidance=5.5, negative_prompt="text, watermark")
    )
    session.commit()
    headers = {"X-CSRF-Token": log_in(client, "alice")}
    item_id = client.post(f"/api/runs/{made.run.id}/claim", headers=headers).json()[
        "review_item_id"
    ]
    images = client.get(f"/api/items/{item_id}").json()["images"]
    by_template = {image["template"]: image for image in images}
    assert {
        key: by_template["studio"][key]
        for key in ("negative_prompt", "scheduler", "steps", "guidance", "width", "height")
    } == {
        "negative_prompt": "text, watermark",
        "scheduler": "euler_a",
        "steps": 31,
        "guidance": 5.5,
        "width": 64,
        "height": 64,
    }
    assert by_template["outdoor"]["scheduler"] is None

    page = client.get(f"/items/{item_id}").text
    metas = re.findall(r'<dl class="meta" hidden>(.*?)</dl>', page, re.S)
    assert len(metas) == 4
    studio_meta = next(meta for meta in metas if "euler_a" in meta)
    for shown in ("photo of item 0, studio", "text, watermark", "tiny", "31", "5.5", "64×64"):
        assert shown in studio_meta
    seeds = [str(image["seed"]) for image in images]
    assert all(any(f"<dd>{seed}</dd>" in meta for meta in metas) for seed in seeds)
    assert any("the model&#39;s default" in meta for meta in metas)  # no scheduler set


def test_the_counter_and_the_pace_on_the_grid_page(
    client: TestClient, session: Session, storage: Storage, alice: Reviewer
) -> None:
    made = make_run(session, items=1, templates=("studio",), seeds=5, storage=storage)
    sync_queue(session)
    item_id = claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE)
    assert item_id is not None
    first, second, *_ = sorted(made.images, key=lambda image: image.id)
    decide(session, item_id, first.id, Decision.KEEP, reviewer_id=alice.id, lease=LEASE)
    decide(session, item_id, second.id, Decision.REJECT, reviewer_id=alice.id, lease=LEASE)
    log_in(client, "alice")
    page = client.get(f"/items/{item_id}").text
    counter = re.sub(r"<[^>]+>", "", re.search(r'id="counter">(.*?)</span>', page).group(1))  # type: ignore[union-attr]
    assert counter == "1 kept · 1 rejected · 3 undecided"
    assert 'id="pace"' not in page  # two decisions seconds apart say nothing yet

    # Six minutes of steady work later, the pace is shown.
    session.execute(
        update(ReviewEvent)
        .where(ReviewEvent.image_id == first.id)
        .values(created_at=utcnow() - timedelta(minutes=6))
    )
    for index, image in enumerate(sorted(made.images, key=lambda image: image.id)[2:]):
        decide(session, item_id, image.id, Decision.REJECT, reviewer_id=alice.id, lease=LEASE)
        session.execute(
            update(ReviewEvent)
            .where(ReviewEvent.image_id == image.id)
            .values(created_at=utcnow() - timedelta(minutes=4 - index))
        )
    session.commit()
    page = client.get(f"/items/{item_id}").text
    pace = re.search(r'id="pace">(\d+) decisions/h<', page)
    assert pace and 20 <= int(pace.group(1)) <= 200


def test_the_next_item_is_claimed_besides_the_one_on_screen(
    client: TestClient, session: Session, storage: Storage, alice: Reviewer, bob: Reviewer
) -> None:
    made = make_run(session, items=3, templates=("studio",), seeds=1, storage=storage)
    headers = {"X-CSRF-Token": log_in(client, "alice")}
    claim = f"/api/runs/{made.run.id}/claim"
    current = client.post(claim, headers=headers).json()["review_item_id"]
    assert client.post(claim, headers=headers).json()["review_item_id"] == current  # own first
    ahead = client.post(f"{claim}?besides={current}", headers=headers).json()["review_item_id"]
    assert ahead not in (None, current)
    # Asked again (a reload), the same item comes back ahead: Alice's own claims first.
    again = client.post(f"{claim}?besides={current}", headers=headers).json()["review_item_id"]
    assert again == ahead
    # Bob gets the third item; nothing is left to fetch ahead of Alice's second.
    assert claim_next(session, run_id=made.run.id, reviewer_id=bob.id, lease=LEASE) not in (
        None,
        current,
        ahead,
    )
    client.post(f"/api/items/{current}/submit", headers=headers).raise_for_status()
    beyond = client.post(f"{claim}?besides={ahead}", headers=headers).json()["review_item_id"]
    assert beyond is None

"""Mistakes can be mended: reopen the item you submitted last within the window (its keeps
and rejects as they were, the submit's own rejections undone), and only that one; the hold
is renewed while you work, and a reviewer whose expired hold someone else took over is told
who, on every action."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import ImageReview, Reviewer, ReviewEvent, ReviewItem, utcnow
from pixelmill.settings import Settings
from pixelmill.storage import Storage
from review.accounts import add_reviewer
from review.app import create_app
from review.export import export_lines
from review.queue import claim_next, sync_queue
from tests.review.conftest import log_in
from tests.review.factory import MadeRun, make_run

LEASE = timedelta(minutes=10)


@pytest.fixture
def app(settings: Settings, sessions: sessionmaker[Session], storage: Storage) -> FastAPI:
    windowed = settings.model_copy(update={"review_reopen_seconds": 120})
    return create_app(windowed, sessions=sessions, storage=storage, background_sync=False)


@pytest.fixture
def made(session: Session, storage: Storage) -> MadeRun:
    made = make_run(session, items=3, templates=("studio",), seeds=4, storage=storage)
    sync_queue(session)
    return made


class Reviewing:
    """One reviewer's logged-in API client."""

    def __init__(self, app: FastAPI, name: str) -> None:
        self.client = TestClient(app)
        self.headers = {"X-CSRF-Token": log_in(self.client, name)}

    def post(self, path: str, **kwargs: object) -> object:
        return self.client.post(path, headers=self.headers, **kwargs)  # type: ignore[arg-type]

    def claim(self, run_id: int) -> int:
        response = self.client.post(f"/api/runs/{run_id}/claim", headers=self.headers)
        item_id = response.json()["review_item_id"]
        assert item_id is not None
        return int(item_id)

    def images(self, item_id: int) -> list[int]:
        return [image["id"] for image in self.client.get(f"/api/items/{item_id}").json()["images"]]

    def decide(self, item_id: int, image_id: int, decision: str) -> int:
        response = self.client.post(
            f"/api/items/{item_id}/decisions",
            json={"image_id": image_id, "decision": decision},
            headers=self.headers,
        )
        return response.status_code

    def act(self, item_id: int, action: str) -> tuple[int, dict[str, object]]:
        response = self.client.post(f"/api/items/{item_id}/{action}", headers=self.headers)
        return response.status_code, response.json()


def _decisions(session: Session) -> dict[int, str]:
    session.expire_all()
    return dict(session.execute(select(ImageReview.image_id, ImageReview.decision)).all())


def test_reopen_the_last_submitted_item_as_it_was_before_enter(
    app: FastAPI, made: MadeRun, alice: Reviewer, session: Session, storage: Storage
) -> None:
    alice_ = Reviewing(app, "alice")
    item_id = alice_.claim(made.run.id)
    keep, rejected, *rest = alice_.images(item_id)
    assert alice_.decide(item_id, keep, "keep") == 200
    assert alice_.decide(item_id, rejected, "reject") == 200
    assert alice_.act(item_id, "submit") == (200, {"review_item_id": item_id, "rejected": 2})
    assert _decisions(session) == {
        keep: "keep",
        rejected: "reject",
        **dict.fromkeys(rest, "reject"),
    }

    status, body = alice_.act(item_id, "reopen")
    assert (status, body) == (200, {"review_item_id": item_id, "undecided": 2})
    # Alice's own decisions stand; the two the submit made are undone.
    assert _decisions(session) == {keep: "keep", rejected: "reject"}
    item = session.get_one(ReviewItem, item_id)
    assert (item.status, item.claimed_by, item.submitted_by) == ("open", alice.id, None)
    # Reopened items are not exported until they are submitted again.
    assert list(export_lines(session, made.run, storage, "jsonl")) == []
    # Undo on the reopened item walks back Alice's own last decision, not the submit's.
    status, undone = alice_.act(item_id, "undo")
    assert (status, undone["image_id"]) == (200, rejected)
    assert alice_.decide(item_id, rest[0], "keep") == 200
    assert alice_.act(item_id, "submit") == (200, {"review_item_id": item_id, "rejected": 2})
    exported = list(export_lines(session, made.run, storage, "jsonl"))
    assert len(exported) == 2
    actions = session.scalars(
        select(ReviewEvent.action).where(ReviewEvent.review_item_id == item_id)
        .order_by(ReviewEvent.id)
    ).all()  # fmt: skip
    assert actions == [
        "keep", "reject", "reject", "reject", "submit", "undo",  # the reopen
        "undo", "keep", "reject", "reject", "submit",
    ]  # fmt: skip


def test_only_your_last_submit_within_the_window_can_be_reopened(
    app: FastAPI, made: MadeRun, alice: Reviewer, bob: Reviewer, session: Session
) -> None:
    alice_ = Reviewing(app, "alice")
    bob_ = Reviewing(app, "bob")
    first = alice_.claim(made.run.id)
    alice_.act(first, "submit")
    second = alice_.claim(made.run.id)
    alice_.act(second, "submit")
    open_item = bob_.claim(made.run.id)

    cases = [
        (alice_, first, 409, "only the last item you submitted"),  # not her last
        (bob_, second, 409, "only the last item you submitted"),  # not his
        (bob_, open_item, 409, "only the last item you submitted"),  # never submitted
        (alice_, 99999, 404, "does not exist"),
    ]
    for who, item_id, status, text in cases:
        code, body = who.act(item_id, "reopen")
        assert code == status and text in str(body["detail"]), (item_id, body)

    assert alice_.act(second, "reopen")[0] == 200
    code, body = alice_.act(second, "reopen")  # twice
    assert code == 409 and "only the last item you submitted" in str(body["detail"])
    alice_.act(second, "submit")
    # Past the window: the submit is final.
    session.execute(
        update(ReviewEvent)
        .where(ReviewEvent.review_item_id == second, ReviewEvent.action == "submit")
        .values(created_at=utcnow() - timedelta(seconds=121))
    )
    session.commit()
    code, body = alice_.act(second, "reopen")
    assert code == 409 and "120 s to reopen the item have passed" in str(body["detail"])
    assert session.get_one(ReviewItem, second).status == "done"


def test_the_pages_offer_the_reopen_while_the_window_lasts(
    app: FastAPI, made: MadeRun, alice: Reviewer, session: Session
) -> None:
    alice_ = Reviewing(app, "alice")
    item_id = alice_.claim(made.run.id)
    alice_.act(item_id, "submit")
    nxt = alice_.claim(made.run.id)
    page = alice_.client.get(f"/items/{nxt}").text
    assert f'action="/items/{item_id}/reopen"' in page and "SKU-000" in page
    response = alice_.client.post(
        f"/items/{item_id}/reopen",
        data={"csrf_token": alice_.headers["X-CSRF-Token"]},
        follow_redirects=False,
    )
    assert response.status_code == 303 and response.headers["location"] == f"/items/{item_id}"
    # Reopened: nothing left to reopen, the notice is hidden.
    page = alice_.client.get(f"/items/{nxt}").text
    assert re.search(r'<form[^>]*id="reopen"[^>]*\shidden>', page)


def test_the_hold_is_renewed_on_request_and_by_every_decision(
    app: FastAPI, made: MadeRun, alice: Reviewer, session: Session
) -> None:
    alice_ = Reviewing(app, "alice")
    item_id = alice_.claim(made.run.id)
    soon = utcnow() + timedelta(seconds=30)
    session.execute(
        update(ReviewItem).where(ReviewItem.id == item_id).values(claim_expires_at=soon)
    )
    session.commit()
    view = alice_.client.get(f"/api/items/{item_id}").json()
    assert 20 <= view["hold_seconds"] <= 30
    status, held = alice_.act(item_id, "hold")
    assert status == 200 and int(str(held["hold_seconds"])) >= LEASE.total_seconds() - 5
    page = alice_.client.get(f"/items/{item_id}").text
    assert 'id="hold"' in page and 'data-lease-seconds="600"' in page
    # An expired hold nobody took is taken back by the next decision.
    session.execute(
        update(ReviewItem)
        .where(ReviewItem.id == item_id)
        .values(claim_expires_at=utcnow() - timedelta(seconds=5))
    )
    session.commit()
    assert alice_.decide(item_id, alice_.images(item_id)[0], "keep") == 200
    assert alice_.client.get(f"/api/items/{item_id}").json()["hold_seconds"] > 500


def test_a_takeover_after_the_hold_expired_is_explained_on_every_action(
    app: FastAPI, made: MadeRun, alice: Reviewer, bob: Reviewer, session: Session
) -> None:
    alice_ = Reviewing(app, "alice")
    item_id = alice_.claim(made.run.id)
    images = alice_.images(item_id)
    assert alice_.decide(item_id, images[0], "keep") == 200
    session.execute(
        update(ReviewItem)
        .where(ReviewItem.id == item_id)
        .values(claim_expires_at=utcnow() - timedelta(seconds=1))
    )
    session.commit()
    assert claim_next(session, run_id=made.run.id, reviewer_id=bob.id, lease=LEASE) == item_id

    for action in ("decisions", "undo", "submit", "reroll", "hold"):
        if action == "decisions":
            response = alice_.client.post(
                f"/api/items/{item_id}/decisions",
                json={"image_id": images[1], "decision": "reject"},
                headers=alice_.headers,
            )
            status, body = response.status_code, response.json()
        else:
            status, body = alice_.act(item_id, action)
        assert status == 409, (action, body)
        assert body["code"] == "taken_over" and body["holder"] == "bob", (action, body)
        assert "bob" in str(body["detail"]) and "expired" in str(body["detail"])
    assert alice_.act(item_id, "release")[0] == 409
    assert _decisions(session) == {images[0]: "keep"}  # what she did before it expired stays

    # Someone who never worked on it is told it is held, and by whom.
    assert alice_.client.get(f"/api/items/{item_id}").json()["claimed_by"] == "bob"
    add_reviewer(session, "carol", "correct horse battery")
    carol = Reviewing(app, "carol")
    status, body = carol.act(item_id, "hold")
    assert status == 409 and body["code"] == "held" and body["holder"] == "bob"
    assert "claimed by another reviewer (bob)" in str(body["detail"])

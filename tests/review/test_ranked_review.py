"""Ranked review over HTTP, on Postgres and on the embedded SQLite database, with planted
signals (scores and predictions whose order is known): each item's grid best first, groups of
near-duplicates and what a decision on one does, the run's cut line, "keep the top N" and
"reject the rest", and the keeper model's own rejections (hidden, undoable, audited, never a
person's, never exported)."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.migrate import upgrade
from db.models import Image, ImageReview, ReviewItem
from db.ranking import AutoReject
from db.session import make_engine, make_sessionmaker
from pixelmill.storage import LocalStorage
from review.accounts import add_reviewer
from review.app import create_app
from review.queue import sync_queue
from review.ranking.auto_reject import auto_reject_counts, make_auto_rejects
from tests.review.conftest import PASSWORD, log_in, review_settings
from tests.review.factory import MadeRun, make_run
from tests.review.ranking_rows import add_model, add_predictions, add_scores, axis, near

# Planted keep probabilities of the first item's six images, in render order: image 5 is a
# near-duplicate of image 1 (their embeddings nearly the same).
PROBABILITIES = [0.2, 0.9, 0.5, 0.05, 0.7, 0.85]
BEST_FIRST = [1, 5, 4, 2, 0, 3]  # groups best first, each group's members together
# The second item's six images, all unlikely keepers: they pull the run's cut down.
OTHER_ITEM = [0.1] * 6
CUT = (sum(PROBABILITIES) + sum(OTHER_ITEM)) / 12  # ~0.317: images 0 and 3 are below it


@dataclass
class Rig:
    client: TestClient
    headers: dict[str, str]
    sessions: sessionmaker[Session]
    made: MadeRun

    def item(self, review_item_id: int, **params: str) -> dict[str, Any]:
        response = self.client.get(f"/api/items/{review_item_id}", params=params)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def post(self, path: str, body: object = None) -> dict[str, Any]:
        response = self.client.post(path, json=body or {}, headers=self.headers)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def decisions(self) -> dict[int, str]:
        with self.sessions() as session:
            return dict(session.execute(select(ImageReview.image_id, ImageReview.decision)).all())


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("fresh_database_url"))
    url = f"sqlite:///{tmp_path / 'review.db'}"
    upgrade(url)
    return url


def _rig(tmp_path: Path, url: str, **settings: object) -> Iterator[Rig]:
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    storage = LocalStorage(tmp_path / "images")
    with sessions() as session:
        add_reviewer(session, "alice", PASSWORD, admin=True)
        made = make_run(session, items=2, templates=("studio",), seeds=6, storage=storage)
        first, second = (made.images_of(item) for item in made.items)
        vectors = [axis(i) for i in range(6)]
        vectors[5] = near(vectors[1])
        add_scores(session, first, [0.2] * 6, vectors=vectors)
        add_scores(session, second, [0.2] * 6)
        model = add_model(session)
        add_predictions(session, model, first, PROBABILITIES)
        add_predictions(session, model, second, OTHER_ITEM)
        sync_queue(session)
    app = create_app(
        review_settings(tmp_path, url, **settings),
        sessions=sessions,
        storage=storage,
        background_sync=False,
    )
    with TestClient(app) as client:
        headers = {"X-CSRF-Token": log_in(client, "alice")}
        yield Rig(client, headers, sessions, made)
    engine.dispose()


@pytest.fixture
def rig(tmp_path: Path, database_url: str) -> Iterator[Rig]:
    yield from _rig(tmp_path, database_url)


def _claim(rig: Rig) -> int:
    item_id = rig.post(f"/api/runs/{rig.made.run.id}/claim")["review_item_id"]
    assert item_id is not None
    return int(item_id)


def _first_images(rig: Rig) -> list[int]:
    return [image.id for image in rig.made.images_of(rig.made.items[0])]


def test_the_grid_is_best_first_with_groups_scores_and_the_runs_cut(rig: Rig) -> None:
    item_id = _claim(rig)
    ids = _first_images(rig)
    item = rig.item(item_id)

    assert item["ranked_by"] == "model"
    assert item["cut"] == pytest.approx(CUT)
    assert [image["id"] for image in item["images"]] == [ids[i] for i in BEST_FIRST]
    assert [image["probability"] for image in item["images"]] == [
        pytest.approx(PROBABILITIES[i]) for i in BEST_FIRST
    ]
    assert item["groups"][0] == {"lead": ids[1], "members": [ids[1], ids[5]]}
    assert len(item["groups"]) == 5
    by_id = {image["id"]: image for image in item["images"]}
    assert (by_id[ids[5]]["group"], by_id[ids[5]]["group_lead"]) == (ids[1], False)
    assert (by_id[ids[1]]["group_size"], by_id[ids[1]]["group_lead"]) == (2, True)
    assert [i for i, image_id in enumerate(ids) if by_id[image_id]["below_cut"]] == [0, 3]
    assert by_id[ids[1]]["model_version"] == 1
    assert by_id[ids[1]]["clip_score"] == pytest.approx(0.2)
    assert by_id[ids[1]]["prior"] == pytest.approx(0.2)

    page = rig.client.get(f"/items/{item_id}").text
    order = [
        int(i)
        for i in re.findall(r'<figure class="card[^"]*"\s+tabindex="-1" data-image="(\d+)"', page)
    ]
    assert order == [ids[i] for i in BEST_FIRST]
    # The line is drawn before the first card below the cut; the duplicate waits in its group.
    assert page.index('id="cut-line"') < page.index(f'data-image="{ids[0]}"')
    assert page.index(f'data-image="{ids[2]}"') < page.index('id="cut-line"')
    member = re.search(rf'<figure class="card member[^>]*data-image="{ids[5]}"[^>]*>', page, re.S)
    assert member and member.group(0).rstrip(">").endswith("hidden")
    assert "×2" in page and "p 0.90" in page and "best first by the keeper model" in page


def test_before_any_model_the_prior_orders_and_unscored_images_keep_render_order(
    tmp_path: Path, database_url: str
) -> None:
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        add_reviewer(session, "alice", PASSWORD)
        made = make_run(session, items=1, templates=("studio",), seeds=5)
        images = made.images_of(made.items[0])
        add_scores(session, images[:3], [0.1, 0.3, 0.2], aesthetic=[4.0, 5.0, 9.0])
        sync_queue(session)
    app = create_app(
        review_settings(tmp_path, database_url), sessions=sessions, background_sync=False
    )
    with TestClient(app) as client:
        headers = {"X-CSRF-Token": log_in(client, "alice")}
        item_id = client.post(f"/api/runs/{made.run.id}/claim", headers=headers).json()[
            "review_item_id"
        ]
        item = client.get(f"/api/items/{item_id}").json()
    engine.dispose()
    # Priors: 0.1 + 0.2, 0.3 + 0.25, 0.2 + 0.45 (the aesthetic rating counts half, over 10).
    assert item["ranked_by"] == "scores" and item["cut"] is None
    unscored = sorted(images[3:], key=lambda image: image.seed)  # render order: by seed
    assert [image["id"] for image in item["images"]] == [
        *(images[i].id for i in (2, 1, 0)),
        *(image.id for image in unscored),
    ]
    assert [image["prior"] for image in item["images"]][:3] == [
        pytest.approx(0.65),
        pytest.approx(0.55),
        pytest.approx(0.3),
    ]
    assert not any(image["below_cut"] for image in item["images"])


def test_a_decision_on_a_group_decides_its_duplicates_and_one_undo_walks_it_back(
    rig: Rig,
) -> None:
    item_id = _claim(rig)
    ids = _first_images(rig)

    kept = rig.post(
        f"/api/items/{item_id}/decisions",
        {"image_id": ids[1], "decision": "keep", "group": True},
    )
    assert kept["changed"] == [
        {"image_id": ids[1], "decision": "keep"},
        {"image_id": ids[5], "decision": "reject"},
    ]
    assert rig.decisions() == {ids[1]: "keep", ids[5]: "reject"}

    undone = rig.post(f"/api/items/{item_id}/undo")
    assert {change["image_id"] for change in undone["changed"]} == {ids[1], ids[5]}
    assert rig.decisions() == {}

    # A member a person decided keeps that decision when the group is decided.
    rig.post(f"/api/items/{item_id}/decisions", {"image_id": ids[5], "decision": "keep"})
    rig.post(
        f"/api/items/{item_id}/decisions",
        {"image_id": ids[1], "decision": "reject", "group": True},
    )
    assert rig.decisions() == {ids[1]: "reject", ids[5]: "keep"}


def test_keep_the_top_n_and_reject_the_rest_add_what_is_missing(rig: Rig) -> None:
    item_id = _claim(rig)
    ids = _first_images(rig)
    rig.post(f"/api/items/{item_id}/decisions", {"image_id": ids[4], "decision": "reject"})

    top = rig.post(f"/api/items/{item_id}/keep-top", {"count": 2})

    # The two best undecided cards: the group of 1 and 5 (its duplicate rejected), then 2;
    # 4 was rejected by the reviewer and stays so.
    assert top["changed"] == [
        {"image_id": ids[1], "decision": "keep"},
        {"image_id": ids[5], "decision": "reject"},
        {"image_id": ids[2], "decision": "keep"},
    ]
    rest = rig.post(f"/api/items/{item_id}/reject-rest")
    assert {change["image_id"] for change in rest["changed"]} == {ids[0], ids[3]}
    assert rig.decisions() == {
        ids[1]: "keep",
        ids[5]: "reject",
        ids[2]: "keep",
        ids[4]: "reject",
        ids[0]: "reject",
        ids[3]: "reject",
    }
    assert len(rig.post(f"/api/items/{item_id}/undo")["changed"]) == 2  # the rest, at once
    assert len(rig.post(f"/api/items/{item_id}/undo")["changed"]) == 3  # the top two cards
    assert rig.decisions() == {ids[4]: "reject"}

    batch = rig.post(
        f"/api/items/{item_id}/decisions/batch",
        {"decisions": [{"image_id": ids[0], "decision": "keep"}]},
    )
    assert batch["changed"] == [{"image_id": ids[0], "decision": "keep"}]


@pytest.fixture
def auto_rig(tmp_path: Path, database_url: str) -> Iterator[Rig]:
    yield from _rig(tmp_path, database_url, auto_reject_below=0.15)


def test_the_models_rejections_are_its_own_hidden_undoable_and_never_exported(
    auto_rig: Rig,
) -> None:
    rig = auto_rig
    ids = _first_images(rig)
    others = [image.id for image in rig.made.images_of(rig.made.items[1])]
    with rig.sessions() as session:
        images_before = session.scalar(select(func.count()).select_from(Image))
        assert make_auto_rejects(session, 0.15) == 7  # image 3 (0.05) and the other item's six
        session.commit()
        assert make_auto_rejects(session, 0.15) == 0  # once per image
        rows = session.scalars(select(AutoReject)).all()
        assert {row.undone_by for row in rows} == {None}
    assert rig.decisions() == {}  # nothing recorded as a person's decision

    item_id = _claim(rig)
    item = rig.item(item_id)
    assert item["auto_rejected"] == 1
    assert item["images"][-1]["id"] == ids[3]
    assert item["images"][-1]["auto_reject"] == {
        "probability": pytest.approx(0.05),
        "threshold": 0.15,
        "model_version": 1,
        "in_force": True,
    }
    page = rig.client.get(f"/items/{item_id}").text
    assert re.search(rf'class="card[^"]* auto"[^>]*data-image="{ids[3]}"', page, re.S)
    assert "1</b> rejected by the model" in page and "0 kept · 0 rejected · 5 undecided" in (
        re.sub(r"<[^>]+>", "", page)
    )

    # Submitting leaves the model's rejection the model's: not turned into a person's.
    rig.post(f"/api/items/{item_id}/decisions", {"image_id": ids[0], "decision": "keep"})
    assert rig.post(f"/api/items/{item_id}/submit")["rejected"] == 4
    assert ids[3] not in rig.decisions()

    second = _claim(rig)
    undone = rig.post(f"/api/items/{second}/auto-rejects/{others[0]}/undo")
    assert undone == {"image_id": others[0], "undone": True}
    rig.post(f"/api/items/{second}/decisions", {"image_id": others[1], "decision": "keep"})
    assert rig.item(second)["auto_rejected"] == 4
    with rig.sessions() as session:
        counts = auto_reject_counts(session, rig.made.run.id)
        reject = session.get(AutoReject, others[0])
        assert reject is not None and reject.undone_at is not None and reject.undone_by
    assert (counts.made, counts.standing, counts.undone, counts.kept, counts.confirmed) == (
        7,
        5,
        1,
        1,
        0,
    )
    rig.post(f"/api/items/{second}/submit")

    export = rig.client.get(f"/runs/{rig.made.run.id}/export").text
    exported = [int(row["image_id"]) for row in csv.DictReader(io.StringIO(export))]
    assert sorted(exported) == sorted([ids[0], others[1]])
    with rig.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == images_before


def test_an_audit_shows_a_sample_to_confirm_or_undo(auto_rig: Rig) -> None:
    rig = auto_rig
    others = [image.id for image in rig.made.images_of(rig.made.items[1])]
    with rig.sessions() as session:
        make_auto_rejects(session, 0.15)
        session.commit()
    audit = f"/runs/{rig.made.run.id}/auto-rejects"
    page = rig.client.get(audit, params={"size": "3"}).text
    shown = [int(i) for i in re.findall(r'audit-card" data-image="(\d+)"', page)]
    assert len(shown) == 3 and "7 made (below 0.15)" in page

    def act(image_id: int, action: str) -> None:
        response = rig.client.post(
            f"{audit}/{image_id}",
            data={"action": action, "csrf_token": rig.headers["X-CSRF-Token"]},
            follow_redirects=False,
        )
        assert response.status_code == 303, response.text

    act(others[0], "confirm")
    act(others[1], "keep")
    act(others[2], "undo")
    assert rig.decisions() == {others[0]: "reject", others[1]: "keep"}
    with rig.sessions() as session:
        counts = auto_reject_counts(session, rig.made.run.id)
        item = session.get(ReviewItem, session.get(AutoReject, others[0]).review_item_id)  # type: ignore[union-attr]
        assert item is not None and item.status == "open"
    assert (counts.standing, counts.confirmed, counts.kept, counts.undone) == (4, 1, 1, 1)
    page = rig.client.get(audit, params={"size": "100"}).text
    assert len(re.findall(r'audit-card" data-image="(\d+)"', page)) == 4

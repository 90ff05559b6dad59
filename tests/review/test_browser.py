"""The review app in headless Chromium (Playwright), served by uvicorn on a loopback port
against a Postgres database of its own: log in, take an item, keep two images with the
keyboard, reject the rest, submit, and check the rows."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import ImageReview, Reviewer, ReviewEvent, ReviewItem
from pixelmill.settings import Settings
from pixelmill.storage import Storage
from review.app import create_app
from review.queue import sync_queue
from tests.conftest import free_port
from tests.review.conftest import PASSWORD
from tests.review.factory import make_run

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture
def served(settings: Settings, sessions: sessionmaker[Session], storage: Storage) -> Iterator[str]:
    app = create_app(settings, sessions=sessions, storage=storage, background_sync=False)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_review_an_item_with_the_keyboard(
    served: str, session: Session, storage: Storage, alice: Reviewer
) -> None:
    from playwright.sync_api import expect, sync_playwright

    made = make_run(session, items=1, templates=("studio", "outdoor"), seeds=3, storage=storage)
    sync_queue(session)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            page.goto(served + "/")
            expect(page).to_have_url(f"{served}/login?next=/")
            page.fill("input[name=name]", "alice")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            expect(page.locator("h1")).to_have_text("Runs")
            page.click(f"button[data-run='{made.run.id}']")

            cards = page.locator("#grid .card")
            expect(cards).to_have_count(6)
            ids = [int(cards.nth(i).get_attribute("data-image") or 0) for i in range(6)]
            # Every thumbnail really loaded (served from local storage behind login).
            page.wait_for_function(
                "Array.from(document.querySelectorAll('#grid img'))"
                ".every(img => img.complete && img.naturalWidth > 0)"
            )
            page.keyboard.press("k")
            page.keyboard.press("k")
            page.keyboard.press("u")  # undo the second keep...
            expect(cards.nth(1)).not_to_have_class("card keep")
            page.keyboard.press("k")  # ...and keep it again
            for _ in range(4):
                page.keyboard.press("x")
            expect(page.locator("#grid .card.keep")).to_have_count(2)
            expect(page.locator("#grid .card.reject")).to_have_count(4)
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "review-grid.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot of the review grid: {shot}")

            page.keyboard.press("Enter")
            expect(page.locator("h1")).to_contain_text("Nothing to review")
            assert errors == []
        finally:
            browser.close()

    session.expire_all()
    decisions = dict(session.execute(select(ImageReview.image_id, ImageReview.decision)).all())
    assert decisions == {
        ids[0]: "keep",
        ids[1]: "keep",
        **{image_id: "reject" for image_id in ids[2:]},
    }
    assert set(session.scalars(select(ImageReview.reviewer_id))) == {alice.id}
    item = session.scalars(select(ReviewItem)).one()
    assert (item.status, item.submitted_by, item.claimed_by) == ("done", alice.id, None)
    actions = session.scalars(select(ReviewEvent.action).order_by(ReviewEvent.id)).all()
    assert actions == ["keep", "keep", "undo", "keep", *["reject"] * 4, "submit"]
    assert shot.stat().st_size > 10_000

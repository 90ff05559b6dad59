"""The review app in headless Chromium (Playwright), served by uvicorn on a loopback port
against a Postgres database of its own: reviewing with the keyboard, the next item shown
without a page load, undo after Enter, the enlarged view, the grid on a 1440x900 screen, the
hold's countdown and takeover, and a ranked grid with its cut line and a group of
near-duplicates."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fastapi import FastAPI
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import ImageReview, Reviewer, ReviewEvent, ReviewItem, utcnow
from pixelmill.settings import Settings
from pixelmill.storage import Storage
from review.app import create_app
from review.queue import claim_next, sync_queue
from tests.review.conftest import PASSWORD
from tests.review.factory import make_run
from tests.review.ranking_rows import add_model, add_predictions, add_scores, axis, near

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


def open_page(browser: Browser, width: int = 1280, height: int = 900) -> tuple[Page, list[str]]:
    """A page that records script errors (the test asserts there were none)."""
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    return page, errors


def log_in(page: Page, url: str, name: str = "alice") -> None:
    from playwright.sync_api import expect

    page.goto(url + "/")
    expect(page).to_have_url(f"{url}/login?next=/")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Runs")


def test_review_an_item_with_the_keyboard(
    served: str, browser: Browser, session: Session, storage: Storage, alice: Reviewer
) -> None:
    from playwright.sync_api import expect

    made = make_run(session, items=1, templates=("studio", "outdoor"), seeds=3, storage=storage)
    sync_queue(session)
    page, errors = open_page(browser)
    log_in(page, served)
    page.click(f"button[data-run='{made.run.id}']")

    cards = page.locator("#grid .card")
    expect(cards).to_have_count(6)
    ids = [int(cards.nth(i).get_attribute("data-image") or 0) for i in range(6)]
    # Every thumbnail really loaded (served from local storage behind login).
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('#grid img'))"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    page.keyboard.press("k")
    page.keyboard.press("k")
    page.keyboard.press("u")  # undo the second keep...
    expect(cards.nth(1)).not_to_have_class(re.compile(r"\bkeep\b"))
    page.keyboard.press("k")  # ...and keep it again
    for _ in range(4):
        page.keyboard.press("x")
    expect(page.locator("#grid .card.keep")).to_have_count(2)
    expect(page.locator("#grid .card.reject")).to_have_count(4)
    expect(page.locator("#counter")).to_have_text(re.compile(r"2 kept · 4 rejected · 0 undecided"))
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "review-grid.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot of the review grid: {shot}")

    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_contain_text("Nothing to review")
    assert errors == []

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


def test_sixteen_candidates_fit_a_1440x900_screen_and_enlarge_with_their_settings(
    served: str, browser: Browser, session: Session, storage: Storage, alice: Reviewer
) -> None:
    from playwright.sync_api import expect

    made = make_run(session, items=1, templates=("studio",), seeds=16, storage=storage)
    sync_queue(session)
    page, errors = open_page(browser, 1440, 900)
    log_in(page, served)
    page.click(f"button[data-run='{made.run.id}']")
    cards = page.locator("#grid .card")
    expect(cards).to_have_count(16)
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('#grid img')).every(img => img.complete)"
    )

    def fits() -> None:
        for index in range(16):
            box = cards.nth(index).bounding_box()
            assert box is not None
            assert box["y"] >= 0 and box["y"] + box["height"] <= 900, (index, box)
            assert box["x"] + box["width"] <= 1440, (index, box)
        button = page.locator("#submit").bounding_box()
        assert button is not None and button["y"] + button["height"] <= 900

    fits()  # "fit the screen" is the default
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "review-grid-1440x900.png"))
    width_fit = cards.nth(0).bounding_box()["width"]  # type: ignore[index]
    page.keyboard.press("+")  # one step larger than medium: large cards, the page scrolls
    expect(page.locator("#grid")).to_have_attribute("data-size", "l")
    assert cards.nth(0).bounding_box()["width"] > width_fit  # type: ignore[index]
    page.keyboard.press("-")
    page.keyboard.press("-")
    expect(page.locator("#grid")).to_have_attribute("data-size", "s")
    page.select_option("#grid-size", "m")
    expect(page.locator("#grid")).to_have_attribute("data-size", "m")
    page.keyboard.press("0")
    expect(page.locator("#grid")).to_have_attribute("data-size", "fit")
    fits()

    # The enlarged view: every setting of the image, previous/next with the arrows.
    job = made.jobs[0]
    seed_of = {image.id: str(image.seed) for image in made.images}
    seeds = [seed_of[int(cards.nth(i).get_attribute("data-image") or 0)] for i in range(2)]
    zoom = page.locator("#zoom")
    page.keyboard.press("z")
    expect(zoom).to_be_visible()
    info = zoom.locator(".meta")
    for shown in (
        job.prompt,
        "blurry",
        "tiny",
        "the model's default",
        "2",
        "7.0",
        "64×64",
        seeds[0],
    ):
        expect(info).to_contain_text(shown)
    expect(zoom.locator(".zoom-state")).to_have_text("1 of 16 · undecided")
    page.keyboard.press("ArrowRight")
    expect(info).to_contain_text(seeds[1])
    page.keyboard.press("ArrowLeft")
    expect(info).to_contain_text(seeds[0])
    page.keyboard.press("k")  # keep from the enlarged view: it moves on to the next
    expect(zoom.locator(".zoom-state")).to_have_text("2 of 16 · undecided")
    expect(info).to_contain_text(seeds[1])
    page.screenshot(path=str(ARTIFACTS / "review-zoom.png"))
    page.keyboard.press("Escape")
    expect(zoom).to_be_hidden()
    expect(page.locator("#counter")).to_have_text(re.compile(r"1 kept · 0 rejected · 15 undecided"))
    assert errors == []


def test_enter_shows_the_next_item_at_once_and_the_submit_can_be_undone(
    served: str, browser: Browser, session: Session, storage: Storage, alice: Reviewer
) -> None:
    from playwright.sync_api import expect

    made = make_run(session, items=2, templates=("studio",), seeds=4, storage=storage)
    sync_queue(session)
    page, errors = open_page(browser)
    log_in(page, served)
    page.click(f"button[data-run='{made.run.id}']")
    expect(page.locator("h1")).to_have_text("SKU-000")
    first_url = page.url
    # The next item is claimed and loaded ahead of time: wait until it is.
    page.wait_for_function(
        f"() => fetch('/api/runs/{made.run.id}/items?status=open', {{credentials: 'same-origin'}})"
        ".then(r => r.json()).then(rows => rows.every(row => row.claimed_by === 'alice'))",
        polling=200,
    )
    page.evaluate("window.noPageLoad = true")
    page.keyboard.press("k")
    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_have_text("SKU-001")
    assert page.evaluate("window.noPageLoad") is True  # the same page: no load on Enter
    assert page.url != first_url and page.url.endswith(
        "/items/" + page.locator("#item").get_attribute("data-item", timeout=1000)  # type: ignore[operator]
    )
    notice = page.locator("#reopen")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("SKU-000")
    expect(notice.locator(".reopen-left")).to_have_text(re.compile(r"\d+ s left"))

    page.keyboard.press("Shift+U")  # undo after Enter
    expect(page.locator("h1")).to_have_text("SKU-000")
    # The keep stands; the three images the submit rejected are undecided again.
    expect(page.locator("#counter")).to_have_text(re.compile(r"1 kept · 0 rejected · 3 undecided"))
    expect(page.locator("#grid .card.keep")).to_have_count(1)
    page.keyboard.press("k")
    page.keyboard.press("Enter")  # resubmit: two keeps now
    expect(page.locator("h1")).to_have_text("SKU-001")
    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_contain_text("Nothing to review")
    # The last submit can still be reopened from the empty page.
    expect(page.locator("#reopen")).to_contain_text("SKU-001")
    assert errors == []

    session.expire_all()
    items = session.scalars(select(ReviewItem).order_by(ReviewItem.id)).all()
    assert [item.status for item in items] == ["done", "done"]
    kept = session.scalars(select(ImageReview.image_id).where(ImageReview.decision == "keep"))
    assert len(list(kept)) == 2


@pytest.fixture
def short_lease_url(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: Storage,
    serve: Callable[[FastAPI], str],
) -> str:
    quick = settings.model_copy(update={"review_claim_lease_seconds": 20})
    return serve(create_app(quick, sessions=sessions, storage=storage, background_sync=False))


def test_the_hold_counts_down_renews_while_working_and_says_who_took_it_over(
    short_lease_url: str,
    browser: Browser,
    session: Session,
    storage: Storage,
    alice: Reviewer,
    bob: Reviewer,
) -> None:
    from playwright.sync_api import expect

    made = make_run(session, items=1, templates=("studio",), seeds=3, storage=storage)
    sync_queue(session)
    page, errors = open_page(browser)
    log_in(page, short_lease_url)
    page.click(f"button[data-run='{made.run.id}']")
    left = page.locator("#hold .hold-left")
    expect(left).to_have_text(re.compile(r"0:(19|20)"))
    page.wait_for_timeout(7500)
    # Counting down (from the page's own renewal on load, which a loaded machine delays).
    expect(left).to_have_text(re.compile(r"0:1[0-4]"))
    # Working (the mouse moving) renews the hold: at most every lease/3 seconds, counted from
    # that last renewal, so keep moving until it is due.
    renewed = re.compile(r"0:(19|20)")
    for step in range(40):
        page.mouse.move(200 + step, 300 + step)
        if renewed.fullmatch(left.inner_text().strip()):
            break
        page.wait_for_timeout(250)
    expect(left).to_have_text(renewed, timeout=1000)
    page.keyboard.press("k")
    item_id = int(page.locator("#item").get_attribute("data-item") or 0)
    # The keep is saved (and renews the hold) before the hold is made to run out below.
    page.wait_for_function(
        f"() => fetch('/api/items/{item_id}', {{credentials: 'same-origin'}})"
        ".then(r => r.json()).then(item => item.images.some(i => i.decision === 'keep'))",
        polling=200,
    )

    # Alice's hold runs out and Bob takes the item over: Alice is told, not silently refused.
    session.execute(
        update(ReviewItem)
        .where(ReviewItem.id == item_id)
        .values(claim_expires_at=utcnow() - timedelta(seconds=1))
    )
    session.commit()
    lease = timedelta(seconds=20)
    assert claim_next(session, run_id=made.run.id, reviewer_id=bob.id, lease=lease) == item_id
    page.keyboard.press("x")
    message = page.locator("#message")
    expect(message).to_contain_text("bob")
    expect(message).to_contain_text("took this item over after your hold on it expired")
    expect(message).to_have_attribute("role", "alert")
    expect(page.locator("#take-next")).to_be_visible()
    expect(page.locator("#submit")).to_be_disabled()
    expect(left).to_have_text("taken over")
    expect(page.locator("#grid .card.reject")).to_have_count(0)  # the refused decision is undone
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "review-taken-over.png"))
    # The browser logs the refused request (409) itself; nothing else went wrong.
    assert [error for error in errors if "409" not in error] == []


def test_a_ranked_grid_with_its_cut_line_and_a_group_of_near_duplicates(
    served: str, browser: Browser, session: Session, storage: Storage, alice: Reviewer
) -> None:
    from playwright.sync_api import expect

    made = make_run(session, items=2, templates=("studio",), seeds=6, storage=storage)
    first, second = (made.images_of(item) for item in made.items)
    ids = [image.id for image in first]
    vectors = [axis(i) for i in range(6)]
    vectors[5] = near(vectors[1])  # image 5 is a near-duplicate of image 1
    add_scores(session, first, [0.2] * 6, vectors=vectors)
    add_scores(session, second, [0.2] * 6)
    model = add_model(session)
    add_predictions(session, model, first, [0.2, 0.9, 0.5, 0.05, 0.7, 0.85])
    add_predictions(session, model, second, [0.1] * 6)  # the run's cut: ~0.32
    sync_queue(session)
    page, errors = open_page(browser)
    log_in(page, served)
    page.click(f"button[data-run='{made.run.id}']")

    cards = page.locator("#grid .card:visible")
    expect(cards).to_have_count(5)  # the duplicate waits in its group
    order = [int(cards.nth(i).get_attribute("data-image") or 0) for i in range(5)]
    assert order == [ids[i] for i in (1, 4, 2, 0, 3)]  # best first
    line = page.locator("#cut-line")
    expect(line).to_be_visible()
    above = page.locator(f"#grid .card[data-image='{ids[2]}']").bounding_box()
    below = page.locator(f"#grid .card[data-image='{ids[0]}']").bounding_box()
    drawn = line.bounding_box()
    assert above and below and drawn
    assert above["y"] + above["height"] <= drawn["y"] <= below["y"]  # between the two
    lead = cards.nth(0)
    expect(lead.locator(".dupes")).to_have_text("×2")
    page.keyboard.press("s")  # the scores, on demand
    expect(lead.locator(".scores")).to_be_visible()
    expect(lead.locator(".scores")).to_have_text("p 0.90")
    page.keyboard.press("z")  # ...and in the enlarged view
    expect(page.locator("#zoom .meta")).to_contain_text("0.900 (keeper model v1)")
    expect(page.locator("#zoom .zoom-state")).to_have_text("1 of 5 · undecided")
    page.keyboard.press("Escape")

    page.keyboard.press("g")  # open the group and reject its duplicate on its own
    expect(cards).to_have_count(6)
    expect(cards.nth(1)).to_have_attribute("data-image", str(ids[5]))
    page.keyboard.press("ArrowRight")
    page.keyboard.press("x")
    expect(page.locator(f"#grid .card[data-image='{ids[5]}']")).to_have_class(re.compile("reject"))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "review-ranked.png"), full_page=True)
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("g")  # closed again
    expect(cards).to_have_count(5)

    page.keyboard.press("t")  # keep what is above the cut line
    expect(page.locator("#grid .card.keep")).to_have_count(3)
    page.keyboard.press("Shift+X")  # and reject the rest
    expect(page.locator("#counter")).to_have_text(re.compile(r"3 kept · 3 rejected · 0 undecided"))
    assert errors == []

    session.expire_all()
    decisions = dict(session.execute(select(ImageReview.image_id, ImageReview.decision)).all())
    assert decisions == {
        ids[1]: "keep",
        ids[5]: "reject",  # the reviewer's own decision: the group's keep left it alone
        ids[4]: "keep",
        ids[2]: "keep",
        ids[0]: "reject",
        ids[3]: "reject",
    }

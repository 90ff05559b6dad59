"""The server-rendered pages (all behind login; every POST carries the CSRF token)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, StreamingResponse

from pixelmill.storage import StorageError
from review.bounds import RowId
from review.claims import claim_for
from review.deps import (
    DB,
    Admin,
    CurrentReviewer,
    State,
    check_csrf,
    csrf_token,
    current_reviewer,
    log_out,
)
from review.export import export_lines, open_items_left_out
from review.images import ensure_thumbnail
from review.queue import NotFoundError
from review.reopen import reopen, reopenable
from review.stats import MIN_RATE_SECONDS, reviewer_speeds, run_stats
from review.views import get_run, item_view, run_summaries, stats_view

router = APIRouter(
    dependencies=[Depends(current_reviewer), Depends(check_csrf)], include_in_schema=False
)

MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}


def _page(
    request: Request, state: State, name: str, reviewer: CurrentReviewer, **context: object
) -> Response:
    return state.templates.TemplateResponse(
        request, name, {"reviewer": reviewer, "csrf": csrf_token(request), **context}
    )


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request, state: State, session: DB, reviewer: CurrentReviewer) -> Response:
    return _page(request, state, "runs.html", reviewer, runs=run_summaries(session))


@router.post("/logout")
def logout(request: Request, session: DB) -> Response:
    """Ends the login on the server too: a copy of the cookie stops working."""
    log_out(request, session)
    return RedirectResponse("/login", status_code=303)


@router.post("/runs/{run_id}/next")
def next_item(
    request: Request, state: State, session: DB, reviewer: CurrentReviewer, run_id: RowId
) -> Response:
    claimed = claim_for(state, session, run_id, reviewer.id)
    if claimed is None:
        summary = run_summaries(session, run_id=run_id)[0]
        last = reopenable(session, reviewer.id, state.reopen_window)
        return _page(request, state, "empty.html", reviewer, summary=summary, reopenable=last)
    return RedirectResponse(f"/items/{claimed}", status_code=303)


@router.post("/items/{review_item_id}/reopen")
def reopen_item(
    state: State, session: DB, reviewer: CurrentReviewer, review_item_id: RowId
) -> Response:
    """Undo after Enter, from a page: reopen your last submitted item and show it."""
    reopen(
        session,
        review_item_id,
        reviewer_id=reviewer.id,
        lease=state.lease,
        window=state.reopen_window,
    )
    return RedirectResponse(f"/items/{review_item_id}", status_code=303)


@router.get("/items/{review_item_id}", response_class=HTMLResponse)
def item_page(
    request: Request,
    state: State,
    session: DB,
    reviewer: CurrentReviewer,
    review_item_id: RowId,
    flagged: bool = False,
) -> Response:
    view = item_view(
        session,
        review_item_id,
        state.urls,
        show_flagged=flagged,
        duplicate_similarity=state.duplicate_similarity,
        cuts=state.cuts,
    )
    speeds = reviewer_speeds(session, view.run_id, reviewer.id)
    return _page(
        request,
        state,
        "item.html",
        reviewer,
        item=view,
        flagged=flagged,
        holder=view.claimed_by == reviewer.name and view.status == "open",
        lease_seconds=state.settings.review_claim_lease_seconds,
        reopen_seconds=state.settings.review_reopen_seconds,
        pace=speeds[0].decisions_per_hour if speeds else None,
        reopenable=reopenable(session, reviewer.id, state.reopen_window),
    )


@router.get("/runs/{run_id}/stats", response_class=HTMLResponse)
def stats_page(
    request: Request, state: State, session: DB, reviewer: Admin, run_id: RowId
) -> Response:
    run = get_run(session, run_id)
    stats = stats_view(run_stats(session, run))
    left_out = open_items_left_out(session, run)
    return _page(
        request,
        state,
        "stats.html",
        reviewer,
        stats=stats,
        left_out=left_out,
        min_rate_minutes=int(MIN_RATE_SECONDS // 60),
    )


# The download says in a header how many items it left out; the stats page says it in words.
LEFT_OUT_HEADER = "X-Open-Items-Left-Out"


def _export(state: State, run_id: int, fmt: str, copy: bool) -> Response:
    with state.sessions() as session:
        run = get_run(session, run_id)
        filename = f"{run.name}-keepers.{fmt}"
        left_out = open_items_left_out(session, run)

    def lines() -> Iterator[str]:
        # Its own session: the response streams after the request's session has closed.
        with state.sessions() as session:
            yield from export_lines(
                session, get_run(session, run_id), state.storage, fmt, copy=copy
            )

    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in filename)
    return StreamingResponse(
        lines(),
        media_type=MEDIA_TYPES[fmt],
        headers={
            "Content-Disposition": f'attachment; filename="{safe_name}"',
            LEFT_OUT_HEADER: str(left_out),
        },
    )


@router.get("/runs/{run_id}/export")
def export_download(
    state: State, _admin: Admin, run_id: RowId, format: Literal["csv", "jsonl"] = "csv"
) -> Response:
    return _export(state, run_id, format, copy=False)


@router.post("/runs/{run_id}/export")
def export_and_copy(
    state: State,
    _admin: Admin,
    run_id: RowId,
    format: Annotated[Literal["csv", "jsonl"], Form()] = "csv",
    copy_approved: Annotated[bool, Form()] = False,
) -> Response:
    return _export(state, run_id, format, copy=copy_approved)


@router.get("/files/{key:path}")
def local_file(state: State, key: str) -> Response:
    """Images on local storage (the embedded setup), for logged-in reviewers only."""
    try:
        path = state.urls.local_path(key)
    except StorageError as exc:
        raise NotFoundError(str(exc)) from exc
    if not path.is_file():
        raise NotFoundError(f"no image {key!r}")
    return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})


@router.get("/thumbnails/{image_id}")
def thumbnail(state: State, session: DB, image_id: RowId) -> Response:
    """An image's thumbnail, made on its first view: a redirect to where it is stored. The
    browser keeps the redirect for half the life of a presigned URL."""
    try:
        key = ensure_thumbnail(session, state.storage, image_id, size=state.settings.thumbnail_size)
    except StorageError as exc:
        raise NotFoundError(str(exc)) from exc
    url = state.urls.url(key)
    assert url is not None  # a key was just made
    max_age = min(3600, state.urls.expires_in // 2)
    return RedirectResponse(
        url, status_code=302, headers={"Cache-Control": f"private, max-age={max_age}"}
    )

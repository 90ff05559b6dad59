"""What needs no login: the health check, the metrics, and the login form itself."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from review.accounts import authenticate
from review.deps import DB, State, check_csrf, csrf_token, log_in

router = APIRouter()


@router.get("/healthz", response_class=PlainTextResponse, include_in_schema=False)
def healthz(session: DB) -> str:
    session.execute(text("SELECT 1"))  # the app is only useful with its database
    return "ok"


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _safe_next(target: str | None) -> str:
    """Only a path on this site: never redirect a login to another host."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target:
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_form(request: Request, state: State, next: str | None = None) -> Response:
    return state.templates.TemplateResponse(
        request,
        "login.html",
        {"csrf": csrf_token(request), "next": _safe_next(next), "error": None, "reviewer": None},
    )


@router.post("/login", include_in_schema=False, dependencies=[Depends(check_csrf)])
def login(
    request: Request,
    state: State,
    session: DB,
    name: Annotated[str, Form()],
    password: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/",
) -> Response:
    reviewer = authenticate(session, name, password)
    if reviewer is None:
        return state.templates.TemplateResponse(
            request,
            "login.html",
            {
                "csrf": csrf_token(request),
                "next": _safe_next(next),
                "error": "Wrong name or password.",
                "reviewer": None,
            },
            status_code=401,
        )
    log_in(request, reviewer)
    return RedirectResponse(_safe_next(next), status_code=303)

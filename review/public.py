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
from review.throttle import Throttled, ThrottleUnavailable

router = APIRouter()


@router.get("/healthz", response_class=PlainTextResponse, include_in_schema=False)
def healthz(session: DB) -> str:
    session.execute(text("SELECT 1"))  # the app is only useful with its database
    return "ok"


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _safe_next(target: str | None) -> str:
    """Only a path on this site: never redirect a login to another host (nor put a control
    character into the Location header)."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target:
        return "/"
    return target


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _cookie_warning(request: Request, state: State) -> str | None:
    """Said on the login form when the session cookie is Secure but the page came over plain
    HTTP: the browser would drop the cookie and the login would not stick."""
    if request.url.scheme == "https" or not state.secure_cookies:
        return None
    return (
        "This app sends its login cookie over HTTPS only, and this page came over plain HTTP: "
        "serve it behind HTTPS, or set PIXELMILL_REVIEW_SECURE_COOKIES=false on a trusted "
        "network."
    )


def _form(
    request: Request, state: State, next: str | None, error: str | None, status: int = 200
) -> Response:
    return state.templates.TemplateResponse(
        request,
        "login.html",
        {
            "csrf": csrf_token(request),
            "next": _safe_next(next),
            "error": error,
            "warning": _cookie_warning(request, state),
            "reviewer": None,
        },
        status_code=status,
    )


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_form(request: Request, state: State, next: str | None = None) -> Response:
    return _form(request, state, next, None)


@router.post("/login", include_in_schema=False, dependencies=[Depends(check_csrf)])
def login(
    request: Request,
    state: State,
    session: DB,
    name: Annotated[str, Form()],
    password: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/",
) -> Response:
    address = client_address(request)
    try:
        state.throttle.begin(name, address)
    except Throttled as exc:
        response = _form(
            request,
            state,
            next,
            f"Too many failed logins. Try again in {exc.retry_after} seconds.",
            status=429,
        )
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except ThrottleUnavailable:
        response = _form(request, state, next, "Logins are unavailable for a moment.", 503)
        response.headers["Retry-After"] = "30"
        return response
    reviewer = authenticate(session, name, password)
    if reviewer is None:
        state.throttle.failed(address)
        return _form(request, state, next, "Wrong name or password.", status=401)
    state.throttle.succeeded(name)
    log_in(request, session, reviewer)
    return RedirectResponse(_safe_next(next), status_code=303)

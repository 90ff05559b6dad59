"""The review web app: ``create_app(settings)`` builds it; ``pixelmill review`` serves it."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from threading import Lock
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker
from starlette.middleware.sessions import SessionMiddleware

from db.session import make_engine, make_sessionmaker
from pixelmill.settings import Settings
from pixelmill.storage import Storage, storage_from_settings
from review import api, audit, pages, public
from review.bounds import RequestGuard
from review.deps import Forbidden, LoginRequired, ReviewState
from review.images import ImageUrls
from review.intake import SyncThread
from review.queue import ReviewError
from review.ranking.retrain import RetrainThread
from review.secret import secret_key
from review.throttle import LoginThrottle

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "pixelmill_review"
# How often the retraining thread asks whether a source has PIXELMILL_KEEPER_RETRAIN_EVERY new
# decisions (one count per source: cheap).
RETRAIN_CHECK_SECONDS = 30.0


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def secure_cookies(settings: Settings) -> bool:
    """PIXELMILL_REVIEW_SECURE_COOKIES when set; otherwise Secure unless the app is bound to a
    loopback address (PIXELMILL_REVIEW_HOST), where plain HTTP never leaves the machine."""
    if settings.review_secure_cookies is not None:
        return settings.review_secure_cookies
    return not is_loopback(settings.review_host)


def _state(settings: Settings, sessions: sessionmaker[Session], storage: Storage) -> ReviewState:
    return ReviewState(
        settings=settings,
        sessions=sessions,
        storage=storage,
        urls=ImageUrls(storage, expires_in=settings.review_url_seconds),
        templates=Jinja2Templates(directory=HERE / "templates"),
        last_sync={},
        sync_lock=Lock(),
        throttle=LoginThrottle(settings),
        secure_cookies=secure_cookies(settings),
    )


def _lifespan(
    state: ReviewState, sync: bool, retrain: bool, retrain_check_seconds: float
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's background threads, started with it and stopped on shutdown."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        threads: list[SyncThread | RetrainThread] = []
        if sync:
            threads.append(SyncThread(state, state.settings.review_sync_seconds))
        if retrain:
            threads.append(RetrainThread(state.sessions, state.settings, retrain_check_seconds))
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            for thread in threads:
                thread.stop()

    return lifespan


def create_app(
    settings: Settings,
    *,
    sessions: sessionmaker[Session] | None = None,
    storage: Storage | None = None,
    background_sync: bool = True,
    background_retrain: bool | None = None,
    retrain_check_seconds: float = RETRAIN_CHECK_SECONDS,
) -> FastAPI:
    """The app; its background threads (the queue's sync, and the keeper model's retraining,
    which follows ``background_sync`` unless told) start and stop with it."""
    if sessions is None:
        sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    if storage is None:
        storage = storage_from_settings(settings)
    state = _state(settings, sessions, storage)

    retrain = background_sync if background_retrain is None else background_retrain
    app = FastAPI(
        title="pixelmill review",
        version="1",
        lifespan=_lifespan(state, background_sync, retrain, retrain_check_seconds),
        # The schema is served behind login by review.api; no public docs pages.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        # Counted as the body arrives: a larger one is answered 413 before it is all read.
        max_body_size=settings.review_max_body_bytes,
    )
    app.state.review = state
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret_key(settings),
        session_cookie=SESSION_COOKIE,
        max_age=int(settings.review_session_hours * 3600),
        same_site="lax",
        https_only=state.secure_cookies,
    )
    app.add_middleware(RequestGuard, max_body_bytes=settings.review_max_body_bytes)
    _security_headers(app, settings)
    _error_handlers(app)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(public.router)
    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(audit.router)
    return app


def _security_headers(app: FastAPI, settings: Settings) -> None:
    image_sources = "'self' data:"
    if settings.storage == "s3":
        endpoint = settings.s3_endpoint_url
        if endpoint:
            parts = urlsplit(endpoint)
            # Presigned URLs may be path-style (endpoint/bucket) or virtual-hosted.
            image_sources += f" {parts.scheme}://{parts.netloc} {parts.scheme}://*.{parts.netloc}"
        else:
            image_sources += " https://*.amazonaws.com"
    policy = (
        f"default-src 'self'; img-src {image_sources}; script-src 'self'; style-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    )

    @app.middleware("http")
    async def add_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", policy)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if not request.url.path.startswith(("/static/", "/healthz", "/metrics")):
            response.headers.setdefault("Cache-Control", "no-store")
        return response


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "application/json" in request.headers.get(
        "accept", ""
    )


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> Response:
        # What was wrong and where, without echoing the input: it may be megabytes, or a
        # value JSON cannot carry (1e999 is read as infinity).
        errors = [
            {"type": error.get("type"), "loc": list(error.get("loc", ())), "msg": error.get("msg")}
            for error in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, _exc: LoginRequired) -> Response:
        if _wants_json(request) or request.method != "GET":
            return JSONResponse({"detail": "log in first"}, status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> Response:
        if _wants_json(request):
            return JSONResponse({"detail": exc.message}, status_code=403)
        state: ReviewState = request.app.state.review
        return state.templates.TemplateResponse(
            request, "error.html", {"message": exc.message, "reviewer": None}, status_code=403
        )

    @app.exception_handler(ReviewError)
    async def review_error(request: Request, exc: ReviewError) -> Response:
        if _wants_json(request):
            return JSONResponse({"detail": str(exc), **exc.details()}, status_code=exc.status)
        state: ReviewState = request.app.state.review
        return state.templates.TemplateResponse(
            request, "error.html", {"message": str(exc), "reviewer": None}, status_code=exc.status
        )

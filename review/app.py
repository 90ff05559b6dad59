"""The review web app: ``create_app(settings)`` builds it; ``pixelmill review`` serves it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from threading import Lock
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker
from starlette.middleware.sessions import SessionMiddleware

from db.session import make_engine, make_sessionmaker
from pixelmill.settings import Settings
from pixelmill.storage import Storage, storage_from_settings
from review import api, pages, public
from review.deps import Forbidden, LoginRequired, ReviewState
from review.images import ImageUrls
from review.intake import SyncThread
from review.queue import ReviewError
from review.secret import secret_key

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "pixelmill_review"


def create_app(
    settings: Settings,
    *,
    sessions: sessionmaker[Session] | None = None,
    storage: Storage | None = None,
    background_sync: bool = True,
) -> FastAPI:
    if sessions is None:
        sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    if storage is None:
        storage = storage_from_settings(settings)
    templates = Jinja2Templates(directory=HERE / "templates")
    state = ReviewState(
        settings=settings,
        sessions=sessions,
        storage=storage,
        urls=ImageUrls(storage, expires_in=settings.review_url_seconds),
        templates=templates,
        last_sync={},
        sync_lock=Lock(),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        syncer = SyncThread(state, settings.review_sync_seconds) if background_sync else None
        if syncer is not None:
            syncer.start()
        try:
            yield
        finally:
            if syncer is not None:
                syncer.stop()

    app = FastAPI(
        title="pixelmill review",
        version="1",
        lifespan=lifespan,
        # The schema is served behind login by review.api; no public docs pages.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.review = state
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret_key(settings),
        session_cookie=SESSION_COOKIE,
        max_age=int(settings.review_session_hours * 3600),
        same_site="lax",
        https_only=settings.review_secure_cookies,
    )
    _security_headers(app, settings)
    _error_handlers(app)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(public.router)
    app.include_router(pages.router)
    app.include_router(api.router)
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
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        state: ReviewState = request.app.state.review
        return state.templates.TemplateResponse(
            request, "error.html", {"message": str(exc), "reviewer": None}, status_code=exc.status
        )

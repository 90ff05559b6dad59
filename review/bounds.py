"""What a request may hold before any route sees it: ids that fit the database's 64-bit
integers, page sizes that are positive, and no NUL byte in the path or the query (no file,
key or row has one; Postgres refuses them in text)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# The largest id a BIGINT (Postgres) or INTEGER (SQLite) column holds.
MAX_ID = 2**63 - 1

RowId = Annotated[int, Path(ge=1, le=MAX_ID)]
OptionalRowId = Annotated[int | None, Query(ge=1, le=MAX_ID)]
After = Annotated[int, Query(ge=0, le=MAX_ID, description="the last id seen (0: from the start)")]
# A page larger than the route allows is cut to its size, not refused.
PageSize = Annotated[int, Query(ge=1, description="rows to return (large values are cut)")]


class RequestGuard:
    """Answers, before any route runs: 404 for a path with a NUL byte (%00) in it, 422 for
    such a query string, 413 for a body whose declared length is over the cap (a route that
    never reads its body would otherwise act first and be refused after). A body of no
    declared length is counted as it arrives (FastAPI's max_body_size)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            response = self._refusal(scope)
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        if "\x00" in scope["path"]:
            return JSONResponse({"detail": "no such page"}, status_code=404)
        if b"%00" in scope.get("query_string", b"").lower():
            return JSONResponse({"detail": "NUL byte in the query"}, status_code=422)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return JSONResponse(
                {"detail": f"request body over {self.max_body_bytes} bytes"}, status_code=413
            )
        return None

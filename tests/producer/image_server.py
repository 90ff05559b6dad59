"""A loopback HTTP server for catalogue-image tests: real sockets, counted requests, and the
misbehaving servers the producer must survive (404, a hang, 50 MB, a trickle, non-images)."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

HUGE_BYTES = 50 * 1000 * 1000


def png(width: int = 64, height: int = 64, *, mode: str = "RGB", colour: Any = None) -> bytes:
    """A small PNG (RGBA: transparent except a centred opaque square)."""
    if mode == "RGBA":
        image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        image.paste((200, 30, 30, 255), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    else:
        image = Image.new(mode, (width, height), colour if colour is not None else 128)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(width: int = 64, height: int = 64, colour: tuple[int, int, int] = (10, 90, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


class ImageServer:
    """Serves ``files`` (path -> bytes, changeable during a test) plus special paths:

    ``/missing`` (404), ``/hang`` (never answers until closed), ``/huge`` (50 MB with no
    Content-Length), ``/huge-announced`` (announces 50 MB), ``/trickle`` (a byte every 50 ms,
    for ever), ``/to-ftp`` (redirects to ftp://).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()
        self.closing = threading.Event()
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with owner._lock:
                    owner.requests[self.path] += 1
                # The producer hangs up on purpose (too large, too slow).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    owner._answer(self)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path
        if path in self.files:
            body = self.files[path]
            handler.send_response(200)
            handler.send_header("Content-Type", "image/png")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        elif path == "/hang":
            self.closing.wait(30)
        elif path in ("/huge", "/huge-announced"):
            handler.send_response(200)
            handler.send_header("Content-Type", "image/png")
            if path == "/huge-announced":
                handler.send_header("Content-Length", str(HUGE_BYTES))
            handler.end_headers()
            chunk = b"\0" * (1 << 20)
            for _ in range(HUGE_BYTES // len(chunk)):
                if self.closing.is_set():
                    return
                handler.wfile.write(chunk)
        elif path == "/trickle":
            handler.send_response(200)
            handler.end_headers()
            while not self.closing.wait(0.05):
                handler.wfile.write(b"x")
                handler.wfile.flush()
        elif path == "/to-ftp":
            handler.send_response(302)
            handler.send_header("Location", "ftp://127.0.0.1/image.png")
            handler.end_headers()
        else:
            handler.send_response(404)
            handler.send_header("Content-Length", "0")
            handler.end_headers()


def elapsed(started: float) -> float:
    return time.monotonic() - started

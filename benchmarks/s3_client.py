"""S3 client benchmark: the CPU one PUT costs the worker's process, through the project's own
S3 client (pixelmill.storage.make_s3_client), against two local endpoints in processes of
their own:

- moto's server, which the tests and benchmarks/worker.py use: werkzeug closes every
  connection after its response, so each PUT also pays a TCP connect and a server thread;
- a minimal HTTP/1.1 server that keeps connections open and answers each PUT with 200 and
  an ETag, as a real S3 endpoint keeps them open: what is left is botocore's own cost
  (serialising, signing, hooks, parsing).

    .venv/bin/python benchmarks/s3_client.py [--puts 300] [--bytes 20000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.worker_system import free_port, wait_for_port  # noqa: E402

KEEP_ALIVE_SERVER = """
import hashlib, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_PUT(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("ETag", '"%s"' % hashlib.md5(body).hexdigest())
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@contextlib.contextmanager
def endpoint(kind: str) -> Iterator[str]:
    port = free_port()
    if kind == "moto":
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    else:
        command = [sys.executable, "-c", KEEP_ALIVE_SERVER, str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, server)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)


def cpu_per_put(url: str, *, create_bucket: bool, puts: int, size: int) -> float:
    """Milliseconds of this process's CPU per put_object, after a warm-up."""
    from pixelmill.settings import Settings
    from pixelmill.storage import make_s3_client

    settings = Settings(
        storage="s3",
        s3_bucket="pixelmill-bench",
        s3_endpoint_url=url,
        s3_region="us-east-1",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
    )
    client = make_s3_client(settings)
    if create_bucket:
        client.create_bucket(Bucket=settings.s3_bucket)
    body = os.urandom(size)
    for index in range(20):
        client.put_object(Bucket=settings.s3_bucket, Key=f"warm/{index}", Body=body)
    started = time.process_time()
    for index in range(puts):
        client.put_object(Bucket=settings.s3_bucket, Key=f"put/{index}", Body=body)
    return (time.process_time() - started) / puts * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--puts", type=int, default=300)
    parser.add_argument("--bytes", type=int, default=20_000)
    args = parser.parse_args()
    figures = {}
    for kind in ("moto", "keep-alive"):
        with endpoint(kind) as url:
            figures[kind] = cpu_per_put(
                url, create_bucket=kind == "moto", puts=args.puts, size=args.bytes
            )
        print(f"{kind:>10}: {figures[kind]:.2f} ms of the client's CPU per PUT of {args.bytes:,} B")
    print(
        f"ratio keep-alive/moto: {figures['keep-alive'] / figures['moto']:.2f} "
        "(what a connection per request adds; the rest is botocore's own)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

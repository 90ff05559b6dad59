"""Catalogue images staged into storage once, under their content hash.

A template with an ``image`` column makes jobs that start from the catalogue's product
photos. Before any job is written, the producer hands every distinct image address (a local
path, ``s3://bucket/key`` or ``http(s)://`` URL) to :class:`InputStager`, which:

- looks the address up in ``input_sources`` first: an address fetched by an earlier run is
  not fetched again (``--force`` fetches every address again);
- otherwise fetches it with a time limit (connecting, each read, and the whole download) and
  a size limit (the bytes are counted as they arrive, whatever the server announces), decodes
  it with Pillow (verify, then a full load; non-images and decompression bombs are refused),
  stores the original bytes under ``inputs/<sha256[:2]>/<sha256>.<ext>`` (unless that object
  is already there) and records ``input_images`` and ``input_sources`` rows in the
  producer's transaction.

Workers read input images only from storage. An address that fails is remembered with its
reason; the producer reports it against each item that uses it, and the other items go on.
Images are fetched a few at a time on a thread pool, a bounded batch of addresses at once,
so memory stays flat however many images the catalogue names.

Stored objects are content-addressed: one left behind by a produce that was then refused
(``--strict``) is the same bytes a later run would store under the same key.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from PIL import ExifTags, Image, UnidentifiedImageError
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import InputImage, InputSource, utcnow
from db.upsert import insert_ignoring_conflicts_stmt
from pixelmill.errors import BadInputError, InputError
from pixelmill.settings import Settings
from pixelmill.storage import Storage, make_s3_client, storage_from_settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# Formats a catalogue image may have; anything else is refused (less decoder surface).
FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
# Formats Pillow names apart that are stored as one of FORMATS: a multi-picture JPEG (MPO,
# as many cameras and phones write) opens as "MPO", yet its bytes are a JPEG whose first
# picture every JPEG reader shows (the worker too).
FORMAT_ALIASES = {"MPO": "JPEG"}
# input_sources.source is a String(2000).
MAX_SOURCE_CHARS = 2000
READ_CHUNK = 64 * 1024
# Addresses handed to the thread pool at once: bounds what is in flight, not the catalogue.
BATCH = 64


class InputImageError(BadInputError):
    """Why one image address could not be staged (the producer adds line, item and field)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class InputStorageError(InputError):
    """The project's storage failed while staging an image: the whole produce stops."""


@dataclass(frozen=True)
class StagedImage:
    """An input image in storage, as jobs refer to it."""

    sha256: str
    width: int
    height: int
    mode: str  # Pillow's mode: an alpha channel shows as "A" in it (RGBA, LA, PA)

    @property
    def has_alpha(self) -> bool:
        return "A" in self.mode


@dataclass(frozen=True)
class FetchLimits:
    timeout: float  # seconds: connecting, each read, and the whole download
    max_bytes: int
    max_pixels: int

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchLimits:
        return cls(
            timeout=settings.input_fetch_timeout_seconds,
            max_bytes=settings.input_max_bytes,
            max_pixels=settings.input_max_pixels,
        )

    def too_large(self) -> InputImageError:
        return InputImageError(f"larger than {_size(self.max_bytes)}")

    def timed_out(self) -> InputImageError:
        return InputImageError(f"timed out after {self.timeout:g} s")


def _size(count: int) -> str:
    if count >= 1_000_000 and count % 1_000_000 == 0:
        return f"{count // 1_000_000} MB"
    if count >= 1000 and count % 1000 == 0:
        return f"{count // 1000} kB"
    return f"{count} bytes"


# --------------------------------------------------------------------------- addresses


def is_remote(source: str) -> bool:
    return source.startswith(("http://", "https://", "s3://"))


def source_address(value: str, base: Path) -> str:
    """The address an image cell names, as ``input_sources`` keys it.

    URLs are kept as written; a local path becomes absolute (relative paths start at
    ``base``, the catalogue file's folder), so the same file is one source whatever the
    catalogue it was named from.
    """
    value = value.strip()
    if not value:
        raise InputImageError("is empty")
    # Postgres text cannot hold either, and the address is looked up in input_sources.
    if "\0" in value:
        raise InputImageError("contains a NUL character")
    if not _is_utf8(value):
        raise InputImageError("is not valid text (it holds a lone UTF-16 surrogate)")
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme in ("http", "https"):
        address = scheme + value[len(scheme) :]
    elif scheme == "s3":
        bucket, _, key = value[len("s3://") :].partition("/")
        if not bucket or not key:
            raise InputImageError(f"{value}: an S3 address is s3://bucket/key")
        address = "s3" + value[len(scheme) :]
    elif scheme:
        raise InputImageError(f"{value}: unsupported address (use a path, s3:// or http(s)://)")
    else:
        path = Path(value).expanduser()
        address = os.path.abspath(path if path.is_absolute() else base / path)
    if len(address) > MAX_SOURCE_CHARS:
        raise InputImageError(f"address longer than {MAX_SOURCE_CHARS} characters")
    return address


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------- fetching


class _Readable(Protocol):
    def read(self, amt: int, /) -> bytes: ...


def _read_capped(stream: _Readable | BinaryIO, limits: FetchLimits, deadline: float) -> bytes:
    """Reads to the end, refusing more than ``max_bytes`` or a download past the deadline."""
    chunks: list[bytes] = []
    total = 0
    # read1 returns what has arrived; read(n) would wait for n bytes however slowly they come.
    read = getattr(stream, "read1", stream.read)
    while chunk := read(READ_CHUNK):
        total += len(chunk)
        if total > limits.max_bytes:
            raise limits.too_large()
        if time.monotonic() > deadline:
            # Each read has the time limit; this catches a server that trickles bytes.
            raise limits.timed_out()
        chunks.append(chunk)
    return b"".join(chunks)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only (urllib would also follow one to ftp://)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        if not newurl.lower().startswith(("http://", "https://")):
            raise InputImageError(f"redirected to {newurl!r}, which is not http(s)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects())


def _request_url(url: str) -> str:
    """The URL as it is sent. urllib sends only ASCII: a non-ASCII host is IDNA-encoded and
    every other non-ASCII character (a product name in the path) is percent-encoded as UTF-8,
    as a browser does; the rest is sent as written. Raises ValueError for a URL that cannot
    be sent."""
    if url.isascii():
        return url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if not netloc.isascii():
        userinfo, at, host_port = netloc.rpartition("@")
        host, colon, port = host_port.rpartition(":")
        if not colon or not port.isdigit():  # no port given
            host, colon, port = host_port, "", ""
        netloc = (
            _percent_encoded(userinfo) + at + host.encode("idna").decode("ascii") + colon + port
        )
    rest = urllib.parse.urlunsplit(("", "", parts.path, parts.query, parts.fragment))
    return f"{parts.scheme}://{netloc}{_percent_encoded(rest)}"


def _percent_encoded(text: str) -> str:
    """``text`` with its non-ASCII characters percent-encoded as UTF-8."""
    return "".join(c if c.isascii() else urllib.parse.quote(c, safe="") for c in text)


def _fetch_http(url: str, limits: FetchLimits) -> bytes:
    deadline = time.monotonic() + limits.timeout
    try:
        request = urllib.request.Request(
            _request_url(url), headers={"User-Agent": "pixelmill-producer"}
        )
    except ValueError as exc:  # "http://[bad/x.png": Invalid IPv6 URL, a bad host name, ...
        raise InputImageError(f"not a valid URL: {exc}") from None
    try:
        # The timeout applies to connecting and to every read of the socket.
        with _OPENER.open(request, timeout=limits.timeout) as response:
            announced = response.headers.get("Content-Length")
            if announced is not None and announced.isdigit() and int(announced) > limits.max_bytes:
                raise limits.too_large()
            return _read_capped(response, limits, deadline)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise InputImageError(f"HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise limits.timed_out() from None
        raise InputImageError(f"cannot connect: {exc.reason}") from None
    except TimeoutError:  # socket.timeout: connecting, or a read that got nothing in time
        raise limits.timed_out() from None
    except (http.client.HTTPException, OSError) as exc:
        raise InputImageError(f"download failed: {exc or type(exc).__name__}") from None
    except InputImageError:
        raise  # a ValueError too: the limits and the redirect check, with their own reasons
    except ValueError as exc:
        # What urllib, http.client and the resolver find wrong only when connecting, such as
        # a host name label longer than 63 characters.
        raise InputImageError(f"not a valid URL: {exc}") from None


def _read_file(path: str, limits: FetchLimits) -> bytes:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > limits.max_bytes:
                raise limits.too_large()
            # Counted as read too: a file may grow, or be a device.
            return _read_capped(f, limits, time.monotonic() + limits.timeout)
    except FileNotFoundError:
        raise InputImageError("no such file") from None
    except IsADirectoryError:
        raise InputImageError("is a folder, not an image file") from None
    except OSError as exc:
        raise InputImageError(f"cannot read: {exc.strerror or exc}") from None
    except InputImageError:
        raise  # a ValueError too: the limits, with their own reasons
    except ValueError as exc:  # a path open() refuses, such as one with a NUL character
        raise InputImageError(f"not a valid path: {exc}") from None


def make_input_s3_client(settings: Settings) -> S3Client:
    """An S3 client with the project's endpoint and credentials and the fetch time limit."""
    from botocore.config import Config

    timeout = settings.input_fetch_timeout_seconds
    # One retry: a missing object or a dead endpoint must not hold the run for minutes.
    config = Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    return make_s3_client(settings, config=config)


def _fetch_s3(address: str, client: S3Client, limits: FetchLimits) -> bytes:
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        ReadTimeoutError,
    )

    bucket, _, key = address[len("s3://") :].partition("/")
    deadline = time.monotonic() + limits.timeout
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        if response.get("ContentLength", 0) > limits.max_bytes:
            response["Body"].close()
            raise limits.too_large()
        body = response["Body"]
        try:
            return _read_capped(body, limits, deadline)
        finally:
            body.close()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        reasons = {
            "NoSuchKey": "no such object",
            "404": "no such object",
            "NoSuchBucket": f"no such bucket {bucket!r}",
            "AccessDenied": "access denied",
            "403": "access denied",
        }
        raise InputImageError(reasons.get(code, f"S3 error {code or exc}")) from None
    except (ConnectTimeoutError, ReadTimeoutError):
        raise limits.timed_out() from None
    except BotoCoreError as exc:
        raise InputImageError(f"S3 request failed: {exc}") from None


# --------------------------------------------------------------------------- decoding


# EXIF orientations that turn the stored pixels by 90 degrees (with or without a mirror).
ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class _Decoded:
    width: int
    height: int
    mode: str
    format: str


def decode(data: bytes, limits: FetchLimits) -> _Decoded:
    """Checks that ``data`` is a whole image of an allowed format and size; the dimensions are
    the image's as shown, upright by its EXIF orientation."""
    try:
        # Opening reads the header only: the size is checked before any pixel is decoded.
        with Image.open(io.BytesIO(data), formats=list(FORMATS)) as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                raise InputImageError(
                    f"image is {width}x{height} pixels, more than the limit of "
                    f"{limits.max_pixels:,} (a decompression bomb?)"
                )
            image.verify()  # structure and checksums, without decoding
        # verify() leaves the image unusable: decode it again, fully, to catch truncation.
        with Image.open(io.BytesIO(data), formats=list(FORMATS)) as image:
            image.load()
            if image.getexif().get(ExifTags.Base.Orientation) in ROTATED_ORIENTATIONS:
                # A phone photo taken upright, stored sideways: every viewer (and the
                # worker, see worker.conditioning.decode_image) shows it turned upright.
                width, height = height, width
            image_format = FORMAT_ALIASES.get(str(image.format), str(image.format))
            if image_format not in FORMATS:
                # Opening was limited to FORMATS, but a plugin may name its image apart (as
                # JPEG's does for MPO): refused here, not a crash when it is stored.
                kinds = ", ".join(FORMATS)
                raise InputImageError(f"unsupported format {image.format} (expected {kinds})")
            return _Decoded(width, height, image.mode, image_format)
    except InputImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputImageError(f"refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        kinds = ", ".join(FORMATS)
        raise InputImageError(f"not an image (cannot identify; expected {kinds})") from None
    except Exception as exc:
        # Pillow raises many types for damaged files (OSError, SyntaxError, ValueError, ...).
        raise InputImageError(f"not a valid image: {exc or type(exc).__name__}") from None


def storage_key(sha256: str, image_format: str) -> str:
    return f"inputs/{sha256[:2]}/{sha256}.{FORMATS[image_format]}"


# --------------------------------------------------------------------------- staging


@dataclass
class StagingCounts:
    fetched: int = 0  # fetched (and stored) by this produce
    reused: int = 0  # staged by an earlier run: not fetched again
    failed: int = 0


class InputStager:
    """Stages image addresses (see the module docstring); results stay in :attr:`results`.

    Uses ``session`` for its lookups and inserts (in the caller's transaction), so it must
    run before the producer hands the session to staging.
    """

    def __init__(
        self,
        session: Session,
        settings: Settings,
        *,
        refetch: bool = False,
        storage: Storage | None = None,
    ) -> None:
        self.session = session
        self.settings = settings
        self.limits = FetchLimits.from_settings(settings)
        self.storage = storage if storage is not None else storage_from_settings(settings)
        self.refetch = refetch
        self.results: dict[str, StagedImage | InputImageError] = {}
        self.counts = StagingCounts()
        self._s3: S3Client | None = None
        self._pool = ThreadPoolExecutor(
            settings.input_fetch_workers, thread_name_prefix="pixelmill-inputs"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> InputStager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def stage(self, addresses: Iterable[str]) -> None:
        """Stages every address not already in :attr:`results`, :data:`BATCH` at a time."""
        batch: list[str] = []
        for address in addresses:
            if address in self.results or address in batch:
                continue
            batch.append(address)
            if len(batch) >= BATCH:
                self._stage_batch(batch)
                batch = []
        if batch:
            self._stage_batch(batch)

    def _stage_batch(self, addresses: list[str]) -> None:
        if not self.refetch:
            for address, image in self._known(addresses).items():
                self.results[address] = image
                self.counts.reused += 1
            addresses = [address for address in addresses if address not in self.results]
        if self._s3 is None and any(address.startswith("s3://") for address in addresses):
            self._s3 = make_input_s3_client(self.settings)
        images: list[dict[str, Any]] = []
        sources: list[dict[str, Any]] = []
        now = utcnow()
        # map() keeps the batch's order and at most input_fetch_workers downloads in flight.
        for address, result in zip(addresses, self._pool.map(self._fetch, addresses), strict=True):
            if isinstance(result, InputImageError):
                self.results[address] = result
                self.counts.failed += 1
                continue
            image, row = result
            self.results[address] = image
            self.counts.fetched += 1
            images.append(row)
            sources.append({"source": address, "sha256": image.sha256, "fetched_at": now})
        self._record(images, sources)

    def _known(self, addresses: list[str]) -> dict[str, StagedImage]:
        rows = self.session.execute(
            select(
                InputSource.source,
                InputImage.sha256,
                InputImage.width,
                InputImage.height,
                InputImage.mode,
            )
            .join(InputImage, InputImage.sha256 == InputSource.sha256)
            .where(InputSource.source.in_(addresses))
        )
        return {
            source: StagedImage(sha256, width, height, mode)
            for source, sha256, width, height, mode in rows
        }

    def _fetch(self, address: str) -> tuple[StagedImage, dict[str, Any]] | InputImageError:
        """Runs on the pool: fetch, decode, hash and store one address."""
        try:
            if address.startswith(("http://", "https://")):
                data = _fetch_http(address, self.limits)
            elif address.startswith("s3://"):
                assert self._s3 is not None
                data = _fetch_s3(address, self._s3, self.limits)
            else:
                data = _read_file(address, self.limits)
            if not data:
                raise InputImageError("is empty (0 bytes)")
            decoded = decode(data, self.limits)
        except InputImageError as exc:
            return exc
        sha256 = hashlib.sha256(data).hexdigest()
        key = storage_key(sha256, decoded.format)
        try:
            # Content-addressed: an object already there holds these very bytes.
            if not self.storage.exists(key):
                content_type = Image.MIME.get(decoded.format, "application/octet-stream")
                self.storage.put(key, data, content_type=content_type)
        except Exception as exc:
            # Not this image's fault: storage is down or refuses, and every other image would
            # fail the same way. The produce stops (and writes nothing).
            raise InputStorageError(
                self.storage.url(key), None, None, f"cannot store the image from {address}: {exc}"
            ) from exc
        image = StagedImage(sha256, decoded.width, decoded.height, decoded.mode)
        row = {
            "sha256": sha256,
            "storage_key": key,
            "width": decoded.width,
            "height": decoded.height,
            "mode": decoded.mode,
            "bytes": len(data),
            "created_at": utcnow(),
        }
        return image, row

    def _record(self, images: list[dict[str, Any]], sources: list[dict[str, Any]]) -> None:
        if not sources:
            return
        unique = list({row["sha256"]: row for row in images}.values())
        if unique:
            self.session.execute(insert_ignoring_conflicts_stmt(self.session, InputImage), unique)
        # A source fetched again (--force) now points at what it holds today.
        dialect = self.session.get_bind().dialect.name
        statement = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(InputSource)
        self.session.execute(
            statement.on_conflict_do_update(
                index_elements=[InputSource.source],
                set_={
                    "sha256": statement.excluded.sha256,
                    "fetched_at": statement.excluded.fetched_at,
                },
            ),
            sources,
        )

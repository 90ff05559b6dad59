"""Staging catalogue images: addresses, fetching (local, S3, HTTP) with time and size limits,
decoding checks, content-addressed storage, and input_images / input_sources rows in Postgres.

HTTP goes to a real loopback server (tests/producer/image_server.py) that counts requests,
S3 to the moto server, storage to a local folder or the moto bucket.
"""

from __future__ import annotations

import hashlib
import io
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import InputImage, InputSource
from pixelmill.settings import Settings
from pixelmill.storage import LocalStorage, storage_from_settings
from producer.input_images import (
    FetchLimits,
    InputImageError,
    InputStager,
    StagedImage,
    _read_file,
    decode,
    source_address,
    storage_key,
)
from producer.produce import produce
from tests.producer.image_server import ImageServer, elapsed, jpeg, png

# Long enough for a loaded CI machine to serve a good image, short enough for the hang tests.
TIMEOUT = 2.0


@pytest.fixture
def server() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.close()


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path / "var",
        "storage": "local",
        "storage_dir": tmp_path / "store",
        "input_fetch_timeout_seconds": TIMEOUT,
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


def stage(
    session: Session, settings: Settings, addresses: list[str], *, refetch: bool = False
) -> InputStager:
    with InputStager(session, settings, refetch=refetch) as stager:
        stager.stage(addresses)
    return stager


def reason(stager: InputStager, address: str) -> str:
    result = stager.results[address]
    assert isinstance(result, InputImageError), result
    return result.reason


LIMITS = FetchLimits(timeout=TIMEOUT, max_bytes=20_000_000, max_pixels=50_000_000)


# --------------------------------------------------------------------------- addresses


def test_source_addresses(tmp_path: Path) -> None:
    assert source_address(" http://h/a.png ", tmp_path) == "http://h/a.png"
    assert source_address("HTTPS://h/a.png", tmp_path) == "https://h/a.png"
    assert source_address("s3://bucket/key/a.png", tmp_path) == "s3://bucket/key/a.png"
    assert source_address("photos/a.png", tmp_path) == str(tmp_path / "photos" / "a.png")
    assert source_address("./photos/../b.png", tmp_path) == str(tmp_path / "b.png")
    assert source_address("/abs/c.png", tmp_path) == "/abs/c.png"
    for value, message in [
        ("", "is empty"),
        ("   ", "is empty"),
        ("s3://bucket", "s3://bucket: an S3 address is s3://bucket/key"),
        ("ftp://h/a.png", "ftp://h/a.png: unsupported address"),
        ("http://h/" + "a" * 2000, "longer than 2000 characters"),
        # Postgres cannot look such an address up in input_sources.
        ("photos/a\0.png", "contains a NUL character"),
        ("http://h/\ud800.png", "is not valid text (it holds a lone UTF-16 surrogate)"),
    ]:
        with pytest.raises(InputImageError) as info:
            source_address(value, tmp_path)
        assert message in info.value.reason


# --------------------------------------------------------------------------- decoding


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"\0\0\0\0IEND\xaeB`\x82"


def test_decode_reads_size_mode_and_format() -> None:
    assert decode(png(40, 24, mode="RGBA"), LIMITS).__dict__ == {
        "width": 40,
        "height": 24,
        "mode": "RGBA",
        "format": "PNG",
    }
    decoded = decode(jpeg(32, 16), LIMITS)
    assert (decoded.width, decoded.height, decoded.mode, decoded.format) == (32, 16, "RGB", "JPEG")


@pytest.mark.parametrize(("orientation", "size"), [(1, (32, 16)), (3, (32, 16)), (6, (16, 32))])
def test_decode_gives_the_size_as_shown_upright(orientation: int, size: tuple[int, int]) -> None:
    # A phone photo: stored 32x16, tagged "turn 90 degrees" (6), shown 16x32.
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (32, 16), "red").save(buffer, format="JPEG", exif=exif)
    decoded = decode(buffer.getvalue(), LIMITS)
    assert (decoded.width, decoded.height) == size


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"<html>not found</html>", "not an image (cannot identify"),
        (png(64, 64)[:-40], "not a valid image"),  # truncated
        (png_header_only(20_000, 20_000), "refused as a decompression bomb"),
    ],
)
def test_decode_refuses(data: bytes, message: str) -> None:
    with pytest.raises(InputImageError) as info:
        decode(data, LIMITS)
    assert message in info.value.reason


def test_decode_refuses_more_pixels_than_the_limit() -> None:
    limits = FetchLimits(timeout=1, max_bytes=1_000_000, max_pixels=64 * 64 - 1)
    with pytest.raises(InputImageError) as info:
        decode(png(64, 64), limits)
    assert "image is 64x64 pixels, more than the limit of 4,095" in info.value.reason


def mpo(width: int = 32, height: int = 16) -> bytes:
    """A multi-picture JPEG, as cameras and phones write (Pillow opens it as "MPO")."""
    buffer = io.BytesIO()
    first, second = Image.new("RGB", (width, height), "red"), Image.new("RGB", (8, 8), "blue")
    first.save(buffer, format="MPO", save_all=True, append_images=[second])
    return buffer.getvalue()


def test_decode_takes_a_multi_picture_jpeg_for_a_jpeg() -> None:
    data = mpo(32, 16)
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, getattr(image, "n_frames", 1)) == ("MPO", 2)
    decoded = decode(data, LIMITS)
    assert (decoded.width, decoded.height, decoded.mode, decoded.format) == (32, 16, "RGB", "JPEG")


def test_a_multi_picture_jpeg_is_stored_as_a_jpeg(tmp_path: Path, db_session: Session) -> None:
    data = mpo(32, 16)
    (tmp_path / "camera.jpg").write_bytes(data)
    address = str(tmp_path / "camera.jpg")

    stager = stage(db_session, settings_for(tmp_path), [address])

    digest = hashlib.sha256(data).hexdigest()
    assert stager.results[address] == StagedImage(digest, 32, 16, "RGB")
    key = f"inputs/{digest[:2]}/{digest}.jpg"
    assert LocalStorage(tmp_path / "store").get(key) == data  # the original bytes, untouched
    stored = db_session.scalar(select(InputImage.storage_key).where(InputImage.sha256 == digest))
    assert stored == key


def test_decode_refuses_formats_outside_the_list() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PPM")
    with pytest.raises(InputImageError) as info:
        decode(buffer.getvalue(), LIMITS)
    assert "cannot identify" in info.value.reason


# --------------------------------------------------------------------------- HTTP


def test_http_images_are_stored_once_under_their_hash(
    tmp_path: Path, db_session: Session, server: ImageServer
) -> None:
    photo, other = png(48, 32, mode="RGBA"), jpeg(16, 16)
    server.files.update({"/a.png": photo, "/a-copy.png": photo, "/b.jpg": other})
    settings = settings_for(tmp_path)
    addresses = [server.url(p) for p in ("/a.png", "/b.jpg", "/a-copy.png", "/a.png")]

    stager = stage(db_session, settings, addresses)

    digest = hashlib.sha256(photo).hexdigest()
    assert stager.results[addresses[0]] == StagedImage(digest, 48, 32, "RGBA")
    assert stager.results[addresses[0]] == stager.results[addresses[2]]
    assert stager.results[addresses[1]] == StagedImage(
        hashlib.sha256(other).hexdigest(), 16, 16, "RGB"
    )
    assert (stager.counts.fetched, stager.counts.reused, stager.counts.failed) == (3, 0, 0)
    assert server.requests == {"/a.png": 1, "/b.jpg": 1, "/a-copy.png": 1}
    # The original bytes, content-addressed, in the project's storage.
    storage = LocalStorage(tmp_path / "store")
    assert storage.get(f"inputs/{digest[:2]}/{digest}.png") == photo
    assert storage_key(digest, "PNG") == f"inputs/{digest[:2]}/{digest}.png"
    rows = db_session.execute(
        select(InputImage.sha256, InputImage.storage_key, InputImage.width, InputImage.mode).where(
            InputImage.sha256 == digest
        )
    ).all()
    assert [tuple(row) for row in rows] == [
        (digest, f"inputs/{digest[:2]}/{digest}.png", 48, "RGBA")
    ]
    assert db_session.scalar(select(InputImage.bytes).where(InputImage.sha256 == digest)) == len(
        photo
    )
    sources = {s: h for s, h in db_session.execute(select(InputSource.source, InputSource.sha256))}
    assert sources == {
        addresses[0]: digest,
        addresses[2]: digest,
        addresses[1]: hashlib.sha256(other).hexdigest(),
    }


def test_a_second_stager_finds_the_sources_and_fetches_nothing(
    tmp_path: Path, db_session: Session, server: ImageServer
) -> None:
    server.files["/a.png"] = png(colour=(1, 2, 3))
    settings = settings_for(tmp_path)
    address = server.url("/a.png")
    first = stage(db_session, settings, [address])

    again = stage(db_session, settings, [address])

    assert server.requests["/a.png"] == 1
    assert (again.counts.fetched, again.counts.reused) == (0, 1)
    assert again.results[address] == first.results[address]

    # Refetching (--force) reads the address again; changed bytes are a new image, and the
    # source now points at it (the old image stays for the jobs made from it).
    server.files["/a.png"] = png(colour=(9, 9, 9))
    forced = stage(db_session, settings, [address], refetch=True)
    assert server.requests["/a.png"] == 2
    new = forced.results[address]
    assert isinstance(new, StagedImage)
    assert new.sha256 == hashlib.sha256(server.files["/a.png"]).hexdigest()
    assert new != first.results[address]
    assert db_session.scalar(select(InputSource.sha256).where(InputSource.source == address)) == (
        new.sha256
    )
    assert db_session.scalar(select(func.count()).select_from(InputImage)) == 2


def test_http_failures_are_per_address_and_the_others_are_staged(
    tmp_path: Path, db_session: Session, server: ImageServer
) -> None:
    server.files["/good.png"] = png()
    server.files["/page.png"] = b"<html>an error page served as an image</html>"
    closed = ImageServer()
    closed.close()  # a port nobody listens on any more
    bad = {
        server.url("/missing.png"): "HTTP 404",
        server.url("/hang"): f"timed out after {TIMEOUT:g} s",
        server.url("/trickle"): f"timed out after {TIMEOUT:g} s",
        server.url("/huge"): "larger than 20 MB",
        server.url("/huge-announced"): "larger than 20 MB",
        server.url("/page.png"): "not an image (cannot identify",
        server.url("/to-ftp"): "redirected to 'ftp://127.0.0.1/image.png', which is not http(s)",
        closed.url("/gone.png"): "cannot connect:",
    }
    settings = settings_for(tmp_path)
    started = time.monotonic()

    stager = stage(db_session, settings, [server.url("/good.png"), *bad])

    # The hang and the trickle are cut at the time limit, not after the server gives up.
    assert elapsed(started) < 10
    for address, message in bad.items():
        assert message in reason(stager, address), address
    assert isinstance(stager.results[server.url("/good.png")], StagedImage)
    assert (stager.counts.fetched, stager.counts.failed) == (1, len(bad))
    # Only the good image was recorded; a failure is retried by the next run.
    assert db_session.scalar(select(func.count()).select_from(InputSource)) == 1


def test_malformed_urls_are_the_address_s_error(
    tmp_path: Path, db_session: Session, server: ImageServer
) -> None:
    server.files["/good.png"] = png()
    # Non-ASCII in a URL is sent percent-encoded (the host IDNA-encoded), as a browser does.
    server.files["/caf%C3%A9.png"] = png(24, 24)
    bad = {
        "http://[bad/x.png": "not a valid URL: Invalid IPv6 URL",
        "http://" + "a" * 64 + ".example/x.png": "not a valid URL: encoding with 'idna' codec",
        "http://" + "é" * 64 + ".example/x.png": "not a valid URL: encoding with 'idna' codec",
    }
    good = [server.url("/good.png"), server.url("/café.png")]

    stager = stage(db_session, settings_for(tmp_path), [*bad, *good])

    for address, message in bad.items():
        assert reason(stager, address).startswith(message), address
    assert isinstance(stager.results[good[0]], StagedImage)
    cafe = stager.results[good[1]]
    assert isinstance(cafe, StagedImage) and (cafe.width, cafe.height) == (24, 24)
    assert server.requests == {"/good.png": 1, "/caf%C3%A9.png": 1}
    assert (stager.counts.fetched, stager.counts.failed) == (2, len(bad))


def test_the_size_limit_is_counted_not_announced(
    tmp_path: Path, db_session: Session, server: ImageServer
) -> None:
    server.files["/a.png"] = png(64, 64)
    size = len(server.files["/a.png"])
    stager = stage(
        db_session, settings_for(tmp_path, input_max_bytes=size - 1), [server.url("/a.png")]
    )
    assert reason(stager, server.url("/a.png")) == f"larger than {size - 1} bytes"
    stager = stage(db_session, settings_for(tmp_path, input_max_bytes=size), [server.url("/a.png")])
    assert isinstance(stager.results[server.url("/a.png")], StagedImage)


# --------------------------------------------------------------------------- local files


def test_local_files(tmp_path: Path, db_session: Session) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(jpeg())
    (tmp_path / "photos" / "big.png").write_bytes(png(256, 256, colour=(1, 2, 3)) + b"\0" * 5000)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    settings = settings_for(tmp_path, input_max_bytes=5000)
    base = tmp_path / "photos"

    stager = stage(
        db_session,
        settings,
        [
            str(base / "a.jpg"),
            str(base / "gone.png"),
            str(base),
            str(base / "big.png"),
            str(base / "notes.txt"),
        ],
    )

    assert isinstance(stager.results[str(base / "a.jpg")], StagedImage)
    assert reason(stager, str(base / "gone.png")) == "no such file"
    assert reason(stager, str(base)) == "is a folder, not an image file"
    assert reason(stager, str(base / "big.png")) == "larger than 5 kB"
    assert "not an image (cannot identify" in reason(stager, str(base / "notes.txt"))


def test_a_path_open_refuses_is_the_address_s_error(tmp_path: Path) -> None:
    # source_address() refuses a NUL already; reading such a path must not crash either.
    with pytest.raises(InputImageError) as info:
        _read_file(str(tmp_path / "a\0.png"), LIMITS)
    assert info.value.reason == "not a valid path: embedded null byte"


# --------------------------------------------------------------------------- S3


def test_s3_images_and_s3_storage(
    tmp_path: Path, db_session: Session, s3_settings: dict[str, str]
) -> None:
    settings = settings_for(tmp_path, **s3_settings)
    bucket = s3_settings["s3_bucket"]
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=s3_settings["s3_endpoint_url"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    photo = png(32, 32, mode="RGBA")
    client.put_object(Bucket=bucket, Key="catalogue/a.png", Body=photo)
    good = f"s3://{bucket}/catalogue/a.png"
    missing = f"s3://{bucket}/catalogue/gone.png"
    no_bucket = "s3://no-such-bucket-here/a.png"

    stager = stage(db_session, settings, [good, missing, no_bucket])

    digest = hashlib.sha256(photo).hexdigest()
    assert stager.results[good] == StagedImage(digest, 32, 32, "RGBA")
    assert reason(stager, missing) == "no such object"
    assert reason(stager, no_bucket) == "no such bucket 'no-such-bucket-here'"
    # Stored in the project's bucket under its hash.
    assert storage_from_settings(settings).get(f"inputs/{digest[:2]}/{digest}.png") == photo


def test_many_images_on_few_workers(
    tmp_path: Path, db_session: Session, server: ImageServer
) -> None:
    for n in range(150):  # more than one batch
        server.files[f"/{n}.png"] = png(8, 8, colour=(n, 0, 0))
    settings = settings_for(tmp_path, input_fetch_workers=3)
    addresses = [server.url(f"/{n}.png") for n in range(150)]

    stager = stage(db_session, settings, addresses + addresses[:10])

    assert stager.counts.fetched == 150
    assert all(isinstance(stager.results[a], StagedImage) for a in addresses)
    assert sum(server.requests.values()) == 150
    assert db_session.scalar(select(func.count()).select_from(InputImage)) == 150


# --------------------------------------------------------------------------- through produce


def test_an_unusual_image_cell_is_its_row_s_error_and_the_others_go_on(
    tmp_path: Path, db_session: Session, server: ImageServer
) -> None:
    (tmp_path / "camera.jpg").write_bytes(mpo(64, 64))
    server.files["/a3.png"] = png(64, 64)
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text(
        "sku,title,photo\n"
        "A1,mug,camera.jpg\n"  # line 2: a multi-picture JPEG
        "A2,lamp,http://[bad/x.png\n"  # line 3: a malformed URL
        f"A3,chair,{server.url('/a3.png')}\n"  # line 4
        "A4,vase,photos/a\0.png\n",  # line 5: a NUL in a path
        encoding="utf-8",
    )
    templates = tmp_path / "templates.yaml"
    templates.write_text(
        "key: sku\n"
        "defaults: {steps: 2, width: 64, height: 64, seeds: 1}\n"
        "templates:\n"
        "  remix: {kind: img2img, image: photo, strength: 0.5, prompt: '{{ title }} on a table'}\n",
        encoding="utf-8",
    )

    report = produce(
        db_session,
        catalogue_path=catalogue,
        templates_path=templates,
        default_model="tiny",
        run_name="run-1",
        settings=settings_for(tmp_path),
    )

    assert (report.rows, report.items, report.jobs, report.rows_skipped) == (4, 2, 2, 2)
    assert [(p.line, p.field) for p in report.problems] == [(3, "photo"), (5, "photo")]
    assert str(report.problems[0]) == (
        f"{catalogue}:3: field 'photo': item 'A2': http://[bad/x.png: "
        "not a valid URL: Invalid IPv6 URL"
    )
    assert "NUL character" in report.problems[1].reason
    keys = db_session.scalars(select(InputImage.storage_key).order_by(InputImage.storage_key))
    assert sorted(key.rsplit(".", 1)[1] for key in keys) == ["jpg", "png"]

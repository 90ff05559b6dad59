"""The channel export on Postgres: each submitted keeper as each channel's file in a folder, a
zip or S3 (moto), read back (size, format, bytes, XMP, C2PA), with its manifest; a second
export writes only what is missing and rewrites nothing."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy.orm import Session

from db.finishing import ImageCaption, UpscaledImage
from db.models import Reviewer
from pixelmill.approved import upscaled_key
from pixelmill.settings import get_settings
from pixelmill.storage import Storage, StorageError, storage_from_settings
from review.channels.export import MANIFEST_COLUMNS, export_channels, file_name
from review.channels.marking import (
    TRAINED_ALGORITHMIC_MEDIA,
    SigningError,
    digital_source_type,
    read_c2pa,
    signer_from_settings,
)
from review.channels.presets import Preset, load_presets
from review.channels.sinks import FolderSink, S3Sink, ZipSink, open_sink
from tests.review.c2pa_chain import SIGNER_NAME, actions_of, make_chain, untrusted
from tests.review.keepers import noise_png, run_with_keepers

FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}


def built_in(*names: str) -> list[Preset]:
    presets = load_presets()
    return [presets[name] for name in names]


def manifest_rows(read: Any) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    text = read("manifest.csv").decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    records = [json.loads(line) for line in read("manifest.jsonl").decode().splitlines()]
    return rows, records


def check_file(data: bytes, preset: Preset, record: dict[str, Any]) -> PILImage.Image:
    image = PILImage.open(io.BytesIO(data))
    image.load()
    assert image.format == FORMATS[preset.format]
    assert max(image.size) == preset.longer_side
    if preset.width is not None:
        assert image.size == (preset.width, preset.height)
    assert preset.max_bytes is None or len(data) <= preset.max_bytes
    assert digital_source_type(data) == TRAINED_ALGORITHMIC_MEDIA
    assert (record["width"], record["height"]) == image.size
    assert record["bytes"] == len(data)
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["format"] == preset.format
    return image


def test_a_folder_export_on_the_built_in_presets(
    session: Session, storage: Storage, alice: Reviewer, tmp_path: Path
) -> None:
    made = run_with_keepers(session, storage, alice.id, items=2, open_items=2)
    presets = built_in("marketplace-main", "web-shop", "cn-marketplace")
    target = tmp_path / "out"

    result = export_channels(session, made.run, storage, presets, FolderSink(target))

    assert {name: c.written for name, c in result.channels.items()} == {
        "marketplace-main": 2, "web-shop": 2, "cn-marketplace": 2
    }  # fmt: skip
    assert result.failures == [] and result.files == 6
    rows, records = manifest_rows(lambda name: (target / name).read_bytes())
    assert list(rows[0]) == list(MANIFEST_COLUMNS) and len(rows) == len(records) == 6
    by_name = {preset.name: preset for preset in presets}
    for record in records:
        preset = by_name[record["channel"]]
        image = check_file((target / record["file"]).read_bytes(), preset, record)
        if preset.name == "web-shop":
            assert image.size == (2048, 1365)  # the source's own 3:2
        if preset.name == "marketplace-main":
            pixel = image.getpixel((1000, 10))
            assert isinstance(pixel, tuple) and min(pixel) > 245  # padded with white
        assert record["item_key"] in ("SKU-000", "SKU-001")  # the open items are left out
        assert record["alt_text"] == "" and record["c2pa"] is False
        assert record["source_image"].startswith("file://") and record["run"] == "night-1"
        assert record["file"] == file_name(preset, record["item_key"], record["image_id"])
    assert [r["sha256"] for r in rows] == [r["sha256"] for r in records]


def test_a_second_export_writes_only_what_is_missing(
    session: Session, storage: Storage, alice: Reviewer, tmp_path: Path
) -> None:
    made = run_with_keepers(session, storage, alice.id, items=2)
    china = built_in("cn-marketplace")[0]
    target = tmp_path / "out"
    export_channels(session, made.run, storage, [china], FolderSink(target))
    files = sorted((target / "cn-marketplace").iterdir())
    before = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in files}
    files[0].unlink()

    # Another channel, and a changed version of the first: only the missing files are made.
    shop = Preset(name="shop-png", format="png", longer_side=128)
    changed = replace(china, quality=70)
    result = export_channels(session, made.run, storage, [changed, shop], FolderSink(target))

    counts = result.channels
    assert (counts["cn-marketplace"].written, counts["cn-marketplace"].already_there) == (1, 1)
    assert counts["cn-marketplace"].other_preset == 1  # the kept one, made at quality 90
    assert counts["shop-png"].written == 2
    assert (files[1].stat().st_ino, files[1].stat().st_mtime_ns) == before[files[1]]
    _, records = manifest_rows(lambda name: (target / name).read_bytes())
    assert len(records) == result.files == 4
    kept = next(r for r in records if r["file"].endswith(files[1].name))
    assert kept["preset"] == china.fingerprint != changed.fingerprint

    again = export_channels(session, made.run, storage, [changed, shop], FolderSink(target))
    assert sum(c.written for c in again.channels.values()) == 0
    assert sum(c.already_there for c in again.channels.values()) == 4


def test_files_an_interrupted_export_left_are_kept_and_listed(
    session: Session, storage: Storage, alice: Reviewer, tmp_path: Path
) -> None:
    made = run_with_keepers(session, storage, alice.id, items=2)
    preset = Preset(name="small", format="webp", longer_side=64, quality=80)
    target = tmp_path / "out"
    export_channels(session, made.run, storage, [preset], FolderSink(target))
    (target / "manifest.jsonl").unlink()  # as if the export had stopped before its manifest
    (target / "manifest.csv").unlink()

    result = export_channels(session, made.run, storage, [preset], FolderSink(target))

    assert result.channels["small"].already_there == 2
    _, records = manifest_rows(lambda name: (target / name).read_bytes())
    for record in records:
        check_file((target / record["file"]).read_bytes(), preset, record)


def test_a_zip_export_keeps_its_members_and_a_failed_one_leaves_it_as_it_was(
    session: Session, storage: Storage, alice: Reviewer, tmp_path: Path
) -> None:
    made = run_with_keepers(session, storage, alice.id, items=2)
    small = Preset(name="small", format="jpeg", longer_side=100, quality=85)
    target = tmp_path / "export.zip"
    export_channels(session, made.run, storage, [small], ZipSink(target))
    with zipfile.ZipFile(target) as archive:
        first = {name: archive.read(name) for name in archive.namelist()}
    assert len([n for n in first if n.startswith("small/")]) == 2

    square = Preset(name="square", format="png", longer_side=80, width=80, height=80)
    result = export_channels(session, made.run, storage, [small, square], ZipSink(target))

    assert result.channels["small"].already_there == 2 and result.channels["square"].written == 2
    with zipfile.ZipFile(target) as archive:
        assert archive.testzip() is None
        for name, data in first.items():
            if name.startswith("small/"):
                assert archive.read(name) == data
        rows, records = manifest_rows(archive.read)
        for record in records:
            preset = small if record["channel"] == "small" else square
            check_file(archive.read(record["file"]), preset, record)
    assert len(rows) == 4

    class Broken:
        def url(self, key: str) -> str:
            return storage.url(key)

        def get(self, key: str) -> bytes:
            raise StorageError("storage is down")

    before = target.read_bytes()
    late = Preset(name="late", format="png", longer_side=32)
    with pytest.raises(StorageError):
        export_channels(session, made.run, Broken(), [late], ZipSink(target))  # type: ignore[arg-type]
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")) == []


def test_an_s3_export_never_overwrites_an_object(
    session: Session, alice: Reviewer, s3_settings: dict[str, str], tmp_path: Path
) -> None:
    chain = make_chain(tmp_path / "chain")
    settings = get_settings(
        **s3_settings, c2pa_cert_path=chain.cert_path, c2pa_key_path=chain.key_path
    )
    storage = storage_from_settings(settings)  # the keepers in S3 too
    made = run_with_keepers(session, storage, alice.id, items=2)
    bucket = s3_settings["s3_bucket"]
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=s3_settings["s3_endpoint_url"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    preset = built_in("cn-marketplace")[0]
    taken = file_name(preset, "SKU-000", made.images[0].id)
    placeholder = PILImage.new("RGB", (10, 10))
    buffer = io.BytesIO()
    placeholder.save(buffer, "PNG")
    client.put_object(Bucket=bucket, Key=f"exports/night-1/{taken}", Body=buffer.getvalue())

    sink = open_sink(f"s3://{bucket}/exports/night-1", settings)
    assert isinstance(sink, S3Sink)
    signer = signer_from_settings(settings)
    assert signer is not None
    with signer:
        result = export_channels(session, made.run, storage, [preset], sink, signer)

    counts = result.channels["cn-marketplace"]
    assert (counts.written, counts.already_there) == (1, 1)
    kept = client.get_object(Bucket=bucket, Key=f"exports/night-1/{taken}")["Body"].read()
    assert kept == buffer.getvalue()  # what was there stays
    assert not sink.add(taken, b"other", content_type="image/jpeg")  # If-None-Match: *
    _, records = manifest_rows(
        lambda name: client.get_object(Bucket=bucket, Key=f"exports/night-1/{name}")["Body"].read()
    )
    assert result.manifests[1] == f"s3://{bucket}/exports/night-1/manifest.jsonl"
    written = next(r for r in records if r["file"] != taken)
    data = client.get_object(Bucket=bucket, Key=f"exports/night-1/{written['file']}")
    assert data["ContentType"] == "image/jpeg"
    body = data["Body"].read()
    check_file(body, preset, written)
    assert written["source_image"].startswith(f"s3://{bucket}/runs/")
    manifest = read_c2pa(body, "image/jpeg")
    assert manifest is not None and untrusted(manifest)
    placeholder_row = next(r for r in records if r["file"] == taken)
    assert (placeholder_row["width"], placeholder_row["format"]) == (10, "png")
    assert placeholder_row["c2pa"] is False


def test_signed_files_carry_a_c2pa_manifest_read_back_with_c2pa_reader(
    session: Session, storage: Storage, alice: Reviewer, tmp_path: Path
) -> None:
    made = run_with_keepers(session, storage, alice.id, items=1)
    chain = make_chain(tmp_path / "chain")
    settings = get_settings(c2pa_cert_path=chain.cert_path, c2pa_key_path=chain.key_path)
    presets = [
        *built_in("cn-marketplace"),
        Preset(name="web", format="webp", longer_side=300, quality=80, max_bytes=60_000,
               min_quality=40),
        Preset(name="lossless", format="png", longer_side=120),
    ]  # fmt: skip
    signer = signer_from_settings(settings)
    assert signer is not None
    with signer:
        result = export_channels(
            session, made.run, storage, presets, FolderSink(tmp_path / "out"), signer
        )

    job = next(j for j in made.jobs if j.id == made.images[0].job_id)
    _, records = manifest_rows(lambda name: (tmp_path / "out" / name).read_bytes())
    assert result.failures == [] and len(records) == 3
    for record in records:
        preset = next(p for p in presets if p.name == record["channel"])
        data = (tmp_path / "out" / record["file"]).read_bytes()
        check_file(data, preset, record)  # the XMP survives the signing, the limit holds
        assert record["c2pa"] is True
        manifest = read_c2pa(data, preset.content_type)
        assert manifest is not None
        created, resized = actions_of(manifest)
        assert created["action"] == "c2pa.created"
        assert created["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
        assert created["softwareAgent"]["name"] == "tiny"
        parameters = created["parameters"]
        assert parameters["model"] == "tiny" and parameters["seed"] == made.images[0].seed
        assert parameters["prompt"] == job.prompt and parameters["steps"] == job.steps
        assert resized["action"] == "c2pa.resized"
        assert manifest["signature_info"]["common_name"] == SIGNER_NAME
        # A test chain: the signature is sound, the signer is not on any trust list.
        assert manifest["validation_state"] == "Valid"
        assert untrusted(manifest)


def test_bad_signing_credentials_stop_before_anything_is_written(tmp_path: Path) -> None:
    chain = make_chain(tmp_path / "chain")
    other = make_chain(tmp_path / "other")
    mismatched = get_settings(c2pa_cert_path=chain.cert_path, c2pa_key_path=other.key_path)
    with pytest.raises(SigningError, match="PIXELMILL_C2PA_CERT_PATH"):
        signer_from_settings(mismatched)
    missing = get_settings(c2pa_cert_path=tmp_path / "none.pem", c2pa_key_path=chain.key_path)
    with pytest.raises(SigningError, match=r"none\.pem"):
        signer_from_settings(missing)
    assert signer_from_settings(get_settings()) is None
    with pytest.raises(ValueError, match="go together"):
        get_settings(c2pa_cert_path=chain.cert_path)


def test_a_file_over_its_limit_is_reported_and_the_rest_exported(
    session: Session, storage: Storage, alice: Reviewer, tmp_path: Path
) -> None:
    made = run_with_keepers(session, storage, alice.id, items=2)
    impossible = Preset(name="tiny-files", format="png", longer_side=512, max_bytes=1024)
    fine = Preset(name="fine", format="jpeg", longer_side=64, quality=80)
    result = export_channels(
        session, made.run, storage, [impossible, fine], FolderSink(tmp_path / "out")
    )
    assert len(result.failures) == 2 and "max_bytes 1024" in result.failures[0]
    assert result.channels["fine"].written == 2 and result.files == 2
    assert not (tmp_path / "out" / "tiny-files").exists()


def test_the_upscaled_copy_is_the_source_and_captions_fill_the_alt_text(
    session: Session, storage: Storage, alice: Reviewer, tmp_path: Path
) -> None:
    made = run_with_keepers(session, storage, alice.id, items=1)
    kept = made.images[0]
    preset = Preset(name="shop", format="jpeg", longer_side=150, quality=85)
    target = tmp_path / "out"
    export_channels(session, made.run, storage, [preset], FolderSink(target))
    _, records = manifest_rows(lambda name: (target / name).read_bytes())
    assert records[0]["alt_text"] == "" and records[0]["source_image"] == storage.url(
        kept.storage_key
    )
    first = (target / records[0]["file"]).read_bytes()

    # Captioned afterwards: the next export's manifest has the alt text; the file stays.
    session.add(
        ImageCaption(
            image_id=kept.id, caption="a red mug", alt_text="A red mug on a white table",
            captioner="0" * 64, captioner_name="tiny", versions={},
        )
    )  # fmt: skip
    key = upscaled_key(kept.storage_key, scale=2, model_sha256="f" * 64)
    upscaled = noise_png(192, 128, seed=99)
    storage.put(key, upscaled, content_type="image/png")
    session.add(
        UpscaledImage(
            image_id=kept.id, storage_key=key, sha256=hashlib.sha256(upscaled).hexdigest(),
            width=192, height=128, bytes=len(upscaled), scale=2, model_sha256="f" * 64,
            model_name="tiny-esrgan", tile=64, tile_overlap=8, versions={}, seconds=0.1,
        )
    )  # fmt: skip
    session.commit()
    large = Preset(name="large", format="png", longer_side=192)
    export_channels(session, made.run, storage, [preset, large], FolderSink(target))

    _, records = manifest_rows(lambda name: (target / name).read_bytes())
    by_channel = {record["channel"]: record for record in records}
    assert (target / by_channel["shop"]["file"]).read_bytes() == first
    assert all(r["alt_text"] == "A red mug on a white table" for r in records)
    assert by_channel["large"]["source_image"] == storage.url(key)
    with PILImage.open(target / by_channel["large"]["file"]) as made_large:
        pixels = np.asarray(made_large.convert("RGB"))
    with PILImage.open(io.BytesIO(upscaled)) as source:
        assert np.array_equal(pixels, np.asarray(source))  # the same size: the same pixels

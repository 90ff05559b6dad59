from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pixelmill.settings import get_settings
from pixelmill.storage import LocalStorage, S3Storage, Storage, StorageError, storage_from_settings


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return storage_from_settings(get_settings(storage="local", storage_dir=tmp_path / "s"))
    s3_settings = request.getfixturevalue("s3_settings")
    return storage_from_settings(get_settings(**s3_settings, s3_prefix="nightly/"))


def test_put_get_exists_round_trip(storage: Storage) -> None:
    key = "runs/1/jobs/2/3.png"
    assert not storage.exists(key)
    storage.put(key, b"\x89PNG payload", content_type="image/png")
    assert storage.exists(key)
    assert storage.get(key) == b"\x89PNG payload"
    storage.put(key, b"replaced", content_type="image/png")  # overwrite is allowed
    assert storage.get(key) == b"replaced"


def test_missing_object_is_a_storage_error(storage: Storage) -> None:
    with pytest.raises(StorageError, match=r"no object 'nope\.png'"):
        storage.get("nope.png")


@pytest.mark.parametrize("key", ["", "/abs.png", "../escape.png", "a/../../b.png", "a//b.png"])
def test_keys_outside_the_store_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(StorageError, match="invalid storage key"):
        storage.put(key, b"x", content_type="image/png")


def test_local_storage_writes_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("a/b.png", b"data", content_type="image/png")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.png"]
    assert storage.url("a/b.png") == (tmp_path / "a" / "b.png").as_uri()


def test_local_storage_makes_a_removed_folder_again(tmp_path: Path) -> None:
    import shutil

    storage = LocalStorage(tmp_path)
    storage.put("runs/1/a.png", b"first", content_type="image/png")
    shutil.rmtree(tmp_path / "runs")  # an operator clearing old runs under a live worker
    storage.put("runs/1/b.png", b"second", content_type="image/png")
    assert storage.get("runs/1/b.png") == b"second"
    assert sorted(p.name for p in (tmp_path / "runs" / "1").iterdir()) == ["b.png"]


def test_local_files_are_as_readable_as_the_umask_allows(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    previous = os.umask(0o022)
    try:
        storage.put("a/b.png", b"data", content_type="image/png")
        os.umask(0o077)
        storage.put("a/c.png", b"data", content_type="image/png")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a" / "b.png").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a" / "c.png").stat().st_mode) == 0o600


def test_s3_storage_uses_prefix_and_bucket(s3_settings: dict[str, str]) -> None:
    storage = storage_from_settings(get_settings(**s3_settings, s3_prefix="/nightly/"))
    assert isinstance(storage, S3Storage)
    storage.put("x/y.png", b"data", content_type="image/png")
    bucket = s3_settings["s3_bucket"]
    assert storage.url("x/y.png") == f"s3://{bucket}/nightly/x/y.png"
    head = storage.client.head_object(Bucket=bucket, Key="nightly/x/y.png")
    assert head["ContentType"] == "image/png"

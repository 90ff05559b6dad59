from __future__ import annotations

import io
from pathlib import Path

import PIL.Image
import pytest

from pixelmill.storage import LocalStorage, StorageError
from pixelmill.thumbnails import encode_thumbnail, store_thumbnail, thumbnail_key


def test_thumbnail_is_a_small_jpeg_keeping_the_aspect_ratio() -> None:
    image = PIL.Image.new("RGB", (512, 256), (200, 100, 50))
    data = encode_thumbnail(image, size=128)
    with PIL.Image.open(io.BytesIO(data)) as thumbnail:
        assert thumbnail.format == "JPEG"
        assert thumbnail.size == (128, 64)
    # Smaller images are not enlarged.
    with PIL.Image.open(io.BytesIO(encode_thumbnail(image, size=1024))) as thumbnail:
        assert thumbnail.size == (512, 256)


def test_thumbnail_keys_sit_under_thumbs_and_keep_quarantine_apart() -> None:
    key = "runs/3/SKU-1/9/42-ffffffffffffffff.png"
    assert thumbnail_key(key) == "thumbs/runs/3/SKU-1/9/42-ffffffffffffffff.jpg"
    assert thumbnail_key("quarantine/" + key) == (
        "quarantine/thumbs/runs/3/SKU-1/9/42-ffffffffffffffff.jpg"
    )


def test_store_thumbnail_makes_it_from_the_stored_png(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    image = PIL.Image.new("RGB", (640, 480), (10, 200, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    storage.put("runs/1/a/2/7-abc.png", buffer.getvalue(), content_type="image/png")

    made = store_thumbnail(storage, "runs/1/a/2/7-abc.png", size=160)

    assert made == "thumbs/runs/1/a/2/7-abc.jpg"
    with PIL.Image.open(io.BytesIO(storage.get(made))) as thumbnail:
        assert (thumbnail.format, thumbnail.size) == ("JPEG", (160, 120))
        red, green, blue = thumbnail.getpixel((80, 60))  # type: ignore[misc]
        assert green > 150 and red < 60 and blue < 80


def test_store_thumbnail_refuses_a_missing_or_unreadable_image(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(StorageError, match="no object"):
        store_thumbnail(storage, "runs/1/missing.png", size=64)
    storage.put("runs/1/broken.png", b"\x89PNG not really", content_type="image/png")
    with pytest.raises(StorageError, match=r"'runs/1/broken\.png' is not a readable image"):
        store_thumbnail(storage, "runs/1/broken.png", size=64)
    assert not storage.exists("thumbs/runs/1/broken.jpg")

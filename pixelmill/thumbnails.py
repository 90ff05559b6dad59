"""Review thumbnails: a small JPEG beside each stored image, under ``thumbs/``.

The review app makes an image's thumbnail the first time a grid shows it (a ranked grid shows
about a fifth of a run's images, so most never need one); a worker makes them at render time
instead where ``PIXELMILL_THUMBNAILS_AT_RENDER`` is set. Both store it under the same key.
"""

from __future__ import annotations

import io

import PIL.Image

from pixelmill.storage import Storage, StorageError

THUMBNAIL_CONTENT_TYPE = "image/jpeg"
# Flagged images are stored under this prefix, apart from the rest, and so are their
# thumbnails.
QUARANTINE_PREFIX = "quarantine/"


def thumbnail_key(key: str) -> str:
    """The thumbnail beside an image: same path under ``thumbs/``, as JPEG."""
    prefix = QUARANTINE_PREFIX if key.startswith(QUARANTINE_PREFIX) else ""
    return f"{prefix}thumbs/{key.removeprefix(prefix).removesuffix('.png')}.jpg"


def encode_thumbnail(image: PIL.Image.Image, *, size: int, quality: int = 80) -> bytes:
    """A JPEG whose longer side is at most ``size`` pixels: a review grid of 16 loads in a
    fraction of the PNGs' bytes. No metadata: the PNG is the record."""
    thumbnail = image.convert("RGB")
    thumbnail.thumbnail((size, size), PIL.Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="JPEG", quality=quality, optimize=False)
    return buffer.getvalue()


def store_thumbnail(storage: Storage, key: str, *, size: int) -> str:
    """Make the thumbnail of the stored image ``key`` and store it; returns its key.
    StorageError if the image is not there or is not an image."""
    data = storage.get(key)
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            thumbnail = encode_thumbnail(image, size=size)
    except (PIL.UnidentifiedImageError, OSError) as exc:
        raise StorageError(f"object {key!r} is not a readable image: {exc}") from exc
    made = thumbnail_key(key)
    storage.put(made, thumbnail, content_type=THUMBNAIL_CONTENT_TYPE)
    return made

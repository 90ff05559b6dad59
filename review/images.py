"""Where the browser loads an image from: a short-lived presigned S3 URL, or (local storage)
the app's own /files route, which serves the storage folder behind login. An image without a
thumbnail yet is shown through /thumbnails/ID, which makes it on that first view."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from sqlalchemy import update
from sqlalchemy.orm import Session

from db.models import Image
from pixelmill.storage import LocalStorage, S3Storage, Storage, StorageError
from pixelmill.thumbnails import store_thumbnail

FILES_ROUTE = "/files/"
THUMBNAILS_ROUTE = "/thumbnails/"


class ImageUrls:
    def __init__(self, storage: Storage, *, expires_in: int) -> None:
        self.storage = storage
        self.expires_in = expires_in

    def url(self, key: str) -> str | None:
        """A URL the logged-in browser can load; None for no object (a dropped image)."""
        if not key:
            return None
        if isinstance(self.storage, S3Storage):
            return self.storage.presigned_url(key, expires_in=self.expires_in)
        return FILES_ROUTE + quote(key)

    def thumbnail_url(self, image: Image) -> str | None:
        """The image's thumbnail: its object where it has one, else the route that makes it;
        None for an image with no object (a dropped one)."""
        if image.thumbnail_key:
            return self.url(image.thumbnail_key)
        if not image.storage_key:
            return None
        return f"{THUMBNAILS_ROUTE}{image.id}"

    def local_path(self, key: str) -> Path:
        """The file behind a /files/ key on local storage; StorageError if the key is not a
        plain relative path inside the storage folder (or storage is not local)."""
        if not isinstance(self.storage, LocalStorage):
            raise StorageError("images are served from S3, not by the app")
        parts = key.split("/")
        if key.startswith("/") or "\\" in key or "\x00" in key:
            raise StorageError(f"storage key {key!r} is not a plain relative path")
        if any(p in ("", ".", "..") for p in parts):
            raise StorageError(f"storage key {key!r} is not a plain relative path")
        root = self.storage.root
        path = (root / key).resolve()
        if not path.is_relative_to(root):  # a symlink pointing out of the folder
            raise StorageError(f"storage key {key!r} leaves the storage folder")
        return path


def ensure_thumbnail(session: Session, storage: Storage, image_id: int, *, size: int) -> str:
    """The key of the image's thumbnail, made from its stored PNG and recorded if it has none
    yet. Two first views at once both make it: the same bytes under the same key, and the
    row records it once. StorageError for no such image, or no readable object behind it."""
    image = session.get(Image, image_id)
    if image is None or not image.storage_key:
        raise StorageError(f"no stored image {image_id}")
    if image.thumbnail_key:
        return image.thumbnail_key
    made = store_thumbnail(storage, image.storage_key, size=size)
    session.execute(
        update(Image)
        .where(Image.id == image_id, Image.thumbnail_key.is_(None))
        .values(thumbnail_key=made)
    )
    session.commit()
    return made

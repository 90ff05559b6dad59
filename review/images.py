"""Where the browser loads an image from: a short-lived presigned S3 URL, or (local storage)
the app's own /files route, which serves the storage folder behind login."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from pixelmill.storage import LocalStorage, S3Storage, Storage, StorageError

FILES_ROUTE = "/files/"


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

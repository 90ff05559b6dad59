"""Object storage behind one small interface: a local folder or an S3-compatible bucket.

Keys are relative, '/'-separated paths such as ``runs/3/jobs/17/1234.png``. Writes are atomic
in both backends: a reader never sees half an object.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pixelmill.errors import PixelmillError
from pixelmill.settings import Settings

if TYPE_CHECKING:
    from botocore.config import Config
    from mypy_boto3_s3 import S3Client


class StorageError(PixelmillError, RuntimeError):
    pass


class Storage(Protocol):
    def put(self, key: str, data: bytes, *, content_type: str) -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def url(self, key: str) -> str: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}: use a relative path without '..'")
    return key


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        # Folders this object has made or found: a worker writes thousands of files into
        # the same few, and a mkdir per file is a system call per file.
        self._folders: set[Path] = set()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        path = self._path(key)
        if path.parent not in self._folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._folders.add(path.parent)
        # Write to a temporary file in the same folder, then rename: atomic on POSIX.
        # Not mkstemp: its file is owner-only (0600). Created with 0666, the kernel applies the
        # umask, so an image is as readable as any file this process writes (by a web server
        # running as another user, say).
        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileNotFoundError:  # the folder was removed since: make it again
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"no object {key!r} in {self.root}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def url(self, key: str) -> str:
        return self._path(key).as_uri()


class S3Storage:
    def __init__(self, client: S3Client, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _key(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
        )

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey as exc:
            raise StorageError(f"no object {key!r} in s3://{self.bucket}") from exc
        body: bytes = response["Body"].read()
        return body

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def presigned_url(self, key: str, *, expires_in: int) -> str:
        """A GET URL for the object that works without credentials for ``expires_in`` seconds
        (signed locally: no request to S3)."""
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=expires_in,
        )
        return url


def make_s3_client(settings: Settings, *, config: Config | None = None) -> S3Client:
    """The project's S3 client; ``config`` replaces the default retries and timeouts."""
    import boto3
    from botocore.config import Config

    kwargs: dict[str, Any] = {
        "region_name": settings.s3_region,
        "endpoint_url": settings.s3_endpoint_url,
        # Retries with backoff on throttling and 5xx: uploads run all night.
        "config": config or Config(retries={"max_attempts": 8, "mode": "adaptive"}),
    }
    if settings.s3_access_key_id:
        kwargs["aws_access_key_id"] = settings.s3_access_key_id
        kwargs["aws_secret_access_key"] = settings.s3_secret_access_key
    client: S3Client = boto3.session.Session().client("s3", **kwargs)
    return client


def storage_from_settings(settings: Settings) -> Storage:
    if settings.storage == "s3":
        return S3Storage(make_s3_client(settings), settings.s3_bucket, settings.s3_prefix)
    return LocalStorage(settings.resolved_storage_dir)

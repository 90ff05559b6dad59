"""Where a channel export goes: a folder, a zip file or an S3 prefix.

Every sink adds a file only where none is: what an earlier export wrote is never rewritten
(a folder links a finished temporary file into place, S3 writes with ``If-None-Match: *``,
a zip copies its members unchanged). Only the manifests are replaced on each export.
"""

from __future__ import annotations

import os
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pixelmill.errors import BadInputError, InfrastructureError
from pixelmill.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_TEMPORARY = ".tmp-"


class TargetError(BadInputError):
    """The export's target (--to) cannot be used."""


class Sink(Protocol):
    location: str

    def existing(self) -> set[str]:
        """The names of the files already there."""
        ...

    def read(self, name: str) -> bytes: ...

    def add(self, name: str, data: bytes, *, content_type: str) -> bool:
        """Write a new file; False (and nothing written) if one of that name is there."""
        ...

    def replace(self, name: str, data: bytes, *, content_type: str) -> None:
        """Write or overwrite a file (the manifests)."""
        ...

    def url(self, name: str) -> str: ...

    def commit(self) -> None:
        """Make the export final (a zip is written in place)."""
        ...

    def abort(self) -> None:
        """Give up the export: what was added stays where the target keeps files as they
        are written (folder, S3); a zip stays as it was."""
        ...


def _check_name(name: str) -> str:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise TargetError(f"invalid file name {name!r} in the export")
    return name


class FolderSink:
    def __init__(self, root: Path) -> None:
        if root.exists() and not root.is_dir():
            raise TargetError(f"--to {str(root)!r}: not a folder")
        self.root = root.resolve()
        self.location = str(self.root)

    def existing(self) -> set[str]:
        if not self.root.is_dir():
            return set()
        return {
            path.relative_to(self.root).as_posix()
            for path in self.root.rglob("*")
            if path.is_file() and not path.name.startswith(_TEMPORARY)
        }

    def read(self, name: str) -> bytes:
        return (self.root / _check_name(name)).read_bytes()

    def _temporary(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TEMPORARY}{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        return tmp

    def add(self, name: str, data: bytes, *, content_type: str) -> bool:
        path = self.root / _check_name(name)
        tmp = self._temporary(path, data)
        try:
            # A hard link fails where the name exists, unlike a rename: a file another
            # export wrote in the meantime is left as it is, and no reader sees half a file.
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def replace(self, name: str, data: bytes, *, content_type: str) -> None:
        path = self.root / _check_name(name)
        tmp = self._temporary(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def url(self, name: str) -> str:
        return (self.root / name).as_uri()

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


class ZipSink:
    """A zip file, rebuilt beside itself and moved into place on commit: the members it had
    are copied unchanged (only the manifests are replaced), and a failed export leaves it as
    it was. Images are stored, not compressed again; the manifests are deflated."""

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        self.location = str(self.path)
        self._old: set[str] = set()
        if self.path.exists():
            if not zipfile.is_zipfile(self.path):
                raise TargetError(f"--to {str(path)!r}: exists and is not a zip file")
            with zipfile.ZipFile(self.path) as old:
                self._old = {name for name in old.namelist() if not name.endswith("/")}
        self._added: set[str] = set()
        self._replaced: dict[str, bytes] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.parent / f"{_TEMPORARY}{uuid.uuid4().hex}.zip"
        self._zip = zipfile.ZipFile(self._tmp, "w")

    def existing(self) -> set[str]:
        return self._old | self._added

    def read(self, name: str) -> bytes:
        """A member the zip had before this export."""
        with zipfile.ZipFile(self.path) as old:
            return old.read(name)

    def add(self, name: str, data: bytes, *, content_type: str) -> bool:
        if _check_name(name) in self.existing():
            return False
        self._zip.writestr(name, data, compress_type=zipfile.ZIP_STORED)
        self._added.add(name)
        return True

    def replace(self, name: str, data: bytes, *, content_type: str) -> None:
        self._replaced[_check_name(name)] = data

    def url(self, name: str) -> str:
        return f"{self.path.as_uri()}#{name}"

    def commit(self) -> None:
        try:
            self._copy_old_members()
            for name, data in self._replaced.items():
                self._zip.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)
            self._zip.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def _copy_old_members(self) -> None:
        if not self._old:
            return
        with zipfile.ZipFile(self.path) as old:
            for info in old.infolist():
                if info.filename in self._replaced or info.filename in self._added:
                    continue
                with old.open(info) as source, self._zip.open(info, "w") as target:
                    shutil.copyfileobj(source, target, 1 << 20)

    def abort(self) -> None:
        self._zip.close()
        self._tmp.unlink(missing_ok=True)


class S3Sink:
    def __init__(self, client: S3Client, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def _key(self, name: str) -> str:
        name = _check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def existing(self) -> set[str]:
        start = f"{self.prefix}/" if self.prefix else ""
        names: set[str] = set()
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start
            ):
                names.update(item["Key"][len(start) :] for item in page.get("Contents", []))
        except self.client.exceptions.NoSuchBucket:
            raise TargetError(f"--to {self.location}: no such bucket") from None
        return names

    def read(self, name: str) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        return body

    def add(self, name: str, data: bytes, *, content_type: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(name),
                Body=data,
                ContentType=content_type,
                IfNoneMatch="*",
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            # 412: the object exists; 409: another write of it is under way.
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise InfrastructureError(f"S3 refused {self._key(name)!r}: {exc}") from exc
        return True

    def replace(self, name: str, data: bytes, *, content_type: str) -> None:
        self.client.put_object(
            Bucket=self.bucket, Key=self._key(name), Body=data, ContentType=content_type
        )

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


def open_sink(target: str, settings: Settings) -> Sink:
    """The sink of ``--to``: ``s3://BUCKET[/PREFIX]`` (the S3 settings' endpoint and
    credentials), a path ending in ``.zip``, or a folder."""
    if target.startswith("s3://"):
        bucket, _, prefix = target.removeprefix("s3://").partition("/")
        if not bucket:
            raise TargetError(f"--to {target!r}: give s3://BUCKET or s3://BUCKET/PREFIX")
        from pixelmill.storage import make_s3_client

        return S3Sink(make_s3_client(settings), bucket, prefix)
    if not target.strip():
        raise TargetError("--to: give a folder, a .zip file or s3://BUCKET/PREFIX")
    path = Path(target).expanduser()
    if path.suffix.lower() == ".zip":
        return ZipSink(path)
    return FolderSink(path)

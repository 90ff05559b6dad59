"""One export of a run's keepers to sales channels: each kept image of a submitted item (the
rows of :func:`review.export.keepers`) as each chosen channel's file, marked as AI-generated,
written to a sink with a manifest (``manifest.csv`` and ``manifest.jsonl``).

Running it again writes only the files that are missing: a file already in the target is
never rewritten, even where its preset has changed since (the manifest's ``preset`` column
tells which version made it; export to a new target to make them again). The manifest is
rewritten each time with every file of the target, its alt text as the captions are now.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Image, Job, Run
from db.webhooks import record_export_written
from pixelmill.storage import Storage
from review.channels.marking import C2paSigner, c2pa_manifest, has_c2pa, xmp_packet
from review.channels.presets import Preset
from review.channels.render import DoesNotFitError, Encoded, derive, open_source
from review.channels.sinks import Sink
from review.export import Keeper, escape_cell, keepers

MANIFEST_CSV = "manifest.csv"
MANIFEST_JSONL = "manifest.jsonl"
MANIFEST_COLUMNS = (
    "item_key",
    "channel",
    "file",
    "width",
    "height",
    "format",
    "bytes",
    "sha256",
    "alt_text",
    "source_image",
    "image_id",
    "run",
    "preset",
    "c2pa",
)
# Keepers read from the database at a time (their generation parameters are fetched per
# batch).
BATCH = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ChannelCounts:
    written: int = 0
    already_there: int = 0
    # Already there, made by another version of the channel's preset (left as they are).
    other_preset: int = 0


@dataclass
class ChannelExport:
    location: str
    manifests: list[str]
    channels: dict[str, ChannelCounts]
    failures: list[str] = field(default_factory=list)
    files: int = 0


def file_name(preset: Preset, item_key: str, image_id: int) -> str:
    """``CHANNEL/ITEM-KEY_IMAGE-ID.EXT``: the item key made file-safe, the image id making it
    unique."""
    safe = _UNSAFE.sub("_", item_key).strip("._")[:100] or "item"
    return f"{preset.name}/{safe}_{image_id}.{preset.extension}"


def generation_parameters(session: Session, image_ids: list[int]) -> dict[int, dict[str, Any]]:
    """What made each image: the model (and its weights' sha256), the prompts, the seed and
    the sampler settings, and the library versions (for the C2PA manifest)."""
    rows = session.execute(
        select(
            Image.id,
            Image.seed,
            Image.model_sha256,
            Image.versions,
            Job.model,
            Job.prompt,
            Job.negative_prompt,
            Job.scheduler,
            Job.steps,
            Job.guidance,
            Job.width,
            Job.height,
            Job.kind,
        )
        .join(Job, Job.id == Image.job_id)
        .where(Image.id.in_(image_ids))
    )
    found: dict[int, dict[str, Any]] = {}
    for row in rows:
        values = row._asdict()
        image_id = values.pop("id")
        values["seed"] = int(values["seed"])
        found[image_id] = {key: value for key, value in values.items() if value is not None}
    return found


def _batches(rows: Iterator[Keeper]) -> Iterator[list[Keeper]]:
    while batch := list(islice(rows, BATCH)):
        yield batch


class _Exporter:
    def __init__(
        self,
        session: Session,
        storage: Storage,
        presets: list[Preset],
        sink: Sink,
        signer: C2paSigner | None,
    ) -> None:
        self.session = session
        self.storage = storage
        self.presets = presets
        self.sink = sink
        self.signer = signer
        self.xmp = xmp_packet()
        self.existing = sink.existing()
        self.previous = self._previous_rows()
        self.rows: dict[str, dict[str, Any]] = {}
        self.result = ChannelExport(sink.location, [], {p.name: ChannelCounts() for p in presets})

    def _previous_rows(self) -> dict[str, dict[str, Any]]:
        """The last manifest's rows of files still there, by file name."""
        if MANIFEST_JSONL not in self.existing:
            return {}
        rows = {}
        for line in self.sink.read(MANIFEST_JSONL).decode("utf-8", "replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a damaged line: its file is read back instead
            if isinstance(row, dict) and row.get("file") in self.existing:
                rows[row["file"]] = row
        return rows

    def export(self, run: Run) -> ChannelExport:
        for batch in _batches(keepers(self.session, run, self.storage)):
            ids = [int(keeper.values["image_id"]) for keeper in batch]
            generation = generation_parameters(self.session, ids)
            for keeper in batch:
                self._keeper(run, keeper, generation.get(int(keeper.values["image_id"]), {}))
        self._write_manifests()
        return self.result

    def _keeper(self, run: Run, keeper: Keeper, generation: dict[str, Any]) -> None:
        """The keeper's file for each channel, made from its latest upscaled copy if it has
        one, with its caption's alt text (empty until it is captioned)."""
        item_key = str(keeper.values["item_key"])
        image_id = int(keeper.values["image_id"])
        source_key = keeper.upscaled_key or keeper.storage_key
        sources: dict[bool, PILImage.Image] = {}  # decoded once per keeper (by sRGB or not)
        for preset in self.presets:
            name = file_name(preset, item_key, image_id)
            counts = self.result.channels[preset.name]
            row = self._row_of_existing(name) if name in self.existing else None
            if row is None:
                try:
                    if preset.srgb not in sources:
                        data = self.storage.get(source_key)
                        sources[preset.srgb] = open_source(data, preset)
                    row = self._write(name, preset, sources[preset.srgb], generation)
                except (DoesNotFitError, UnidentifiedImageError) as exc:
                    self.result.failures.append(f"{item_key} (image {image_id}): {exc}")
                    continue
            if row.pop("_written", False):
                counts.written += 1
            else:
                counts.already_there += 1
                if row.get("preset") != preset.fingerprint:
                    counts.other_preset += 1
            row.update(
                item_key=item_key,
                channel=preset.name,
                alt_text=keeper.values.get("alt_text") or "",
                source_image=self.storage.url(source_key),
                image_id=image_id,
                run=run.name,
            )
            self.rows[name] = row

    def _write(
        self, name: str, preset: Preset, source: PILImage.Image, generation: dict[str, Any]
    ) -> dict[str, Any]:
        signer = self.signer
        title = name.rsplit("/", 1)[-1]
        derivative = f"{preset.name}: {preset.description or preset.format}"

        def finish(data: bytes) -> bytes:
            if signer is None:
                return data
            manifest = c2pa_manifest(title, generation, derivative)
            return signer.sign(data, preset.content_type, manifest)

        encoded: Encoded = derive(source, preset, self.xmp, finish)
        if not self.sink.add(name, encoded.data, content_type=preset.content_type):
            # Written by another export since this one looked: that file stays.
            self.existing.add(name)
            described = self._row_of_existing(name)
            assert described is not None
            return described
        self.existing.add(name)
        return {
            "file": name,
            "width": encoded.width,
            "height": encoded.height,
            "format": preset.format,
            "bytes": len(encoded.data),
            "sha256": hashlib.sha256(encoded.data).hexdigest(),
            "preset": preset.fingerprint,
            "c2pa": signer is not None,
            "_written": True,
        }

    def _row_of_existing(self, name: str) -> dict[str, Any]:
        """A file already there: its last manifest row, or what the file itself says (an
        export stopped before writing its manifest)."""
        previous = self.previous.get(name)
        if previous is not None and all(key in previous for key in MANIFEST_COLUMNS):
            return dict(previous)
        data = self.sink.read(name)
        with PILImage.open(io.BytesIO(data)) as image:
            width, height, fmt = image.width, image.height, (image.format or "").lower()
        content_type = PILImage.MIME.get(fmt.upper(), "application/octet-stream")
        return {
            "file": name,
            "width": width,
            "height": height,
            "format": fmt,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "preset": "",
            "c2pa": has_c2pa(data, content_type),
        }

    def _write_manifests(self) -> None:
        rows = {**self.previous, **self.rows}
        ordered = sorted(rows.values(), key=lambda r: (str(r["item_key"]), r["channel"], r["file"]))
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\r\n")
        writer.writerow(MANIFEST_COLUMNS)
        for row in ordered:
            writer.writerow([escape_cell(row.get(column, "")) for column in MANIFEST_COLUMNS])
        lines = "".join(
            json.dumps({c: row.get(c) for c in MANIFEST_COLUMNS}, ensure_ascii=False) + "\n"
            for row in ordered
        )
        self.sink.replace(MANIFEST_CSV, text.getvalue().encode("utf-8"), content_type="text/csv")
        self.sink.replace(
            MANIFEST_JSONL, lines.encode("utf-8"), content_type="application/x-ndjson"
        )
        self.result.manifests = [self.sink.url(MANIFEST_CSV), self.sink.url(MANIFEST_JSONL)]
        self.result.files = len(ordered)


def export_channels(
    session: Session,
    run: Run,
    storage: Storage,
    presets: list[Preset],
    sink: Sink,
    signer: C2paSigner | None = None,
) -> ChannelExport:
    """Write each keeper's file for each preset that the sink lacks, then the manifests, and
    commit the sink (a failure leaves a zip as it was; a folder or S3 keeps the files written,
    which the next export finds and keeps)."""
    try:
        result = _Exporter(session, storage, presets, sink, signer).export(run)
    except BaseException:
        sink.abort()
        raise
    sink.commit()
    # Told to the webhooks' receivers (db.webhooks): recorded once the manifest is written.
    record_export_written(session, run.id, export_event_data(result))
    session.commit()
    return result


def export_event_data(result: ChannelExport) -> dict[str, Any]:
    """What the ``export.written`` webhook event says about an export."""
    return {
        "location": result.location,
        "manifests": result.manifests,
        "files": result.files,
        "written": sum(counts.written for counts in result.channels.values()),
        "already_there": sum(counts.already_there for counts in result.channels.values()),
        "failures": len(result.failures),
        "channels": {
            name: {"written": counts.written, "already_there": counts.already_there}
            for name, counts in result.channels.items()
        },
    }

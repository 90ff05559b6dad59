"""Finishing a run's keepers on Postgres with moto S3: upscaled copies under approved/ at
deterministic keys, captions and alt text, filled catalogue fields beside the immutable
items, rows recording what was made from what, resumable and idempotent, and the export."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import PIL.Image
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from db.finishing import CatalogueFill, ImageCaption, UpscaledImage
from db.models import CatalogueItem, Image, ReviewItem, ReviewStatus
from db.session import make_engine, make_sessionmaker
from pixelmill.approved import upscaled_key
from pixelmill.errors import BadInputError
from pixelmill.settings import Settings, get_settings
from pixelmill.storage import Storage, storage_from_settings
from review.export import export_lines
from tests.review.factory import MadeRun
from tests.worker.finishing.conftest import PARAMETERS, Models, reviewed_run
from worker.finishing.configured import finisher_from_settings
from worker.finishing.finish import UPSCALE_CHUNK, Finisher


@pytest.fixture
def engine(fresh_database_url: str) -> Iterator[Engine]:
    engine = make_engine(fresh_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


@pytest.fixture
def settings(
    tmp_path: Path, fresh_database_url: str, s3_settings: dict[str, str], models: Models
) -> Settings:
    return get_settings(
        data_dir=tmp_path,
        database_url=fresh_database_url,
        upscale_model=str(models.esrgan_x4),
        upscale_scale=4,
        upscale_tile=16,
        upscale_tile_overlap=8,
        caption_model=str(models.blip),
        caption_max_tokens=6,
        caption_beams=1,
        caption_fill_field="description",
        **s3_settings,
    )


@pytest.fixture
def storage(settings: Settings) -> Storage:
    return storage_from_settings(settings)


@pytest.fixture
def finisher(settings: Settings, sessions: sessionmaker[Session], storage: Storage) -> Finisher:
    return finisher_from_settings(settings, sessions=sessions, storage=storage)


class CountingStorage:
    """The storage, counting writes; ``fail_after`` writes later ones fail as a lost
    connection would."""

    def __init__(self, inner: Storage, fail_after: int | None = None) -> None:
        self.inner = inner
        self.puts: list[str] = []
        self.fail_after = fail_after

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        if self.fail_after is not None and len(self.puts) >= self.fail_after:
            raise ConnectionError("storage went away")
        self.puts.append(key)
        self.inner.put(key, data, content_type=content_type)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def url(self, key: str) -> str:
        return self.inner.url(key)


def _kept_images(session: Session, made: MadeRun) -> list[Image]:
    done = {
        item_id
        for (item_id,) in session.execute(
            select(ReviewItem.item_id).where(
                ReviewItem.run_id == made.run.id, ReviewItem.status == ReviewStatus.DONE
            )
        )
    }
    return [made.images_of(item)[0] for item in made.items if item.id in done]


def test_a_runs_keepers_are_upscaled_and_captioned(
    finisher: Finisher, sessions: sessionmaker[Session], storage: Storage
) -> None:
    with sessions() as session:
        made = reviewed_run(session, storage, items=2, open_items=1)
        kept = _kept_images(session, made)
    report = finisher.finish_run(made.run.id)
    assert (report.keepers, report.upscaled, report.captioned) == (2, 2, 2)
    assert report.failures == []

    upscaler = finisher.upscaler
    assert upscaler is not None
    with sessions() as session:
        rows = session.scalars(select(UpscaledImage).order_by(UpscaledImage.image_id)).all()
        assert [row.image_id for row in rows] == [image.id for image in kept]
        for row, image in zip(rows, kept, strict=True):
            key = upscaled_key(image.storage_key, scale=4, model_sha256=upscaler.identity)
            assert row.storage_key == key and key.startswith("approved/runs/")
            assert (row.width, row.height, row.scale) == (128, 96, 4)
            assert row.model_sha256 == upscaler.identity
            assert (row.tile, row.tile_overlap) == (16, 8)
            assert {"torch", "spandrel"} <= set(row.versions)
            stored = PIL.Image.open(io.BytesIO(storage.get(key)))
            assert stored.size == (128, 96) and stored.format == "PNG"
            assert stored.info["parameters"] == PARAMETERS  # the source's own chunk, copied
            note = json.loads(stored.info[UPSCALE_CHUNK])
            assert note["image_id"] == image.id and note["source"] == image.storage_key
        captions = session.scalars(select(ImageCaption).order_by(ImageCaption.image_id)).all()
        assert [caption.image_id for caption in captions] == [image.id for image in kept]
        for caption in captions:
            assert caption.caption and caption.alt_text.endswith((".", "?", "!"))
            assert caption.alt_text[0].isupper() and len(caption.alt_text) <= 125
            assert caption.captioner == finisher.captioner.identity  # type: ignore[union-attr]


def test_finishing_again_makes_nothing_new(
    finisher: Finisher, sessions: sessionmaker[Session], storage: Storage
) -> None:
    with sessions() as session:
        made = reviewed_run(session, storage, items=2, open_items=0)
    finisher.finish_run(made.run.id)
    counting = CountingStorage(storage)
    finisher.storage = counting
    progress: list[tuple[int, int]] = []
    again = finisher.finish_run(
        made.run.id, progress=lambda done, total: progress.append((done, total))
    )
    assert (again.keepers, again.upscaled, again.captioned, again.filled) == (2, 0, 0, 0)
    assert counting.puts == [] and progress == [(0, 0)]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(UpscaledImage)) == 2
        assert session.scalar(select(func.count()).select_from(ImageCaption)) == 2


def test_an_interrupted_run_resumes_where_it_stopped(
    finisher: Finisher, sessions: sessionmaker[Session], storage: Storage
) -> None:
    """Storage fails on the second upscaled copy: the first keeper's results stay, the
    second has no row (its row and object go together), and finishing again makes only it."""
    with sessions() as session:
        made = reviewed_run(session, storage, items=2, open_items=0)
        first, second = _kept_images(session, made)
    finisher.storage = CountingStorage(storage, fail_after=1)
    with pytest.raises(ConnectionError):
        finisher.finish_run(made.run.id)
    with sessions() as session:
        assert session.scalars(select(UpscaledImage.image_id)).all() == [first.id]
        assert session.scalars(select(ImageCaption.image_id)).all() == [first.id]
    counting = CountingStorage(storage)
    finisher.storage = counting
    resumed = finisher.finish_run(made.run.id)
    assert (resumed.upscaled, resumed.captioned) == (1, 1)
    assert len(counting.puts) == 1 and str(second.job_id) in counting.puts[0]


def test_a_keeper_finished_meanwhile_is_not_stored_twice(
    finisher: Finisher, settings: Settings, sessions: sessionmaker[Session], storage: Storage
) -> None:
    """Two workers on the same keeper: the one that finds the other's rows writes nothing."""
    with sessions() as session:
        made = reviewed_run(session, storage, items=1, open_items=0)
    _total, (keeper,) = finisher.pending(run_id=made.run.id)
    other = finisher_from_settings(settings, sessions=sessions, storage=storage)
    assert other.finish_keeper(keeper) == (True, True)
    counting = CountingStorage(storage)
    finisher.storage = counting
    assert finisher.finish_keeper(keeper) == (False, False)
    assert counting.puts == []
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(UpscaledImage)) == 1


def test_empty_catalogue_fields_are_filled_beside_the_item(
    finisher: Finisher, sessions: sessionmaker[Session], storage: Storage
) -> None:
    fields: list[dict[str, Any]] = [
        {"sku": "A", "description": ""},
        {"sku": "B", "description": "Hand-made brass lamp."},
        {"sku": "C"},
    ]
    with sessions() as session:
        made = reviewed_run(session, storage, items=3, open_items=0, fields=fields)
    report = finisher.finish_run(made.run.id)
    assert report.filled == 2
    with sessions() as session:
        fills = {fill.item_id: fill for fill in session.scalars(select(CatalogueFill))}
        a, _b, c = made.items
        assert set(fills) == {a.id, c.id}
        for item in (a, c):
            fill = fills[item.id]
            caption = session.get(ImageCaption, fill.image_id)
            assert caption is not None and fill.value == caption.alt_text
            assert fill.field == "description"
        # The items themselves, immutable versions, are as they were.
        assert [session.get(CatalogueItem, item.id).fields for item in made.items] == fields  # type: ignore[union-attr]
    assert finisher.finish_run(made.run.id).filled == 0


def test_the_export_carries_the_finished_keepers(
    finisher: Finisher, sessions: sessionmaker[Session], storage: Storage
) -> None:
    with sessions() as session:
        made = reviewed_run(
            session, storage, items=2, open_items=0, fields=[{"sku": "A"}, {"sku": "B"}]
        )
        before = [json.loads(line) for line in export_lines(session, made.run, storage, "jsonl")]
        assert [row["upscaled_url"] for row in before] == ["", ""]
        assert [row["caption"] for row in before] == ["", ""]
        assert [row["filled_fields"] for row in before] == [{}, {}]
    finisher.finish_run(made.run.id)
    with sessions() as session:
        rows = [json.loads(line) for line in export_lines(session, made.run, storage, "jsonl")]
        captions = {c.image_id: c for c in session.scalars(select(ImageCaption))}
        upscaled = {u.image_id: u for u in session.scalars(select(UpscaledImage))}
        text = "".join(export_lines(session, made.run, storage, "csv"))
    for row in rows:
        caption = captions[row["image_id"]]
        assert row["upscaled_url"] == storage.url(upscaled[row["image_id"]].storage_key)
        assert (row["caption"], row["alt_text"]) == (caption.caption, caption.alt_text)
        assert row["filled_fields"] == {"description": caption.alt_text}
    for record in csv.DictReader(io.StringIO(text)):
        caption = captions[int(record["image_id"])]
        assert record["alt_text"] == caption.alt_text
        assert json.loads(record["filled_fields"]) == {"description": caption.alt_text}


def test_only_a_submitted_items_keepers_are_finished(
    finisher: Finisher, sessions: sessionmaker[Session], storage: Storage
) -> None:
    with sessions() as session:
        made = reviewed_run(session, storage, items=1, open_items=1)
        items = {
            item.status: item.id
            for item in session.scalars(select(ReviewItem).where(ReviewItem.run_id == made.run.id))
        }
    assert finisher.finish_item(items[ReviewStatus.OPEN]).keepers == 0
    report = finisher.finish_item(items[ReviewStatus.DONE])
    assert (report.keepers, report.upscaled, report.captioned) == (1, 1, 1)


def test_an_unreadable_keeper_is_reported_and_the_others_finished(
    finisher: Finisher, sessions: sessionmaker[Session], storage: Storage
) -> None:
    with sessions() as session:
        made = reviewed_run(session, storage, items=2, open_items=0)
        first, _second = _kept_images(session, made)
    storage.put(first.storage_key, b"not a png", content_type="image/png")
    report = finisher.finish_run(made.run.id)
    assert (report.upscaled, report.captioned) == (1, 1)
    assert len(report.failures) == 1 and first.storage_key in report.failures[0]


def test_the_built_in_tiny_models_and_a_missing_model_file(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    tiny = settings.model_copy(update={"upscale_model": "tiny", "caption_model": "tiny"})
    finisher = finisher_from_settings(tiny, sessions=sessions)
    assert finisher.upscaler is not None and finisher.upscaler.path.is_file()
    assert finisher.captioner is not None
    assert finisher.upscaler.path.parent == tmp_path / "models"

    missing = settings.model_copy(update={"upscale_model": str(tmp_path / "nope.pth")})
    with pytest.raises(BadInputError, match=r"PIXELMILL_UPSCALE_MODEL .*nope\.pth: no such file"):
        finisher_from_settings(missing, sessions=sessions)
    none = settings.model_copy(update={"upscale_model": "", "caption_model": ""})
    assert finisher_from_settings(none, sessions=sessions).upscaler is None

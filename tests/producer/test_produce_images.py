"""produce() with templates that start from the catalogue's images (img2img, inpaint,
controlnet) and with adapters: jobs' kind, input_image, mask_image and options in Postgres,
per-item image errors with their line and item, no refetch on a re-run, dedupe keys over the
image hashes and options, and plain txt2img keys exactly as before job kinds existed.

Images come from a loopback HTTP server that counts requests (tests/producer/image_server.py)
and from local files beside the catalogue; storage is a local folder of the test's own.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from db.job_options import JobOptions
from db.migrate import upgrade
from db.models import CatalogueItem, InputImage, InputSource, Job
from db.session import make_sessionmaker
from pixelmill.identity import dedupe_key
from pixelmill.settings import Settings
from producer.input_images import InputStorageError
from producer.produce import produce
from producer.report import (
    ExpansionLimitError,
    NothingToProduceError,
    ProduceReport,
    StrictModeError,
)
from tests.producer.image_server import ImageServer, jpeg, png

TEMPLATES = """\
key: sku
defaults: {steps: 2, width: 64, height: 64, seeds: 2, image: photo}
templates:
  plain:
    prompt: "{{ title }}"
  remix:
    kind: img2img
    strength: 0.5
    prompt: "{{ title }} on an oak table"
  cutout:
    kind: inpaint
    mask: alpha
    when: "cutout == 'yes'"
    prompt: "{{ title }} in a bright kitchen"
"""


@pytest.fixture
def server() -> Iterator[ImageServer]:
    server = ImageServer()
    server.files["/a1.png"] = png(64, 64, mode="RGBA")
    yield server
    server.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "var",
        storage="local",
        storage_dir=tmp_path / "store",
        input_fetch_timeout_seconds=5,  # nothing here hangs: a loaded machine is not a timeout
    )


def catalogue_text(server: ImageServer) -> str:
    return (
        "sku,title,photo,cutout\n"
        f"A1,mug,{server.url('/a1.png')},yes\n"  # line 2: RGBA over HTTP
        "A2,lamp,photos/a2.jpg,no\n"  # line 3: a local file beside the catalogue
        f"A3,chair,{server.url('/missing.png')},no\n"  # line 4: 404
        "A4,vase,photos/a4.jpg,yes\n"  # line 5: inpaint from alpha, but a JPEG has none
        f"A5,sofa,{server.url('/a1.png')},no\n"  # line 6: A1's image again
        "A6,rug,,no\n"  # line 7: no image
    )


def write(tmp_path: Path, catalogue: str, templates: str = TEMPLATES) -> tuple[Path, Path]:
    (tmp_path / "photos").mkdir(exist_ok=True)
    for name, colour in (("a2.jpg", (200, 10, 10)), ("a4.jpg", (10, 200, 10))):
        if not (tmp_path / "photos" / name).exists():
            (tmp_path / "photos" / name).write_bytes(jpeg(64, 64, colour))
    catalogue_path = tmp_path / "catalogue.csv"
    catalogue_path.write_text(catalogue, encoding="utf-8")
    templates_path = tmp_path / "templates.yaml"
    templates_path.write_text(templates, encoding="utf-8")
    return catalogue_path, templates_path


def run(
    session: Session | None,
    paths: tuple[Path, Path],
    settings: Settings,
    run_name: str = "run-1",
    **kwargs: Any,
) -> ProduceReport:
    return produce(
        session,
        catalogue_path=paths[0],
        templates_path=paths[1],
        default_model="tiny",
        run_name=run_name,
        settings=settings,
        **kwargs,
    )


def jobs(session: Session, run_id: int | None) -> dict[tuple[str, str], dict[str, Any]]:
    rows = session.execute(
        select(Job.__table__, CatalogueItem.external_key)
        .join(CatalogueItem, CatalogueItem.id == Job.item_id)
        .where(Job.run_id == run_id)
        .order_by(Job.id)
    ).mappings()
    return {(row["external_key"], row["template"]): dict(row) for row in rows}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def count(session: Session, model: type[Any]) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def old_dedupe_key(job: dict[str, Any], salt: str = "") -> str:
    """producer.produce.dedupe_key as it was before job kinds existed (copied, not imported):
    plain txt2img jobs must keep exactly these keys."""

    def part(value: str) -> str:
        return f"{len(value)}:{value}"

    parts = (
        job["model"],
        str(job["scheduler"]),
        str(job["steps"]),
        repr(float(job["guidance"])),
        str(job["width"]),
        str(job["height"]),
        job["prompt"],
        job["negative_prompt"],
        ",".join(map(str, job["seeds"])),
        salt,
    )
    return hashlib.sha256("".join(map(part, parts)).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- one run


def test_image_jobs_bad_images_per_item_and_the_rest_proceed(
    tmp_path: Path, db_session: Session, server: ImageServer, settings: Settings
) -> None:
    paths = write(tmp_path, catalogue_text(server))

    report = run(db_session, paths, settings)

    a1 = sha(server.files["/a1.png"])
    a2 = sha((tmp_path / "photos" / "a2.jpg").read_bytes())
    problems = [str(problem) for problem in report.problems]
    missing = server.url("/missing.png")
    assert problems == [
        f"{paths[0]}:4: field 'photo': item 'A3': {missing}: HTTP 404",
        f"{paths[0]}:5: field 'photo': item 'A4': template 'cutout': mask 'alpha' needs an "
        f"image with an alpha channel, and {tmp_path / 'photos' / 'a4.jpg'} has none (mode RGB)",
        f"{paths[0]}:7: field 'photo': item 'A6': is empty",
    ]
    assert (report.rows, report.items, report.rows_skipped) == (6, 3, 3)
    # Each distinct address fetched once: A1 and A5 share one.
    assert server.requests == {"/a1.png": 1, "/missing.png": 1}
    assert (report.inputs, report.inputs_fetched, report.inputs_reused) == (4, 3, 0)
    assert report.inputs_failed == 1

    made = jobs(db_session, report.run_id)
    assert sorted(made) == sorted(
        [
            ("A1", "plain"),
            ("A1", "remix"),
            ("A1", "cutout"),
            ("A2", "plain"),
            ("A2", "remix"),
            ("A5", "plain"),
            ("A5", "remix"),
        ]
    )
    columns = {
        key: (job["kind"], job["input_image"], job["mask_image"], job["options"])
        for key, job in made.items()
    }
    assert columns == {
        ("A1", "plain"): ("txt2img", None, None, None),
        ("A1", "remix"): ("img2img", a1, None, {"strength": 0.5}),
        ("A1", "cutout"): ("inpaint", a1, None, {"mask": {"source": "alpha"}}),
        ("A2", "plain"): ("txt2img", None, None, None),
        ("A2", "remix"): ("img2img", a2, None, {"strength": 0.5}),
        ("A5", "plain"): ("txt2img", None, None, None),
        ("A5", "remix"): ("img2img", a1, None, {"strength": 0.5}),
    }
    for (_sku, template), job in made.items():
        # The producer's fast path and the reference definition agree...
        assert job["dedupe_key"] == dedupe_key(job)
        # ... and a plain job's key is what it was before job kinds existed.
        if template == "plain":
            assert job["dedupe_key"] == old_dedupe_key(job)
        else:
            assert job["dedupe_key"] != old_dedupe_key(job)
    assert made["A1", "remix"]["prompt"] == "mug on an oak table"

    # The staged images: rows, and the original bytes in storage under their hash.
    staged = {
        row.sha256: (row.width, row.height, row.mode, row.storage_key)
        for row in db_session.scalars(select(InputImage))
    }
    assert staged[a1] == (64, 64, "RGBA", f"inputs/{a1[:2]}/{a1}.png")
    assert staged[a2] == (64, 64, "RGB", f"inputs/{a2[:2]}/{a2}.jpg")
    assert (tmp_path / "store" / "inputs" / a1[:2] / f"{a1}.png").read_bytes() == server.files[
        "/a1.png"
    ]
    sources = {s: h for s, h in db_session.execute(select(InputSource.source, InputSource.sha256))}
    assert sources[str(tmp_path / "photos" / "a2.jpg")] == a2
    assert sources[server.url("/a1.png")] == a1
    assert missing not in sources


def test_a_rerun_fetches_nothing_and_creates_no_jobs(
    tmp_path: Path, db_session: Session, server: ImageServer, settings: Settings
) -> None:
    paths = write(tmp_path, catalogue_text(server))
    first = run(db_session, paths, settings, "run-1")

    with pytest.raises(NothingToProduceError) as nothing_new:
        run(db_session, paths, settings, "run-2")

    again = nothing_new.value.report
    assert (again.jobs, again.jobs_new, again.jobs_unchanged) == (first.jobs, 0, first.jobs)
    # Only the address that failed is tried again.
    assert server.requests == {"/a1.png": 1, "/missing.png": 2}
    assert (again.inputs_fetched, again.inputs_reused, again.inputs_failed) == (0, 3, 1)
    assert [str(p) for p in again.problems] == [str(p) for p in first.problems]


def test_changed_bytes_at_the_same_address_need_force(
    tmp_path: Path, db_session: Session, server: ImageServer, settings: Settings
) -> None:
    paths = write(tmp_path, catalogue_text(server))
    first = run(db_session, paths, settings, "run-1")
    old = sha(server.files["/a1.png"])
    server.files["/a1.png"] = png(32, 32, mode="RGBA")
    new = sha(server.files["/a1.png"])

    with pytest.raises(NothingToProduceError):
        run(db_session, paths, settings, "run-2")
    assert server.requests["/a1.png"] == 1  # not fetched: the address is known

    forced = run(db_session, paths, settings, "run-3", force=True)
    assert server.requests["/a1.png"] == 2
    assert forced.jobs_new == first.jobs
    made = jobs(db_session, forced.run_id)
    assert made["A1", "remix"]["input_image"] == made["A5", "remix"]["input_image"] == new
    assert (
        db_session.scalar(
            select(InputSource.sha256).where(InputSource.source == server.url("/a1.png"))
        )
        == new
    )
    # The earlier jobs still point at the image they were made from.
    assert jobs(db_session, first.run_id)["A1", "remix"]["input_image"] == old


def test_a_new_address_renders_again_only_if_its_bytes_differ(
    tmp_path: Path, db_session: Session, server: ImageServer, settings: Settings
) -> None:
    paths = write(tmp_path, catalogue_text(server))
    run(db_session, paths, settings, "run-1")
    shutil.copy(tmp_path / "photos" / "a2.jpg", tmp_path / "photos" / "a2-copy.jpg")
    (tmp_path / "photos" / "a2-new.jpg").write_bytes(jpeg(64, 64, (1, 1, 250)))

    # Same bytes under another name: the item changed, its jobs did not.
    with pytest.raises(NothingToProduceError) as nothing_new:
        run(
            db_session,
            write(tmp_path, catalogue_text(server).replace("a2.jpg", "a2-copy.jpg")),
            settings,
            "run-2",
        )
    same = nothing_new.value.report
    assert same.jobs_new == 0
    assert same.inputs_fetched == 1

    # Other bytes: A2's img2img job is new; its plain job (no image) is not.
    other = run(
        db_session,
        write(tmp_path, catalogue_text(server).replace("a2.jpg", "a2-new.jpg")),
        settings,
        "run-3",
    )
    assert other.jobs_new == 1
    [new_job] = [
        job
        for job in jobs(db_session, other.run_id).values()
        if job["external_key"] == "A2" and job["template"] == "remix"
    ]
    assert new_job["input_image"] == sha((tmp_path / "photos" / "a2-new.jpg").read_bytes())


def test_option_changes_make_new_jobs_for_their_template_alone(
    tmp_path: Path, db_session: Session, server: ImageServer, settings: Settings
) -> None:
    paths = write(tmp_path, catalogue_text(server))
    first = run(db_session, paths, settings, "run-1")
    plain_keys = {k: j["dedupe_key"] for k, j in jobs(db_session, first.run_id).items()}

    stronger = run(
        db_session,
        write(tmp_path, catalogue_text(server), TEMPLATES.replace("0.5", "0.6")),
        settings,
        "run-2",
    )
    made = jobs(db_session, stronger.run_id)
    assert stronger.jobs_new == 3 == len(made)
    assert {template for _sku, template in made} == {"remix"}
    assert all(job["options"] == {"strength": 0.6} for job in made.values())

    # A LoRA on the plain template: its jobs get options and new keys; so does a change of
    # the LoRA file's bytes at the same path.
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"first weights")
    with_lora = TEMPLATES.replace(
        'prompt: "{{ title }}"\n',
        'prompt: "{{ title }}"\n    loras: [{path: style.safetensors, scale: 0.7}]\n',
    )
    styled = run(db_session, write(tmp_path, catalogue_text(server), with_lora), settings, "run-3")
    made = jobs(db_session, styled.run_id)
    assert styled.jobs_new == 3 and {t for _s, t in made} == {"plain"}
    for (sku, _template), job in made.items():
        assert job["kind"] == "txt2img" and job["input_image"] is None
        assert JobOptions.from_json(job["options"]).loras[0].sha256 == sha(b"first weights")
        assert job["options"]["loras"][0]["path"] == str(lora)
        assert job["dedupe_key"] == dedupe_key(job) != plain_keys[sku, "plain"]
    lora.write_bytes(b"second weights")
    retrained = run(
        db_session, write(tmp_path, catalogue_text(server), with_lora), settings, "run-4"
    )
    assert retrained.jobs_new == 3


def test_strict_with_a_bad_image_writes_nothing(
    tmp_path: Path, db_session: Session, server: ImageServer, settings: Settings
) -> None:
    paths = write(tmp_path, catalogue_text(server))

    with pytest.raises(StrictModeError) as info:
        run(db_session, paths, settings, strict=True)

    assert info.value.total == 3
    assert "item 'A3'" in str(info.value.problems[0]) and "HTTP 404" in str(info.value.problems[0])
    assert (
        count(db_session, Job),
        count(db_session, InputImage),
        count(db_session, InputSource),
    ) == (
        0,
        0,
        0,
    )


def test_dry_run_fetches_nothing(tmp_path: Path, server: ImageServer, settings: Settings) -> None:
    paths = write(tmp_path, catalogue_text(server))

    report = run(None, paths, settings, dry_run=True)

    assert server.requests == {}
    assert not (tmp_path / "store").exists()
    # Every row whose image is named counts (the 404 shows only in a real run); the empty
    # cell is a problem already.
    assert report.inputs == 4
    assert [str(p).split(": ", 1)[1] for p in report.problems] == [
        "field 'photo': item 'A6': is empty"
    ]
    assert report.jobs == 3 + 2 + 2 + 3 + 2


def test_max_jobs_refuses_before_any_image_is_fetched(
    tmp_path: Path, db_session: Session, server: ImageServer, settings: Settings
) -> None:
    # A template that matches every row of a big catalogue would download every image and
    # only then be refused: the expansion is counted first.
    rows = "".join(f"B{n},mug {n},{server.url(f'/b{n}.png')},no\n" for n in range(50))
    paths = write(tmp_path, "sku,title,photo,cutout\n" + rows)

    with pytest.raises(ExpansionLimitError) as info:
        run(db_session, paths, settings, max_jobs=20)

    assert server.requests == {}
    assert info.value.line == 12  # the row at which the 21st job appeared (2 per row)
    assert "more than 20 jobs" in info.value.reason
    assert "counted before fetching images" in info.value.reason
    assert (count(db_session, Job), count(db_session, InputSource)) == (0, 0)
    # Within the limit, the same catalogue is fetched and produced as before.
    with pytest.raises(NothingToProduceError, match="every row was refused") as refused:
        run(db_session, paths, settings, max_jobs=100)
    # Every image is a 404 here.
    report = refused.value.report
    assert (report.inputs_failed, report.rows_skipped, report.jobs) == (50, 50, 0)
    assert server.requests


MASK_TEMPLATES = """\
key: sku
templates:
  masked:
    kind: inpaint
    image: photo
    mask: {column: mask}
    width: 64
    height: 64
    seeds: 1
    prompt: "{{ title }} on a beach"
"""


def test_mask_column_must_match_the_image_size(
    tmp_path: Path, db_session: Session, server: ImageServer, settings: Settings
) -> None:
    server.files["/m-good.png"] = png(64, 64, mode="L", colour=255)
    server.files["/m-big.png"] = png(100, 80, mode="L", colour=255)
    catalogue = (
        "sku,title,photo,mask\n"
        f"B1,mug,{server.url('/a1.png')},{server.url('/m-good.png')}\n"
        f"B2,cup,{server.url('/a1.png')},{server.url('/m-big.png')}\n"
        f"B3,jug,{server.url('/a1.png')},{server.url('/m-gone.png')}\n"
    )
    paths = write(tmp_path, catalogue, MASK_TEMPLATES)

    report = run(db_session, paths, settings)

    assert [str(p) for p in report.problems] == [
        f"{paths[0]}:3: field 'mask': item 'B2': mask 100x80 does not match image 64x64",
        f"{paths[0]}:4: field 'mask': item 'B3': {server.url('/m-gone.png')}: HTTP 404",
    ]
    [job] = jobs(db_session, report.run_id).values()
    assert (job["kind"], job["input_image"], job["mask_image"], job["options"]) == (
        "inpaint",
        sha(server.files["/a1.png"]),
        sha(server.files["/m-good.png"]),
        {"mask": {"source": "column"}},
    )
    assert job["dedupe_key"] == dedupe_key(job)


def test_controlnet_and_box_options_are_stored(
    tmp_path: Path, db_session: Session, server: ImageServer, settings: Settings
) -> None:
    (tmp_path / "nets" / "canny").mkdir(parents=True)
    templates = """\
key: sku
defaults: {image: photo, width: 64, height: 64, seeds: 1}
templates:
  edges:
    kind: controlnet
    controlnet: {model: nets/canny, scale: 0.9}
    prompt: "{{ title }}"
  boxed:
    kind: inpaint
    mask: {keep_box: [8, 8, 56, 56]}
    prompt: "{{ title }}"
"""
    paths = write(tmp_path, f"sku,title,photo\nC1,mug,{server.url('/a1.png')}\n", templates)

    report = run(db_session, paths, settings)

    made = jobs(db_session, report.run_id)
    assert made["C1", "edges"]["kind"] == "controlnet"
    assert made["C1", "edges"]["options"] == {
        "controlnet": {"model": str(tmp_path / "nets" / "canny"), "scale": 0.9}
    }
    assert made["C1", "boxed"]["options"] == {"mask": {"source": "box", "keep_box": [8, 8, 56, 56]}}
    for job in made.values():
        assert job["dedupe_key"] == dedupe_key(job)
        assert JobOptions.from_json(job["options"]).to_json() == job["options"]


def test_plain_catalogues_keep_their_keys_and_write_no_options(
    tmp_path: Path, db_session: Session, settings: Settings
) -> None:
    templates = "key: sku\ndefaults: {seeds: 2, width: 64, height: 64}\ntemplates:\n"
    templates += '  studio:\n    prompt: "photo of {{ title }}, {white|grey} background"\n'
    paths = write(tmp_path, "sku,title\nP1,mug\nP2,lamp\n", templates)

    report = run(db_session, paths, settings)

    made = [dict(row) for row in db_session.execute(select(Job.__table__)).mappings()]
    assert len(made) == 4 and report.inputs == 0
    for job in made:
        assert (job["kind"], job["input_image"], job["mask_image"], job["options"]) == (
            "txt2img",
            None,
            None,
            None,
        )
        assert job["dedupe_key"] == old_dedupe_key(job) == dedupe_key(job)
        # The reference function needs none of the new columns for a plain job.
        old_columns = {k: v for k, v in job.items() if k not in ("kind", "options")}
        assert dedupe_key(old_columns) == job["dedupe_key"]
    assert count(db_session, InputImage) == 0


# --------------------------------------------------------------------------- SQLite


@pytest.fixture
def sqlite_session(tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{tmp_path / 'images.db'}"
    upgrade(url)
    engine = create_engine(url)
    with make_sessionmaker(engine)() as session:
        yield session
    engine.dispose()


def test_image_jobs_on_sqlite(
    tmp_path: Path, sqlite_session: Session, server: ImageServer, settings: Settings
) -> None:
    paths = write(tmp_path, catalogue_text(server))

    first = run(sqlite_session, paths, settings, "run-1")
    again = run(sqlite_session, paths, settings, "run-2", force=True)

    made = jobs(sqlite_session, first.run_id)
    assert len(made) == 7 and first.rows_skipped == 3
    assert made["A1", "cutout"]["options"] == {"mask": {"source": "alpha"}}
    assert made["A1", "plain"]["options"] is None and made["A1", "plain"]["kind"] == "txt2img"
    for job in made.values():
        assert job["dedupe_key"] == dedupe_key(job)
    assert again.jobs_new == 7 and again.inputs_fetched == 3
    assert count(sqlite_session, InputSource) == 3


def test_a_storage_failure_stops_the_produce_and_writes_nothing(
    tmp_path: Path, db_session: Session, server: ImageServer, s3_settings: dict[str, str]
) -> None:
    broken = Settings(
        **{**s3_settings, "s3_bucket": "no-such-bucket-for-inputs"},  # type: ignore[arg-type]
        data_dir=tmp_path / "var",
        input_fetch_timeout_seconds=5,  # nothing here hangs: a loaded machine is not a timeout
    )
    paths = write(tmp_path, catalogue_text(server))

    with pytest.raises(InputStorageError) as info:
        run(db_session, paths, broken)

    assert "cannot store the image from" in str(info.value)
    assert "s3://no-such-bucket-for-inputs/inputs/" in str(info.value)
    assert (count(db_session, Job), count(db_session, InputImage)) == (0, 0)

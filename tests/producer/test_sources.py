from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from db.models import CatalogueItem, Job
from pixelmill.settings import Settings
from producer.catalogue import CatalogueError, CatalogueSource, open_catalogue
from producer.catalogue.csv import CsvCatalogue
from producer.catalogue.jsonl import JsonlCatalogue
from producer.catalogue.sql import SqlCatalogue
from producer.produce import produce
from tests.producer.image_server import png


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def rows_of(source: CatalogueSource) -> list[tuple[int, dict[str, str]]]:
    return [(row.line, row.fields) for row in source]


def test_csv_by_default_with_sniffed_delimiter(tmp_path: Path) -> None:
    source = open_catalogue(write(tmp_path / "cat.txt", b"sku;title\nA1;Mug\n"))
    assert isinstance(source, CsvCatalogue)
    assert (source.path, source.name, source.columns) == (
        tmp_path / "cat.txt",
        "cat.txt",
        ["sku", "title"],
    )
    assert rows_of(source) == [(2, {"sku": "A1", "title": "Mug"})]


def test_csv_options_are_passed(tmp_path: Path) -> None:
    location = write(tmp_path / "cat.csv", "sku|title\nA1|红色\n".encode("gbk"))
    source = open_catalogue(location, encoding="gbk", delimiter="|")
    assert rows_of(source) == [(2, {"sku": "A1", "title": "红色"})]


def test_csv_default_encoding_drops_the_bom(tmp_path: Path) -> None:
    source = open_catalogue(write(tmp_path / "cat.csv", "\ufeffsku\nA1\n".encode()))
    assert source.columns == ["sku"]


@pytest.mark.parametrize("name", ["cat.jsonl", "cat.ndjson", "CAT.JSONL"])
def test_jsonl_by_suffix(tmp_path: Path, name: str) -> None:
    source = open_catalogue(write(tmp_path / name, b'{"sku": "A1"}\n'))
    assert isinstance(source, JsonlCatalogue)
    assert source.columns is None
    assert rows_of(source) == [(1, {"sku": "A1"})]


def test_jsonl_encoding(tmp_path: Path) -> None:
    location = write(tmp_path / "cat.jsonl", '{"t": "红色"}\n'.encode("gbk"))
    with pytest.raises(CatalogueError, match="not valid utf-8"):
        list(open_catalogue(location))
    assert rows_of(open_catalogue(location, encoding="gbk")) == [(1, {"t": "红色"})]


def test_jsonl_refuses_a_delimiter(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="--delimiter applies only to CSV"):
        open_catalogue(write(tmp_path / "cat.jsonl", b'{"sku": "A1"}\n'), delimiter=";")


def test_sqlite_url_by_table_and_query(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cat.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE items (sku TEXT PRIMARY KEY, title TEXT)"))
        conn.execute(text("INSERT INTO items VALUES ('B2', 'Cup'), ('A1', 'Mug')"))
    engine.dispose()
    by_table = open_catalogue(url, table="items")
    assert isinstance(by_table, SqlCatalogue)
    assert (by_table.path, by_table.name, by_table.columns) == (
        "sql:items",
        "sql:items",
        ["sku", "title"],
    )
    assert rows_of(by_table) == [
        (1, {"sku": "A1", "title": "Mug"}),
        (2, {"sku": "B2", "title": "Cup"}),
    ]
    by_query = open_catalogue(url, query="SELECT sku FROM items WHERE title = 'Cup'")
    assert by_query.path == "sql:query"
    assert rows_of(by_query) == [(1, {"sku": "B2"})]


def test_postgres_url(fresh_database_url: str) -> None:
    source = open_catalogue(fresh_database_url, query="SELECT 'A1' AS sku")
    assert isinstance(source, SqlCatalogue)
    assert rows_of(source) == [(1, {"sku": "A1"})]


def test_url_needs_table_or_query() -> None:
    with pytest.raises(CatalogueError, match="give --table or --query"):
        open_catalogue("sqlite:///whatever.db")


def test_url_refuses_file_options() -> None:
    with pytest.raises(CatalogueError, match="apply only to catalogue files"):
        open_catalogue("sqlite:///whatever.db", table="items", encoding="gbk")


def test_file_refuses_table_and_query(tmp_path: Path) -> None:
    location = write(tmp_path / "cat.csv", b"sku\nA1\n")
    with pytest.raises(CatalogueError, match="apply only to a database URL"):
        open_catalogue(location, table="items")
    with pytest.raises(CatalogueError, match="apply only to a database URL"):
        open_catalogue(location, query="SELECT 1")


def test_unknown_driver_is_a_catalogue_error() -> None:
    with pytest.raises(CatalogueError) as err:
        open_catalogue("nosuchdb://u:secret@host/db", table="items")
    assert err.value.reason.startswith("bad database URL")
    assert "secret" not in str(err.value)


# --------------------------------------------------------------------------- through produce

JSONL_TEMPLATES = """\
key: sku
defaults: {steps: 2, width: 64, height: 64, seeds: 1}
templates:
  mugshot:
    prompt: "{{ title }} on a table"
    when: "category == 'mugs'"
  lampshot:
    kind: img2img
    image: photo
    strength: 0.5
    prompt: "a {{ shade }} lamp"
    when: "category == 'lamps'"
"""


def test_jsonl_rows_need_only_the_keys_of_the_templates_that_apply(
    tmp_path: Path, db_session: Session
) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "j2.png").write_bytes(png(64, 64))
    rows: list[dict[str, str]] = [
        {"sku": "J1", "category": "mugs", "title": "mug"},  # no shade, no photo: not needed
        {"sku": "J2", "category": "lamps", "shade": "linen", "photo": "photos/j2.png"},  # no title
        {"sku": "J3", "category": "lamps", "photo": "photos/j2.png"},  # lampshot needs shade
        {"sku": "J4", "category": "lamps", "shade": "paper"},  # lampshot needs a photo
        {"title": "orphan", "category": "mugs"},  # every row needs the item key
        {"sku": "J6", "title": "cup"},  # the templates' `when` needs the category
    ]
    catalogue = tmp_path / "catalogue.jsonl"
    catalogue.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    templates = tmp_path / "templates.yaml"
    templates.write_text(JSONL_TEMPLATES, encoding="utf-8")

    report = produce(
        db_session,
        catalogue_path=catalogue,
        templates_path=templates,
        default_model="tiny",
        run_name="run-1",
        settings=Settings(
            data_dir=tmp_path / "var",
            storage="local",
            storage_dir=tmp_path / "store",
            input_fetch_timeout_seconds=5,
        ),
    )

    assert (report.rows, report.items, report.jobs, report.rows_skipped) == (6, 2, 2, 4)
    made = db_session.execute(
        select(CatalogueItem.external_key, Job.template, Job.prompt)
        .join(Job, Job.item_id == CatalogueItem.id)
        .where(Job.run_id == report.run_id)
        .order_by(CatalogueItem.external_key)
    ).all()
    assert [tuple(row) for row in made] == [
        ("J1", "mugshot", "mug on a table"),
        ("J2", "lampshot", "a linen lamp"),
    ]
    assert [(p.line, p.field, p.reason) for p in report.problems] == [
        (3, "shade", "template 'lampshot': is missing"),
        (4, "photo", "item 'J4': is empty"),
        (5, "sku", "key required by the template file's 'key' is missing (keys: title, category)"),
        (6, "category", "template 'mugshot': is missing (used by 'when')"),
    ]
    assert str(report.problems[0]).startswith(f"{catalogue}:3: field 'shade': ")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("catalogue.csv", b"sku,title,note\nA1,mug,a\x00b\nA2,lamp,ok\n"),
        (
            "catalogue.jsonl",
            b'{"sku": "A1", "title": "mug", "note": "a\\ud800b"}\n{"sku": "A2", "title": "lamp"}\n',
        ),
    ],
)
def test_text_the_database_cannot_store_is_its_row_s_problem(
    tmp_path: Path, db_session: Session, name: str, data: bytes
) -> None:
    # Written as it is, such a field fails the whole produce when the items are stored.
    catalogue = tmp_path / name
    catalogue.write_bytes(data)
    templates = tmp_path / "templates.yaml"
    templates.write_text(
        "key: sku\ndefaults: {steps: 2, width: 64, height: 64, seeds: 1}\n"
        "templates:\n  studio: {prompt: '{{ title }}'}\n",
        encoding="utf-8",
    )

    report = produce(
        db_session,
        catalogue_path=catalogue,
        templates_path=templates,
        default_model="tiny",
        run_name="run-1",
    )

    assert (report.items, report.jobs, report.rows_skipped) == (1, 1, 1)
    [problem] = report.problems
    assert (problem.line, problem.field) == (1 if name.endswith(".jsonl") else 2, "note")
    keys = db_session.scalars(
        select(CatalogueItem.external_key).join(Job, Job.item_id == CatalogueItem.id)
    )
    assert list(keys) == ["A2"]

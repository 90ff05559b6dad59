from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from producer.catalogue import CatalogueError, CsvCatalogue, JsonlCatalogue, SqlCatalogue
from producer.sources import CatalogueSource, open_catalogue


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

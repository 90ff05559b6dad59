from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
)

from producer.catalogue.common import CatalogueError, CatalogueRow
from producer.catalogue.csv import CsvCatalogue
from producer.catalogue.jsonl import JsonlCatalogue
from producer.catalogue.lines import READ_BYTES
from producer.catalogue.sql import SqlCatalogue


def write(tmp_path: Path, data: bytes, name: str = "catalogue.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_plain_rows_and_whitespace_stripped(tmp_path: Path) -> None:
    path = write(tmp_path, b"sku, title ,colour\nA1,  Red mug ,red\r\nA2,Blue mug,blue\n")
    cat = CsvCatalogue(path)
    assert cat.columns == ["sku", "title", "colour"]
    rows = list(cat)
    assert rows == [
        CatalogueRow(line=2, fields={"sku": "A1", "title": "Red mug", "colour": "red"}),
        CatalogueRow(line=3, fields={"sku": "A2", "title": "Blue mug", "colour": "blue"}),
    ]


def test_iteration_is_a_stream(tmp_path: Path) -> None:
    path = write(tmp_path, b"sku\nA\nB\n")
    it = iter(CsvCatalogue(path))
    assert next(it).fields == {"sku": "A"}
    assert next(it).fields == {"sku": "B"}
    with pytest.raises(StopIteration):
        next(it)


def test_bom_is_stripped(tmp_path: Path) -> None:
    path = write(tmp_path, "\ufeffsku,title\nA1,Mug\n".encode())
    cat = CsvCatalogue(path)
    assert cat.columns == ["sku", "title"]
    assert [r.fields for r in cat] == [{"sku": "A1", "title": "Mug"}]


def excel_unicode_text(rows: list[list[str]]) -> bytes:
    """What Excel's "Unicode Text" export writes: UTF-16 LE with a BOM, tabs, CRLF."""
    return "\r\n".join("\t".join(row) for row in rows).encode("utf-16") + "\r\n".encode("utf-16-le")


def test_utf16_tab_separated_as_excel_writes_it(tmp_path: Path) -> None:
    data = excel_unicode_text(
        [
            ["sku", "title", "colour"],
            ["A1", '"Mug\r\nwith a handle"', "红"],
            ["A2", "Lamp", "blue"],
            ["A3", "Ċhair", "green"],  # U+010A: its UTF-16 bytes are 0x0A 0x01
        ]
    )
    assert data.startswith(b"\xff\xfe") and b"\n\x01" in data
    cat = CsvCatalogue(write(tmp_path, data, "catalogue.txt"), encoding="utf-16")
    assert (cat.delimiter, cat.columns) == ("\t", ["sku", "title", "colour"])
    assert [(r.line, r.fields) for r in cat] == [
        (2, {"sku": "A1", "title": "Mug\r\nwith a handle", "colour": "红"}),
        (4, {"sku": "A2", "title": "Lamp", "colour": "blue"}),
        (5, {"sku": "A3", "title": "Ċhair", "colour": "green"}),
    ]


def test_utf16_bad_data_names_the_line(tmp_path: Path) -> None:
    # A lone low surrogate (0xDC00) on line 3 cannot be decoded.
    data = (
        excel_unicode_text([["sku", "title"], ["A1", "ok"]])
        + b"A\x002\x00\t\x00\x00\xdc\r\x00\n\x00"
    )
    path = write(tmp_path, data)
    with pytest.raises(CatalogueError) as err:
        list(CsvCatalogue(path, encoding="utf-16", delimiter="\t"))
    assert err.value.line == 3
    assert str(err.value).startswith(f"{path}:3: not valid utf-16 (byte 0x")
    assert "at position 3); pass --encoding" in str(err.value)


def test_bom_is_dropped_whatever_the_encoding(tmp_path: Path) -> None:
    path = write(tmp_path, "\ufeffsku,title\nA1,Mug\n".encode("utf-16-le"))
    assert CsvCatalogue(path, encoding="utf-16-le").columns == ["sku", "title"]
    path = write(tmp_path, "\ufeffsku\nA1\n".encode(), "plain-utf8.csv")
    assert CsvCatalogue(path, encoding="utf-8").columns == ["sku"]


def test_a_line_longer_than_a_read_keeps_its_number(tmp_path: Path) -> None:
    long_title = "红" * (READ_BYTES // 2)  # 3 bytes each in UTF-8: spans several reads
    data = f"sku,title\nA1,{long_title}\nA2,b\xe4d\n".encode()
    rows = list(CsvCatalogue(write(tmp_path, data)))
    assert [(r.line, r.fields["title"]) for r in rows] == [(2, long_title), (3, "bäd")]
    bad = data.replace(b"b\xc3\xa4d", b"b\xe4d")
    with pytest.raises(CatalogueError) as err:
        list(CsvCatalogue(write(tmp_path, bad)))
    assert str(err.value).startswith(
        f"{tmp_path / 'catalogue.csv'}:3: not valid utf-8-sig (byte 0xe4 at position 4)"
    )


def test_quoted_newlines_keep_line_numbers(tmp_path: Path) -> None:
    data = b'sku,title\nA1,"line one\nline two\nline three"\nA2,plain\n\nA3,"x\r\ny"\nA4,z\n'
    rows = list(CsvCatalogue(write(tmp_path, data)))
    assert [(r.line, r.fields["sku"]) for r in rows] == [(2, "A1"), (5, "A2"), (7, "A3"), (9, "A4")]
    assert rows[0].fields["title"] == "line one\nline two\nline three"


def test_ragged_row_after_quoted_newline_reports_its_line(tmp_path: Path) -> None:
    data = b'sku,title\nA1,"a\nb"\nA2,x,extra\n'
    with pytest.raises(CatalogueError) as err:
        list(CsvCatalogue(write(tmp_path, data)))
    assert err.value.line == 4
    assert "3 cells" in err.value.reason and "2 columns" in err.value.reason


def test_too_few_cells(tmp_path: Path) -> None:
    path = write(tmp_path, b"sku,title,colour\nA1,Mug,red\nA2,Mug\n")
    with pytest.raises(CatalogueError) as err:
        list(CsvCatalogue(path))
    assert err.value.line == 3
    assert str(err.value).startswith(f"{path}:3: ")


def test_gbk_with_explicit_encoding(tmp_path: Path) -> None:
    path = write(tmp_path, "sku,title\nA1,红色杯子\nA2,蓝色\n".encode("gbk"))
    rows = list(CsvCatalogue(path, encoding="gbk"))
    assert [r.fields["title"] for r in rows] == ["红色杯子", "蓝色"]
    assert [r.line for r in rows] == [2, 3]


def test_gbk_read_as_utf8_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, b"sku,title\nA1,plain\n" + "A2,红色\n".encode("gbk"))
    cat = CsvCatalogue(path)
    with pytest.raises(CatalogueError) as err:
        list(cat)
    assert err.value.line == 3
    assert "not valid" in err.value.reason and "--encoding" in err.value.reason


def test_invalid_byte_names_line_and_byte(tmp_path: Path) -> None:
    path = write(tmp_path, b"sku,title\nA1,ok\nA2,ok\nA3,bad \xff here\n")
    with pytest.raises(CatalogueError) as err:
        list(CsvCatalogue(path))
    assert err.value.line == 4
    assert "0xff" in str(err.value)
    assert str(err.value).startswith(f"{path}:4: not valid utf-8-sig (byte 0xff at position 7)")


def test_invalid_byte_in_header(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError) as err:
        CsvCatalogue(write(tmp_path, b"sku,ti\xfftle\nA,b\n"))
    assert err.value.line == 1


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, b"")
    with pytest.raises(CatalogueError) as err:
        CsvCatalogue(path)
    assert (err.value.line, err.value.field) == (1, None)
    assert str(err.value) == f"{path}:1: file is empty"


def test_bom_only_file_is_empty(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="file is empty"):
        CsvCatalogue(write(tmp_path, b"\xef\xbb\xbf\n"))


def test_header_only(tmp_path: Path) -> None:
    cat = CsvCatalogue(write(tmp_path, b"sku,title\n"))
    assert cat.columns == ["sku", "title"]
    assert list(cat) == []


def test_duplicate_header_names_both(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError) as err:
        CsvCatalogue(write(tmp_path, b"sku,title, sku\n"))
    assert (err.value.line, err.value.field) == (1, "sku")
    assert "columns 1 and 3" in err.value.reason


def test_empty_column_name(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError) as err:
        CsvCatalogue(write(tmp_path, b"sku,,title\n"))
    assert err.value.line == 1
    assert "column 2" in err.value.reason


def test_blank_rows_are_skipped(tmp_path: Path) -> None:
    rows = list(CsvCatalogue(write(tmp_path, b"sku,title\n\nA1,x\n,\n")))
    assert [(r.line, r.fields["sku"]) for r in rows] == [(3, "A1")]


def test_require_columns(tmp_path: Path) -> None:
    path = write(tmp_path, b"sku,title\nA,b\n")
    cat = CsvCatalogue(path)
    cat.require_columns(["sku", "title"], who="template 'studio'")
    with pytest.raises(CatalogueError) as err:
        cat.require_columns(["sku", "colour", "size"], who="template 'studio'")
    assert (err.value.line, err.value.field) == (1, "colour")
    assert str(err.value) == (
        f"{path}:1: field 'colour': column required by template 'studio' is missing "
        "(columns: sku, title)"
    )


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="cannot open"):
        CsvCatalogue(tmp_path / "nope.csv")


def test_unknown_encoding(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="unknown encoding"):
        CsvCatalogue(write(tmp_path, b"sku\n"), encoding="no-such-codec")


# --- CSV delimiters -----------------------------------------------------------------------


def test_semicolon_is_sniffed(tmp_path: Path) -> None:
    cat = CsvCatalogue(write(tmp_path, b"sku;title;price\nA1;Red, big mug;9,90\nA2;Cup;3\n"))
    assert cat.delimiter == ";"
    assert cat.columns == ["sku", "title", "price"]
    assert [r.fields for r in cat] == [
        {"sku": "A1", "title": "Red, big mug", "price": "9,90"},
        {"sku": "A2", "title": "Cup", "price": "3"},
    ]


def test_tab_is_sniffed(tmp_path: Path) -> None:
    cat = CsvCatalogue(write(tmp_path, b"sku\ttitle\nA1\tRed; mug, large\nA2\tCup\n"))
    assert cat.delimiter == "\t"
    assert [(r.line, r.fields["title"]) for r in cat] == [(2, "Red; mug, large"), (3, "Cup")]


def test_single_column_falls_back_to_comma(tmp_path: Path) -> None:
    # The "|" in the values must not be taken for a delimiter: the header has none.
    cat = CsvCatalogue(write(tmp_path, b"sku\nA|1\nB|2\n"))
    assert cat.delimiter == ","
    assert [r.fields for r in cat] == [{"sku": "A|1"}, {"sku": "B|2"}]


def test_given_delimiter_wins_over_sniffing(tmp_path: Path) -> None:
    path = write(tmp_path, b"sku|title\nA1|a,b\n")
    assert [r.fields for r in CsvCatalogue(path, delimiter="|")] == [{"sku": "A1", "title": "a,b"}]
    # Forced to ",", the same file is one column named "sku|title".
    assert CsvCatalogue(path, delimiter=",").columns == ["sku|title"]


def test_bad_delimiter(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="one character"):
        CsvCatalogue(write(tmp_path, b"sku\n"), delimiter=";;")


def test_sniffed_semicolon_with_quoted_newlines_and_bom(tmp_path: Path) -> None:
    data = '\ufeffsku;title\nA1;"one\ntwo"\nA2;x\n'.encode()
    rows = list(CsvCatalogue(write(tmp_path, data)))
    assert [(r.line, r.fields["sku"]) for r in rows] == [(2, "A1"), (4, "A2")]
    assert rows[0].fields["title"] == "one\ntwo"


def test_sniffed_semicolon_gbk(tmp_path: Path) -> None:
    path = write(tmp_path, "sku;title\nA1;红色杯子\n".encode("gbk"))
    cat = CsvCatalogue(path, encoding="gbk")
    assert cat.delimiter == ";"
    assert [r.fields["title"] for r in cat] == ["红色杯子"]


# --- JSON Lines ---------------------------------------------------------------------------


def jsonl(tmp_path: Path, text_: str) -> Path:
    return write(tmp_path, text_.encode(), name="catalogue.jsonl")


def test_jsonl_rows_and_lines(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path, '{"sku": "A1", "title": "Red mug"}\n\n  \n{"sku": "A2", "title": "Cup"}\n'
    )
    cat = JsonlCatalogue(path)
    assert cat.columns is None
    assert list(cat) == [
        CatalogueRow(line=1, fields={"sku": "A1", "title": "Red mug"}),
        CatalogueRow(line=4, fields={"sku": "A2", "title": "Cup"}),
    ]


def test_jsonl_value_conversion(tmp_path: Path) -> None:
    line = '{"s": "x", "i": 3, "f": 9.5, "t": true, "n": false, "z": null, "u": "红"}\n'
    [row] = list(JsonlCatalogue(jsonl(tmp_path, line)))
    assert row.fields == {
        "s": "x",
        "i": "3",
        "f": "9.5",
        "t": "true",
        "n": "false",
        "z": "",
        "u": "红",
    }


def test_jsonl_bom_and_crlf(tmp_path: Path) -> None:
    path = write(tmp_path, '\ufeff{"sku": "A1"}\r\n{"sku": "A2"}'.encode(), "c.ndjson")
    assert [(r.line, r.fields) for r in JsonlCatalogue(path)] == [
        (1, {"sku": "A1"}),
        (2, {"sku": "A2"}),
    ]


def test_jsonl_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = jsonl(tmp_path, '{"sku": "A1"}\n\n{"sku": "A2",}\n')
    with pytest.raises(CatalogueError) as err:
        list(JsonlCatalogue(path))
    assert (err.value.line, err.value.field) == (3, None)
    assert str(err.value).startswith(f"{path}:3: not valid JSON")


def test_jsonl_nan_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="NaN is not valid JSON") as err:
        list(JsonlCatalogue(jsonl(tmp_path, '{"sku": "A1", "price": NaN}\n')))
    assert err.value.line == 1


@pytest.mark.parametrize(
    ("value", "kind"), [("[1, 2]", "an array"), ('"A1"', "a string"), ("null", "null")]
)
def test_jsonl_line_must_be_an_object(tmp_path: Path, value: str, kind: str) -> None:
    path = jsonl(tmp_path, '{"sku": "A1"}\n' + value + "\n")
    with pytest.raises(CatalogueError) as err:
        list(JsonlCatalogue(path))
    assert err.value.line == 2
    assert err.value.reason == f"expected a JSON object, got {kind}"


@pytest.mark.parametrize("nested", ['["red", "blue"]', '{"r": 1}'])
def test_jsonl_nested_value(tmp_path: Path, nested: str) -> None:
    path = jsonl(tmp_path, '{"sku": "A1"}\n{"sku": "A2", "colours": ' + nested + "}\n")
    with pytest.raises(CatalogueError) as err:
        list(JsonlCatalogue(path))
    assert (err.value.line, err.value.field) == (2, "colours")
    assert str(err.value) == f"{path}:2: field 'colours': nested values are not supported"


def test_jsonl_duplicate_key(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError) as err:
        list(JsonlCatalogue(jsonl(tmp_path, '{"sku": "A1", "sku": "A2"}\n')))
    assert (err.value.line, err.value.field, err.value.reason) == (1, "sku", "duplicate key")


def test_jsonl_required_key_checked_per_row(tmp_path: Path) -> None:
    path = jsonl(tmp_path, '{"sku": "A1", "title": "x"}\n{"title": "y"}\n')
    cat = JsonlCatalogue(path)
    cat.require_columns(["sku"], who="the template file's 'key'")
    rows = iter(cat)
    assert next(rows).fields == {"sku": "A1", "title": "x"}
    with pytest.raises(CatalogueError) as err:
        next(rows)
    assert (err.value.line, err.value.field) == (2, "sku")
    assert str(err.value) == (
        f"{path}:2: field 'sku': key required by the template file's 'key' is missing (keys: title)"
    )


def test_jsonl_template_keys_are_not_required_on_every_row(tmp_path: Path) -> None:
    # A template with a `when` needs its keys only on the rows it applies to; the template
    # reports a missing one on such a row (tests/producer/test_sources.py, through produce).
    path = jsonl(tmp_path, '{"sku": "A1", "title": "x"}\n{"sku": "A2"}\n')
    cat = JsonlCatalogue(path)
    cat.require_columns(["sku"], who="the template file's 'key'")
    cat.require_columns(["title"], who="template 'studio'", every_row=False)
    cat.require_columns(["photo"], who="template 'studio' (images)", every_row=False)
    assert [(r.line, r.fields, r.problem) for r in cat.rows()] == [
        (1, {"sku": "A1", "title": "x"}, None),
        (2, {"sku": "A2"}, None),
    ]
    # What every row needs is checked on every row.
    cat.require_columns(["title"], who="the export")
    problems = [r.problem for r in cat.rows()]
    assert problems[0] is None
    assert "key required by the export is missing" in str(problems[1])


def test_jsonl_bad_encoding_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, b'{"sku": "A1"}\n{"sku": "\xff"}\n', "c.jsonl")
    with pytest.raises(CatalogueError) as err:
        list(JsonlCatalogue(path))
    assert err.value.line == 2
    assert "not valid utf-8" in err.value.reason


def test_jsonl_utf16_with_bom(tmp_path: Path) -> None:
    data = '{"sku": "A1", "title": "红"}\r\n\r\n{"sku": "A2", "title": "\u010a"}\r\n'
    path = write(tmp_path, data.encode("utf-16"), "c.jsonl")
    assert [(r.line, r.fields) for r in JsonlCatalogue(path, encoding="utf-16")] == [
        (1, {"sku": "A1", "title": "红"}),
        (3, {"sku": "A2", "title": "Ċ"}),
    ]


def test_jsonl_gbk(tmp_path: Path) -> None:
    path = write(tmp_path, '{"sku": "A1", "title": "红色杯子"}\n'.encode("gbk"), "c.jsonl")
    assert [r.fields["title"] for r in JsonlCatalogue(path, encoding="gbk")] == ["红色杯子"]


@pytest.mark.parametrize("data", [b"", b"\n \n"])
def test_jsonl_empty(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, data, "c.jsonl")
    with pytest.raises(CatalogueError) as err:
        JsonlCatalogue(path)
    assert str(err.value) == f"{path}:1: file is empty"


def test_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="cannot open"):
        JsonlCatalogue(tmp_path / "nope.jsonl")


# --- SQL ----------------------------------------------------------------------------------

products_meta = MetaData()
products = Table(
    "products",
    products_meta,
    Column("id", Integer, primary_key=True),
    Column("sku", String, nullable=False),
    Column("title", String),
    Column("price", Numeric(10, 2)),
)


def make_products(url: str, count: int) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            products_meta.create_all(conn)
            rows = [
                {"id": n, "sku": f"S{n:05d}", "title": None if n == 2 else f"Item {n}", "price": n}
                for n in range(1, count + 1)
            ]
            # Inserted in reverse, so primary key order is not the insertion order.
            conn.execute(insert(products), rows[::-1])
    finally:
        engine.dispose()


def count_products(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(products)).scalar_one())
    finally:
        engine.dispose()


@pytest.fixture
def pg_products(fresh_database_url: str) -> str:
    make_products(fresh_database_url, 3)
    return fresh_database_url


@pytest.fixture
def sqlite_products(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'catalogue.db'}"
    make_products(url, 3)
    return url


@pytest.fixture(params=["postgres", "sqlite"])
def products_url(request: pytest.FixtureRequest) -> str:
    fixture = "pg_products" if request.param == "postgres" else "sqlite_products"
    url: str = request.getfixturevalue(fixture)
    return url


EXPECTED = [
    CatalogueRow(line=1, fields={"id": "1", "sku": "S00001", "title": "Item 1", "price": "1.00"}),
    CatalogueRow(line=2, fields={"id": "2", "sku": "S00002", "title": "", "price": "2.00"}),
    CatalogueRow(line=3, fields={"id": "3", "sku": "S00003", "title": "Item 3", "price": "3.00"}),
]


def test_sql_by_table(products_url: str) -> None:
    cat = SqlCatalogue(products_url, table="products")
    assert cat.path == "sql:products"
    assert cat.columns == ["id", "sku", "title", "price"]
    assert list(cat) == EXPECTED
    # A second pass reads the table again.
    assert [r.line for r in cat] == [1, 2, 3]


@pytest.mark.parametrize(
    ("url", "schema"), [("pg_products", "public"), ("sqlite_products", "main")]
)
def test_sql_by_schema_qualified_table(
    request: pytest.FixtureRequest, url: str, schema: str
) -> None:
    cat = SqlCatalogue(request.getfixturevalue(url), table=f"{schema}.products")
    assert cat.path == f"sql:{schema}.products"
    assert list(cat) == EXPECTED


def test_sql_by_query(products_url: str) -> None:
    query = (
        "-- the ones with titles\n"
        "SELECT sku, title FROM products WHERE title IS NOT NULL ORDER BY sku DESC"
    )
    cat = SqlCatalogue(products_url, query=query)
    assert cat.path == "sql:query"
    assert cat.columns == ["sku", "title"]
    assert [(r.line, r.fields) for r in cat] == [
        (1, {"sku": "S00003", "title": "Item 3"}),
        (2, {"sku": "S00001", "title": "Item 1"}),
    ]


def test_sql_value_conversion(pg_products: str) -> None:
    query = (
        "SELECT true AS yes, false AS no, NULL AS nothing, 2.5::float8 AS f, "
        "DATE '2024-05-01' AS day, ARRAY[1, 2] AS list"
    )
    cat = SqlCatalogue(pg_products, query=query)
    with pytest.raises(CatalogueError) as err:
        list(cat)
    assert (err.value.path, err.value.line, err.value.field) == ("sql:query", 1, "list")
    assert err.value.reason == "nested values are not supported"
    [row] = SqlCatalogue(pg_products, query=query.replace(", ARRAY[1, 2] AS list", ""))
    assert row.fields == {
        "yes": "true",
        "no": "false",
        "nothing": "",
        "f": "2.5",
        "day": "2024-05-01",
    }


def test_sql_missing_table(products_url: str) -> None:
    with pytest.raises(CatalogueError) as err:
        SqlCatalogue(products_url, table="prodcts")
    assert str(err.value) == "sql:prodcts: table 'prodcts' does not exist"


def test_sql_missing_schema(pg_products: str) -> None:
    with pytest.raises(CatalogueError) as err:
        SqlCatalogue(pg_products, table="nope.products")
    assert err.value.reason == "table 'nope.products' does not exist"


def test_sql_table_name_is_quoted(pg_products: str) -> None:
    with pytest.raises(CatalogueError, match="does not exist"):
        SqlCatalogue(pg_products, table="products; DROP TABLE products")
    assert count_products(pg_products) == 3


def test_sql_bad_query_is_a_catalogue_error(products_url: str) -> None:
    with pytest.raises(CatalogueError) as err:
        SqlCatalogue(products_url, query="SELECT nope FROM products")
    assert err.value.path == "sql:query"
    assert err.value.reason.startswith("query failed: ")
    assert "nope" in err.value.reason


def test_sql_duplicate_column_names(products_url: str) -> None:
    with pytest.raises(CatalogueError) as err:
        SqlCatalogue(products_url, query="SELECT sku, title AS sku FROM products")
    assert (err.value.field, err.value.reason) == ("sku", "duplicate column name")


def test_sql_require_columns(products_url: str) -> None:
    cat = SqlCatalogue(products_url, query="SELECT sku, title FROM products")
    cat.require_columns(["sku"], who="the template file's 'key'")
    with pytest.raises(CatalogueError) as err:
        cat.require_columns(["sku", "colour"], who="template 'studio'")
    assert str(err.value) == (
        "sql:query: field 'colour': column required by template 'studio' is missing "
        "(columns: sku, title)"
    )


@pytest.mark.parametrize(
    "query",
    [
        "DELETE FROM products RETURNING sku",
        "  /* tidy */ delete from products",
        "UPDATE products SET title = 'x' RETURNING sku",
        "DROP TABLE products",
    ],
)
def test_sql_writing_statement_is_refused(products_url: str, query: str) -> None:
    with pytest.raises(CatalogueError) as err:
        list(SqlCatalogue(products_url, query=query))
    assert "read-only" in err.value.reason
    assert count_products(products_url) == 3


def test_sql_writing_cte_is_refused_on_postgres(pg_products: str) -> None:
    query = "WITH d AS (DELETE FROM products RETURNING sku) SELECT sku FROM d"
    with pytest.raises(CatalogueError) as err:
        list(SqlCatalogue(pg_products, query=query))
    assert "tries to write" in err.value.reason
    assert count_products(pg_products) == 3


def test_sql_writing_function_is_stopped_by_read_only_transaction(pg_products: str) -> None:
    # A SELECT that writes through a function passes any word check; only the read-only
    # transaction stops it.
    engine = create_engine(pg_products)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION wipe() RETURNS bigint LANGUAGE sql AS "
                "'DELETE FROM products RETURNING 1'"
            )
        )
    engine.dispose()
    with pytest.raises(CatalogueError) as err:
        list(SqlCatalogue(pg_products, query="SELECT wipe() AS n"))
    assert "tries to write" in err.value.reason
    assert "read-only transaction" in err.value.reason
    assert count_products(pg_products) == 3


def test_sql_table_and_query_exclusive(pg_products: str) -> None:
    with pytest.raises(CatalogueError, match="give --table or --query"):
        SqlCatalogue(pg_products)
    with pytest.raises(CatalogueError, match="give --table or --query"):
        SqlCatalogue(pg_products, table="products", query="SELECT 1")


def test_sql_unreachable_database() -> None:
    with pytest.raises(CatalogueError) as err:
        SqlCatalogue("postgresql+psycopg://postgres:secret@127.0.0.1:1/x", table="products")
    assert err.value.reason.startswith("cannot connect to the database")
    assert "secret" not in str(err.value)


@pytest.fixture
def cursors() -> Iterator[list[Any]]:
    """The DBAPI cursors of every statement any engine runs during the test."""
    seen: list[Any] = []

    def record(conn: Any, cursor: Any, *args: Any) -> None:
        seen.append(cursor)

    event.listen(Engine, "before_cursor_execute", record)
    yield seen
    event.remove(Engine, "before_cursor_execute", record)


def test_sql_streams_through_a_server_side_cursor(
    fresh_database_url: str, cursors: list[Any]
) -> None:
    make_products(fresh_database_url, 5000)
    cat = SqlCatalogue(fresh_database_url, table="products", batch_size=250)
    del cursors[:]
    rows = iter(cat)
    first = next(rows)
    assert first.fields["sku"] == "S00001"
    [cursor] = [c for c in cursors if isinstance(c, psycopg.ServerCursor)]
    assert not cursor.closed
    # After 1,000 rows the server has handed over at most one batch more than that, not
    # the whole table (rownumber counts the rows fetched from the server so far).
    head = [first, *itertools.islice(rows, 999)]
    assert cursor.rownumber is not None
    assert 1000 <= cursor.rownumber <= 1000 + 250
    numbers = [row.line for row in head] + [row.line for row in rows]
    assert numbers == list(range(1, 5001))
    assert cursor.closed


def test_sql_abandoned_iteration_closes_the_cursor(
    fresh_database_url: str, cursors: list[Any]
) -> None:
    make_products(fresh_database_url, 600)
    rows = iter(SqlCatalogue(fresh_database_url, query="SELECT sku FROM products", batch_size=100))
    assert next(rows).line == 1
    [cursor] = [c for c in cursors if isinstance(c, psycopg.ServerCursor) and not c.closed]
    rows.close()  # type: ignore[attr-defined]
    assert cursor.closed


# --- text the database cannot store --------------------------------------------------------


def test_csv_cell_with_a_nul_is_its_row_s_problem(tmp_path: Path) -> None:
    path = write(tmp_path, b"sku,title\nA1,mu\x00g\nA2,lamp\n")
    rows = list(CsvCatalogue(path).rows())
    assert rows[1] == CatalogueRow(line=3, fields={"sku": "A2", "title": "lamp"})
    problem = rows[0].problem
    assert problem is not None and rows[0].fields == {}
    assert str(problem) == (
        f"{path}:2: field 'title': contains a NUL character, which the database cannot store"
    )


def test_csv_header_with_a_nul(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError) as err:
        CsvCatalogue(write(tmp_path, b"sku,ti\x00tle\nA1,x\n"))
    assert (err.value.line, err.value.reason) == (
        1,
        "column 2 of the header contains a NUL character, which the database cannot store",
    )


def test_jsonl_text_the_database_cannot_store(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        '{"sku": "A1", "title": "a\\u0000b"}\n'
        '{"sku": "A2", "title": "a\\ud800b"}\n'
        '{"sku": "A3", "ti\\u0000tle": "x"}\n'
        '{"sku": "A4", "title": "\\ud83d\\ude00"}\n',  # a surrogate pair is one character
    )
    rows = list(JsonlCatalogue(path).rows())
    assert [(r.line, r.problem and (r.problem.field, r.problem.reason)) for r in rows] == [
        (1, ("title", "contains a NUL character, which the database cannot store")),
        (2, ("title", "holds a lone UTF-16 surrogate (\\ud800), not text")),
        (3, (None, "key 'ti\\x00tle' contains a NUL character, which the database cannot store")),
        (4, None),
    ]
    assert rows[3].fields == {"sku": "A4", "title": "\U0001f600"}

from __future__ import annotations

from pathlib import Path

import pytest

from producer.catalogue import CatalogueError, CatalogueRow, CsvCatalogue


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

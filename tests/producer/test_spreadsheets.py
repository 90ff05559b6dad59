"""Spreadsheet catalogues (.xlsx, .xlsm, .ods) read directly, and files whose bytes are
another format than their name says, named as such."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import CatalogueItem, Job
from producer.catalogue import CatalogueError, open_catalogue
from producer.catalogue.spreadsheet import SpreadsheetCatalogue, column_letter
from producer.produce import produce
from tests.producer.spreadsheets import Sheet, write_ods, write_xlsx

PRODUCTS: Sheet = (
    "Products",
    [
        ["sku", "title", "price", "in stock"],
        ["A1", "mug", 12, True],
        [None, None, None, None],  # a blank row: skipped, but it still counts as a row
        [1234, "lamp", 3.5, False],
        ["C3", "  chair  ", None, None],
    ],
)
NOTES: Sheet = ("Notes", [["sku", "note"], ["A1", "fragile"]])

TEMPLATES = """\
key: sku
defaults: {steps: 2, width: 64, height: 64, seeds: 1}
templates:
  studio:
    prompt: "photo of a {{ title }}"
"""


def _write(kind: str, path: Path, sheets: list[Sheet]) -> Path:
    return write_ods(path, sheets) if kind == "ods" else write_xlsx(path, sheets)


def rows_of(source: object) -> list[tuple[int, dict[str, str]]]:
    return [(row.line, row.fields) for row in source]  # type: ignore[attr-defined]


@pytest.mark.parametrize("suffix", [".xlsx", ".xlsm", ".ods", ".XLSX"])
def test_first_sheet_rows_as_text_with_spreadsheet_row_numbers(tmp_path: Path, suffix: str) -> None:
    kind = "ods" if suffix == ".ods" else "xlsx"
    source = open_catalogue(str(_write(kind, tmp_path / f"cat{suffix}", [PRODUCTS, NOTES])))

    assert isinstance(source, SpreadsheetCatalogue)
    assert source.columns == ["sku", "title", "price", "in stock"]
    assert rows_of(source) == [
        (2, {"sku": "A1", "title": "mug", "price": "12", "in stock": "true"}),
        # A SKU typed as a number is the text a person sees, not "1234.0".
        (4, {"sku": "1234", "title": "lamp", "price": "3.5", "in stock": "false"}),
        (5, {"sku": "C3", "title": "chair", "price": "", "in stock": ""}),
    ]


@pytest.mark.parametrize("kind", ["xlsx", "ods"])
def test_sheet_by_name_and_a_missing_sheet_names_the_sheets(tmp_path: Path, kind: str) -> None:
    path = _write(kind, tmp_path / f"cat.{kind}", [PRODUCTS, NOTES])

    assert rows_of(open_catalogue(str(path), sheet="Notes")) == [
        (2, {"sku": "A1", "note": "fragile"})
    ]
    with pytest.raises(CatalogueError, match=r"no sheet 'Prices' \(sheets: Products, Notes\)"):
        open_catalogue(str(path), sheet="Prices")


def test_a_header_further_down_keeps_the_sheet_s_row_numbers(tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "cat.xlsx", [PRODUCTS], first_row=4)
    source = open_catalogue(str(path))
    assert [line for line, _ in rows_of(source)] == [5, 7, 8]
    with pytest.raises(CatalogueError) as missing:
        source.require_columns(["colour"], who="template 'studio'")
    assert missing.value.line == 4


@pytest.mark.parametrize(
    ("rows", "line", "message"),
    [
        ([["sku", None, "title"], ["A", "x", "y"]], 1, "the header's cell B1 is empty"),
        ([["sku", "sku"], ["A", "B"]], 1, "duplicate column name (cell A1 and cell B1)"),
        ([["sku", "nul\x00"], ["A", "B"]], 1, "the header's cell B1 contains a NUL"),
        ([[None], [None]], 1, "sheet 'S' is empty"),
    ],
)
def test_header_problems_name_the_cell(
    tmp_path: Path, rows: list[list[object]], line: int, message: str
) -> None:
    path = write_xlsx(tmp_path / "cat.xlsx", [("S", rows)])  # type: ignore[list-item]
    with pytest.raises(CatalogueError) as info:
        open_catalogue(str(path))
    assert info.value.line == line
    assert message in str(info.value)


def test_a_value_beyond_the_header_is_that_row_s_problem(tmp_path: Path) -> None:
    rows: list[list[object]] = [["sku", "title"], ["A", "mug"], ["B", "lamp", "stray"], ["C", "x"]]
    source = open_catalogue(str(write_xlsx(tmp_path / "cat.xlsx", [("S", rows)])))  # type: ignore[list-item]

    read = list(source.rows())

    assert [(row.line, row.problem is None) for row in read] == [(2, True), (3, False), (4, True)]
    assert "cell C3 has a value but its column has no name" in str(read[1].problem)


def test_column_letters() -> None:
    assert [column_letter(i) for i in (0, 25, 26, 27, 701, 702)] == [
        "A",
        "Z",
        "AA",
        "AB",
        "ZZ",
        "AAA",
    ]


def test_csv_options_are_refused_for_a_spreadsheet_and_sheet_for_csv(tmp_path: Path) -> None:
    xlsx = write_xlsx(tmp_path / "cat.xlsx", [PRODUCTS])
    with pytest.raises(CatalogueError, match="--encoding and --delimiter apply only to text"):
        open_catalogue(str(xlsx), delimiter=";")
    csv = tmp_path / "cat.csv"
    csv.write_text("sku\nA\n")
    with pytest.raises(CatalogueError, match="--sheet applies only to spreadsheets"):
        open_catalogue(str(csv), sheet="Products")


# --------------------------------------------------------------------------- other formats


def _png() -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (4, 4)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (4, 4)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _zip(tmp_path: Path) -> bytes:
    path = tmp_path / "any.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("catalogue.csv", "sku\nA\n")
    return path.read_bytes()


@pytest.mark.parametrize(
    ("make", "named", "expected"),
    [
        (
            lambda t: write_xlsx(t / "w.xlsx", [PRODUCTS]).read_bytes(),
            "cat.csv",
            "an Excel workbook",
        ),
        (lambda t: write_ods(t / "w.ods", [PRODUCTS]).read_bytes(), "cat.csv", "an OpenDocument"),
        (lambda t: write_xlsx(t / "w.xlsx", [PRODUCTS]).read_bytes(), "cat.jsonl", "an Excel"),
        (_zip, "cat.csv", "a zip archive"),
        (lambda t: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "cat.csv", "a PDF document"),
        (lambda t: _png(), "cat.csv", "a PNG image"),
        (lambda t: _jpeg(), "cat.txt", "a JPEG image"),
        (lambda t: b"GIF89a\x01\x00\x01\x00", "cat.csv", "a GIF image"),
        (lambda t: b"RIFF\x10\x00\x00\x00WEBPVP8 ", "cat.csv", "a WebP image"),
        (lambda t: gzip.compress(b"sku\nA\n"), "cat.csv", "a gzip archive"),
        (lambda t: b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100), "cat.csv", "an old Excel"),
        (lambda t: "sku,title\nA,mug\n".encode("utf-16"), "cat.csv", "UTF-16 text"),
        (lambda t: "sku,title\nA,mug\n".encode("utf-16-le"), "cat.csv", "UTF-16-LE text"),
        (lambda t: "sku,title\nA,mug\n".encode("utf-16-be"), "cat.csv", "UTF-16-BE text"),
        (lambda t: '{"sku": "A"}\n'.encode("utf-16"), "cat.jsonl", "UTF-16 text"),
    ],
    ids=[
        "xlsx-as-csv",
        "ods-as-csv",
        "xlsx-as-jsonl",
        "zip",
        "pdf",
        "png",
        "jpeg",
        "gif",
        "webp",
        "gzip",
        "xls",
        "utf16-bom",
        "utf16le",
        "utf16be",
        "utf16-jsonl",
    ],
)
def test_a_file_of_another_format_is_named_as_such(
    tmp_path: Path, make: object, named: str, expected: str
) -> None:
    path = tmp_path / named
    path.write_bytes(make(tmp_path))  # type: ignore[operator]

    with pytest.raises(CatalogueError) as info:
        open_catalogue(str(path))

    message = str(info.value)
    assert expected in message
    assert "not valid utf-8" not in message
    assert message.startswith(f"{path}: this file is")


def test_utf16_text_read_with_the_encoding_it_names(tmp_path: Path) -> None:
    path = tmp_path / "cat.csv"
    path.write_bytes("sku,title\nA,mug\n".encode("utf-16"))
    with pytest.raises(CatalogueError, match="pass --encoding utf-16"):
        open_catalogue(str(path))
    assert rows_of(open_catalogue(str(path), encoding="utf-16")) == [
        (2, {"sku": "A", "title": "mug"})
    ]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"sku,title\nA,mug\n", r"not a spreadsheet \(it reads as text"),
        (b"%PDF-1.4 ...", "this file is a PDF document, not a spreadsheet"),
        (b"PK\x03\x04broken", "a zip archive, not a spreadsheet"),
    ],
    ids=["csv-as-xlsx", "pdf-as-xlsx", "broken-zip"],
)
def test_a_spreadsheet_name_on_other_bytes(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "cat.xlsx"
    path.write_bytes(content)
    with pytest.raises(CatalogueError, match=expected):
        open_catalogue(str(path))


def test_format_overrides_the_name(tmp_path: Path) -> None:
    workbook = write_xlsx(tmp_path / "export.dat", [PRODUCTS])
    assert len(rows_of(open_catalogue(str(workbook), format="spreadsheet"))) == 3
    text = tmp_path / "export.xlsx"
    text.write_text("sku,title\nA,mug\n")
    assert rows_of(open_catalogue(str(text), format="csv")) == [(2, {"sku": "A", "title": "mug"})]


@pytest.mark.parametrize("location", ["folder", "missing.csv", "loop.csv"])
def test_a_path_that_is_no_catalogue_file(tmp_path: Path, location: str) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "loop.csv").symlink_to(tmp_path / "loop.csv")
    with pytest.raises(CatalogueError) as info:
        open_catalogue(str(tmp_path / location))
    assert str(info.value).startswith(str(tmp_path / location))


# --------------------------------------------------------------------------- produce


@pytest.mark.parametrize("kind", ["xlsx", "ods"])
def test_produce_from_a_spreadsheet(tmp_path: Path, db_session: Session, kind: str) -> None:
    templates = tmp_path / "templates.yaml"
    templates.write_text(TEMPLATES.replace("{{ title }}", "{{ title }}, {{ price }}"))
    sheets = [NOTES, PRODUCTS]
    catalogue = _write(kind, tmp_path / f"cat.{kind}", sheets)

    report = produce(
        db_session,
        catalogue_path=catalogue,
        templates_path=templates,
        sheet="Products",
        run_name=f"sheet-{kind}",
    )

    # C3 has no price: a bad row, on the sheet's row 5.
    assert (report.items, report.jobs_new, report.rows_skipped) == (2, 2, 1)
    assert [(p.line, p.field) for p in report.problems] == [(5, "price")]
    prompts = db_session.scalars(select(Job.prompt).order_by(Job.id)).all()
    assert prompts == ["photo of a mug, 12", "photo of a lamp, 3.5"]
    sources = set(db_session.scalars(select(CatalogueItem.source)).all())
    assert sources == {f"cat.{kind}"}

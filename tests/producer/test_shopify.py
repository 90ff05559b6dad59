"""Shopify product exports: rows per variant and per extra image read as products (or
variants), continuation rows filled from the product row, image URLs collected, and every
item on the line it came from."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import CatalogueItem, Job
from producer.catalogue import CatalogueError, open_catalogue
from producer.catalogue.csv import CsvCatalogue
from producer.catalogue.shopify import IMAGE_URLS, VARIANT_SKUS, ShopifyCatalogue
from producer.produce import produce
from tests.producer.spreadsheets import write_xlsx

HEADER = [
    "Handle",
    "Title",
    "Body (HTML)",
    "Vendor",
    "Type",
    "Tags",
    "Published",
    "Option1 Name",
    "Option1 Value",
    "Option2 Name",
    "Option2 Value",
    "Variant SKU",
    "Variant Price",
    "Image Src",
    "Image Position",
    "Image Alt Text",
    "Variant Image",
    "Status",
]


def row(**cells: str) -> list[str]:
    names = {name.replace(" ", "_").replace("(", "").replace(")", ""): name for name in HEADER}
    values = {names[key]: value for key, value in cells.items()}
    return [values.get(name, "") for name in HEADER]


# A tee with two colours and two sizes (4 variants, 3 images: one on an image-only row), a
# mug with one variant and an extra image, and a poster with a variant image of its own.
ROWS = [
    row(
        Handle="tee",
        Title="Organic tee",
        Body_HTML="<p>Soft</p>",
        Vendor="Acme",
        Type="Shirt",
        Tags="cotton, summer",
        Published="true",
        Option1_Name="Colour",
        Option1_Value="Red",
        Option2_Name="Size",
        Option2_Value="S",
        Variant_SKU="TEE-R-S",
        Variant_Price="20.00",
        Image_Src="https://cdn.example/tee-front.jpg",
        Image_Position="1",
        Image_Alt_Text="front",
        Status="active",
    ),
    row(
        Handle="tee",
        Option1_Value="Red",
        Option2_Value="M",
        Variant_SKU="TEE-R-M",
        Variant_Price="21.00",
        Image_Src="https://cdn.example/tee-back.jpg",
        Image_Position="2",
    ),
    row(Handle="tee", Option1_Value="Blue", Option2_Value="S", Variant_SKU="TEE-B-S"),
    row(Handle="tee", Image_Src="https://cdn.example/tee-side.jpg", Image_Position="3"),
    row(
        Handle="tee",
        Option1_Value="Blue",
        Option2_Value="M",
        Variant_SKU="TEE-B-M",
        Variant_Image="https://cdn.example/tee-blue.jpg",
    ),
    row(
        Handle="mug",
        Title="Enamel mug",
        Vendor="Acme",
        Type="Mug",
        Option1_Name="Title",
        Option1_Value="Default Title",
        Variant_SKU="MUG-1",
        Variant_Price="9.50",
        Image_Src="https://cdn.example/mug.jpg",
        Image_Position="1",
        Status="active",
    ),
    row(Handle="mug", Image_Src="https://cdn.example/mug-2.jpg", Image_Position="2"),
    row(
        Handle="poster",
        Title="Mountain poster",
        Vendor="Print Co",
        Type="Poster",
        Option1_Name="Size",
        Option1_Value="A3",
        Variant_SKU="POS-A3",
        Image_Src="https://cdn.example/poster.jpg",
        Status="draft",
    ),
]


def export(rows: list[list[str]] = ROWS, header: list[str] = HEADER) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write(tmp_path: Path, text: str, name: str = "products_export_1.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def items(source: object) -> list[tuple[int, dict[str, str]]]:
    return [(r.line, r.fields) for r in source]  # type: ignore[attr-defined]


def test_recognised_by_its_header_and_read_as_products(tmp_path: Path) -> None:
    source = open_catalogue(str(write(tmp_path, export())), key="Handle")

    assert isinstance(source, ShopifyCatalogue)
    read = items(source)
    assert [(line, fields["Handle"]) for line, fields in read] == [
        (2, "tee"),
        (7, "mug"),
        (9, "poster"),
    ]
    tee = read[0][1]
    assert (tee["Title"], tee["Vendor"], tee["Variant SKU"]) == ("Organic tee", "Acme", "TEE-R-S")
    assert tee[IMAGE_URLS] == (
        "https://cdn.example/tee-front.jpg https://cdn.example/tee-back.jpg "
        "https://cdn.example/tee-side.jpg https://cdn.example/tee-blue.jpg"
    )
    assert tee[VARIANT_SKUS] == "TEE-R-S, TEE-R-M, TEE-B-S, TEE-B-M"
    assert (tee["Option1 Values"], tee["Option2 Values"]) == ("Red, Blue", "S, M")
    assert read[1][1][IMAGE_URLS] == "https://cdn.example/mug.jpg https://cdn.example/mug-2.jpg"
    assert read[2][1][VARIANT_SKUS] == "POS-A3"


def test_keyed_by_variant_sku_every_variant_is_an_item_filled_from_its_product(
    tmp_path: Path,
) -> None:
    read = items(open_catalogue(str(write(tmp_path, export())), key="Variant SKU"))

    # The image-only rows (lines 5 and 8) are no items; every variant keeps its own line.
    assert [(line, fields["Variant SKU"]) for line, fields in read] == [
        (2, "TEE-R-S"),
        (3, "TEE-R-M"),
        (4, "TEE-B-S"),
        (6, "TEE-B-M"),
        (7, "MUG-1"),
        (9, "POS-A3"),
    ]
    blue_m = read[3][1]
    # Product fields come from the product row; variant and image fields stay the row's own.
    assert (blue_m["Title"], blue_m["Tags"], blue_m["Status"]) == (
        "Organic tee",
        "cotton, summer",
        "active",
    )
    assert (blue_m["Option1 Name"], blue_m["Option1 Value"]) == ("Colour", "Blue")
    assert (blue_m["Variant Price"], blue_m["Image Src"]) == ("", "")
    assert blue_m["Variant Image"] == "https://cdn.example/tee-blue.jpg"
    assert blue_m[IMAGE_URLS].split()[0] == "https://cdn.example/tee-front.jpg"
    assert read[1][1]["Image Src"] == "https://cdn.example/tee-back.jpg"


@pytest.mark.parametrize(
    ("key", "per_variant"),
    [("Handle", False), ("Title", False), ("Variant SKU", True), ("Variant Barcode", True)],
)
def test_the_template_key_decides_products_or_variants(
    tmp_path: Path, key: str, per_variant: bool
) -> None:
    source = open_catalogue(str(write(tmp_path, export())), key=key)
    assert isinstance(source, ShopifyCatalogue)
    assert source.per_variant is per_variant


def test_a_product_whose_rows_are_apart_and_an_empty_handle_are_bad_rows(tmp_path: Path) -> None:
    rows = [*ROWS[:2], ROWS[5], ROWS[2], row(Handle="", Variant_SKU="X"), ROWS[7]]
    source = open_catalogue(str(write(tmp_path, export(rows))), key="Handle")

    read = list(source.rows())

    assert [(r.line, r.fields.get("Handle"), r.problem is not None) for r in read] == [
        (2, "tee", False),
        (4, "mug", False),
        (5, None, True),
        (6, None, True),
        (7, "poster", False),
    ]
    assert "product 'tee' continues here, but its rows ended on line 3" in str(read[2].problem)
    assert "the Handle is empty" in str(read[3].problem)
    assert read[2].problem is not None and read[2].problem.field == "Handle"


def test_a_broken_row_inside_a_product_is_reported_on_its_line(tmp_path: Path) -> None:
    text = export()
    lines = text.splitlines(keepends=True)
    lines[2] = "tee,too,few\n"  # line 3: a ragged row between the tee's rows
    source = open_catalogue(str(write(tmp_path, "".join(lines))), key="Variant SKU")

    read = list(source.rows())

    assert [(r.line, r.problem is not None) for r in read][:4] == [
        (3, True),
        (2, False),
        (4, False),
        (6, False),
    ]


def test_format_insists_or_turns_it_off(tmp_path: Path) -> None:
    path = write(tmp_path, export())
    plain = open_catalogue(str(path), format="csv", key="Handle")
    assert isinstance(plain, CsvCatalogue)
    assert len(items(plain)) == len(ROWS)

    no_handle = write(tmp_path, "sku,title\nA,mug\n", "other.csv")
    assert isinstance(open_catalogue(str(no_handle)), CsvCatalogue)
    with pytest.raises(CatalogueError, match="not a Shopify product export"):
        open_catalogue(str(no_handle), format="shopify")
    with pytest.raises(CatalogueError, match="a CSV file or spreadsheet"):
        open_catalogue(str(write(tmp_path, "{}\n", "x.jsonl")), format="shopify")


def test_a_shopify_export_saved_as_a_workbook(tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "products.xlsx", [("Products", [HEADER, *ROWS])])
    source = open_catalogue(str(path), key="Variant SKU")
    assert isinstance(source, ShopifyCatalogue)
    assert [line for line, _ in items(source)] == [2, 3, 4, 6, 7, 9]


def test_required_columns_include_what_the_reader_collects(tmp_path: Path) -> None:
    source = open_catalogue(str(write(tmp_path, export())), key="Handle")
    source.require_columns(["Title", IMAGE_URLS, VARIANT_SKUS], who="template 'studio'")
    with pytest.raises(CatalogueError, match="column required by template 'studio' is missing"):
        source.require_columns(["Colour"], who="template 'studio'")


# --------------------------------------------------------------------------- produce

TEMPLATES = """\
key: {key}
defaults: {{steps: 2, width: 64, height: 64, seeds: 1}}
templates:
  studio:
    prompt: "{{{{ Title }}}} by {{{{ Vendor }}}}, {prompt_tail}"
"""


def _templates(tmp_path: Path, key: str, tail: str) -> Path:
    path = tmp_path / "templates.yaml"
    path.write_text(TEMPLATES.format(key=key, prompt_tail=tail))
    return path


def test_produce_one_item_per_product(tmp_path: Path, db_session: Session) -> None:
    templates = _templates(tmp_path, "Handle", "{{ Type }}")

    report = produce(
        db_session,
        catalogue_path=write(tmp_path, export()),
        templates_path=templates,
        run_name="shop-products",
    )

    assert (report.rows, report.items, report.rows_skipped, report.jobs_new) == (3, 3, 0, 3)
    keys = db_session.scalars(select(CatalogueItem.external_key).order_by(CatalogueItem.id))
    assert list(keys) == ["tee", "mug", "poster"]
    prompts = db_session.scalars(select(Job.prompt).order_by(Job.id)).all()
    assert prompts == [
        "Organic tee by Acme, Shirt",
        "Enamel mug by Acme, Mug",
        "Mountain poster by Print Co, Poster",
    ]
    tee = db_session.scalars(
        select(CatalogueItem.fields).where(CatalogueItem.external_key == "tee")
    ).one()
    assert len(tee[IMAGE_URLS].split()) == 4


def test_produce_one_item_per_variant_and_bad_rows_on_their_lines(
    tmp_path: Path, db_session: Session
) -> None:
    # The tags are on the tee's first row only; its other variants take them from there.
    # The mug and the poster have none: bad rows, on the lines of their variants.
    templates = _templates(tmp_path, "Variant SKU", "{{ Tags }}")

    report = produce(
        db_session,
        catalogue_path=write(tmp_path, export()),
        templates_path=templates,
        run_name="shop-variants",
    )

    assert (report.rows, report.items, report.rows_skipped) == (6, 4, 2)
    assert [(p.line, p.field) for p in report.problems] == [(7, "Tags"), (9, "Tags")]
    keys = db_session.scalars(select(CatalogueItem.external_key).order_by(CatalogueItem.id))
    assert list(keys) == ["TEE-R-S", "TEE-R-M", "TEE-B-S", "TEE-B-M"]
    prompts = set(db_session.scalars(select(Job.prompt)).all())
    assert prompts == {"Organic tee by Acme, cotton, summer"}
    # One job per variant, each with its own seeds (the seeds derive from the item's key).
    seeds = db_session.scalars(select(Job.seeds).order_by(Job.id)).all()
    assert len({tuple(s) for s in seeds}) == 4

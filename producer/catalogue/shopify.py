"""Shopify product exports, read as products (or variants) rather than as rows.

Shopify's product CSV has one row per variant and per extra image, all sharing the product's
``Handle``; the product's own fields (Title, Body (HTML), Vendor, Type, Tags, Option names,
...) are filled in only on its first row. Read row by row, the rows after the first are
duplicate keys with empty titles. Here the rows of one product are read together (Shopify
writes them one after the other, so one product at a time is held) and become:

- one item per product when the template file's key is a product column (``Handle``): the
  product row's fields, with every image URL and variant SKU of the product collected;
- one item per variant when the key is a variant column (``Variant SKU``, ``Variant
  Barcode``, ...): each variant row, its empty product fields filled from the product row,
  with the product's image URLs collected.

Rows that only add an image are not items; every item keeps the line of the row it came from
(a product's: its first row), so problems point where a person looks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from producer.catalogue.common import CatalogueError, CatalogueRow, raise_problems

HANDLE = "Handle"
# Columns whose presence (with Handle and Title) marks a Shopify product export.
_MARKERS = ("Variant SKU", "Variant Price", "Image Src", "Option1 Name", "Body (HTML)")
IMAGE_COLUMNS = frozenset({"Image Src", "Image Position", "Image Alt Text"})
# Shopify's per-variant columns besides "Variant ...": option values, cost, market prices.
_VARIANT_COLUMN = re.compile(
    r"Variant .+|Option[1-3] (?:Value|Linked To)|Cost per item|"
    r"(?:Price|Compare At Price|Included) / .+"
)
# What the reader adds to each item, collected over the product's rows.
IMAGE_URLS = "Image Srcs"  # every Image Src and Variant Image, space-separated
VARIANT_SKUS = "Variant SKUs"  # every variant's SKU, comma-separated
_OPTION_VALUES = "Option{n} Values"  # an option's values over the variants, comma-separated


def looks_like_shopify(columns: Iterable[str]) -> bool:
    names = set(columns)
    return {HANDLE, "Title"} <= names and any(marker in names for marker in _MARKERS)


def is_variant_column(name: str) -> bool:
    return _VARIANT_COLUMN.fullmatch(name) is not None


def collected_columns(columns: list[str]) -> list[str]:
    """The columns this reader adds, those the export does not have already."""
    added = [IMAGE_URLS, VARIANT_SKUS]
    added += [_OPTION_VALUES.format(n=n) for n in (1, 2, 3) if f"Option{n} Name" in columns]
    return [name for name in added if name not in columns]


class HeaderSource(Protocol):
    """What this reader needs of the catalogue under it (a CSV file or a spreadsheet)."""

    @property
    def path(self) -> str | os.PathLike[str]: ...

    @property
    def name(self) -> str: ...

    @property
    def columns(self) -> list[str]: ...

    def rows(self) -> Generator[CatalogueRow]: ...

    def require_columns(
        self, needed: Iterable[str], *, who: str, every_row: bool = True
    ) -> None: ...


@dataclass
class _Product:
    """The rows of one product read so far."""

    handle: str
    first: CatalogueRow
    variants: list[CatalogueRow] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    last_line: int = 0

    def add(self, row: CatalogueRow) -> None:
        self.last_line = row.line
        fields = row.fields
        for column in ("Image Src", "Variant Image"):
            url = fields.get(column, "")
            if url and url not in self.images:
                self.images.append(url)
        if row is self.first or any(
            value and is_variant_column(name) for name, value in fields.items()
        ):
            self.variants.append(row)


class ShopifyCatalogue:
    """A Shopify product export over a header catalogue (CSV or spreadsheet); ``key`` is the
    template file's key column, which decides between items per product and per variant."""

    def __init__(self, inner: HeaderSource, *, key: str) -> None:
        self.inner = inner
        self.path = inner.path
        self.name = inner.name
        source_columns = list(inner.columns)
        if HANDLE not in source_columns:
            raise CatalogueError(
                self.path,
                1,
                HANDLE,
                "not a Shopify product export: the header has no 'Handle' column",
            )
        self._added = collected_columns(source_columns)
        self.columns: list[str] = source_columns + self._added
        self.per_variant = is_variant_column(key)
        self._product_columns = [
            name
            for name in source_columns
            if name != HANDLE and name not in IMAGE_COLUMNS and not is_variant_column(name)
        ]

    def __iter__(self) -> Iterator[CatalogueRow]:
        return raise_problems(self.rows())

    def rows(self) -> Generator[CatalogueRow]:
        """The items of every product, in the file's order; a bad row carries its problem."""
        product: _Product | None = None
        # Where each product's rows ended: a Handle seen again later is reported.
        ended: dict[str, int] = {}
        inner = self.inner.rows()
        try:
            for row in inner:
                if row.problem is not None:
                    yield row
                    continue
                handle = row.fields.get(HANDLE, "")
                if product is not None and handle == product.handle:
                    product.add(row)
                    continue
                if product is not None:
                    ended[product.handle] = product.last_line
                    yield from self._items(product)
                    product = None
                if not handle:
                    yield self._problem(row, "the Handle is empty (every row names its product)")
                elif handle in ended:
                    yield self._problem(
                        row,
                        f"product {handle!r} continues here, but its rows ended on line "
                        f"{ended[handle]}; a product's rows must be together",
                    )
                else:
                    product = _Product(handle, row)
                    product.add(row)
            if product is not None:
                yield from self._items(product)
        finally:
            inner.close()

    def _problem(self, row: CatalogueRow, reason: str) -> CatalogueRow:
        return CatalogueRow(row.line, {}, CatalogueError(self.path, row.line, HANDLE, reason))

    def _items(self, product: _Product) -> Iterator[CatalogueRow]:
        collected = self._collected(product)
        if not self.per_variant:
            yield CatalogueRow(product.first.line, {**product.first.fields, **collected})
            return
        base = product.first.fields
        images = {IMAGE_URLS: collected[IMAGE_URLS]} if IMAGE_URLS in collected else {}
        for row in product.variants:
            fields = dict(row.fields)
            for name in self._product_columns:
                if not fields.get(name):
                    fields[name] = base.get(name, "")
            yield CatalogueRow(row.line, {**fields, **images})

    def _collected(self, product: _Product) -> dict[str, str]:
        values: dict[str, list[str]] = {name: [] for name in self._added}
        for row in product.variants:
            for name, column in self._collecting():
                value = row.fields.get(column, "")
                if name in values and value and value not in values[name]:
                    values[name].append(value)
        values_text = {name: ", ".join(found) for name, found in values.items()}
        if IMAGE_URLS in values:
            values_text[IMAGE_URLS] = " ".join(product.images)
        return values_text

    @staticmethod
    def _collecting() -> Iterator[tuple[str, str]]:
        yield VARIANT_SKUS, "Variant SKU"
        for n in (1, 2, 3):
            yield _OPTION_VALUES.format(n=n), f"Option{n} Value"

    def require_columns(self, needed: Iterable[str], *, who: str, every_row: bool = True) -> None:
        added = set(self._added)
        self.inner.require_columns(
            [name for name in needed if name not in added], who=who, every_row=every_row
        )

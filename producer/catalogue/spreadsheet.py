"""Spreadsheet catalogues (.xlsx, .xlsm, .ods): one sheet, a header row, then one item per row.

Read with python-calamine (Rust's calamine), which hands out a sheet's rows one at a time as
Python values, so a large sheet is never turned into Python objects all at once. Rows are
numbered as the spreadsheet numbers them (the header's row is usually 1), so an error points
at the row a person sees in Excel or LibreOffice.
"""

from __future__ import annotations

import datetime
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path
from typing import Any

import python_calamine

from db.limits import unstorable
from producer.catalogue.common import (
    CatalogueError,
    CatalogueRow,
    UnsupportedValue,
    cell_text,
    raise_problems,
    require_columns_in,
)
from producer.catalogue.sniff import content_kind, read_head


def column_letter(index: int) -> str:
    """The spreadsheet's name of 0-based column ``index``: A, B, ..., Z, AA, ..."""
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = chr(65 + rest) + name
    return name


def spreadsheet_text(value: Any) -> str:
    """The text a template sees for one cell: numbers as a person typed them (a whole
    number has no ".0": a SKU typed as 1234 is "1234"), dates in ISO form."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    if isinstance(value, datetime.timedelta):
        return str(value)
    return cell_text(value)


def _blank(cells: list[Any]) -> bool:
    return all(cell is None or (isinstance(cell, str) and not cell.strip()) for cell in cells)


class SpreadsheetCatalogue:
    """One sheet of a workbook: ``sheet`` by name (default: the first sheet)."""

    def __init__(self, path: Path, *, sheet: str | None = None) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self._check_bytes()
        self._workbook = self._open()
        names = self._workbook.sheet_names
        if sheet is None:
            if not names:
                raise CatalogueError(self.path, None, None, "the workbook has no sheets")
            sheet = names[0]
        elif sheet not in names:
            raise CatalogueError(
                self.path, None, None, f"no sheet {sheet!r} (sheets: {', '.join(names)})"
            )
        self.sheet = sheet
        self.columns: list[str] = []
        self._header_line = 1
        self._first_column = 0
        for line, cells in self._records(with_header=True):
            self._header_line = line
            self.columns = self._check_header(line, cells)
            break
        else:
            raise CatalogueError(self.path, 1, None, f"sheet {sheet!r} is empty")

    def _check_bytes(self) -> None:
        head = read_head(self.path)
        kind = content_kind(self.path, head)
        if kind is None:
            raise CatalogueError(
                self.path,
                None,
                None,
                "this file is not a spreadsheet (it reads as text: name it .csv or .jsonl, "
                "or pass --format csv)",
            )
        if "workbook (.xlsx" not in kind and "(.ods)" not in kind:
            raise CatalogueError(self.path, None, None, f"this file is {kind}, not a spreadsheet")

    def _open(self) -> python_calamine.CalamineWorkbook:
        try:
            return python_calamine.CalamineWorkbook.from_path(str(self.path))
        except python_calamine.PasswordError:
            raise CatalogueError(
                self.path, None, None, "the workbook is password-protected"
            ) from None
        except (python_calamine.CalamineError, OSError) as exc:
            raise CatalogueError(
                self.path, None, None, f"not a readable spreadsheet: {exc}"
            ) from None

    def _sheet(self) -> python_calamine.CalamineSheet:
        try:
            sheet = self._workbook.get_sheet_by_name(self.sheet)
        except python_calamine.CalamineError as exc:
            raise CatalogueError(
                self.path, None, None, f"sheet {self.sheet!r} cannot be read: {exc}"
            ) from None
        self._first_column = sheet.start[1] if sheet.start is not None else 0
        return sheet

    def _records(self, *, with_header: bool) -> Iterator[tuple[int, list[Any]]]:
        """(spreadsheet row number, cells) of every non-blank row, header first."""
        header_seen = False
        # calamine hands out rows from the sheet's first row, blank ones included, so the
        # count is the spreadsheet's own row number.
        for number, cells in enumerate(self._sheet().iter_rows(), start=1):
            if _blank(cells):
                continue
            if not header_seen:
                header_seen = True
                if not with_header:
                    continue
            yield number, cells

    def _check_header(self, line: int, cells: list[Any]) -> list[str]:
        texts = []
        for position, cell in enumerate(cells):
            try:
                texts.append(spreadsheet_text(cell).strip())
            except UnsupportedValue as exc:
                raise CatalogueError(
                    self.path, line, None, f"the header's cell {self._cell(line, position)} {exc}"
                ) from None
        while texts and not texts[-1]:
            texts.pop()  # columns the sheet's used range takes in, with no name
        seen: dict[str, str] = {}
        for position, name in enumerate(texts):
            where = f"cell {self._cell(line, position)}"
            if not name:
                raise CatalogueError(self.path, line, None, f"the header's {where} is empty")
            if (reason := unstorable(name)) is not None:
                raise CatalogueError(self.path, line, None, f"the header's {where} {reason}")
            if name in seen:
                raise CatalogueError(
                    self.path, line, name, f"duplicate column name ({seen[name]} and {where})"
                )
            seen[name] = where
        return texts

    def _cell(self, line: int, position: int) -> str:
        return f"{column_letter(self._first_column + position)}{line}"

    def __iter__(self) -> Iterator[CatalogueRow]:
        return raise_problems(self.rows())

    def rows(self) -> Generator[CatalogueRow]:
        """Every row, bad ones carrying their ``problem``; file-level errors raise."""
        width = len(self.columns)
        for line, cells in self._records(with_header=False):
            try:
                fields = self._fields(line, cells, width)
            except CatalogueError as problem:
                yield CatalogueRow(line=line, fields={}, problem=problem)
                continue
            yield CatalogueRow(line=line, fields=fields)

    def _fields(self, line: int, cells: list[Any], width: int) -> dict[str, str]:
        for position in range(width, len(cells)):
            if not _blank([cells[position]]):
                raise CatalogueError(
                    self.path,
                    line,
                    None,
                    f"cell {self._cell(line, position)} has a value but its column has no "
                    "name in the header",
                )
        fields: dict[str, str] = {}
        for position, name in enumerate(self.columns):
            value = cells[position] if position < len(cells) else ""
            try:
                fields[name] = spreadsheet_text(value).strip()
            except UnsupportedValue as exc:
                raise CatalogueError(self.path, line, name, str(exc)) from None
        return fields

    def require_columns(self, needed: Iterable[str], *, who: str, every_row: bool = True) -> None:
        """Fails on the first column in ``needed`` that the header lacks."""
        require_columns_in(self.path, self._header_line, self.columns, needed, who)

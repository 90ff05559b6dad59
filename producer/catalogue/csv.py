"""CSV catalogues: a header row, then one item per record."""

from __future__ import annotations

import codecs
import csv
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path

from db.limits import unstorable
from producer.catalogue.common import (
    CatalogueError,
    CatalogueRow,
    raise_problems,
    require_columns_in,
)
from producer.catalogue.lines import LineReader, check_encoding, open_binary


def _blank(cells: list[str]) -> bool:
    # Blank lines, and rows of empty cells such as the ",,," rows spreadsheets leave at the
    # end of an export, carry no data; skipping them is friendlier than a ragged-row error.
    return all(not cell.strip() for cell in cells)


# Delimiters the sniffer may pick; anything else must be given explicitly.
SNIFF_DELIMITERS = ",;\t|"
SNIFF_BYTES = 16 * 1024


def _sniff_delimiter(path: Path, encoding: str) -> str:
    """Guesses the delimiter from the start of the file; "," when unsure."""
    with open_binary(path) as raw:
        data = raw.read(SNIFF_BYTES)
        truncated = bool(raw.read(1))
    # Bad bytes are reported (with their line) by the real read; here they only must not
    # stop the guess.  final=False keeps a multi-byte character cut at the end out.
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    sample = decoder.decode(data, final=not truncated)
    if truncated and "\n" in sample:
        # A cut-off last line would skew the per-line delimiter counts.
        sample = sample[: sample.rindex("\n") + 1]
    try:
        delimiter = csv.Sniffer().sniff(sample, delimiters=SNIFF_DELIMITERS).delimiter
    except csv.Error:
        return ","
    # A single-column catalogue has no delimiter in its header; a ";" or "|" inside its
    # values must not be taken for one.
    header = sample.split("\n", 1)[0]
    return delimiter if delimiter in header else ","


class CsvCatalogue:
    """A catalogue CSV whose header is read on construction and whose rows are streamed.

    ``delimiter`` None means: sniff it from the first few KB (one of ``,;\\t|``), and fall
    back to "," when the sample is ambiguous.
    """

    def __init__(
        self, path: Path, *, encoding: str = "utf-8-sig", delimiter: str | None = None
    ) -> None:
        self.path = Path(path)
        self.name = self.path.name
        # utf-8-sig reads plain UTF-8 too and drops the BOM Excel puts in front.
        self.encoding = encoding
        check_encoding(self.path, encoding)
        if delimiter is None:
            delimiter = _sniff_delimiter(self.path, encoding)
        elif len(delimiter) != 1 or delimiter in '"\r\n':
            raise CatalogueError(
                self.path, None, None, f"delimiter must be one character, not {delimiter!r}"
            )
        self.delimiter = delimiter
        # Read the header now so a broken file fails before any work is queued.
        self.columns: list[str] = []
        for line, cells in self._records(with_header=True):
            self.columns = self._check_header(line, cells)
            break
        else:
            raise CatalogueError(self.path, 1, None, "file is empty")

    def _check_header(self, line: int, cells: list[str]) -> list[str]:
        columns = [cell.strip() for cell in cells]
        seen: dict[str, int] = {}
        for position, name in enumerate(columns, start=1):
            if not name:
                raise CatalogueError(
                    self.path, line, None, f"column {position} of the header has an empty name"
                )
            reason = unstorable(name)
            if reason is not None:
                raise CatalogueError(
                    self.path, line, None, f"column {position} of the header {reason}"
                )
            if name in seen:
                raise CatalogueError(
                    self.path,
                    line,
                    name,
                    f"duplicate column name (columns {seen[name]} and {position})",
                )
            seen[name] = position
        return columns

    def _records(self, *, with_header: bool) -> Iterator[tuple[int, list[str]]]:
        """Yields (start line, cells) for each non-blank record, header first."""
        with open_binary(self.path) as raw:
            source = LineReader(self.path, raw, self.encoding)
            reader = csv.reader(source, delimiter=self.delimiter, strict=True)
            header_seen = False
            while True:
                # The record starts on the line after the last one the previous record used.
                start = source.line + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise CatalogueError(self.path, start, None, f"malformed CSV: {exc}") from None
                if _blank(cells):
                    continue
                if not header_seen:
                    header_seen = True
                    if not with_header:
                        continue
                yield start, cells

    def __iter__(self) -> Iterator[CatalogueRow]:
        return raise_problems(self.rows())

    def rows(self) -> Generator[CatalogueRow]:
        """Every record, bad ones carrying their ``problem``; file-level errors raise."""
        width = len(self.columns)
        for line, cells in self._records(with_header=False):
            if len(cells) != width:
                problem = CatalogueError(
                    self.path,
                    line,
                    None,
                    f"row has {len(cells)} cells but the header has {width} columns",
                )
                yield CatalogueRow(line=line, fields={}, problem=problem)
                continue
            fields = {name: cell.strip() for name, cell in zip(self.columns, cells, strict=True)}
            bad_cell = self._unstorable_cell(line, fields)
            if bad_cell is not None:
                yield CatalogueRow(line=line, fields={}, problem=bad_cell)
                continue
            yield CatalogueRow(line=line, fields=fields)

    def _unstorable_cell(self, line: int, fields: dict[str, str]) -> CatalogueError | None:
        for name, value in fields.items():
            reason = unstorable(value)
            if reason is not None:
                return CatalogueError(self.path, line, name, reason)
        return None

    def require_columns(self, needed: Iterable[str], *, who: str, every_row: bool = True) -> None:
        """Fails on the first column in ``needed`` that the header (line 1) lacks (a header
        names every row's columns, so ``every_row`` makes no difference)."""
        require_columns_in(self.path, 1, self.columns, needed, who)

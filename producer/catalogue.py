"""Streaming reader for the catalogue CSV.

The catalogue can be large (hundreds of thousands of rows), so rows are read one at a
time and never collected into a list.  Every problem is reported with the file, the
physical line where the offending record starts and, where it applies, the column.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from producer.errors import InputError


class CatalogueError(InputError):
    """A problem with the catalogue file, located by file, line and field."""


@dataclass(frozen=True)
class CatalogueRow:
    """One catalogue record.

    ``line`` is the 1-based physical line where the record starts (the header is line 1),
    which stays correct when earlier quoted cells contain newlines.
    """

    line: int
    fields: dict[str, str]


class _Source:
    """Decodes a binary file line by line and counts physical lines.

    Decoding is done here rather than by ``open(..., encoding=...)`` so that a bad byte is
    reported on the line that contains it instead of wherever the text layer's read buffer
    happened to fail.  An incremental decoder is used so that a multi-byte character is
    never split by our line boundaries.
    """

    def __init__(self, path: Path, raw: BinaryIO, encoding: str) -> None:
        self._path = path
        self._raw = raw
        self._encoding = encoding
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        # Physical line number of the last line handed to the csv reader.
        self.line = 0

    def __iter__(self) -> Iterator[str]:
        # Iterating a binary file splits on b"\n" only; line endings are kept so the csv
        # module sees exactly what newline="" would give it (quoted newlines survive).
        for chunk in self._raw:
            self.line += 1
            yield self._decode(chunk, final=False)
        tail = self._decode(b"", final=True)
        if tail:
            yield tail

    def _decode(self, chunk: bytes, *, final: bool) -> str:
        try:
            return self._decoder.decode(chunk, final)
        except UnicodeDecodeError as exc:
            bad = exc.object[exc.start : exc.start + 1].hex()
            raise CatalogueError(
                self._path,
                max(self.line, 1),
                None,
                f"not valid {self._encoding} (byte 0x{bad} at position {exc.start}); "
                "pass --encoding",
            ) from None


def _blank(cells: list[str]) -> bool:
    # Blank lines, and rows of empty cells such as the ",,," rows spreadsheets leave at the
    # end of an export, carry no data; skipping them is friendlier than a ragged-row error.
    return all(not cell.strip() for cell in cells)


class CsvCatalogue:
    """A catalogue CSV whose header is read on construction and whose rows are streamed."""

    def __init__(self, path: Path, *, encoding: str = "utf-8-sig") -> None:
        self.path = Path(path)
        # utf-8-sig reads plain UTF-8 too and drops the BOM Excel puts in front.
        self.encoding = encoding
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise CatalogueError(self.path, None, None, f"unknown encoding {encoding!r}") from None
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
        try:
            raw = self.path.open("rb")
        except OSError as exc:
            raise CatalogueError(self.path, None, None, f"cannot open: {exc.strerror}") from None
        with raw:
            source = _Source(self.path, raw, self.encoding)
            reader = csv.reader(source, strict=True)
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
        width = len(self.columns)
        for line, cells in self._records(with_header=False):
            if len(cells) != width:
                raise CatalogueError(
                    self.path,
                    line,
                    None,
                    f"row has {len(cells)} cells but the header has {width} columns",
                )
            values = (cell.strip() for cell in cells)
            yield CatalogueRow(line=line, fields=dict(zip(self.columns, values, strict=True)))

    def require_columns(self, needed: Iterable[str], *, who: str) -> None:
        """Fails on the first column in ``needed`` that the header lacks."""
        present = set(self.columns)
        for name in needed:
            if name not in present:
                raise CatalogueError(
                    self.path,
                    1,
                    name,
                    f"column required by {who} is missing (columns: {', '.join(self.columns)})",
                )

"""JSON Lines catalogues: one JSON object per line, whose keys are the item's fields."""

from __future__ import annotations

import json
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path
from typing import Any

from db.limits import unstorable
from producer.catalogue.common import (
    CatalogueError,
    CatalogueRow,
    UnsupportedValue,
    cell_text,
    raise_problems,
)
from producer.catalogue.lines import LineReader, check_encoding, open_binary


class _JsonObject(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs, so duplicate keys can be reported."""


def _reject_constant(name: str) -> None:
    # json.loads accepts NaN and Infinity, which are not JSON and have no place in a prompt.
    raise ValueError(f"{name} is not valid JSON")


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "a number"


class JsonlCatalogue:
    """A JSON Lines catalogue: one JSON object per line, blank lines skipped.

    There is no header, so ``columns`` is None and rows may carry different keys.
    ``require_columns`` records the keys every row must have (the item key) and iteration
    checks them on every row.
    """

    columns: list[str] | None = None

    def __init__(self, path: Path, *, encoding: str = "utf-8") -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.encoding = encoding
        check_encoding(self.path, encoding)
        # Required key -> who requires it, in the order they were asked for.
        self._required: dict[str, str] = {}
        # Fail on an unreadable or empty file now, before any work is queued; this reads
        # only up to the first record.
        for _ in self._lines():
            break
        else:
            raise CatalogueError(self.path, 1, None, "file is empty")

    def _lines(self) -> Iterator[tuple[int, str]]:
        """Yields (physical line, text) for each non-blank line."""
        with open_binary(self.path) as raw:
            source = LineReader(self.path, raw, self.encoding)
            # A BOM (not JSON, but editors on Windows still write one) is dropped by LineReader.
            for text_line in source:
                if text_line.strip():
                    yield source.line, text_line

    def __iter__(self) -> Iterator[CatalogueRow]:
        return raise_problems(self.rows())

    def rows(self) -> Generator[CatalogueRow]:
        """Every record, bad ones carrying their ``problem``; file-level errors raise."""
        for line, text_line in self._lines():
            try:
                fields = self._fields(line, text_line)
            except CatalogueError as problem:
                yield CatalogueRow(line=line, fields={}, problem=problem)
                continue
            yield CatalogueRow(line=line, fields=fields)

    def _fields(self, line: int, text_line: str) -> dict[str, str]:
        try:
            value = json.loads(
                text_line, object_pairs_hook=_JsonObject, parse_constant=_reject_constant
            )
        except json.JSONDecodeError as exc:
            raise CatalogueError(
                self.path, line, None, f"not valid JSON: {exc.msg} (column {exc.colno})"
            ) from None
        except ValueError as exc:
            raise CatalogueError(self.path, line, None, str(exc)) from None
        if not isinstance(value, _JsonObject):
            raise CatalogueError(
                self.path, line, None, f"expected a JSON object, got {_json_kind(value)}"
            )
        fields: dict[str, str] = {}
        for key, item in value:
            if not key.strip():
                raise CatalogueError(self.path, line, None, "a key is empty")
            reason = unstorable(key)
            if reason is not None:
                raise CatalogueError(self.path, line, None, f"key {key!r} {reason}")
            if key in fields:
                raise CatalogueError(self.path, line, key, "duplicate key")
            try:
                fields[key] = cell_text(item)
            except UnsupportedValue as exc:
                raise CatalogueError(self.path, line, key, str(exc)) from None
        for name, who in self._required.items():
            if name not in fields:
                raise CatalogueError(
                    self.path,
                    line,
                    name,
                    f"key required by {who} is missing (keys: {', '.join(fields)})",
                )
        return fields

    def require_columns(self, needed: Iterable[str], *, who: str, every_row: bool = True) -> None:
        """Records keys that every row must have; iteration fails on a row that lacks one.

        Keys only some rows need (``every_row=False``: a template's, which with a ``when``
        needs its prompt and image keys only on the rows it applies to) are not recorded:
        rows may carry different keys, and the template reports a key missing from a row it
        applies to itself, naming the row's line and the key (a CSV or SQL catalogue checks
        them in its header instead, where every row has every column).
        """
        if not every_row:
            return
        for name in needed:
            self._required.setdefault(name, who)

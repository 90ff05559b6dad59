"""Reading a catalogue file line by line, decoding it as it goes (CSV and JSON Lines)."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from producer.catalogue.common import CatalogueError

# How much of a catalogue file is read and decoded at a time.
READ_BYTES = 64 * 1024


class LineReader:
    """Decodes a binary file and hands out its lines, counting physical lines.

    Decoding is done here rather than by ``open(..., encoding=...)`` so that a bad byte is
    reported on the line that contains it instead of wherever the text layer's read buffer
    happened to fail.  The file is decoded first and split into lines after: in UTF-16 (Excel's
    "Unicode Text") a newline is two bytes, and a 0x0A byte can be half of another character.
    """

    def __init__(self, path: Path, raw: BinaryIO, encoding: str) -> None:
        self._path = path
        self._raw = raw
        self._encoding = encoding
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        # Physical line number of the last line handed out.
        self.line = 0

    def __iter__(self) -> Iterator[str]:
        # Only "\n" ends a line, and line endings are kept: the csv module sees exactly what
        # newline="" would give it ("\r\n" is its business, and quoted newlines survive).
        pending: list[str] = []  # decoded pieces of a line whose end has not been read yet
        at_start = True
        while True:
            data = self._raw.read(READ_BYTES)
            final = not data
            text, error = self._decode(data, final=final)
            if at_start and text:
                # A byte order mark is not content (utf-8-sig and utf-16 drop it already;
                # utf-8 or utf-16-le given explicitly would keep it in the first column name).
                text = text.removeprefix("\ufeff")
                at_start = False
            *complete, rest = text.split("\n")
            for piece in complete:
                pending.append(piece)
                self.line += 1
                yield "".join(pending) + "\n"
                pending = []
            if rest:
                pending.append(rest)
            if error is not None:
                # The lines before the bad byte are handed out first, so the error comes
                # where it did when the file was read line by line.
                raise self._not_valid(error, position=sum(map(len, pending)))
            if final:
                break
        if pending:
            self.line += 1
            yield "".join(pending)

    def _decode(self, data: bytes, *, final: bool) -> tuple[str, UnicodeDecodeError | None]:
        """The text of ``data``; on a bad byte, the text before it and the error."""
        state = self._decoder.getstate()
        try:
            return self._decoder.decode(data, final), None
        except UnicodeDecodeError as exc:
            error = exc
        # Only on this error path: decode the chunk again from the same state, a byte at a
        # time, to find the text before the bad byte (and so its line).
        decoder = codecs.getincrementaldecoder(self._encoding)(errors="strict")
        decoder.setstate(state)
        good: list[str] = []
        try:
            for index in range(len(data)):
                good.append(decoder.decode(data[index : index + 1], False))
            decoder.decode(b"", final)
        except UnicodeDecodeError as exc:
            return "".join(good), exc
        # A codec that fails only on the whole chunk: the error is placed at the chunk's
        # first line, which is still the file's error.
        return "", error

    def _not_valid(self, exc: UnicodeDecodeError, *, position: int) -> CatalogueError:
        bad = exc.object[exc.start : exc.start + 1].hex()
        # The error is on the line being read, after the ones already handed out;
        # ``position`` counts the characters of that line before the bad byte.
        return CatalogueError(
            self._path,
            self.line + 1,
            None,
            f"not valid {self._encoding} (byte 0x{bad} at position {position}); pass --encoding",
        )


def check_encoding(path: Path, encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise CatalogueError(path, None, None, f"unknown encoding {encoding!r}") from None


def open_binary(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise CatalogueError(path, None, None, f"cannot open: {exc.strerror}") from None

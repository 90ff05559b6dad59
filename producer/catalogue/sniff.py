"""What a catalogue file's first bytes say it is, whatever its name says.

A spreadsheet saved as ``products.csv``, a PDF price list or a product photo passed by
mistake, or Excel's UTF-16 "Unicode Text" would otherwise be reported as a bad UTF-8 byte on
line 1, which sends the user looking for an encoding problem that is not there.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from producer.catalogue.common import CatalogueError
from producer.catalogue.lines import open_binary

SNIFF_BYTES = 4096

# Leading bytes of the formats people mistake for a catalogue text file.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Excel workbook (.xls); save it as .xlsx or CSV"),
    (b"%PDF-", "a PDF document"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive; unpack it first"),
    (b"BZh", "a bzip2 archive; unpack it first"),
    (b"\xfd7zXZ\x00", "an xz archive; unpack it first"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive; unpack it first"),
    (b"SQLite format 3\x00", "an SQLite database; pass a sqlite:/// URL with --table or --query"),
)
_ZIP = b"PK\x03\x04"
_UTF16_BOMS = ((b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
_UTF32_BOMS = (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")
SPREADSHEET_SUFFIXES = (".xlsx", ".xlsm", ".ods")


def _zip_kind(path: Path) -> str:
    """What a zip archive holds: a workbook (by its parts) or anything else."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "xl/workbook.xml" in names:
                return "an Excel workbook (.xlsx or .xlsm)"
            if "mimetype" in names:
                mimetype = archive.read("mimetype")[:100]
                if b"opendocument.spreadsheet" in mimetype:
                    return "an OpenDocument spreadsheet (.ods)"
                if b"opendocument" in mimetype:
                    return "an OpenDocument file that is no spreadsheet"
            if "word/document.xml" in names:
                return "a Word document (.docx)"
    except (zipfile.BadZipFile, OSError, KeyError):
        pass
    return "a zip archive"


def content_kind(path: Path, head: bytes) -> str | None:
    """What ``head`` (the file's first bytes) shows the file to be, if it is a format other
    than text; None for text (or anything else this does not recognise)."""
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    if head.startswith(_ZIP):
        return _zip_kind(path)
    if head[:12].startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    return None


def utf16_hint(head: bytes) -> str | None:
    """The encoding to pass for UTF-16 (or UTF-32) text, if ``head`` is such text."""
    if any(head.startswith(bom) for bom in _UTF32_BOMS):
        return "utf-32"
    for bom, encoding in _UTF16_BOMS:
        if head.startswith(bom):
            return encoding
    # Without a byte order mark: ASCII text in UTF-16 has a NUL in every other byte.
    sample = head[:512]
    if len(sample) >= 8:
        even, odd = sample[0::2], sample[1::2]
        if odd.count(0) > 0.9 * len(odd) and even.count(0) < 0.1 * len(even):
            return "utf-16-le"
        if even.count(0) > 0.9 * len(even) and odd.count(0) < 0.1 * len(odd):
            return "utf-16-be"
    return None


def read_head(path: Path) -> bytes:
    with open_binary(path) as raw:
        try:
            return raw.read(SNIFF_BYTES)
        except OSError as exc:
            raise CatalogueError(path, None, None, f"cannot read: {exc.strerror}") from None


def check_text_file(path: Path, what: str, encoding: str | None) -> None:
    """Refuses a file meant to be ``what`` (CSV, JSON Lines) whose bytes are another format,
    naming that format; ``encoding`` is the one the user gave (None: the default)."""
    head = read_head(path)
    kind = content_kind(path, head)
    if kind is not None:
        hint = ""
        if "workbook (.xlsx" in kind or "(.ods)" in kind:
            hint = f"; name it {'.ods' if '.ods' in kind else '.xlsx'} or pass --format spreadsheet"
        raise CatalogueError(path, None, None, f"this file is {kind}, not {what}{hint}")
    if encoding is None:
        wide = utf16_hint(head)
        if wide is not None:
            raise CatalogueError(
                path,
                None,
                None,
                f'this file is {wide.upper()} text (such as Excel\'s "Unicode Text"), '
                f"not UTF-8; pass --encoding {wide}",
            )

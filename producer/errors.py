"""The one shape of a bad-input error: what was wrong, and where (file, line, field)."""

from __future__ import annotations

import os


class InputError(ValueError):
    """A problem in an input file, located by file, line and field (either may be unknown)."""

    def __init__(
        self, path: str | os.PathLike[str], line: int | None, field: str | None, reason: str
    ) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.field = field
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        if self.field is None:
            return f"{where}: {self.reason}"
        return f"{where}: field {self.field!r}: {self.reason}"

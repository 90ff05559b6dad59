"""One root for every error pixelmill raises, with two branches callers act on.

- :class:`BadInputError`: something a person gave (a catalogue, a template, an option, a
  setting, a job's own inputs) is wrong. Trying again cannot help: the command line reports it
  with its place and exits 2, and the worker fails the job at once.
- :class:`InfrastructureError`: a service pixelmill depends on (storage, the database, the
  broker) did not answer as it should. The work is sound and is retried.

Errors in neither branch are pixelmill's own state conflicts (a lease lost, an item held by
someone else) and are handled where they are raised.
"""

from __future__ import annotations

import os


class PixelmillError(Exception):
    """The root of pixelmill's errors."""


class BadInputError(PixelmillError, ValueError):
    """Bad input: reported to whoever gave it, never retried (exit status 2)."""


class InfrastructureError(PixelmillError, RuntimeError):
    """A dependency failed (storage, database, broker): the work is retried."""


class InputError(BadInputError):
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

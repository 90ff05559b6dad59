"""A recording publisher for the dispatcher and run tests."""

from __future__ import annotations

from collections.abc import Iterable

import pytest


class Recorder:
    """A publish callback that records each call's ids.

    ``max_calls`` turns a dispatcher that keeps publishing the same jobs into a test failure
    instead of a hang.
    """

    def __init__(self, max_calls: int = 100) -> None:
        self.calls: list[list[int]] = []
        self.max_calls = max_calls

    def __call__(self, ids: Iterable[int]) -> None:
        batch = list(ids)
        self.calls.append(batch)
        if len(self.calls) > self.max_calls:
            pytest.fail(f"publish called more than {self.max_calls} times: {self.calls[:5]}...")

    @property
    def ids(self) -> list[int]:
        return [job_id for batch in self.calls for job_id in batch]

"""Rows and a recording publisher for the dispatcher and run tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime

import pytest
from sqlalchemy.orm import Session

from db.models import CatalogueItem, Job, JobStatus, Run, RunStatus


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


def make_run(
    session: Session, status: str = RunStatus.ACTIVE, *, priority: int = 0, name: str = ""
) -> Run:
    run = Run(
        name=name or f"run-{uuid.uuid4().hex[:8]}",
        source="test.csv",
        status=status,
        priority=priority,
    )
    session.add(run)
    session.flush()
    return run


def make_jobs(
    session: Session,
    run: Run,
    count: int,
    *,
    status: str = JobStatus.PENDING,
    queued_at: datetime | None = None,
    seeds_per_job: int = 1,
) -> list[int]:
    """``count`` committed jobs of one item; job i has seeds i, i + 100, ..."""
    item = CatalogueItem(
        source="test.csv",
        external_key=uuid.uuid4().hex,
        fields={"sku": "x"},
        content_hash=uuid.uuid4().hex,
    )
    session.add(item)
    jobs = [
        Job(
            run=run,
            item=item,
            template="t",
            prompt=f"prompt {i}",
            negative_prompt="",
            model="m",
            scheduler=None,
            steps=2,
            guidance=5.0,
            width=64,
            height=64,
            seeds=[i + 100 * k for k in range(seeds_per_job)],
            status=status,
            queued_at=queued_at,
            dedupe_key=uuid.uuid4().hex,
        )
        for i in range(count)
    ]
    session.add_all(jobs)
    session.commit()
    return [job.id for job in jobs]

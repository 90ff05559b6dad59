"""Fixtures of the fault and outage tests: the rig (a database, a broker, S3 and the fault
settings) and processes frozen mid-run, always thawed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from tests.integration.faults import FAULT_SETTINGS, FrozenProcesses, Rig


@pytest.fixture
def frozen() -> Iterator[FrozenProcesses]:
    processes = FrozenProcesses()
    yield processes
    processes.release_all()


@pytest.fixture
def make_rig(
    tmp_path: Path, fresh_database_url: str, tiny_model_dir: Path
) -> Iterator[Callable[..., Rig]]:
    engines = []

    def make(*, broker_url: str, queue: str, s3: dict[str, str], **extra: str) -> Rig:
        # pre_ping: the outage tests drop every connection to the database, the rig's too.
        engine = create_engine(fresh_database_url, pool_pre_ping=True)
        engines.append(engine)
        values: dict[str, str | Path] = {
            **FAULT_SETTINGS,
            "database_url": fresh_database_url,
            "broker_url": broker_url,
            "render_queue": queue,
            "model": str(tiny_model_dir),
            "data_dir": tmp_path / "data",
            **s3,
            **extra,
        }
        return Rig(values=values, engine=engine)

    yield make
    for engine in engines:
        engine.dispose()

"""prometheus-client's multiprocess mode for Celery's prefork workers.

Each pool process writes its metrics to memory-mapped files in ``PROMETHEUS_MULTIPROC_DIR``;
the process that serves ``/metrics`` merges them on every scrape. Three rules keep the sums
right (prometheus-client's documentation, "Multiprocess Mode"):

- the directory is emptied when the worker host starts, before any process writes to it, so
  a restart does not add the previous run's counters again (the serving process does this);
- a process that exits is marked dead, so its ``live*`` gauges stop counting (its counters and
  histograms stay: what it counted happened). Pool processes mark themselves on a clean exit;
  a process killed outright (OOM, Celery's hard time limit) is found by
  :class:`LiveProcessCollector` on the next scrape;
- ``PROMETHEUS_MULTIPROC_DIR`` is set before prometheus-client is first imported: it picks its
  value storage at import time (:func:`ensure_multiprocess_mode` checks).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pixelmill.errors import BadInputError

# Nothing from prometheus_client at import time (see ensure_multiprocess_mode): this module is
# imported before PROMETHEUS_MULTIPROC_DIR is decided.
if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"

# gauge_livesum_1234.db, gauge_liveall_1234.db, ...: files of gauges that follow live processes.
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


class MultiprocessSetupError(BadInputError):
    pass


def multiprocess_dir() -> Path | None:
    """The directory named by ``PROMETHEUS_MULTIPROC_DIR``, or None when it is not set."""
    value = os.environ.get(ENV_VAR, "")
    return Path(value) if value else None


def use_multiprocess_dir(path: Path) -> Path:
    """Point this process (and the processes it forks or starts) at ``path``; create it."""
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ[ENV_VAR] = str(path)
    return path


def clean_multiprocess_dir(path: Path) -> None:
    """Delete the metrics files in ``path`` (the previous run's ``*.db``), keeping the
    directory and anything else in it: the variable may point at a folder shared by mistake.

    Only the process that serves the metrics of a host calls this, once, at start: a file
    deleted while another live process writes to it would lose that process's counts."""
    if not path.is_dir():
        raise MultiprocessSetupError(f"{ENV_VAR}={path}: not a directory")
    for entry in path.glob("*.db"):
        if entry.is_file() and not entry.is_symlink():
            entry.unlink()


def ensure_multiprocess_mode() -> None:
    """Fail clearly if ``PROMETHEUS_MULTIPROC_DIR`` is set but prometheus-client was imported
    before it was (its metrics would then stay in this process's memory, never served)."""
    from prometheus_client import values

    path = multiprocess_dir()
    if path is None:
        return
    if values.ValueClass is values.MutexValue:
        raise MultiprocessSetupError(
            f"{ENV_VAR}={path} was set after prometheus_client was imported: set it in the "
            "environment of the worker (or let the worker set it before loading its tasks)"
        )


def mark_process_dead(pid: int, path: Path | None = None) -> None:
    """Forget the ``live*`` gauge values of process ``pid`` (it exited)."""
    from prometheus_client import multiprocess

    path = path or multiprocess_dir()
    if path is not None:
        multiprocess.mark_process_dead(pid, str(path))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def mark_dead_processes(path: Path) -> list[int]:
    """Mark dead every process with ``live*`` gauge files that no longer exists; returns them.

    Covers processes that could not mark themselves: killed by the OOM killer, by Celery's hard
    time limit, or by SIGKILL."""
    dead = sorted(
        {
            pid
            for entry in path.iterdir()
            if (match := _LIVE_GAUGE_FILE.fullmatch(entry.name))
            and not _alive(pid := int(match.group(1)))
        }
    )
    for pid in dead:
        mark_process_dead(pid, path)
    return dead


class LiveProcessCollector:
    """prometheus-client's MultiProcessCollector, after marking vanished processes dead."""

    def __init__(self, path: Path) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self._path = path
        self._merged = MultiProcessCollector(None, path=str(path))

    def collect(self) -> Iterable[Metric]:
        mark_dead_processes(self._path)
        return self._merged.collect()


def multiprocess_registry(path: Path) -> CollectorRegistry:
    """A registry serving the merged metrics of every process writing to ``path``."""
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(LiveProcessCollector(path))
    return registry

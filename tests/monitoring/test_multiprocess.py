"""Multiprocess mode's bookkeeping with real processes: a process killed without cleanup stops
counting in live gauges (its counters stay), the directory is emptied at start, and metrics
imported before the directory was set are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pixelmill.metrics_multiprocess import (
    MultiprocessSetupError,
    clean_multiprocess_dir,
    mark_dead_processes,
    multiprocess_registry,
)

RECORD = """
import os, sys, time
from worker import metrics
metrics.IMAGES.labels("safe").inc(int(sys.argv[1]))
metrics.GPU_MEMORY_BYTES.labels("0").set(float(sys.argv[2]))
print("ready", flush=True)
if sys.argv[3] == "die":
    os._exit(0)  # like SIGKILL or the OOM killer: no exit hook runs
time.sleep(600)
"""


def _record(directory: Path, images: int, memory: int, how: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    process = subprocess.Popen(
        [sys.executable, "-c", RECORD, str(images), str(memory), how],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    return process


def _reap(process: subprocess.Popen[str], *, kill: bool = False) -> None:
    if kill:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.stdout is not None
    process.stdout.close()


def _values(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in multiprocess_registry(directory).collect()
        for s in family.samples
    }


def test_a_killed_process_leaves_live_gauges_but_its_counts_stay(tmp_path: Path) -> None:
    killed = _record(tmp_path, images=3, memory=1000, how="die")
    _reap(killed)
    alive = _record(tmp_path, images=2, memory=500, how="stay")
    try:
        values = _values(tmp_path)
        assert values[("pixelmill_images_total", (("outcome", "safe"),))] == 5
        assert values[("pixelmill_gpu_memory_bytes", (("gpu", "0"),))] == 500
        assert mark_dead_processes(tmp_path) == []  # already swept by the collect above
        assert not list(tmp_path.glob(f"gauge_live*_{killed.pid}.db"))
        assert list(tmp_path.glob(f"gauge_live*_{alive.pid}.db"))
    finally:
        _reap(alive, kill=True)
    values = _values(tmp_path)
    assert values[("pixelmill_images_total", (("outcome", "safe"),))] == 5
    assert ("pixelmill_gpu_memory_bytes", (("gpu", "0"),)) not in values


def test_cleaning_deletes_the_metrics_files_and_nothing_else(tmp_path: Path) -> None:
    _reap(_record(tmp_path, images=3, memory=1, how="die"))
    assert list(tmp_path.glob("*.db"))
    # PROMETHEUS_MULTIPROC_DIR pointed at a shared folder by mistake: its files survive.
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"png")
    (tmp_path / "notes.txt").write_text("keep me")
    clean_multiprocess_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "notes.txt"]
    assert (tmp_path / "images" / "a.png").read_bytes() == b"png"
    assert ("pixelmill_images_total", (("outcome", "safe"),)) not in _values(tmp_path)


def test_metrics_imported_before_the_directory_was_set_are_refused(tmp_path: Path) -> None:
    code = (
        "import os, prometheus_client\n"
        f"os.environ['PROMETHEUS_MULTIPROC_DIR'] = {str(tmp_path)!r}\n"
        "from pixelmill.metrics_multiprocess import ensure_multiprocess_mode\n"
        "ensure_multiprocess_mode()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode != 0
    assert "set after prometheus_client was imported" in result.stderr


def test_cleaning_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(MultiprocessSetupError, match="not a directory"):
        clean_multiprocess_dir(tmp_path / "missing")


@pytest.mark.parametrize(
    ("visible", "index", "label"),
    [("2", 0, "2"), ("1,3", 1, "3"), ("", 0, "0"), ("GPU-5f3a", 0, "GPU-5f3a"), ("0", 4, "4")],
)
def test_gpu_label_names_the_hosts_gpu(
    monkeypatch: pytest.MonkeyPatch, visible: str, index: int, label: str
) -> None:
    """A `--gpus 2` worker sees its GPU as cuda:0: the label says 2, so a host's GPUs stay
    apart in pixelmill_gpu_memory_bytes."""
    from worker.metrics_hooks import gpu_label

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpu_label(index) == label

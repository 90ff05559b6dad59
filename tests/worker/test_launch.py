"""Worker launch (argv and environment per GPU) and the Celery settings, without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pixelmill.settings import Settings
from worker.celery_app import celery_config
from worker.launch import (
    gpu_worker_command,
    gpu_worker_env,
    parse_gpus,
    start_gpu_workers,
    worker_argv,
)


def test_parse_gpus() -> None:
    assert parse_gpus("0,1, 3") == ["0", "1", "3"]
    assert parse_gpus("GPU-8f3a-11") == ["GPU-8f3a-11"]
    for bad in ("", " , ", "0,0", "cuda:0", "1;rm -rf /"):
        with pytest.raises(ValueError, match="--gpus"):
            parse_gpus(bad)


def test_worker_argv() -> None:
    assert worker_argv(queue="render", hostname="w@%h", concurrency=2, loglevel="WARNING") == [
        "worker",
        "--pool=prefork",
        "--concurrency=2",
        "--queues=render",
        "--hostname=w@%h",
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
    ]
    with pytest.raises(ValueError):
        worker_argv(queue="render", hostname="w", concurrency=0)


def test_gpu_worker_env_and_command() -> None:
    env = gpu_worker_env("1", {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2"})
    assert env == {
        "PATH": "/bin",
        "CUDA_VISIBLE_DEVICES": "1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "PIXELMILL_DEVICE": "cuda",
    }
    command = gpu_worker_command("1", queue="render", name="night")
    assert command[:5] == [sys.executable, "-m", "celery", "-A", "worker.main"]
    assert "--concurrency=1" in command and "--pool=prefork" in command
    assert "--hostname=night-gpu1@%h" in command
    assert "--queues=render" in command


def test_start_gpu_workers_starts_one_process_per_gpu() -> None:
    calls: list[dict[str, Any]] = []

    def fake_popen(argv: list[str], **kwargs: Any) -> str:
        calls.append({"argv": argv, **kwargs})
        return f"process-{len(calls)}"

    processes = start_gpu_workers(
        ["0", "1"], queue="q", base_env={"HOME": "/root"}, popen=fake_popen
    )

    assert processes == ["process-1", "process-2"]
    assert [call["env"]["CUDA_VISIBLE_DEVICES"] for call in calls] == ["0", "1"]
    assert all(call["env"]["HOME"] == "/root" for call in calls)
    assert [a for a in calls[0]["argv"] if a.startswith("--hostname")] == [
        "--hostname=pixelmill-gpu0@%h"
    ]
    assert Path(calls[0]["cwd"], "worker", "launch.py").is_file()
    with pytest.raises(ValueError):
        start_gpu_workers(["0", "0"], queue="q", popen=fake_popen)


def test_launching_imports_no_torch() -> None:
    """The parent of the GPU workers must never initialise CUDA: it does not even import torch
    (nor does `import worker.main`, which `celery -A worker.main` does in the parent)."""
    code = (
        "import sys, worker, worker.main, worker.launch, worker.celery_app;"
        "from pixelmill.settings import Settings;"
        "worker.celery_app.celery_config(Settings());"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "assert 'diffusers' not in sys.modules, 'diffusers imported'"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_celery_config_for_long_gpu_tasks() -> None:
    settings = Settings(broker_url="redis://localhost:6379/0", job_time_limit_seconds=1800)  # type: ignore[call-arg]
    config = celery_config(settings)
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    # A render in progress rides out a broker blip (its claim, not the message, owns the job).
    assert config["worker_cancel_long_running_tasks_on_connection_loss"] is False
    assert config["task_soft_time_limit"] == 1800
    assert 1800 < config["task_time_limit"] <= 2100
    assert config["broker_transport_options"]["visibility_timeout"] > config["task_time_limit"]
    assert "worker_max_tasks_per_child" not in config

    longer = Settings(  # type: ignore[call-arg]
        broker_url="redis://localhost:6379/0",
        job_lease_seconds=600,
        job_time_limit_seconds=20 * 3600,
        worker_max_tasks_per_child=50,
    )
    config = celery_config(longer)
    assert config["task_soft_time_limit"] == 20 * 3600
    assert config["task_time_limit"] > 20 * 3600
    assert config["broker_transport_options"]["visibility_timeout"] > config["task_time_limit"]
    assert config["worker_max_tasks_per_child"] == 50

    amqp = celery_config(Settings(broker_url="amqp://guest@localhost//"))  # type: ignore[call-arg]
    assert amqp["broker_transport_options"] == {}

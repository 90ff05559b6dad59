"""What the render workers count, in base units with a ``pixelmill_`` prefix (the dispatcher's
metrics are its own, so each endpoint shows only what its process does).

No label names a job, run or image: series stay few however large the night is (per-run
figures come from the exporter, which reads them from Postgres).

Celery's prefork workers record these in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
see :mod:`pixelmill.metrics_multiprocess`): prometheus-client chooses its value storage when it
is first imported, so that variable must be set before this module is imported in a worker
(:mod:`worker.metrics_hooks` sets it). Counters and histograms of processes that exit stay
counted; gauges use a ``live*`` mode so a dead process's value disappears (its files are marked
dead, see ``mark_process_dead``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Per image: 0.05 s (tiny model, CPU) .. 120 s (SDXL at high step counts).
RENDER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
# A batch is several images: up to 10 minutes.
BATCH_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# A job is a sweep of seeds: seconds to the 2 h default job time limit.
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
# Loading a pipeline from local disk (or building the tiny model) onto a device.
MODEL_LOAD_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# Uploading one PNG (a few hundred KB to a few MB) to S3 or a folder.
UPLOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Outcomes of IMAGES: the image row's safety status, or `failed` (rendered or stored not).
IMAGE_OUTCOMES = ("safe", "unchecked", "flagged", "failed")

IMAGES = Counter(
    "pixelmill_images_total",
    "Images rendered by this host's workers, by outcome (safe, unchecked, flagged, failed).",
    ["outcome"],
)
RENDER_SECONDS = Histogram(
    "pixelmill_render_seconds",
    "Seconds to render one image (a batch's time divided by its images).",
    buckets=RENDER_BUCKETS,
)
BATCH_RENDER_SECONDS = Histogram(
    "pixelmill_batch_render_seconds",
    "Seconds of one pipeline call (a batch of images of one job).",
    buckets=BATCH_BUCKETS,
)
JOB_SECONDS = Histogram(
    "pixelmill_job_duration_seconds",
    "Seconds a render job took, from its task's start to its end (a job whose tail finishes "
    "in the background: to the tail's end), every outcome.",
    buckets=JOB_BUCKETS,
)
MODEL_LOAD_SECONDS = Histogram(
    "pixelmill_model_load_seconds",
    "Seconds to load a diffusers pipeline onto its device.",
    buckets=MODEL_LOAD_BUCKETS,
)
UPLOAD_SECONDS = Histogram(
    "pixelmill_upload_seconds",
    "Seconds to store one PNG in storage (S3 or a folder).",
    buckets=UPLOAD_BUCKETS,
)
UPLOAD_ERRORS = Counter(
    "pixelmill_upload_errors_total",
    "Failed attempts to store a PNG.",
)
SAFETY_FLAGS = Counter(
    "pixelmill_safety_flags_total",
    "Images the safety checker flagged (quarantined or dropped).",
)
REDELIVERIES = Counter(
    "pixelmill_redeliveries_total",
    "Claims of a job that had been claimed before (attempts > 1): a worker lost, a retry.",
)
JOBS_FINISHED = Counter(
    "pixelmill_jobs_finished_total",
    "Render tasks by how they ended (done, failed, blocked, dead, skipped, retry, error).",
    ["outcome"],
)
# Memory the CUDA caching allocator holds, per visible GPU. `livesum`: the processes sharing a
# GPU add up, and a process that exits stops counting (its file is marked dead).
GPU_MEMORY_BYTES = Gauge(
    "pixelmill_gpu_memory_bytes",
    "GPU memory held by this host's render processes (torch.cuda.memory_reserved), per GPU.",
    ["gpu"],
    multiprocess_mode="livesum",
)
# Scoring one batch on the render device (CLIP embedding, scores, keep probabilities).
SCORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SCORE_SECONDS = Histogram(
    "pixelmill_score_seconds",
    "Seconds to score one batch of rendered images (the scorer's share of the render loop).",
    buckets=SCORE_BUCKETS,
)
EARLY_STOP_SEEDS = Counter(
    "pixelmill_early_stop_seeds_total",
    "Seeds not rendered because their item already had enough likely keepers (early stop).",
)
GPU_SECONDS_SAVED = Counter(
    "pixelmill_early_stop_gpu_seconds_total",
    "GPU-seconds early stop saved: each job's skipped seeds times its mean render seconds.",
)

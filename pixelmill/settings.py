"""One typed settings object, read from ``PIXELMILL_*`` environment variables and ``.env``.

Nothing here runs at import time: call :func:`get_settings` where settings are needed, so
tests and subcommands can build their own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The built-in tiny random model: built on first use into the data folder, never downloaded.
TINY_MODEL = "tiny"
# The built-in tiny random ControlNet for the tiny model (worker.models.resolve_controlnet).
TINY_CONTROLNET = "tiny-controlnet"
# What PIXELMILL_LOG_LEVEL may be (any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# A Hugging Face Hub id ("owner/name"): what a model name that is no local path must be.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(name: str) -> bool:
    return _HUB_ID.fullmatch(name) is not None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PIXELMILL_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    # Where the embedded defaults keep their files (SQLite database, broker, images, models).
    data_dir: Path = Path("var")

    # Empty means "the embedded default inside data_dir".
    database_url: str = ""
    broker_url: str = ""

    storage: Literal["local", "s3"] = "local"
    storage_dir: Path | None = None  # local storage root; default data_dir/images
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None

    model: str = TINY_MODEL
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # For a single-file checkpoint (model = a .safetensors/.ckpt file): a diffusers folder (or
    # hub id) whose configs describe the checkpoint's architecture, so nothing is fetched.
    model_config_dir: str | None = None
    # Seeds rendered together in one pipeline call. Larger batches use the GPU better; the
    # initial noise of each image still comes from its own seed alone.
    render_batch_size: int = Field(default=4, ge=1, le=64)
    # Threads that encode PNGs (and thumbnails) and upload them while the next batch renders.
    upload_workers: int = Field(default=2, ge=1, le=32)
    # The longer side of the review thumbnail stored beside each image (pixels).
    thumbnail_size: int = Field(default=256, ge=32, le=2048)
    # Thumbnails made by the worker at render time, one more object per image. Off: the review
    # app makes each on the first view of its image, and a ranked grid shows about a fifth.
    thumbnails_at_render: bool = False
    # Compile the UNet with torch.compile (slow first job per shape, faster after).
    torch_compile: bool = False
    # The fast path (worker.fast_path), for every model; a template's fast_path wins, and
    # fast_path_models overrides these per model. channels_last and fused QKV render the same
    # pixels within rounding (the README states the measured tolerance), so they are on.
    fast_path_channels_last: bool = True
    fast_path_fuse_qkv: bool = True
    # "auto": fast_path_compile_mode on CUDA, not compiled on CPU (minutes of compiling per
    # shape for little gain); "off"; or a torch.compile mode for every device.
    fast_path_compile: Literal[
        "auto", "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "auto"
    fast_path_compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "max-autotune-no-cudagraphs"
    # The VAE decoder is compiled with the denoiser (same mode; never with CUDA graphs).
    fast_path_compile_vae: bool = True
    # Per model (its name as jobs give it, or "default" for the configured one): JSON such as
    # {"/models/sdxl": {"compile": "reduce-overhead", "fuse_qkv": false}}; only the exact
    # options (channels_last, fuse_qkv, compile) — those that change pixels are per template.
    fast_path_models: dict[str, dict[str, bool | str]] = Field(default_factory=dict)
    # Where compiled kernels are kept across worker restarts (default data_dir/compile-cache).
    compile_cache_dir: Path | None = None
    # CUDA: find the largest batch that fits (with this share of GPU memory left free), up to
    # render_batch_max, once per model and image size; CPU: render_batch_size.
    render_batch_probe: bool = True
    render_batch_max: int = Field(default=16, ge=1, le=256)
    render_batch_headroom: float = Field(default=0.15, ge=0, lt=1)
    # Pipelines a worker keeps loaded at once (least recently used is evicted).
    max_loaded_models: int = Field(default=2, ge=1)

    # A running job whose lease has not been extended for this long is presumed lost with its
    # worker and re-queued by the dispatcher's reaper. The worker's heartbeat extends the lease
    # every third of it while the job renders, so jobs may run far longer than this.
    job_lease_seconds: int = Field(default=300, ge=10)
    # A queued job whose message has not been picked up for this long is published again.
    requeue_after_seconds: int = Field(default=900, ge=1)
    # How many published-but-not-started jobs the dispatcher keeps on the broker: a few per
    # worker keeps every GPU fed while the backlog stays in Postgres (pausable, reorderable).
    dispatch_window: int = Field(default=32, ge=1)
    # Prompt blocklist file (one rule per line, see pixelmill/default_blocklist.txt); empty
    # means the shipped default list.
    blocklist_path: Path | None = None
    # Celery's soft time limit of a render task (the task is interrupted and the job retried):
    # longer than the longest job. The hard limit (the process is killed) is a little longer.
    job_time_limit_seconds: int = Field(default=7200, ge=10)
    # A job is claimed at most this many times: a claim that would exceed it (the job failed
    # or lost its worker that often) makes it `dead` with its last error instead.
    max_attempts: int = Field(default=3, ge=1)
    # A job given back for another attempt (its attempt failed, or its worker was lost) is
    # published again only after a pause that doubles with each try, from this many seconds
    # up to the maximum, drawn between half of it and all of it. An attempt that failed
    # because the database, broker or storage was unreachable is not counted in max_attempts.
    retry_backoff_seconds: float = Field(default=15.0, ge=0)
    retry_backoff_max_seconds: float = Field(default=600.0, ge=0)
    # Celery's worker_max_tasks_per_child: recycle a worker process after this many jobs
    # (None: never). Each new process loads its model again.
    worker_max_tasks_per_child: int | None = Field(default=None, ge=1)
    # Run the model's safety checker on every image (False: load pipelines without it and
    # record images as `unchecked`).
    safety_checker: bool = True
    # For models without a safety checker of their own (SD3, FLUX): a StableDiffusionSafety-
    # Checker folder (config.json and preprocessor_config.json, or an SD model folder) or hub
    # id, run after decoding. Empty: only a checker shipped in the model's folder.
    safety_checker_model: str = ""
    # SD3/FLUX's T5 text encoder: "auto" runs it in the pipeline's dtype (bfloat16 on CUDA),
    # "fp8" stores its weights in float8 (about 40% less memory, slightly other pixels).
    t5_precision: Literal["auto", "fp8"] = "auto"
    # Keep models in CPU memory and move them to the GPU as they run: "model" (one model at a
    # time), "sequential" (layer by layer: least memory, slowest), "none". CUDA only.
    model_offload: Literal["none", "model", "sequential"] = "none"
    # What happens to an image the safety checker flags: "quarantine" stores it under the
    # `quarantine/` key prefix, "drop" stores nothing (the row has an empty storage_key).
    # Either way its row says `flagged`.
    flagged_images: Literal["quarantine", "drop"] = "quarantine"
    # Catalogue images (`produce` with an image template): each distinct image is fetched once
    # (a path, s3:// or http(s)://) with this limit on connecting, on each read and on the
    # whole download, at most this many bytes (read until the limit, whatever the server
    # announces), and refused when it decodes to more pixels (a decompression bomb).
    input_fetch_timeout_seconds: float = Field(default=20.0, gt=0)
    input_max_bytes: int = Field(default=20_000_000, ge=1)
    input_max_pixels: int = Field(default=50_000_000, ge=1)
    # Images fetched at the same time.
    input_fetch_workers: int = Field(default=8, ge=1, le=64)
    # Throughput assumed by `produce --dry-run` to estimate GPU time.
    images_per_second: float = Field(default=1.0, gt=0)
    render_queue: str = "render"
    log_level: str = "INFO"
    # Review app (review/, `pixelmill review`).
    review_host: str = "127.0.0.1"
    review_port: int = Field(default=8080, ge=1, le=65535)
    # Signs session cookies; every review process must share it (at least 32 characters).
    # Required with PIXELMILL_DATABASE_URL; the embedded setup generates one in data_dir.
    review_secret_key: SecretStr | None = None
    # A claimed item left this long without a decision goes back to the queue; every decision
    # renews the claim.
    review_claim_lease_seconds: int = Field(default=600, ge=10)
    # Lifetime of the presigned S3 URLs of the review pages' images.
    review_url_seconds: int = Field(default=900, ge=10, le=604800)
    # A login lasts this long at most; logging out or a new password ends it sooner.
    review_session_hours: float = Field(default=12.0, gt=0)
    # Mark the session cookie Secure (sent over HTTPS only). Unset: Secure unless the app is
    # bound to a loopback address (review_host), where plain HTTP stays on the machine.
    review_secure_cookies: bool | None = None
    # How often the app looks for items whose jobs have all ended (the queue's intake).
    review_sync_seconds: float = Field(default=10.0, gt=0)
    # Failed logins allowed per account and per client address within the window; past
    # either, logins are answered 429 with Retry-After until old failures leave the window.
    review_login_failures_per_account: int = Field(default=10, ge=1)
    review_login_failures_per_address: int = Field(default=50, ge=1)
    review_login_window_seconds: int = Field(default=900, ge=1)
    # Where the failure counts live: a redis:// URL shares them between app processes;
    # empty: in the process's memory (the embedded setup, or a single process).
    review_rate_limit_url: str = ""
    # Request bodies larger than this are refused with 413 as they arrive.
    review_max_body_bytes: int = Field(default=1_000_000, ge=1024)
    # How long after submitting an item its reviewer may reopen it (undo after Enter).
    review_reopen_seconds: int = Field(default=60, ge=0)
    # Prometheus: the port of a worker host's /metrics (every GPU worker and pool process on
    # the host, merged; 0: not served), of `dispatch --watch` (0: not served), and of
    # `pixelmill exporter` (run progress read from Postgres on each scrape).
    metrics_port: int = Field(default=0, ge=0, le=65535)
    dispatch_metrics_port: int = Field(default=0, ge=0, le=65535)
    exporter_port: int = Field(default=9466, ge=0, le=65535)
    # Where a worker host's processes write their metrics files (prometheus-client's
    # multiprocess mode); default data_dir/prometheus. Emptied when the host's workers start.
    prometheus_multiproc_dir: Path | None = None
    # A run should be finished this many hours after it was produced: the exporter publishes
    # the deadline and an alert fires when the projected finish is later.
    run_deadline_hours: float = Field(default=10.0, gt=0)

    # Ranking (scores at render time, the keeper model). The scorer: a CLIP model, a local
    # folder or a hub id loaded with transformers' CLIPModel ("tiny": the built-in tiny random
    # one; empty: nothing is scored). The aesthetic head: a LAION improved-aesthetic-predictor
    # state dict (.safetensors or .pth) on the scorer's image embedding; empty: none.
    scorer: str = ""
    aesthetic_head: Path | None = None
    # Images of one item whose embeddings' cosine similarity is above this are one group of
    # near-duplicates in the review grid (identical files always are).
    duplicate_similarity: float = Field(default=0.97, gt=0, le=1)
    # The keeper model: trained once a source has this many decisions (before that the grid
    # is ordered by CLIP and aesthetic scores), retrained after this many new ones.
    keeper_min_decisions: int = Field(default=200, ge=10)
    keeper_retrain_every: int = Field(default=200, ge=1)
    # Automatic rejection below this predicted keep probability (None: off). Recorded as the
    # model's decision, never a person's; undoable, nothing deleted.
    auto_reject_below: float | None = Field(default=None, gt=0, lt=1)
    # Early stop: a sweep stops once its item has this many images predicted to be kept with
    # at least this probability (None: every seed is rendered).
    early_stop_keepers: int | None = Field(default=None, ge=1)
    early_stop_probability: float = Field(default=0.8, gt=0, lt=1)

    # Finishing keepers (worker/finishing, `pixelmill finish RUN`): once an item is submitted
    # (and its reopen window has passed), its keepers are upscaled and captioned on the
    # finishing queue, which every worker serves beside the render queue. Off while neither
    # model is set. The upscaler: a Real-ESRGAN-family model file (.pth or .safetensors, read
    # by spandrel; "tiny": a built-in tiny random one); x2 or x4 (a model of a larger native
    # scale is resized down to it); run in tiles of this many input pixels a side, each with
    # this much context around it, so memory stays bounded at any image size.
    upscale_model: str = ""
    upscale_scale: int = 4
    upscale_tile: int = Field(default=256, ge=16, le=4096)
    upscale_tile_overlap: int = Field(default=16, ge=0, le=512)
    # The captioner: a BLIP captioning model (a folder or hub id loaded with transformers'
    # BlipForConditionalGeneration; "tiny": a built-in tiny random one). An optional prompt
    # starts the caption (conditional captioning; left out of the stored caption). Alt text is
    # the caption as a sentence of at most alt_text_max_chars characters.
    caption_model: str = ""
    caption_prompt: str = ""
    caption_max_tokens: int = Field(default=30, ge=1, le=512)
    caption_beams: int = Field(default=3, ge=1, le=16)
    alt_text_max_chars: int = Field(default=125, ge=16, le=2000)
    # A catalogue field (e.g. "description") that the first keeper's caption fills where the
    # item's own value is empty: recorded beside the item (catalogue_fills), never written
    # into it. Empty: nothing is filled.
    caption_fill_field: str = Field(default="", max_length=200)
    finishing_queue: str = "finishing"

    # Sales-channel export (`pixelmill export RUN --channel NAME --to ...`): the presets file
    # (unset: the built-in ones, examples/channels.yaml). Every exported file is marked as
    # AI-generated in its XMP; with a certificate chain (PEM, the signer's certificate first)
    # and its private key (PEM) it also carries a signed C2PA manifest, time-stamped by the
    # RFC 3161 authority at c2pa_timestamp_url if one is set (empty: offline, no time-stamp).
    channel_presets_path: Path | None = None
    c2pa_cert_path: Path | None = None
    c2pa_key_path: Path | None = None
    c2pa_signing_alg: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = (
        "es256"
    )
    c2pa_timestamp_url: str = ""

    # Webhooks (`pixelmill webhooks deliver`): each event (a run rendered, a run reviewed, an
    # export written) is posted as JSON to every URL here (a JSON list, or URLs separated by
    # commas or spaces; empty: none), signed with HMAC-SHA256 under the secret (required with
    # URLs, at least 16 characters). A receiver that does not answer 2xx within the timeout
    # is tried again after backoff_seconds, doubling up to max_backoff_seconds, until
    # max_attempts; the deliverer looks for new events every poll_seconds.
    webhook_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_secret: SecretStr | None = None
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    webhook_backoff_seconds: float = Field(default=10.0, gt=0)
    webhook_max_backoff_seconds: float = Field(default=3600.0, gt=0)
    webhook_max_attempts: int = Field(default=30, ge=1)
    webhook_poll_seconds: float = Field(default=10.0, gt=0)
    # Runs created longer ago than this are not announced as rendered or reviewed (turning
    # webhooks on does not announce every run of the past).
    webhook_lookback_days: float = Field(default=30.0, gt=0)

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("fast_path_models")
    @classmethod
    def _check_fast_path_models(
        cls, value: dict[str, dict[str, bool | str]]
    ) -> dict[str, dict[str, bool | str]]:
        modes = {"off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"}
        for model, options in value.items():
            for name, option in options.items():
                if name in ("channels_last", "fuse_qkv") and isinstance(option, bool):
                    continue
                if name == "compile" and option in modes:
                    continue
                raise ValueError(
                    f"{model}: {name}={option!r}: per-model options are channels_last and "
                    f"fuse_qkv (true/false) and compile ({', '.join(sorted(modes))})"
                )
        return value

    @field_validator("upscale_scale")
    @classmethod
    def _check_upscale_scale(cls, value: int) -> int:
        if value not in (2, 4):
            raise ValueError("must be 2 or 4")
        return value

    @field_validator("webhook_urls", mode="before")
    @classmethod
    def _split_webhook_urls(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        if value.strip().startswith("["):
            return json.loads(value)
        return [url for url in re.split(r"[\s,]+", value) if url]

    @field_validator("webhook_urls")
    @classmethod
    def _check_webhook_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and 0 < len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @model_validator(mode="after")
    def _check_webhook_secret(self) -> Settings:
        secret = self.webhook_secret.get_secret_value() if self.webhook_secret else ""
        if self.webhook_urls and not secret:
            raise ValueError("PIXELMILL_WEBHOOK_SECRET is required with PIXELMILL_WEBHOOK_URLS")
        return self

    @model_validator(mode="after")
    def _check_s3(self) -> Settings:
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("PIXELMILL_S3_BUCKET is required when PIXELMILL_STORAGE=s3")
        return self

    @model_validator(mode="after")
    def _check_c2pa(self) -> Settings:
        if (self.c2pa_cert_path is None) != (self.c2pa_key_path is None):
            raise ValueError(
                "PIXELMILL_C2PA_CERT_PATH and PIXELMILL_C2PA_KEY_PATH go together: set both"
            )
        return self

    @property
    def task_soft_time_limit(self) -> int:
        """Seconds a render task may run before it is interrupted (and retried)."""
        return self.job_time_limit_seconds

    @property
    def task_time_limit(self) -> int:
        """Seconds after which the worker process running a task is killed."""
        soft = self.task_soft_time_limit
        return soft + max(30, soft // 10)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'pixelmill.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        # kombu's SQLAlchemy transport: a real broker in a file, no server needed.
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def resolved_compile_cache_dir(self) -> Path:
        return (self.compile_cache_dir or self.data_dir / "compile-cache").resolve()

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "images").resolve()

    @property
    def resolved_prometheus_multiproc_dir(self) -> Path:
        return (self.prometheus_multiproc_dir or self.data_dir / "prometheus").resolve()

    @property
    def model_hash_cache(self) -> Path:
        """Where a host's workers keep their models' sha256, so a restart does not hash again."""
        return self.data_dir / "model-hashes.json"

    @property
    def tiny_model_dir(self) -> Path:
        return (self.data_dir / "models" / "tiny").resolve()


def get_settings(**overrides: object) -> Settings:
    """Build settings from the environment (and ``.env``), with explicit overrides on top."""
    return Settings(**overrides)  # type: ignore[arg-type]

# The GPU worker image: CUDA build of torch, one render process per GPU.
# Build from the repository root: docker build -f deploy/docker/worker.Dockerfile -t pixelmill-worker .
# Needs the NVIDIA driver and container toolkit on the host; torch's CUDA wheels bring the
# CUDA runtime and cuDNN themselves, so the base is a plain Python image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The pinned torch version, CUDA 12.8 build (README, "GPU hosts"), before pixelmill.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY pixelmill pixelmill
COPY db db
COPY migrations migrations
COPY producer producer
COPY worker worker
COPY review review
COPY monitoring monitoring
COPY cli cli
RUN pip install . && useradd --system --uid 10001 --home-dir /app pixelmill

USER pixelmill
# Metrics of every GPU worker and pool process of the host, merged and served on one port;
# the directory is emptied when the workers start.
ENV PIXELMILL_DATA_DIR=/tmp/pixelmill \
    PIXELMILL_METRICS_PORT=9464 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/pixelmill-metrics
EXPOSE 9464
# Celery's warm shutdown on SIGTERM: the current job finishes (give it the time: compose's
# stop_grace_period, Kubernetes' terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["pixelmill"]
CMD ["worker", "--gpus", "0"]

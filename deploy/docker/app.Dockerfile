# The slim image: dispatcher, review app, exporter, migrations, the nightly produce.
# Build from the repository root: docker build -f deploy/docker/app.Dockerfile -t pixelmill .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

# The CPU build of the pinned torch first (pixelmill imports it, none of these processes
# renders): the default wheel would bring CUDA libraries this image never uses.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

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
ENV PIXELMILL_DATA_DIR=/tmp/pixelmill
ENTRYPOINT ["pixelmill"]
CMD ["--help"]

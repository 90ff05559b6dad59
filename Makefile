# pixelmill developer commands. `make demo` and `make test` are the two the README promises.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo demo-products test lint format typecheck pytest migrations-check bench bench-worker review bench-review clean

# The venv is rebuilt when pyproject.toml changes. torch is installed first and pinned: the
# CPU wheel of 2.13.0 (an unpinned torch would pull a multi-GB CUDA build). spandrel (upscale
# models) is installed without its dependencies: see the "einops" line of pyproject.toml.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps 'spandrel>=0.4.2,<0.5'
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

## Run the nightly job end to end on embedded defaults (SQLite, local folder, tiny model).
demo: install
	$(BIN)/pixelmill demo

## The same on product photos: img2img, inpaint and ControlNet (examples/product-scenes).
demo-products: install
	$(BIN)/pixelmill demo --examples examples/product-scenes

## Lint, type-check and run every test against the real services.
test: lint typecheck pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

## Fail if the models and the migrations disagree (the test suite checks this too).
migrations-check: install
	$(BIN)/pixelmill db upgrade && $(BIN)/pixelmill db check

## Producer throughput and memory against a raw COPY (needs Postgres; a few minutes).
bench: install
	$(BIN)/python benchmarks/producer.py

## Worker throughput per model family: the whole system (Postgres, Redis, a Celery worker, moto
## S3) against bare diffusers loops (plain and fast path) on the same 32 images, then the
## system's overhead per job (null model, 64 jobs), then the goals.
bench-worker: install
	$(BIN)/python benchmarks/worker.py

## Serve the review app on the embedded defaults (add an account: pixelmill reviewer add NAME).
review: install
	$(BIN)/pixelmill review

## Review "next item" and grid page at 1,000 and 1,000,000 images (needs Postgres; minutes).
bench-review: install
	$(BIN)/python benchmarks/review.py

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache

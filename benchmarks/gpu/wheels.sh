#!/usr/bin/env bash
# Wheels for benchmarks/gpu/figures.sh, downloaded here into .whl/ (ignored by git), to travel
# with the working tree to a GPU host that cannot download. That host's image has Python 3.12
# with PyTorch (CUDA), transformers, safetensors, numpy, Pillow, typer, rich, jinja2, PyYAML
# and prometheus-client, but not the rest of what the worker and its benchmark import: these,
# at the versions this project is tested with.
#
#     benchmarks/gpu/wheels.sh            # then carry .whl (device tool: carry [".whl"])
set -euo pipefail
cd "$(dirname "$0")/../.."

PACKAGES=(
  diffusers==0.42.1 importlib_metadata==10.2.0
  sqlalchemy==2.1.9 greenlet==3.5.6 alembic==1.20.1 mako==1.4.3
  celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 tzlocal==5.4.5
  click-didyoumean==0.3.1 click-plugins==1.1.1.2 click-repl==0.4.1
  prompt_toolkit==3.0.53 wcwidth==0.9.5
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
  typing-inspection==0.4.5 annotated-types==0.8.0
  dynamicprompts==0.31.0 python-calamine==0.9.1 psycopg==3.3.9 psycopg-binary==3.3.9
)

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}"
du -sh .whl

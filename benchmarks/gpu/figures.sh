#!/usr/bin/env bash
# The README's GPU figures in one run on a GPU host: per family, a full-size model with random
# weights (`pixelmill model synthetic`, nothing downloaded), then benchmarks/worker.py on it
# (the whole system on the embedded services, and the bare diffusers loops, plain and fast
# path). Prepare here with benchmarks/gpu/wheels.sh; run there from the repository root:
#
#     bash benchmarks/gpu/figures.sh                    # sd15, then sdxl
#     FAMILIES=sd15 JOBS=4 bash benchmarks/gpu/figures.sh
#
# (PYTHON, DEVICE, SIZE and STEPS override the interpreter, the device and the goals' sizes
# and steps: a trial of the script itself on a CPU, not a figure.)
# Everything it prints also goes to $OUT/figures.txt ($OUT: a folder that comes back).
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-/tmp/pixelmill-gpu-out}
WORK=${WORK:-/tmp/pixelmill-gpu}
FAMILIES=${FAMILIES:-sd15,sdxl}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/figures.txt") 2>&1

if [[ -d .whl ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$WORK/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [[ $DEVICE == cuda* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PYTHON" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"

# The scorer's figure (render-time scoring <= 3% slower) on the first family, with a random
# CLIP ViT-L/14, the architecture of the LAION aesthetic predictor's encoder.
scorer="$WORK/models/clip-vit-l14"
if [[ ! -f "$scorer/config.json" ]]; then
  "$PYTHON" -m cli model synthetic --arch clip-vit-l14 --out "$scorer"
fi

for family in ${FAMILIES//,/ }; do
  case $family in
    # The issue's goals: SD1.5 512x512 25 steps, SDXL 1024x1024 30 steps.
    sd15) options=(--size "${SIZE:-512}" --steps "${STEPS:-25}" --seeds 8 --batch-size 8) ;;
    sdxl) options=(--size "${SIZE:-1024}" --steps "${STEPS:-30}" --seeds 4 --batch-size 4) ;;
    *) echo "unknown family $family (sd15, sdxl)" >&2; exit 2 ;;
  esac
  model="$WORK/models/$family"
  if [[ ! -f "$model/model_index.json" ]]; then
    started=$SECONDS
    "$PYTHON" -m cli model synthetic --arch "$family" --out "$model" --dtype fp16
    echo "$family: synthetic model written in $((SECONDS - started)) s"
  fi
  started=$SECONDS
  "$PYTHON" benchmarks/worker.py --embedded --device "$DEVICE" --model "$model" \
    --families "$family" --no-null --jobs "${JOBS:-4}" --scorer "$scorer" "${options[@]}"
  echo "$family: benchmark took $((SECONDS - started)) s"
done

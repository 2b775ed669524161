#!/usr/bin/env bash
# Baseline recipes for a lent GPU (issue 10, lever 1): VGG16 width 1 from scratch on this
# repository's JPEG CIFAR-10 with three recipes, each meant to fit 3 minutes on one H100/H200;
# prints test accuracy (plain and with a flip average), held-out accuracy and seconds per recipe.
#
#   bash benchmarks/gpu_paper.sh prepare          # on the dev machine, then carry .gpu
#   bash benchmarks/gpu_baseline.sh vgg16         # on the GPU machine, one call of about 6 minutes
#   bash benchmarks/gpu_baseline.sh vgg16 --dry-run   # same code path on the CPU, smoke scale
#
# Timings it was sized from (issue 10, H200): 30 epochs at batch 256 took 55 s (1.8 s/epoch).
set -euo pipefail
cd "$(dirname "$0")/.."
NET=${1:?usage: gpu_baseline.sh NET [--dry-run]}
OUT_DIR="${OUT:-/tmp/rl_mtd_gpu}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
if [[ "${2:-}" == "--dry-run" ]]; then
  DATA="${RL_MTD_DATA:?--dry-run reads the dataset from RL_MTD_DATA; set it}"
  export RL_MTD_CACHE="${RL_MTD_CACHE:-/tmp/rl_mtd_gpu/cache}"
  ARGS=(--width 0.125 --device cpu --train-size 1000 --proxy-size 200 --test-size 500)
  RECIPES=(today:ep=1,lr=0.1,bs=256 long:ep=2,lr=0.1,bs=256 wide:ep=2,lr=0.2,bs=512)
else
  source benchmarks/_gpu_env.sh
  ARGS=(--width 1 --device cuda --proxy-size 5000)
  # today's gpu_paper.sh recipe, twice the epochs, and twice the epochs at batch 512.
  RECIPES=(today:ep=30,lr=0.1,bs=256 long:ep=60,lr=0.1,bs=256 wide:ep=60,lr=0.2,bs=512)
fi
"${PYTHON:-python3}" benchmarks/baseline_recipe.py --net "$NET" --data "$DATA" "${ARGS[@]}" \
  --recipes "${RECIPES[@]}" --out "$OUT_DIR/$NET-baseline-recipes.json" 2>&1 \
  | tee "$OUT_DIR/$NET-baseline-recipes.txt"

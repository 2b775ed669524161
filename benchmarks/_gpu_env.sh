# Sourced by the gpu_*.sh scripts on the GPU machine: the carried dataset (sets DATA), the
# wheels its Python lacks, the repository on PYTHONPATH, a cache in /tmp, and the GPU's name.
DATA=.gpu/cifar10-jpeg.tar.gz
[[ -f $DATA ]] || { echo "error: $DATA missing; run 'bash benchmarks/gpu_paper.sh prepare' and carry .gpu" >&2; exit 2; }
if ! python3 -c "import gymnasium, stable_baselines3, tensorly" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export RL_MTD_CACHE="${RL_MTD_CACHE:-/tmp/rl_mtd_cache}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

#!/usr/bin/env bash
# One device-tool call: environment facts, native kernel tests, then timings. Each stage has its
# own time limit and writes under $OUT, so a slow stage cannot lose the others' results.
# Usage (on the GPU machine, after the wheel install line of ../shared/gpu/wheels.sh):
#   bash bench/gpu_session.sh STAGES...   with stages: env kernels attention sweep train train_more sampling
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case "$stage" in
    env)
      nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/env.txt"
      python3 -c "import jax, flax, optax, orbax.checkpoint, grain; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/env.txt" ;;
    kernels)
      timeout 300 python3 -m pytest -q -x -m gpu kernels -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/pytest_gpu.log" ;;
    attention)
      timeout 330 python3 bench/attention.py --out "$OUT/attention.json" 2>&1 | tail -40 ;;
    sweep)
      timeout 420 python3 bench/attention.py --sweep --no-xla --no-cudnn --shapes "32,18,256,64;32,18,1024,64" --out "$OUT/sweep.json" 2>&1 | tail -40 ;;
    train)
      timeout 420 python3 bench/train_step.py --variants "${TRAIN_VARIANTS:-default}" --out "$OUT/train_step.json" 2>&1 | tail -25 ;;
    sampling)
      timeout 300 python3 bench/train_step.py --variants "" --sampling --out "$OUT/sampling.json" 2>&1 | tail -8 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "=== done $(date +%T)"

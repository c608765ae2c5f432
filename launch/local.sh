#!/usr/bin/env bash
# Single-node training on every visible GPU (one process; JAX shards the batch over all local devices).
#
#   bash launch/local.sh configs/in256.py runs/in256 --config.data.path=/data/in256_latents
#   CUDA_VISIBLE_DEVICES=0,1 bash launch/local.sh configs/digits.py runs/digits
#
# Extra arguments go to `python -m tvm_jax.main` (any --config.a.b=value override, --mode=...).
# Re-running the same command resumes from the latest checkpoint in the workdir.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [tvm_jax.main flags...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
[[ -f "$config" ]] || { echo "error: config file $config not found" >&2; exit 2; }
# Let XLA use most of the GPU memory up front (fewer fragmentation surprises on long runs).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# exec: SIGTERM/SIGINT reach the trainer directly (it saves a checkpoint before exiting).
exec python -m tvm_jax.main --config="$config" --workdir="$workdir" "$@"

#!/usr/bin/env bash
# Single-node training on every visible GPU.
#
#   bash launch/local.sh configs/in256.py runs/in256 --config.data.path=/data/in256_latents
#   CUDA_VISIBLE_DEVICES=0,1 bash launch/local.sh configs/digits.py runs/digits
#   NUM_PROCESSES=8 bash launch/local.sh configs/in256.py runs/in256 ...   # one process per GPU
#
# NUM_PROCESSES=1 (default): one process drives all local GPUs (JAX shards the batch over them).
# NUM_PROCESSES=N > 1: N processes joined by jax.distributed (coordinator on localhost:PORT,
# PORT from COORDINATOR_PORT, default 23456), each seeing its own equal share of the GPUs
# (CUDA_VISIBLE_DEVICES); on a machine without GPUs each process uses the CPU. Both modes train
# the same run: the global batches do not depend on the process count, and a workdir written in
# one mode resumes in the other. Output of process i > 0 goes to WORKDIR/logs/process_i.log.
#
# Extra arguments go to `python -m tvm_jax.main` (any --config.a.b=value override, --mode=...).
# Re-running the same command resumes from the latest checkpoint in the workdir.
# SIGTERM/SIGINT reach the trainer(s), which save a checkpoint and exit (status 143/130).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: [NUM_PROCESSES=N] $0 CONFIG WORKDIR [tvm_jax.main flags...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
[[ -f "$config" ]] || { echo "error: config file $config not found" >&2; exit 2; }
# Let XLA use most of the GPU memory up front (fewer fragmentation surprises on long runs).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
nproc=${NUM_PROCESSES:-1}
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "error: NUM_PROCESSES must be a positive integer, got '$nproc'" >&2; exit 2; }
if (( nproc == 1 )); then
  # exec: SIGTERM/SIGINT reach the trainer directly (it saves a checkpoint before exiting).
  exec python -m tvm_jax.main --config="$config" --workdir="$workdir" "$@"
fi

# One process per GPU share.
gpus=()
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=, read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
  mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader)
fi
if (( ${#gpus[@]} > 0 && ${#gpus[@]} % nproc != 0 )); then
  echo "error: NUM_PROCESSES=$nproc does not divide the ${#gpus[@]} visible GPUs (${gpus[*]})" >&2
  exit 2
fi
per=$(( ${#gpus[@]} / nproc ))
port=${COORDINATOR_PORT:-23456}
mkdir -p "$workdir/logs"
pids=()
stop() { kill -s "$1" "${pids[@]}" 2> /dev/null || true; }
trap 'stop TERM' TERM
trap 'stop INT' INT
for (( i = 0; i < nproc; i++ )); do
  env_gpu=()
  if (( per > 0 )); then
    share=$(IFS=,; echo "${gpus[*]:$(( i * per )):$per}")
    env_gpu=(CUDA_VISIBLE_DEVICES="$share")
  fi
  cmd=(env "${env_gpu[@]}" python -m tvm_jax.main --config="$config" --workdir="$workdir"
       --coordinator_address="localhost:$port" --num_processes="$nproc" --process_id="$i" "$@")
  if (( i == 0 )); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" > "$workdir/logs/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
# Wait for all; the job's status is the first non-zero one (a failed process brings the
# others down: jax.distributed stops them when a peer disappears).
status=0
for pid in "${pids[@]}"; do
  while true; do
    set +e
    wait "$pid"
    rc=$?
    set -e
    # 128+n from `wait` itself means a trapped signal interrupted it: wait again.
    if (( rc > 128 )) && kill -0 "$pid" 2> /dev/null; then continue; fi
    break
  done
  if (( rc != 0 && status == 0 )); then status=$rc; fi
done
exit "$status"

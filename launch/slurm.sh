#!/usr/bin/env bash
# Multi-node training under SLURM: one task per node, each task drives all GPUs of its node.
# jax.distributed.initialize() reads the SLURM environment (coordinator = first node), so
# tvm_jax.main needs no extra flags; the global batch is split over all GPUs of all nodes.
#
#   sbatch --nodes=4 launch/slurm.sh configs/in256.py /shared/runs/in256 --config.data.path=/shared/in256
#
# The workdir and data must be on a filesystem every node sees. Preemption: SLURM sends SIGTERM
# (request it ahead with --signal below); the trainer saves a checkpoint and exits, and the same
# sbatch line resumes.
#SBATCH --job-name=tvm-jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: sbatch [--nodes=N] $0 CONFIG WORKDIR [tvm_jax.main flags...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
echo "nodes: ${SLURM_JOB_NODELIST:-?} tasks: ${SLURM_NTASKS:-1}"
srun --kill-on-bad-exit=1 python -m tvm_jax.main --config="$config" --workdir="$workdir" "$@"

# Sourced by the bench/gpu_*_session.sh scripts: strict variables, the output folder ($OUT, which
# the device tool brings back), unbuffered Python, a timestamped log line, and the GPUs in use.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "=== $* $(date +%T)"; }
nvidia-smi --query-gpu=name,memory.total --format=csv

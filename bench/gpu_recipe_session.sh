#!/usr/bin/env bash
# Device-tool calls for the recipe benchmarks on a 2-GPU machine (nvidia-h200-x2): single-GPU
# jobs run side by side on GPU 0 and GPU 1, then the 2-GPU jobs. Every job has its own time limit
# and writes its JSON under $OUT as soon as it ends, so one slow job cannot lose the others.
# Usage (after the wheel install line of ../shared/gpu/wheels.sh):
#   bash bench/gpu_recipe_session.sh a     # 256px: headline 1 GPU | step+profile 256 & 512, sampling; then 2 GPUs DP, FSDP
#   bash bench/gpu_recipe_session.sh b     # 2 GPUs DP, FSDP; then 512px headline 1 GPU | sampling 256px
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "=== $* $(date +%T)"; }
nvidia-smi --query-gpu=name,memory.total --format=csv
case "${1:-}" in
  a)
    log "phase 1: GPU0 headline 256 | GPU1 train_step 256/512 + profile, sampling"
    (CUDA_VISIBLE_DEVICES=0 timeout 280 python3 bench/recipe_run.py --config configs/in256.py --steps 4 \
        --timeout 270 --out "$OUT/recipe_in256_1gpu.json" > "/tmp/log_recipe1.txt" 2>&1) &
    (CUDA_VISIBLE_DEVICES=1 timeout 150 python3 bench/train_step.py --variants default --profile \
        --out "$OUT/train_step_in256.json" > "/tmp/log_step256.txt" 2>&1;
     CUDA_VISIBLE_DEVICES=1 timeout 130 python3 bench/train_step.py --config configs/in512.py --batch_per_device 16 \
        --variants default --profile --sampling --out "$OUT/train_step_in512.json" > "/tmp/log_step512.txt" 2>&1) &
    wait
    tail -n 5 "/tmp/log_recipe1.txt" "/tmp/log_step256.txt" "/tmp/log_step512.txt"
    log "phase 2: 2 GPUs data parallel, then FSDP 2"
    timeout 150 python3 bench/recipe_run.py --config configs/in256.py --steps 4 --timeout 145 \
        --out "$OUT/recipe_in256_2gpu.json" 2>&1 | tail -2
    timeout 150 python3 bench/recipe_run.py --config configs/in256.py --steps 4 --timeout 145 --set mesh.fsdp=2 \
        --out "$OUT/recipe_in256_2gpu_fsdp2.json" 2>&1 | tail -2 ;;
  b)
    log "2 GPUs: headline 256 data parallel, then FSDP 2"
    timeout 165 python3 bench/recipe_run.py --config configs/in256.py --steps 3 --timeout 160 \
        --out "$OUT/recipe_in256_2gpu.json" 2>&1 | tail -n 2
    timeout 170 python3 bench/recipe_run.py --config configs/in256.py --steps 3 --timeout 165 --set mesh.fsdp=2 \
        --out "$OUT/recipe_in256_2gpu_fsdp2.json" 2>&1 | tail -n 2
    log "GPU0 headline 512 | GPU1 sampling 256px, batch 256 and 1024"
    (CUDA_VISIBLE_DEVICES=1 timeout 150 python3 bench/train_step.py --variants "" --sampling --sampling_batch 256,1024 \
        --out "$OUT/sampling_in256.json" > /tmp/log_sampling.txt 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 235 python3 bench/recipe_run.py --config configs/in512.py --steps 2 --timeout 230 \
        --out "$OUT/recipe_in512_1gpu.json" 2>&1 | tail -n 2
    wait
    tail -n 4 /tmp/log_sampling.txt ;;
  *) echo "usage: $0 a|b" >&2; exit 2 ;;
esac
log done

#!/usr/bin/env bash
# Device-tool calls for the recipe benchmarks on a 2-GPU machine (nvidia-h200-x2): single-GPU
# jobs run side by side on GPU 0 and GPU 1, then the 2-GPU jobs. Every job has its own time limit
# and writes its JSON under $OUT as soon as it ends, so one slow job cannot lose the others.
# Usage (after the wheel install line of ../shared/gpu/wheels.sh):
#   bash bench/gpu_recipe_session.sh a     # 256px: headline 1 GPU | step+profile 256 & 512, sampling; then 2 GPUs DP, FSDP
#   bash bench/gpu_recipe_session.sh b     # 2 GPUs DP, FSDP; then 512px headline 1 GPU | sampling 256px
#   bash bench/gpu_recipe_session.sh c     # 512px headline 1 GPU | 256px headline 1 GPU (8 steps), remat and sampling profiles
#   bash bench/gpu_recipe_session.sh e     # XLA GEMM-epilogue flags on the 256px step and sampling; GPU step-vs-XLA test
#   bash bench/gpu_recipe_session.sh f     # 2 GPUs FSDP 2 (6 steps); 512px headline (4 steps) | 512px step at batch 32
#   bash bench/gpu_recipe_session.sh g     # 2 GPUs, one process per GPU through launch/local.sh
#   bash bench/gpu_recipe_session.sh d     # 2 GPUs DP at 256px, 8 steps (scaling against c's 1-GPU run); profiled 2-GPU step
source "$(dirname "$0")/gpu_session_common.sh"
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
  c)
    log "GPU0 headline 512 (3 steps) | GPU1 headline 256 (8 steps), then step variants and sampling profile"
    (CUDA_VISIBLE_DEVICES=1 timeout 230 python3 bench/recipe_run.py --config configs/in256.py --steps 8 --timeout 225 \
        --out "$OUT/recipe_in256_1gpu.json" > /tmp/log_recipe256.txt 2>&1;
     CUDA_VISIBLE_DEVICES=1 timeout 110 python3 bench/train_step.py --variants remat_none,remat_block --profile \
        --out "$OUT/train_step_in256_remat.json" > /tmp/log_step256.txt 2>&1;
     CUDA_VISIBLE_DEVICES=1 timeout 80 python3 bench/train_step.py --variants "" --sampling --profile \
        --out "$OUT/sampling_in256_profile.json" > /tmp/log_sampling.txt 2>&1;
     CUDA_VISIBLE_DEVICES=1 timeout 60 python3 bench/train_step.py --config configs/in512.py --batch_per_device 16 \
        --variants remat_dots --out "$OUT/train_step_in512_dots.json" > /tmp/log_step512.txt 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 520 python3 bench/recipe_run.py --config configs/in512.py --steps 3 --timeout 515 \
        --out "$OUT/recipe_in512_1gpu.json" 2>&1 | tail -n 2
    wait
    tail -n 3 /tmp/log_recipe256.txt; tail -n 6 /tmp/log_step256.txt /tmp/log_sampling.txt /tmp/log_step512.txt ;;
  d)
    log "2 GPUs: headline 256 data parallel, 8 steps"
    timeout 230 python3 bench/recipe_run.py --config configs/in256.py --steps 8 --timeout 225 \
        --out "$OUT/recipe_in256_2gpu.json" 2>&1 | tail -n 2
    log "2 GPUs: step of 2 micro-batches of 128 per device, profiled (where the collectives go)"
    timeout 150 python3 bench/train_step.py --variants default --batch_per_device 256 --set train.microbatch_size=128 \
        --profile --out "$OUT/train_step_in256_2gpu_micro.json" 2>&1 | tail -n 3 ;;
  e)
    log "XLA GEMM-epilogue flags, 256px step and sampling: GPU0 none, then triton_gemm_any | GPU1 cublaslt, then GPU tests"
    (CUDA_VISIBLE_DEVICES=1 XLA_FLAGS=--xla_gpu_enable_cublaslt=true timeout 120 python3 bench/train_step.py \
        --variants default --sampling --out "$OUT/flags_cublaslt.json" > /tmp/log_f2.txt 2>&1;
     CUDA_VISIBLE_DEVICES=1 timeout 150 python3 -m pytest -q -m gpu tests/test_attention_in_step.py \
        > "$OUT/pytest_gpu_attention_in_step.log" 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/train_step.py --variants default --sampling \
        --out "$OUT/flags_none.json" > /tmp/log_f1.txt 2>&1
    CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=--xla_gpu_triton_gemm_any=true timeout 150 python3 bench/train_step.py \
        --variants default --sampling --out "$OUT/flags_triton_gemm_any.json" > /tmp/log_f3.txt 2>&1
    wait
    tail -n 5 /tmp/log_f1.txt /tmp/log_f2.txt /tmp/log_f3.txt; tail -n 3 "$OUT/pytest_gpu_attention_in_step.log" ;;
  f)
    log "2 GPUs: headline 256 with mesh.fsdp=2, 6 steps"
    timeout 150 python3 bench/recipe_run.py --config configs/in256.py --steps 6 --timeout 145 --set mesh.fsdp=2 \
        --out "$OUT/recipe_in256_2gpu_fsdp2.json" 2>&1 | tail -n 1
    log "GPU0 headline 512 (4 steps) | GPU1 512px step at batch 32 (remat block), the like-for-like bench"
    (CUDA_VISIBLE_DEVICES=1 timeout 150 python3 bench/train_step.py --config configs/in512.py --variants default \
        --out "$OUT/train_step_in512_b32.json" > /tmp/log_s512.txt 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 405 python3 bench/recipe_run.py --config configs/in512.py --steps 4 --timeout 400 \
        --out "$OUT/recipe_in512_1gpu.json" 2>&1 | tail -n 1
    wait
    tail -n 3 /tmp/log_s512.txt ;;
  g)
    log "2 GPUs, one process per GPU (NUM_PROCESSES=2 bash launch/local.sh): headline 256, 4 steps"
    timeout 150 python3 bench/recipe_run.py --config configs/in256.py --processes 2 --steps 4 --timeout 140 \
        --out "$OUT/recipe_in256_2gpu_2proc.json" 2>&1 | tail -n 1 ;;
  *) echo "usage: $0 a|b|c|d|e|f|g" >&2; exit 2 ;;
esac
log done

#!/usr/bin/env bash
# Device-tool calls for the training-step work of issue 14 on a 2-GPU machine (nvidia-h200-x2):
# GPU 0 and GPU 1 run independent jobs side by side. Every job has its own time limit and writes
# its JSON under $OUT as soon as it ends, so one slow job cannot lose the others.
# Usage (after the wheel install line of ../shared/gpu/wheels.sh):
#   bash bench/gpu_step_session.sh h   # remat keeps the attention kernels' outputs (model.save_attention):
#                                      # GPU0 256px step before/after (+ profile without command buffers,
#                                      #      optimised HLO), GPU step-vs-XLA test, sampling HLO
#                                      # GPU1 512px batch 16 before/after, remat dots and block
#   bash bench/gpu_step_session.sh i   # after the GELU (sigmoid form) and modulation-barrier changes:
#                                      # GPU0 256px step + attribution (HLO tarred), sampling + attribution,
#                                      #      GPU step-vs-XLA test
#                                      # GPU1 XLA flags that turn off the Triton normalisation fusions
#                                      #      (sampling, step), 512px batch 16 dots and block
#   bash bench/gpu_step_session.sh j   # GPU0 native kernel suite (pytest -m gpu kernels), then the 256px step
#                                      #      and sampling again (the spread of repeated runs)
#                                      # GPU1 the 512px headline command with save_attention (which
#                                      #      micro-batch the trainer picks, 2 steps)
#   bash bench/gpu_step_session.sh k   # attribution profiles (command buffers off, every op row kept):
#                                      # GPU0 256px batch 32 | GPU1 512px batch 16, remat block then dots
#   bash bench/gpu_step_session.sh l   # the 512px headline command, 3 steps: GPU0 save_attention on
#                                      # (micro-batch 64) | GPU1 off (micro-batch 128)
#   bash bench/gpu_step_session.sh m   # XLA flags aimed at the step's copies (dynamic-update-slice memcpys
#                                      # into the scan's stacked residuals) and fusion tiling, each in its
#                                      # own process: GPU0 256px step + sampling | GPU1 512px batch 16 dots
#   bash bench/gpu_step_session.sh n   # attention_qkv (q/k norms inside the plain forward kernel) A/B:
#                                      # GPU0 256px step + sampling, code before (.baseline/src.tgz, a git
#                                      #      archive of the parent commit, carried, not committed) and
#                                      #      after, alternating, twice
#                                      #      then the sampling attribution without command buffers
#                                      # GPU1 native qkv kernel tests, GPU step-vs-XLA test
#   bash bench/gpu_step_session.sh o   # the native kernel suite (pytest -m gpu kernels), split over the
#                                      # two GPUs by test name; the two logs are joined afterwards
#   bash bench/gpu_step_session.sh p   # after the qkv split kernel: GPU0 sampling at batch 256 and 1,024
#                                      # (the largest measured) | GPU1 the 512px step, batch 16, remat dots
#   bash bench/gpu_step_session.sh r   # two A/Bs against .baseline/base.tgz (git archive of main), alternating:
#                                      # GPU0 the GELU in fc1's cuBLASLt epilogue (this tree): 256px step and
#                                      #      sampling x2, the GPU epilogue test, sampling attribution + HLO
#                                      # GPU1 the JVP-mode prologue kernel (.baseline/jvp.tgz, branch
#                                      #      jvp-prologue): 256px step x2, 512px dots x1, its native qkv tests
#   bash bench/gpu_step_session.sh s   # A/B against .baseline/base.tgz (git archive of main), alternating:
#                                      # the MLP's bias + GELU kernel and the split kernel before cuDNN
#                                      # (the latter measured, not kept: it is on branch cudnn-split)
#                                      # GPU0 256px step and sampling x2, native GELU/cuDNN-qkv tests
#                                      # GPU1 512px dots x1, plain forward Pallas vs cuDNN, GPU step test
#   bash bench/gpu_step_session.sh t   # GPU0 bench/bias_gelu.py tile sweep; the best tiles patched into this
#                                      # copy's kernels/gelu.py; then the 256px step + sampling A/B against
#                                      # .baseline/base.tgz on both GPUs (GPU0 before first, GPU1 after first)
#   bash bench/gpu_step_session.sh u   # the committed code with the GELU kernel: GPU0 256px step + sampling,
#                                      #      native GELU tests, sampling attribution | GPU1 256px step +
#                                      #      sampling, GPU step-vs-XLA test
#   bash bench/gpu_step_session.sh v   # the 512px step (batch 16, remat dots) with the GELU kernel: GPU0 this
#                                      # tree | GPU1 .baseline/base.tgz (main before it), at the same time
#   bash bench/gpu_step_session.sh w   # kernels.residual_norm_modulate: GPU0 tile sweep
#                                      # (bench/residual_norm_modulate.py; the best patched into this copy)
#                                      # | GPU1 its native tests; then sampling A/B against
#                                      # .baseline/base.tgz on both GPUs (GPU0 before first, GPU1 after first)
#   bash bench/gpu_step_session.sh x   # main with both memory-pass kernels: GPU0 256px step + sampling, then
#                                      #      the 512px step (batch 16, remat dots) | GPU1 GPU step-vs-XLA
#                                      #      test, native GELU and norm-modulate tests (swept tiles)
#   bash bench/gpu_step_session.sh y   # the one-kernel tangent backward (AttentionConfig.jvp_bwd_one_kernel):
#                                      # the two kernels at the defaults, then a sweep of the one kernel's
#                                      # tiles (bench/attention.py --sweep-kernels jvp_bwd): GPU0 head dim 64
#                                      # (the DiT shapes) | GPU1 head dim 128, then its native tests (bwd1)
#                                      # (the code is on branch one-kernel-bwd: measured, not kept)
#   bash bench/gpu_step_session.sh z   # GPU0 bench/linear_gelu.py (fc1 + bias + GELU as one Pallas matmul vs
#                                      #      cuBLAS + the GELU kernel; on branch linear-gelu: measured, not
#                                      #      kept), then the native attention tests
#                                      #      (plain, cuDNN, auto) | GPU1 the native tangent, grad-of-JVP and
#                                      #      qkv tests
#   bash bench/gpu_step_session.sh z2  # the 512px step's plain attention calls (FM term, teacher): auto
#                                      # (cuDNN at 1,024 tokens, its forward recomputed under remat) against
#                                      # Pallas (residuals kept), batch 16, remat dots, one process per GPU,
#                                      # the two GPUs in opposite orders
#   bash bench/gpu_step_session.sh z3  # GPU0 bench/matmul_probe.py (cuBLAS against jax's Mosaic GPU Hopper
#                                      # matmul at sampling's fc1) | GPU1 256px step + sampling again
#   bash bench/gpu_step_session.sh z4  # kernels.matmul (the model's token-wise matmuls on jax's Hopper Mosaic
#                                      # GPU matmul in undifferentiated calls): 256px step + sampling A/B
#                                      # against .baseline/base.tgz on both GPUs (GPU0 before first, GPU1
#                                      # after first); GPU1 first its native test (the code is on branch
#                                      # hopper-matmul: measured, not kept)
#   bash bench/gpu_step_session.sh z5  # model.layer_loop: the layer scan against one traced copy per block,
#                                      # one process each: GPU0 256px step + sampling, scan then unroll |
#                                      # GPU1 512px step (batch 16, remat dots), unroll then scan (this ran
#                                      # the first unrolled form, per-layer indexing; re-running it now
#                                      # times the committed form)
#   bash bench/gpu_step_session.sh z6  # layer_loop=unroll after the split fix (one concatenate of the per-layer
#                                      # gradients): GPU0 256px step, then the 512px step (batch 16, remat
#                                      # dots) | GPU1 the 256px step with prevent_cse=False (make_nocse: a
#                                      # patched copy of the tree in /tmp/nocse), then the scan at 256px
#   bash bench/gpu_step_session.sh z7  # layer_loop=unroll with prevent_cse=False (/tmp/nocse; the session's
#                                      # tree had it at that point): GPU0 256px step + sampling, then 256px
#                                      # without remat (this tree) | GPU1 the GPU step-vs-XLA test (with an
#                                      # unrolled case), the 512px step (dots)
#   bash bench/gpu_step_session.sh z8  # the unrolled loop where remat keeps its barriers (committed form):
#                                      # GPU0 256px per-image rate at larger batches: batch 64 scan + dots
#                                      # (the config) and unroll + no remat, batch 128 scan + dots | GPU1
#                                      # 512px batch 16: unroll + no remat, unroll + remat block
#   bash bench/gpu_step_session.sh z9  # the 256px headline command (configs/in256.py, global batch 2048, the
#                                      # trainer's automatic micro-batch), one GPU each: GPU0 layer_loop=unroll
#                                      # with remat none | GPU1 the config as committed before (scan, dots)
#   bash bench/gpu_step_session.sh z10 # GPU0 the 512px headline command (configs/in512.py) unrolled without
#                                      # remat at micro-batches of 16 | GPU1 the same command as committed
#                                      # (scan, remat block, automatic micro-batch), then the attribution
#                                      # profile of the 256px step as committed (unrolled, no remat;
#                                      # command buffers off)
#   bash bench/gpu_step_session.sh z11 # the barrier on the unrolled loop's stacked gradients (tvm_jax/dit.py) A/B
#                                      # against .baseline/base.tgz (main before it): GPU0 256px step before,
#                                      # after (+ sampling), then the attribution profile after (command
#                                      # buffers off) | GPU1 512px batch 16 (unrolled, no remat) after, before
#   bash bench/gpu_step_session.sh z12 # with the gradient barrier: GPU0 the 256px headline command (configs/in256.py,
#                                      # 6 steps) | GPU1 the 512px headline command unrolled without remat
#                                      # at micro-batches of 16 (3 steps), then the GPU step-vs-XLA test's
#                                      # unrolled cases (the scan cases do not run the changed code)
#   bash bench/gpu_step_session.sh z13 # the committed code (gradient barrier): the 256px step and sampling on both
#                                      # GPUs at the same time (two runs of the same tree)
#   bash bench/gpu_step_session.sh z14 # one per-layer split shared by the objective's two student calls
#                                      # (Network.prepare) A/B against .baseline/base.tgz (main before it):
#                                      # GPU0 256px step before, after, then the attribution profile after
#                                      # (command buffers off) with its optimised HLO | GPU1 after, before
#   bash bench/gpu_step_session.sh z15 # the Pallas backward of the JVP-mode qkv prologue (kernels.qkv_tangent)
#                                      # A/B against .baseline/base.tgz (main before it): GPU0 256px step
#                                      # before, after, attribution profile after | GPU1 its native tests,
#                                      # the GPU step-vs-XLA test's unrolled cases, 256px after, before
#   bash bench/gpu_step_session.sh z16 # every block's adaLN modulation as one batched matmul (DiT.block_modulations)
#                                      # A/B against .baseline/base.tgz (main before it), 256px step and
#                                      # sampling: GPU0 before, after | GPU1 the GPU step-vs-XLA test's
#                                      # unrolled cases, after, before (the code is on branch
#                                      # batched-modulation: measured, not kept)
#   bash bench/gpu_step_session.sh z17 # the committed code: GPU0 the 256px headline command (configs/in256.py,
#                                      # 6 steps) | GPU1 the 512px step (batch 16), then the 256px step
#                                      # and sampling again
#   bash bench/gpu_step_session.sh z18 # the step without its per-step parameter norm (tvm_jax.training):
#                                      # A/B against .baseline/base.tgz (main), 256px step: GPU0 before,
#                                      # after (+ optimised HLO) | GPU1 after, before
#   bash bench/gpu_step_session.sh z19 # the gradient norm taken of the per-layer gradients, A/B against
#                                      # .baseline/update_pass.tgz (z18's code): GPU0 before, after
#                                      # (+ optimised HLO) | GPU1 after, before
#   bash bench/gpu_step_session.sh z20 # the 256px headline command on both GPUs (data parallel, 6 steps):
#                                      # throughput, and its losses against z17's one-GPU run
#   bash bench/gpu_step_session.sh z21 # the committed code: GPU0 the 512px step (batch 16) | GPU1 the 256px
#                                      # step and sampling, then the GPU step-vs-XLA test (all cases)
#   bash bench/gpu_step_session.sh z22 # GPU1 the step-vs-XLA case z21 ran out of time in (auto, no remat,
#                                      # unrolled) | GPU0 the 256px step again
#   bash bench/gpu_step_session.sh z23 # 1-step sampling at large batches, 3 timed calls each: GPU0 4,096 and
#                                      # 16,384 | GPU1 32,768 and 24,576 (the largest batch that fits)
#   bash bench/gpu_step_session.sh z24 # XLA flags, one process each, 256px step: GPU0 none, concurrent
#                                      # command-buffer regions, Triton TMA | GPU1 concurrent regions, none,
#                                      # Triton GEMM off
#   (z25-z27 ran branch concurrent-kernels-option, where train.concurrent_kernels exists; not on main)
#   bash bench/gpu_step_session.sh z25 # train.concurrent_kernels: the headline command (6 steps, one GPU)
#                                      # GPU0 with it, GPU1 without; then sampling with / without the option
#   bash bench/gpu_step_session.sh z26 # train.concurrent_kernels at batch 64 (the recipe's micro-batch): GPU0
#                                      # the 256px step with it, then sampling at batch 14,336 | GPU1 the GPU
#                                      # step-vs-XLA test's unrolled cases with the option, the step without it
#   bash bench/gpu_step_session.sh z27 # train.concurrent_kernels (jax.jit compiler_options) at batch 32:
#                                      # GPU0 with it | GPU1 without it
#   bash bench/gpu_step_session.sh z28 # XLA_FLAGS concurrent command-buffer regions at batch 64 (the recipe's
#                                      # micro-batch): GPU0 with the flag | GPU1 without it
#   bash bench/gpu_step_session.sh z29 # profiles with command buffers on (device time against wall time):
#                                      # GPU0 the 256px step | GPU1 sampling
#   (z30-z32 ran kernels.norm_modulate_tangent before its pass-through of x, z30 and the first z31 also with
#    its first kernel: row sums reduced chunk by chunk, tiles (32, 4); run now, they run the current code)
#   bash bench/gpu_step_session.sh z30 # the JVP call's pre-norms with a Pallas backward: GPU1 the native kernel
#                                      # tests, bench/norm_tangent.py's sweep, the 256px step after / before |
#                                      # GPU0 before, after (+ HLO), the GPU step-vs-XLA test's unrolled cases
#   bash bench/gpu_step_session.sh z31 # bench/norm_tangent.py's sweep (rows, warps, keep) at the 256px shape
#                                      # (TILES=... picks the candidates; the first run used the default shown)
#   bash bench/gpu_step_session.sh z32 # z30's A/B again with the swept tiles (2, 1, 0): GPU1 the native kernel
#                                      # tests, the 256px step after / before | GPU0 before, after
#   bash bench/gpu_step_session.sh z33 # the same with x passed through the op (its backward adds the residual's
#                                      # cotangent in place), + the GPU step-vs-XLA test's unrolled cases on GPU0
#   bash bench/gpu_step_session.sh z34 # the 512px step, batch 16, at the same time: GPU0 with z33's kernel | GPU1 main
#   bash bench/gpu_step_session.sh z35 # XLA's dot-merger threshold: GPU0 bench/jvp_matmul_pairs.py (primal and tangent
#                                      # matmuls as pairs or one stacked call), the 256px step at 1024 MB (+ HLO)
#                                      # | GPU1 the step without flags, then at 1024 MB
#   bash bench/gpu_step_session.sh z36 # the flow-matching call's pre-norms with a Pallas backward: GPU0 native tests,
#                                      # tile sweep (best patched in), the 256px step after / before | GPU1
#                                      # before / after, then the GPU step-vs-XLA test's unrolled cases
#                                      # (the code is on branch fm-norm-grad and in bench/results/fm_norm_grad.patch:
#                                      # measured, not kept; apply the patch to run this letter)
#   bash bench/gpu_step_session.sh z37 # the headline command (configs/in256.py, 6 steps) on both GPUs, data parallel
#   bash bench/gpu_step_session.sh z38 # the native kernel suite (pytest -m gpu kernels), split over the two GPUs
#                                      # (written in the thirteenth session, not run there: device time ran out)
#   bash bench/gpu_step_session.sh z39 # the headline command on one GPU each at the same time: GPU0 this tree | GPU1
#                                      # .baseline/base.tgz (main before item 34's kernel)
#   bash bench/gpu_step_session.sh z40 # the GPU step-vs-XLA test, all six cases: GPU0 layer scan | GPU1 unrolled
#   bash bench/gpu_step_session.sh z41 # the qkv prologue inside the plain forward (no split kernel): GPU0 native qkv
#                                      # tests, bench/qkv_prologue.py (best tiles patched in), sampling after /
#                                      # before | GPU1 256px step + sampling before / after
#   bash bench/gpu_step_session.sh z42 # with it: the native kernel suite split over both GPUs, then the GPU
#                                      # step-vs-XLA test (GPU0 layer-scan cases | GPU1 unrolled)
#   bash bench/gpu_step_session.sh z43 # with its default tiles: the 256px step + sampling against main on both
#                                      # GPUs in opposite orders
#   bash bench/gpu_step_session.sh z44 # kernels.block_end_norm_modulate against the fused-prologue code: GPU0
#                                      # native tests, tile sweep (patched in), sampling after / before, the
#                                      # unrolled step-vs-XLA cases | GPU1 256px step + sampling before / after
#                                      # (measured, not kept: run `git apply bench/results/block_end.patch`
#                                      # first, and carry main as .baseline/base.tgz)
#   bash bench/gpu_step_session.sh z45 # the headline command on one GPU each at the same time: GPU0 the fused
#                                      # qkv prologue | GPU1 main before it (.baseline/base.tgz)
#   bash bench/gpu_step_session.sh z46 # jvp_dq="matmul" (dq, dtq of the tangent backward from dS written by the kv
#                                      # kernel, as XLA matmuls): GPU0 bench/attention.py jvp_fwd_bwd at five
#                                      # shapes, kernel then matmul; the 256px step before / with matmul at head
#                                      # dim 64 | GPU1 the native tangent tests (both choices), the step with / before
#   bash bench/gpu_step_session.sh z47 # with jvp_dq="auto" the default at head dim 128: GPU0 bench/attention.py at the
#                                      # five shapes (defaults), then the jvp_bwd_kv tiles swept with "matmul" at
#                                      # (1, 24, 4096, 128) and (1, 24, 1024, 128) | GPU1 the native tangent tests
#   bash bench/gpu_step_session.sh z48 # jvp_dq="matmul_qk" (dq, dtq, dk, dtk all from dS matmuls): GPU0 bench/attention.py
#                                      # at the five shapes, then jvp_bwd_kv swept with it at (1, 24, 4096 and 1024, 128)
#                                      # | GPU1 its native tests, then head dim 128 with the kv tile 32 x 32, 4 warps,
#                                      # under "matmul" and "kernel"
#   bash bench/gpu_step_session.sh z49 # jvp_bwd_impl ("auto" at head dim 128: jvp_bwd_v + dS matmuls from 2,048 tokens):
#                                      # GPU0 bench/attention.py at six shapes with the defaults, "matmul" forced at
#                                      # 1,024 and 8,192 tokens, jvp_bwd_v swept at 4,096 and 2,048 | GPU1 the native
#                                      # tangent tests under both impls
#   bash bench/gpu_step_session.sh z50 # GPU0 head dim 128 at 2,048 and 4,096 tokens: "kernels" forced, then the defaults
#                                      # ("auto": matmul), twice | GPU1 the rest of the native kernel suite
#   bash bench/gpu_step_session.sh z51 # the 256px step at the same time: GPU0 this tree (jvp_bwd_impl landed; head dim 64
#                                      # keeps "kernels") | GPU1 .baseline/base.tgz (main before it)
#   bash bench/gpu_step_session.sh z52 # jvp_bwd_impl="matmul_all" (P, tP, dS, dtS written; all six cotangents as
#                                      # matmuls) and the merged dS matmuls: GPU0 error check + profile, A/B against
#                                      # .baseline/base.tgz (main) alternating twice, profiles | GPU1 native tests,
#                                      # a jvp_bwd_v sweep under "matmul_all"
#   bash bench/gpu_step_session.sh z53 # jvp_bwd_impl="matmul_kv" (the query-block kernel writes P, tP, dS, dtS; dk,
#                                      # dv, dtk, dtv as matmuls): GPU0 error check + profile, A/B against main and
#                                      # the merged dS matmuls alternating twice, jvp_bwd_q sweep under it | GPU1
#                                      # native tests; every file in $OUT/z53.tgz
#   bash bench/gpu_step_session.sh z54 # the merged dS matmuls, final code: GPU0 A/B against .baseline/base.tgz (main)
#                                      # alternating three times, profile, "matmul" forced at 1,024 and 8,192
#                                      # tokens | native "matmul" tests (GPU1, or GPU0 afterwards on one GPU)
#   bash bench/gpu_step_session.sh z55 # one GPU: device time per kernel of main and of the merged dS matmuls
#                                      # (--profile), alternating twice; the native "matmul" tests
#                                      # (z54's stopped at its 170 s limit after 15 tests, none failed)
#   bash bench/gpu_step_session.sh z56 # one GPU: the hd128 call timed alone per sample and 8 back-to-back
#                                      # (--min-sample-ms 2 / 50), main and the merged dS matmuls, twice
# z57 (what jvp_bwd_v's dS/dtS stores cost: an experiment that drops them) is on commit 6399486,
# branch exp-nostore, with its kernel switch; it was not for main.
# z52's "matmul_all" (the key-block kernel writing P, tP, dS, dtS) is commit e9f478c; z53's
# "matmul_kv" (the query-block kernel writing them) is commit 9036937. Neither was kept.
# z46-z48 ran the first forms of that option (AttentionConfig.jvp_dq: "kernel", "matmul" = dq and dtq
# only, "matmul_qk" = today's "matmul"); the code that knew those names is commits 44b6552, 0513a1a
# and 39b7375: check one out to repeat them.
# The letters before z9 that run configs/in256.py ran it when it meant the layer scan with remat
# "dots" (z5-z8 now say so with --set); since the seventh session it unrolls the layers without
# remat, so to repeat an older letter add --set model.layer_loop=scan --set model.remat=dots.
source "$(dirname "$0")/gpu_session_common.sh"
make_nocse() {  # /tmp/nocse: this tree with jax.checkpoint(prevent_cse=False) in the unrolled layer loop
  rm -rf /tmp/nocse && mkdir -p /tmp/nocse && cp -r bench configs kernels tests tvm_jax pyproject.toml /tmp/nocse/ || return 1
  sed -i 's/prevent_cse=cfg.layer_loop != "scan"/prevent_cse=False/' /tmp/nocse/tvm_jax/dit.py
  grep -q "prevent_cse=False)" /tmp/nocse/tvm_jax/dit.py && ! grep -q "prevent_cse=cfg" /tmp/nocse/tvm_jax/dit.py \
    || { echo "patch failed"; return 1; }
}
unpack_base() {  # unpack_base [TGZ]: the carried archive of main's code (default .baseline/base.tgz) into /tmp/base
  mkdir -p /tmp/base && tar -C /tmp/base -xzf "${1:-.baseline/base.tgz}"
}
run_recipe() {  # run_recipe DEVICE TIMEOUT OUT CONFIG STEPS ARGS...: bench/recipe_run.py, its own limit 5 s shorter
  local dev=$1 t=$2 out=$3 config=$4 steps=$5; shift 5
  CUDA_VISIBLE_DEVICES=$dev timeout "$t" python3 bench/recipe_run.py --config "$config" --steps "$steps" \
    --timeout $((t - 5)) "$@" --out "$OUT/$out.json" > "/tmp/log_$out.txt" 2>&1
}
run_tree() {  # run_tree DEVICE TREE TIMEOUT OUT ARGS...: bench/train_step.py of one code tree
  local dev=$1 tree=$2 t=$3 out=$4; shift 4
  CUDA_VISIBLE_DEVICES=$dev PYTHONPATH=$tree:/tmp/site timeout "$t" python3 "$tree/bench/train_step.py" "$@" \
    --out "$OUT/$out.json" > "/tmp/log_$out.txt" 2>&1
}
run_flags() {  # run_flags DEVICE FLAGS TIMEOUT OUT ARGS...: this tree's 256px step with XLA_FLAGS=FLAGS
  local dev=$1 flags=$2 t=$3 out=$4; shift 4
  CUDA_VISIBLE_DEVICES=$dev XLA_FLAGS="$flags" timeout "$t" python3 bench/train_step.py --variants default "$@" \
    --out "$OUT/$out.json" > "/tmp/log_$out.txt" 2>&1
}
ab_step() {  # ab_step NAME: the 256px step of this tree against /tmp/base, alternating on both GPUs in
             # opposite orders (GPU0 before, then after with its optimised HLO; GPU1 after, then before)
  local name=$1
  (run_tree 1 "$PWD" 185 "train_step_h200_${name}_gpu1" --variants default
   run_tree 1 /tmp/base 185 "train_step_h200_before_${name}_gpu1" --variants default) &
  run_tree 0 /tmp/base 185 "train_step_h200_before_${name}_gpu0" --variants default
  run_tree 0 "$PWD" 185 "train_step_h200_${name}_gpu0" --variants default --hlo_dir /tmp/hlo
  tar -C /tmp -czf "$OUT/hlo_h200_in256_${name}.tgz" hlo 2>/dev/null
  wait
  for f in /tmp/log_*"${name}"*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-400; done
}
ab_norm_tangent() {  # ab_norm_tangent NAME TIMEOUT [step_test]: the native tests of kernels.norm_modulate_tangent and
                     # the 256px step against /tmp/base on both GPUs in opposite orders (+ the GPU step-vs-XLA test)
  local name=$1 t=$2
  (CUDA_VISIBLE_DEVICES=1 timeout 100 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py -k norm_modulate_tangent \
      -p no:cacheprovider > "$OUT/pytest_gpu_h200_norm_tangent_${name}.log" 2>&1
   run_tree 1 "$PWD" "$t" "train_step_h200_norm_tangent_${name}_gpu1" --variants default
   run_tree 1 /tmp/base "$t" "train_step_h200_before_norm_tangent_${name}_gpu1" --variants default) &
  run_tree 0 /tmp/base "$t" "train_step_h200_before_norm_tangent_${name}_gpu0" --variants default
  run_tree 0 "$PWD" "$t" "train_step_h200_norm_tangent_${name}_gpu0" --variants default
  if [ "${3:-}" = step_test ]; then
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -m gpu tests/test_attention_in_step.py -k unroll \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_attention_in_step_norm_tangent_${name}.log" 2>&1
  fi
  wait
  tail -n 3 "$OUT"/pytest_gpu_h200_*norm_tangent_"${name}".log
  for f in /tmp/log_*norm_tangent_"${name}"_gpu*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-400; done
}
case "${1:-}" in
  h)
    log "GPU0 256px before/after, attribution profile, GPU test, sampling HLO | GPU1 512px before/after"
    (CUDA_VISIBLE_DEVICES=1 timeout 170 python3 bench/train_step.py --config configs/in512.py --batch_per_device 16 \
        --set model.remat=dots --variants default,recompute_attention \
        --out "$OUT/train_step_in512_dots_save_attention.json" > /tmp/log_512d.txt 2>&1;
     CUDA_VISIBLE_DEVICES=1 timeout 170 python3 bench/train_step.py --config configs/in512.py --batch_per_device 16 \
        --variants default,recompute_attention \
        --out "$OUT/train_step_in512_block_save_attention.json" > /tmp/log_512b.txt 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 110 python3 bench/train_step.py --variants default,recompute_attention \
        --out "$OUT/train_step_in256_save_attention.json" > /tmp/log_256.txt 2>&1
    # attribution: without CUDA command buffers the trace names each fusion, and the HLO says what it is
    CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 90 python3 bench/train_step.py \
        --variants default --profile --hlo_dir "$OUT/hlo" \
        --out "$OUT/train_step_in256_attribution.json" > /tmp/log_256p.txt 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -m gpu tests/test_attention_in_step.py \
        > "$OUT/pytest_gpu_attention_in_step.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 80 python3 bench/train_step.py \
        --variants "" --sampling --profile --hlo_dir "$OUT/hlo" \
        --out "$OUT/sampling_in256_attribution.json" > /tmp/log_samp.txt 2>&1
    wait
    tail -n 4 /tmp/log_256.txt /tmp/log_256p.txt /tmp/log_samp.txt /tmp/log_512d.txt /tmp/log_512b.txt
    tail -n 3 "$OUT/pytest_gpu_attention_in_step.log" ;;
  i)
    NOCB=--xla_gpu_enable_command_buffer=
    F1=--xla_gpu_experimental_enable_triton_softmax_priority_fusion=false
    F2=--xla_gpu_experimental_enable_triton_heroless_priority_fusion=false
    log "GPU0 256px step, sampling (+ attribution), GPU test | GPU1 flags on sampling and step, 512px"
    (CUDA_VISIBLE_DEVICES=1 XLA_FLAGS=$F1 timeout 60 python3 bench/train_step.py --variants "" --sampling \
        --out "$OUT/sampling_in256_flag_softmax_priority_off.json" > /tmp/log_sf1.txt 2>&1;
     CUDA_VISIBLE_DEVICES=1 XLA_FLAGS=$F2 timeout 60 python3 bench/train_step.py --variants "" --sampling \
        --out "$OUT/sampling_in256_flag_heroless_off.json" > /tmp/log_sf2.txt 2>&1;
     CUDA_VISIBLE_DEVICES=1 XLA_FLAGS=$F1 timeout 60 python3 bench/train_step.py --variants default \
        --out "$OUT/train_step_in256_flag_softmax_priority_off.json" > /tmp/log_tf1.txt 2>&1;
     CUDA_VISIBLE_DEVICES=1 timeout 75 python3 bench/train_step.py --config configs/in512.py --batch_per_device 16 \
        --set model.remat=dots --variants default --out "$OUT/train_step_in512_dots_gelu.json" > /tmp/log_512d.txt 2>&1;
     CUDA_VISIBLE_DEVICES=1 timeout 75 python3 bench/train_step.py --config configs/in512.py --batch_per_device 16 \
        --variants default --out "$OUT/train_step_in512_block_gelu.json" > /tmp/log_512b.txt 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 60 python3 bench/train_step.py --variants default \
        --out "$OUT/train_step_in256_gelu.json" > /tmp/log_256.txt 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 60 python3 bench/train_step.py --variants "" --sampling \
        --out "$OUT/sampling_in256_gelu.json" > /tmp/log_samp.txt 2>&1
    CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=$NOCB timeout 110 python3 bench/train_step.py --variants default --profile \
        --sampling --hlo_dir /tmp/hlo --out "$OUT/attribution_in256_gelu.json" > /tmp/log_attr.txt 2>&1
    tar -C /tmp -czf "$OUT/hlo_in256_gelu.tgz" hlo 2>/dev/null
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -m gpu tests/test_attention_in_step.py \
        > "$OUT/pytest_gpu_attention_in_step.log" 2>&1
    wait
    tail -n 3 /tmp/log_256.txt /tmp/log_samp.txt /tmp/log_attr.txt /tmp/log_sf1.txt /tmp/log_sf2.txt /tmp/log_tf1.txt \
        /tmp/log_512d.txt /tmp/log_512b.txt
    tail -n 3 "$OUT/pytest_gpu_attention_in_step.log" ;;
  j)
    log "GPU0 kernel suite, 256px step and sampling repeat | GPU1 512px headline"
    run_recipe 1 335 recipe_in512_save_attention configs/in512.py 2 &
    CUDA_VISIBLE_DEVICES=0 timeout 280 python3 -m pytest -q -rs -m gpu kernels > "$OUT/pytest_gpu_kernels.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 60 python3 bench/train_step.py --variants default \
        --out "$OUT/train_step_in256_repeat.json" > /tmp/log_256.txt 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 60 python3 bench/train_step.py --variants "" --sampling \
        --out "$OUT/sampling_in256_repeat.json" > /tmp/log_samp.txt 2>&1
    wait
    tail -n 3 "$OUT/pytest_gpu_kernels.log" /tmp/log_256.txt /tmp/log_samp.txt /tmp/log_recipe_in512_save_attention.txt ;;
  k)
    NOCB=--xla_gpu_enable_command_buffer=
    log "attribution: GPU0 256px | GPU1 512px block, dots"
    (CUDA_VISIBLE_DEVICES=1 XLA_FLAGS=$NOCB timeout 110 python3 bench/train_step.py --config configs/in512.py \
        --batch_per_device 16 --variants default --profile \
        --out "$OUT/attribution_in512_block.json" > /tmp/log_a512b.txt 2>&1;
     CUDA_VISIBLE_DEVICES=1 XLA_FLAGS=$NOCB timeout 110 python3 bench/train_step.py --config configs/in512.py \
        --batch_per_device 16 --set model.remat=dots --variants default --profile \
        --out "$OUT/attribution_in512_dots.json" > /tmp/log_a512d.txt 2>&1) &
    CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=$NOCB timeout 100 python3 bench/train_step.py --variants default --profile \
        --out "$OUT/attribution_in256.json" > /tmp/log_a256.txt 2>&1
    wait
    tail -n 2 /tmp/log_a256.txt /tmp/log_a512b.txt /tmp/log_a512d.txt ;;
  l)
    log "512px headline: GPU0 save_attention on | GPU1 off"
    run_recipe 1 425 recipe_in512_recompute_attention configs/in512.py 3 --set model.save_attention=false &
    run_recipe 0 425 recipe_in512_save_attention configs/in512.py 3
    wait
    tail -n 1 /tmp/log_recipe_in512_save_attention.txt /tmp/log_recipe_in512_recompute_attention.txt ;;
  m)
    # name=flags pairs; "base" runs without flags. Each JSON records its XLA_FLAGS.
    FLAGS=("base=" "dsf=--xla_gpu_enable_dynamic_slice_fusion=true"
           "dbuf=--xla_gpu_enable_while_loop_double_buffering=true"
           "blr=--xla_gpu_experimental_enable_fusion_block_level_rewriter=true")
    log "XLA flags: GPU0 256px step + sampling | GPU1 512px dots"
    (for nf in "${FLAGS[@]}"; do n=${nf%%=*}; f=${nf#*=}
       CUDA_VISIBLE_DEVICES=1 XLA_FLAGS=$f timeout 100 python3 bench/train_step.py --config configs/in512.py \
         --batch_per_device 16 --set model.remat=dots --variants default \
         --out "$OUT/flags_in512_dots_$n.json" > /tmp/log_512_$n.txt 2>&1; done) &
    for nf in "${FLAGS[@]}" "unroll=--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_FULL_UNROLL"; do
      n=${nf%%=*}; f=${nf#*=}
      CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=$f timeout 110 python3 bench/train_step.py --variants default --sampling \
        --sampling_batch 256 --out "$OUT/flags_in256_$n.json" > /tmp/log_256_$n.txt 2>&1
    done
    wait
    for f in /tmp/log_256_*.txt /tmp/log_512_*.txt; do echo "--- $f"; tail -n 4 "$f"; done
    cd "$OUT" && tar -czf flags.tgz flags_*.json && rm flags_*.json ;;
  n)
    unpack_base .baseline/src.tgz || exit 1
    log "A/B attention_qkv: GPU0 step + sampling before/after x2, sampling attribution | GPU1 GPU tests"
    (CUDA_VISIBLE_DEVICES=1 timeout 150 python3 -m pytest -q -rs -m gpu kernels/tests/test_gpu.py -k qkv \
        > "$OUT/pytest_gpu_qkv.log" 2>&1;
     CUDA_VISIBLE_DEVICES=1 timeout 300 python3 -m pytest -q -m gpu tests/test_attention_in_step.py \
        > "$OUT/pytest_gpu_attention_in_step.log" 2>&1) &
    for rep in 1 2; do
      CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/base:/tmp/site timeout 100 python3 /tmp/base/bench/train_step.py \
        --variants default --sampling --out "$OUT/qkv_before_$rep.json" > /tmp/log_before_$rep.txt 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout 100 python3 bench/train_step.py --variants default --sampling \
        --out "$OUT/qkv_after_$rep.json" > /tmp/log_after_$rep.txt 2>&1
    done
    CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 80 python3 bench/train_step.py \
        --variants "" --sampling --profile --out "$OUT/sampling_qkv_attribution.json" > /tmp/log_prof.txt 2>&1
    wait
    for f in /tmp/log_before_*.txt /tmp/log_after_*.txt /tmp/log_prof.txt; do echo "--- $f"; tail -n 4 "$f"; done
    tail -n 3 "$OUT/pytest_gpu_qkv.log" "$OUT/pytest_gpu_attention_in_step.log"
    cd "$OUT" && tar -czf qkv.tgz qkv_*.json && rm qkv_*.json ;;
  o)
    log "native kernel suite: GPU0 plain, cuDNN, auto | GPU1 tangent, grad of jvp, qkv"
    (CUDA_VISIBLE_DEVICES=1 timeout 400 python3 -m pytest -q -rs -m gpu kernels -k "tangent or grad_of_jvp or qkv" \
        > "$OUT/pytest_gpu_kernels_gpu1.log" 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 400 python3 -m pytest -q -rs -m gpu kernels -k "not (tangent or grad_of_jvp or qkv)" \
        > "$OUT/pytest_gpu_kernels_gpu0.log" 2>&1
    wait
    tail -n 4 "$OUT/pytest_gpu_kernels_gpu0.log" "$OUT/pytest_gpu_kernels_gpu1.log" ;;
  p)
    log "GPU0 sampling 256 and 1024 | GPU1 512px dots"
    (CUDA_VISIBLE_DEVICES=1 timeout 110 python3 bench/train_step.py --config configs/in512.py --batch_per_device 16 \
        --set model.remat=dots --variants default --out "$OUT/train_step_in512_dots_split_qkv.json" > /tmp/log_512.txt 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/train_step.py --variants "" --sampling --sampling_batch 256,1024 \
        --out "$OUT/sampling_h200_split_qkv.json" > /tmp/log_samp.txt 2>&1
    wait
    tail -n 5 /tmp/log_samp.txt /tmp/log_512.txt ;;
  r)
    for v in base jvp; do mkdir -p /tmp/$v && tar -C /tmp/$v -xzf .baseline/$v.tgz || exit 1; done
    log "A/B: GPU0 GELU epilogue (step + sampling x2, GPU test, attribution) | GPU1 JVP-mode prologue"
    (for rep in 1 2; do
       run_tree 1 /tmp/base 90 ab_jvp_in256_before_$rep --variants default
       run_tree 1 /tmp/jvp 90 ab_jvp_in256_after_$rep --variants default
     done
     run_tree 1 /tmp/base 100 ab_jvp_in512_before_1 --config configs/in512.py --batch_per_device 16 \
       --set model.remat=dots --variants default
     run_tree 1 /tmp/jvp 100 ab_jvp_in512_after_1 --config configs/in512.py --batch_per_device 16 \
       --set model.remat=dots --variants default
     (cd /tmp/jvp && CUDA_VISIBLE_DEVICES=1 PYTHONPATH=/tmp/jvp:/tmp/site timeout 120 python3 -m pytest -q -rs -m gpu \
       kernels/tests/test_gpu.py -k qkv -p no:cacheprovider > "$OUT/pytest_gpu_qkv_jvp_prologue.log" 2>&1)) &
    for rep in 1 2; do
      run_tree 0 /tmp/base 100 ab_gelu_before_$rep --variants default --sampling
      run_tree 0 "$PWD" 100 ab_gelu_after_$rep --variants default --sampling
    done
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -rs -m gpu tests/test_gpu_gelu_epilogue.py \
      -p no:cacheprovider > "$OUT/pytest_gpu_gelu_epilogue.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 90 python3 bench/train_step.py \
      --variants "" --sampling --profile --hlo_dir /tmp/hlo --out "$OUT/sampling_gelu_attribution.json" \
      > /tmp/log_prof.txt 2>&1
    tar -C /tmp -czf "$OUT/hlo_sampling_gelu.tgz" hlo 2>/dev/null
    wait
    for f in /tmp/log_ab_*.txt /tmp/log_prof.txt; do echo "--- $f"; tail -n 2 "$f"; done
    tail -n 3 "$OUT/pytest_gpu_gelu_epilogue.log" "$OUT/pytest_gpu_qkv_jvp_prologue.log"
    cd "$OUT" && tar -czf ab.tgz ab_*.json && rm ab_*.json ;;
  s)
    unpack_base || exit 1
    log "A/B GELU kernel + split before cuDNN: GPU0 step + sampling x2, tests | GPU1 512px, attention fwd, step test"
    (run_tree 1 /tmp/base 100 ab_in512_before_1 --config configs/in512.py --batch_per_device 16 \
       --set model.remat=dots --variants default
     run_tree 1 "$PWD" 100 ab_in512_after_1 --config configs/in512.py --batch_per_device 16 \
       --set model.remat=dots --variants default
     CUDA_VISIBLE_DEVICES=1 timeout 100 python3 bench/attention.py --kinds plain_fwd --no-xla \
       --shapes "256,18,256,64;64,18,256,64;32,18,1024,64" --out "$OUT/attention_plain_fwd_h200.json" \
       > /tmp/log_attn.txt 2>&1
     CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest -q -m gpu tests/test_attention_in_step.py \
       -p no:cacheprovider > "$OUT/pytest_gpu_attention_in_step.log" 2>&1) &
    for rep in 1 2; do
      run_tree 0 /tmp/base 100 ab_in256_before_$rep --variants default --sampling
      run_tree 0 "$PWD" 100 ab_in256_after_$rep --variants default --sampling
    done
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -rs -m gpu kernels/tests/test_gpu.py \
      -k "bias_gelu or cudnn_reads or qkv_with_bias" -p no:cacheprovider > "$OUT/pytest_gpu_gelu_qkv.log" 2>&1
    wait
    for f in /tmp/log_ab_*.txt; do echo "--- $f"; tail -n 2 "$f"; done
    tail -n 12 /tmp/log_attn.txt
    tail -n 3 "$OUT/pytest_gpu_gelu_qkv.log" "$OUT/pytest_gpu_attention_in_step.log"
    cd "$OUT" && tar -czf ab.tgz ab_*.json && rm ab_*.json ;;
  t)
    unpack_base || exit 1
    log "GELU kernel tiles sweep, then A/B on both GPUs"
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench/bias_gelu.py --out "$OUT/bias_gelu_h200.json" > /tmp/log_sweep.txt 2>&1
    tail -n 30 /tmp/log_sweep.txt
    best=$(python3 -c "import json; print(','.join(map(str, json.load(open('$OUT/bias_gelu_h200.json'))['best_tiles'])))") || exit 1
    sed -i "s/^TILES = .*/TILES = ($best)/" kernels/gelu.py && grep -n "^TILES" kernels/gelu.py | tee "$OUT/ab_tiles.txt"
    (run_tree 1 "$PWD" 100 ab_t_after_gpu1 --variants default --sampling
     run_tree 1 /tmp/base 100 ab_t_before_gpu1 --variants default --sampling) &
    run_tree 0 /tmp/base 100 ab_t_before_gpu0 --variants default --sampling
    run_tree 0 "$PWD" 100 ab_t_after_gpu0 --variants default --sampling
    wait
    for f in /tmp/log_ab_t_*.txt; do echo "--- $f"; tail -n 4 "$f"; done
    cd "$OUT" && tar -czf ab.tgz ab_*.json && rm ab_*.json ;;
  u)
    log "GPU0 step + sampling, GELU tests, sampling attribution | GPU1 step + sampling, GPU step test"
    (run_tree 1 "$PWD" 100 train_step_sampling_h200_gelu_kernel_gpu1 --variants default --sampling
     CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest -q -m gpu tests/test_attention_in_step.py \
       -p no:cacheprovider > "$OUT/pytest_gpu_attention_in_step.log" 2>&1) &
    run_tree 0 "$PWD" 100 train_step_sampling_h200_gelu_kernel_gpu0 --variants default --sampling
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -rs -m gpu kernels/tests/test_gpu.py -k bias_gelu \
      -p no:cacheprovider > "$OUT/pytest_gpu_bias_gelu.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 90 python3 bench/train_step.py \
      --variants "" --sampling --profile --out "$OUT/sampling_h200_gelu_kernel_profile.json" > /tmp/log_prof.txt 2>&1
    wait
    for f in /tmp/log_train_step_*.txt /tmp/log_prof.txt; do echo "--- $f"; tail -n 4 "$f"; done
    tail -n 3 "$OUT/pytest_gpu_bias_gelu.log" "$OUT/pytest_gpu_attention_in_step.log" ;;
  v)
    unpack_base || exit 1
    log "512px: GPU0 this tree | GPU1 main before the GELU kernel"
    (run_tree 1 /tmp/base 110 train_step_h200_in512_dots_before_gelu_kernel --config configs/in512.py \
       --batch_per_device 16 --set model.remat=dots --variants default) &
    run_tree 0 "$PWD" 110 train_step_h200_in512_dots_gelu_kernel --config configs/in512.py \
       --batch_per_device 16 --set model.remat=dots --variants default
    wait
    for f in /tmp/log_train_step_h200_in512_*.txt; do echo "--- $f"; tail -n 2 "$f"; done ;;
  w)
    unpack_base || exit 1
    log "norm kernel: GPU0 sweep | GPU1 native tests; then sampling A/B on both"
    (CUDA_VISIBLE_DEVICES=1 timeout 60 python3 -m pytest -q -rs -m gpu kernels/tests/test_gpu.py -k norm_modulate \
       -p no:cacheprovider > "$OUT/pytest_gpu_residual_norm_modulate.log" 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 60 python3 bench/residual_norm_modulate.py \
      --out "$OUT/residual_norm_modulate_h200.json" > /tmp/log_sweep.txt 2>&1
    tail -n 25 /tmp/log_sweep.txt
    best=$(python3 -c "import json; print(','.join(map(str, json.load(open('$OUT/residual_norm_modulate_h200.json'))['best_tiles'])))") || exit 1
    sed -i "s/^TILES = .*/TILES = ($best)/" kernels/modulation.py && grep -n "^TILES" kernels/modulation.py | tee "$OUT/ab_tiles.txt"
    wait
    (run_tree 1 "$PWD" 70 ab_w_after_gpu1 --variants "" --sampling
     run_tree 1 /tmp/base 70 ab_w_before_gpu1 --variants "" --sampling) &
    run_tree 0 /tmp/base 70 ab_w_before_gpu0 --variants "" --sampling
    run_tree 0 "$PWD" 70 ab_w_after_gpu0 --variants "" --sampling
    wait
    for f in /tmp/log_ab_w_*.txt; do echo "--- $f"; tail -n 2 "$f"; done
    tail -n 3 "$OUT/pytest_gpu_residual_norm_modulate.log" ;;
  x)
    log "GPU0 256px step + sampling, 512px dots | GPU1 GPU step test, native GELU + norm-modulate tests"
    (CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest -q -m gpu tests/test_attention_in_step.py \
       -p no:cacheprovider > "$OUT/pytest_gpu_attention_in_step.log" 2>&1
     CUDA_VISIBLE_DEVICES=1 timeout 120 python3 -m pytest -q -rs -m gpu kernels/tests/test_gpu.py \
       -k "bias_gelu or norm_modulate" -p no:cacheprovider > "$OUT/pytest_gpu_memory_pass_kernels.log" 2>&1) &
    run_tree 0 "$PWD" 100 train_step_sampling_h200_norm_kernel --variants default --sampling
    run_tree 0 "$PWD" 110 train_step_h200_in512_dots_norm_kernel --config configs/in512.py \
       --batch_per_device 16 --set model.remat=dots --variants default
    wait
    for f in /tmp/log_train_step_*.txt; do echo "--- $f"; tail -n 4 "$f"; done
    tail -n 3 "$OUT/pytest_gpu_attention_in_step.log" "$OUT/pytest_gpu_memory_pass_kernels.log" ;;
  y)
    echo '{"jvp_bwd_one_kernel": true}' > /tmp/one_kernel.json
    sweep_bwd() {  # sweep_bwd DEVICE SHAPES NAME TIMEOUT
      CUDA_VISIBLE_DEVICES=$1 timeout 60 python3 bench/attention.py --shapes "$2" --no-xla --no-cudnn \
        --kinds jvp_fwd_bwd --out "$OUT/attention_jvp_bwd_two_kernels_$3.json" > "/tmp/log_two_$3.txt" 2>&1
      CUDA_VISIBLE_DEVICES=$1 timeout "$4" python3 bench/attention.py --shapes "$2" --no-cudnn \
        --config /tmp/one_kernel.json --sweep --sweep-kernels jvp_bwd \
        --out "$OUT/attention_jvp_bwd_one_kernel_sweep_$3.json" > "/tmp/log_one_$3.txt" 2>&1
    }
    log "one-kernel tangent backward: GPU0 head dim 64 | GPU1 head dim 128, then native bwd1 tests"
    (sweep_bwd 1 "1,24,4096,128;1,24,1024,128" h200_hd128 200
     CUDA_VISIBLE_DEVICES=1 timeout 230 python3 -m pytest -q -rs -m gpu kernels/tests/test_gpu.py -k bwd1 \
       -p no:cacheprovider > "$OUT/pytest_gpu_one_kernel_bwd.log" 2>&1) &
    sweep_bwd 0 "32,18,256,64;32,18,1024,64" h200_hd64 300
    wait
    for f in /tmp/log_two_*.txt /tmp/log_one_*.txt; do echo "--- $f"; grep -E "pallas +jvp_fwd_bwd|sweep jvp_bwd|rel err|best config:" "$f" | cut -c1-200; done
    tail -n 3 "$OUT/pytest_gpu_one_kernel_bwd.log" ;;
  z)
    log "GPU0 linear_gelu sweep, native plain/cuDNN/auto tests | GPU1 native tangent/grad-of-JVP/qkv tests"
    (CUDA_VISIBLE_DEVICES=1 timeout 330 python3 -m pytest -q -rs -m gpu kernels -k "tangent or grad_of_jvp or qkv" \
        -p no:cacheprovider > "$OUT/pytest_gpu_kernels_gpu1.log" 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/linear_gelu.py --out "$OUT/linear_gelu_h200.json" > /tmp/log_lg.txt 2>&1
    cat /tmp/log_lg.txt | cut -c1-160
    CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -q -rs -m gpu kernels \
        -k "not (tangent or grad_of_jvp or qkv or bias_gelu or norm_modulate)" \
        -p no:cacheprovider > "$OUT/pytest_gpu_kernels_gpu0.log" 2>&1
    wait
    tail -n 4 "$OUT/pytest_gpu_kernels_gpu0.log" "$OUT/pytest_gpu_kernels_gpu1.log" ;;
  z2)
    log "512px plain attention: GPU0 auto then pallas | GPU1 pallas then auto"
    (run_tree 1 "$PWD" 260 train_step_h200_in512_dots_plain_impl_gpu1 --config configs/in512.py \
       --batch_per_device 16 --set model.remat=dots --variants pallas_attention,default) &
    run_tree 0 "$PWD" 260 train_step_h200_in512_dots_plain_impl_gpu0 --config configs/in512.py \
       --batch_per_device 16 --set model.remat=dots --variants default,pallas_attention
    wait
    for f in /tmp/log_train_step_h200_in512_*.txt; do echo "--- $f"; tail -n 3 "$f"; done ;;
  z3)
    log "GPU0 Mosaic GPU matmul probe | GPU1 256px step + sampling"
    (run_tree 1 "$PWD" 110 train_step_sampling_h200_norm_kernel_repeat --variants default --sampling) &
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/matmul_probe.py --out "$OUT/matmul_probe_h200.json" \
      > /tmp/log_probe.txt 2>&1
    cut -c1-220 /tmp/log_probe.txt
    wait
    tail -n 4 /tmp/log_train_step_sampling_h200_norm_kernel_repeat.txt ;;
  z4)
    unpack_base || exit 1
    log "hopper matmul A/B: GPU0 before, after, step test | GPU1 native test, after, before"
    (CUDA_VISIBLE_DEVICES=1 timeout 60 python3 -m pytest -q -rs -m gpu kernels/tests/test_gpu.py -k mosaic \
       -p no:cacheprovider > "$OUT/pytest_gpu_mosaic_matmul.log" 2>&1
     run_tree 1 "$PWD" 110 ab_z4_after_gpu1 --variants default --sampling
     run_tree 1 /tmp/base 110 ab_z4_before_gpu1 --variants default --sampling) &
    run_tree 0 /tmp/base 110 ab_z4_before_gpu0 --variants default --sampling
    run_tree 0 "$PWD" 110 ab_z4_after_gpu0 --variants default --sampling
    wait
    for f in /tmp/log_ab_z4_*.txt; do echo "--- $f"; tail -n 4 "$f"; done
    tail -n 3 "$OUT/pytest_gpu_mosaic_matmul.log" ;;
  z5)
    log "layer loop A/B: GPU0 256px + sampling, scan then unroll | GPU1 512px dots, unroll then scan"
    (run_tree 1 "$PWD" 330 train_step_h200_in512_dots_layer_loop_unroll --config configs/in512.py \
       --batch_per_device 16 --set model.remat=dots --set model.layer_loop=unroll --variants default
     run_tree 1 "$PWD" 150 train_step_h200_in512_dots_layer_loop_scan --config configs/in512.py \
       --batch_per_device 16 --set model.remat=dots --set model.layer_loop=scan --variants default) &
    run_tree 0 "$PWD" 130 train_step_sampling_h200_layer_loop_scan --variants default --sampling \
       --set model.layer_loop=scan --set model.remat=dots
    run_tree 0 "$PWD" 330 train_step_sampling_h200_layer_loop_unroll --variants default --sampling \
       --set model.layer_loop=unroll --set model.remat=dots
    wait
    for f in /tmp/log_train_step_*layer_loop*.txt; do echo "--- $f"; tail -n 4 "$f" | cut -c1-600; done ;;
  z6)
    make_nocse || exit 1
    log "unroll (split): GPU0 256px then 512px dots | GPU1 256px unroll without CSE barriers, 256px scan"
    (run_tree 1 /tmp/nocse 200 train_step_h200_layer_loop_unroll_nocse --variants default \
       --set model.layer_loop=unroll --set model.remat=dots
     run_tree 1 "$PWD" 130 train_step_h200_layer_loop_scan_z6 --variants default --set model.layer_loop=scan \
       --set model.remat=dots) &
    run_tree 0 "$PWD" 200 train_step_h200_layer_loop_unroll_split --variants default --set model.layer_loop=unroll \
       --set model.remat=dots
    run_tree 0 "$PWD" 300 train_step_h200_in512_dots_layer_loop_unroll_split --config configs/in512.py \
       --batch_per_device 16 --set model.remat=dots --set model.layer_loop=unroll --variants default
    wait
    for f in /tmp/log_train_step_*layer_loop*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-600; done ;;
  z7)
    log "unroll: GPU0 256px + sampling, 256px remat none | GPU1 GPU step test, 512px dots"
    make_nocse || exit 1
    (cd /tmp/nocse && CUDA_VISIBLE_DEVICES=1 PYTHONPATH=/tmp/nocse:/tmp/site timeout 200 python3 -m pytest -q -m gpu \
       tests/test_attention_in_step.py -p no:cacheprovider > "$OUT/pytest_gpu_attention_in_step.log" 2>&1
     run_tree 1 /tmp/nocse 280 train_step_h200_in512_dots_layer_loop_unroll_nocse --config configs/in512.py \
       --batch_per_device 16 --set model.remat=dots --set model.layer_loop=unroll --variants default) &
    run_tree 0 /tmp/nocse 220 train_step_sampling_h200_layer_loop_unroll_nocse --variants default --sampling \
       --set model.layer_loop=unroll --set model.remat=dots
    run_tree 0 "$PWD" 220 train_step_h200_layer_loop_unroll_remat_none --variants default \
       --set model.layer_loop=unroll --set model.remat=none
    wait
    for f in /tmp/log_train_step_*layer_loop*.txt; do echo "--- $f"; tail -n 4 "$f" | cut -c1-600; done
    tail -n 3 "$OUT/pytest_gpu_attention_in_step.log" ;;
  z8)
    log "GPU0 256px batch 64/128, scan+dots vs unroll+none | GPU1 512px batch 16 unroll, none and block"
    (run_tree 1 "$PWD" 250 train_step_h200_in512_layer_loop_unroll_remat_none --config configs/in512.py \
       --batch_per_device 16 --set model.remat=none --set model.layer_loop=unroll --variants default
     run_tree 1 "$PWD" 250 train_step_h200_in512_block_layer_loop_unroll --config configs/in512.py \
       --batch_per_device 16 --set model.remat=block --set model.layer_loop=unroll --variants default) &
    run_tree 0 "$PWD" 100 train_step_h200_b64_scan_dots --variants default --batch_per_device 64 \
       --set model.layer_loop=scan --set model.remat=dots
    run_tree 0 "$PWD" 220 train_step_h200_b64_layer_loop_unroll_remat_none --variants default --batch_per_device 64 \
       --set model.remat=none --set model.layer_loop=unroll
    run_tree 0 "$PWD" 120 train_step_h200_b128_scan_dots --variants default --batch_per_device 128 \
       --set model.layer_loop=scan --set model.remat=dots
    wait
    for f in /tmp/log_train_step_*.txt; do echo "--- $f"; tail -n 2 "$f" | cut -c1-600; done ;;
  z9)
    log "256px headline: GPU0 unroll + remat none | GPU1 scan + dots"
    run_recipe 1 300 recipe_in256_h200_scan_dots configs/in256.py 6 --set model.layer_loop=scan --set model.remat=dots &
    run_recipe 0 465 recipe_in256_h200_unroll_none configs/in256.py 6 --set model.layer_loop=unroll --set model.remat=none
    wait
    tail -n 2 /tmp/log_recipe_in256_h200_unroll_none.txt /tmp/log_recipe_in256_h200_scan_dots.txt | cut -c1-400 ;;
  z10)
    log "512px headline: GPU0 unroll + remat none, micro-batch 16 | GPU1 scan + block (as committed), 256px profile"
    (run_recipe 1 330 recipe_in512_h200_scan_block_z10 configs/in512.py 3
     CUDA_VISIBLE_DEVICES=1 XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 220 python3 bench/train_step.py \
        --variants default --profile --out "$OUT/profile_h200_attribution_in256_unroll_none.json" > /tmp/log_p.txt 2>&1) &
    run_recipe 0 545 recipe_in512_h200_unroll_none_mb16 configs/in512.py 3 \
        --set model.layer_loop=unroll --set model.remat=none --set train.microbatch_size=16
    wait
    tail -n 2 /tmp/log_recipe_in512_h200_*.txt /tmp/log_p.txt | cut -c1-500 ;;
  z11)
    unpack_base || exit 1
    log "gradient barrier A/B: GPU0 256px before, after (+ sampling), profile after | GPU1 512px after, before"
    (run_tree 1 "$PWD" 260 train_step_h200_in512_unroll_none_grad_barrier --config configs/in512.py \
       --batch_per_device 16 --set model.layer_loop=unroll --set model.remat=none --variants default
     run_tree 1 /tmp/base 260 train_step_h200_in512_unroll_none_before_grad_barrier --config configs/in512.py \
       --batch_per_device 16 --set model.layer_loop=unroll --set model.remat=none --variants default) &
    run_tree 0 /tmp/base 190 train_step_h200_unroll_none_before_grad_barrier --variants default
    run_tree 0 "$PWD" 230 train_step_sampling_h200_grad_barrier --variants default --sampling
    XLA_FLAGS=--xla_gpu_enable_command_buffer= run_tree 0 "$PWD" 150 profile_h200_attribution_in256_grad_barrier \
       --variants default --profile
    wait
    for f in /tmp/log_*grad_barrier*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-400; done ;;
  z12)
    log "headline commands with the gradient barrier: GPU0 256px | GPU1 512px (micro-batch 16), GPU step test"
    (run_recipe 1 380 recipe_in512_h200_unroll_none_mb16_grad_barrier configs/in512.py 3 \
        --set model.layer_loop=unroll --set model.remat=none --set train.microbatch_size=16
     CUDA_VISIBLE_DEVICES=1 timeout 150 python3 -m pytest -q -m gpu tests/test_attention_in_step.py -k unroll -p no:cacheprovider \
        > "$OUT/pytest_gpu_h200_attention_in_step_grad_barrier.log" 2>&1) &
    run_recipe 0 500 recipe_in256_h200_grad_barrier configs/in256.py 6
    wait
    tail -n 2 /tmp/log_recipe_*grad_barrier.txt | cut -c1-500
    tail -n 3 "$OUT/pytest_gpu_h200_attention_in_step_grad_barrier.log" ;;
  z13)
    log "256px step + sampling, the same tree on both GPUs"
    run_tree 1 "$PWD" 240 train_step_sampling_h200_grad_barrier_gpu1 --variants default --sampling &
    run_tree 0 "$PWD" 240 train_step_sampling_h200_grad_barrier_gpu0 --variants default --sampling
    wait
    for f in /tmp/log_*grad_barrier_gpu*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-400; done ;;
  z14)
    unpack_base || exit 1
    log "one split for both student calls, A/B against main: GPU0 before, after, profile + HLO after | GPU1 after, before"
    (run_tree 1 "$PWD" 180 train_step_h200_shared_split_gpu1 --variants default
     run_tree 1 /tmp/base 180 train_step_h200_before_shared_split_gpu1 --variants default) &
    run_tree 0 /tmp/base 180 train_step_h200_before_shared_split_gpu0 --variants default
    run_tree 0 "$PWD" 180 train_step_h200_shared_split_gpu0 --variants default
    XLA_FLAGS=--xla_gpu_enable_command_buffer= run_tree 0 "$PWD" 200 profile_h200_attribution_in256_shared_split \
       --variants default --profile --hlo_dir /tmp/hlo
    tar -C /tmp -czf "$OUT/hlo_h200_in256_shared_split.tgz" hlo 2>/dev/null
    wait
    for f in /tmp/log_*shared_split*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-400; done ;;
  z15)
    unpack_base || exit 1
    log "Pallas backward of the JVP-mode qkv prologue, A/B against main: GPU0 before, after | GPU1 native tests, GPU step test, after, before"
    (CUDA_VISIBLE_DEVICES=1 timeout 100 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py -k qkv_tangent -p no:cacheprovider \
        > "$OUT/pytest_gpu_h200_qkv_tangent.log" 2>&1
     CUDA_VISIBLE_DEVICES=1 timeout 150 python3 -m pytest -q -m gpu tests/test_attention_in_step.py -k unroll -p no:cacheprovider \
        > "$OUT/pytest_gpu_h200_attention_in_step_qkv_tangent.log" 2>&1
     run_tree 1 "$PWD" 165 train_step_h200_qkv_tangent_gpu1 --variants default
     run_tree 1 /tmp/base 165 train_step_h200_before_qkv_tangent_gpu1 --variants default) &
    run_tree 0 /tmp/base 180 train_step_h200_before_qkv_tangent_gpu0 --variants default
    run_tree 0 "$PWD" 180 train_step_h200_qkv_tangent_gpu0 --variants default
    XLA_FLAGS=--xla_gpu_enable_command_buffer= run_tree 0 "$PWD" 180 profile_h200_attribution_in256_qkv_tangent \
       --variants default --profile
    wait
    tail -n 3 "$OUT"/pytest_gpu_h200_*qkv_tangent*.log
    for f in /tmp/log_*qkv_tangent*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-400; done ;;
  z16)
    unpack_base || exit 1
    log "every block's modulation at once, A/B against main: GPU0 before, after (+ sampling) | GPU1 GPU step test, after, before"
    (CUDA_VISIBLE_DEVICES=1 timeout 120 python3 -m pytest -q -m gpu tests/test_attention_in_step.py -k unroll -p no:cacheprovider \
        > "$OUT/pytest_gpu_h200_attention_in_step_block_modulations.log" 2>&1
     run_tree 1 "$PWD" 210 train_step_sampling_h200_block_modulations_gpu1 --variants default --sampling
     run_tree 1 /tmp/base 210 train_step_sampling_h200_before_block_modulations_gpu1 --variants default --sampling) &
    run_tree 0 /tmp/base 210 train_step_sampling_h200_before_block_modulations_gpu0 --variants default --sampling
    run_tree 0 "$PWD" 210 train_step_sampling_h200_block_modulations_gpu0 --variants default --sampling
    wait
    tail -n 3 "$OUT"/pytest_gpu_h200_attention_in_step_block_modulations.log
    for f in /tmp/log_*block_modulations*.txt; do echo "--- $f"; tail -n 6 "$f" | cut -c1-400; done ;;
  z17)
    log "the committed code: GPU0 the 256px headline command (6 steps) | GPU1 the 512px step (batch 16), the 256px step + sampling"
    (run_tree 1 "$PWD" 250 train_step_h200_in512_qkv_tangent --config configs/in512.py --batch_per_device 16 --variants default
     run_tree 1 "$PWD" 210 train_step_sampling_h200_qkv_tangent_repeat --variants default --sampling) &
    run_recipe 0 480 recipe_in256_h200_qkv_tangent configs/in256.py 6
    wait
    for f in /tmp/log_*qkv_tangent*.txt; do echo "--- $f"; tail -n 4 "$f" | cut -c1-500; done ;;
  z18)
    unpack_base || exit 1
    log "the step without its parameter norm, A/B against main: GPU0 before, after (+ HLO) | GPU1 after, before"
    ab_step update_pass ;;
  z19)
    unpack_base .baseline/update_pass.tgz || exit 1
    log "the gradient norm of the per-layer gradients, A/B against the step without its parameter norm: GPU0 before, after (+ HLO) | GPU1 after, before"
    ab_step layer_grad_norm ;;
  z20)
    log "the headline command (configs/in256.py, 6 steps, micro-batch chosen automatically) on both GPUs, data parallel"
    run_recipe 0,1 560 recipe_in256_h200x2_update_pass configs/in256.py 6
    tail -n 4 /tmp/log_recipe_in256_h200x2_update_pass.txt | cut -c1-600 ;;
  z21)
    log "the committed code (without the per-step parameter norm): GPU0 the 512px step (batch 16) | GPU1 the 256px step + sampling, the GPU step-vs-XLA test"
    (run_tree 1 "$PWD" 215 train_step_sampling_h200_update_pass_repeat --variants default --sampling
     CUDA_VISIBLE_DEVICES=1 timeout 170 python3 -m pytest -q -m gpu tests/test_attention_in_step.py -p no:cacheprovider \
        > "$OUT/pytest_gpu_h200_attention_in_step_update_pass.log" 2>&1) &
    run_tree 0 "$PWD" 260 train_step_h200_in512_update_pass --config configs/in512.py --batch_per_device 16 --variants default
    wait
    tail -n 3 "$OUT"/pytest_gpu_h200_attention_in_step_update_pass.log
    for f in /tmp/log_*update_pass*.txt; do echo "--- $f"; tail -n 6 "$f" | cut -c1-400; done ;;
  z22)
    log "z21's GPU step-vs-XLA test ran past its limit in its last case: GPU1 that case (auto, no remat, unrolled) | GPU0 the 256px step again"
    (CUDA_VISIBLE_DEVICES=1 timeout 180 python3 -m pytest -q -m gpu tests/test_attention_in_step.py -k "auto-none-unroll" \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_attention_in_step_update_pass_unroll.log" 2>&1) &
    run_tree 0 "$PWD" 185 train_step_h200_update_pass_repeat --variants default
    wait
    tail -n 3 "$OUT"/pytest_gpu_h200_attention_in_step_update_pass_unroll.log
    for f in /tmp/log_*update_pass_repeat*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-400; done ;;
  z23)
    log "sampling, 1 step, at large batches (the largest that fits): GPU0 4,096 and 16,384 | GPU1 32,768 and 24,576"
    (run_tree 1 "$PWD" 250 sampling_h200_large_batch_gpu1 --variants "" --sampling --sampling_batch 32768,24576 \
        --sampling_steps 1 --sampling_repeats 3) &
    run_tree 0 "$PWD" 200 sampling_h200_large_batch_gpu0 --variants "" --sampling --sampling_batch 4096,16384 \
        --sampling_steps 1 --sampling_repeats 3
    wait
    for f in /tmp/log_sampling_h200_large_batch*.txt; do echo "--- $f"; grep -E "^sampling|Error" "$f" | cut -c1-300; done ;;
  z24)
    log "XLA flags for the unrolled 256px step, each in its own process: GPU0 none, concurrent graph regions, Triton TMA | GPU1 concurrent graph regions, none, no Triton GEMM"
    (run_flags 1 "--xla_gpu_graph_enable_concurrent_region=true" 185 train_step_h200_flag_concurrent_region_gpu1
     run_flags 1 "" 185 train_step_h200_flag_none_gpu1
     run_flags 1 "--xla_gpu_enable_triton_gemm=false" 185 train_step_h200_flag_no_triton_gemm_gpu1) &
    run_flags 0 "" 185 train_step_h200_flag_none_gpu0
    run_flags 0 "--xla_gpu_graph_enable_concurrent_region=true" 185 train_step_h200_flag_concurrent_region_gpu0
    run_flags 0 "--xla_gpu_experimental_enable_triton_tma=true" 185 train_step_h200_flag_triton_tma_gpu0
    wait
    for f in /tmp/log_train_step_h200_flag_*.txt; do echo "--- $f"; tail -n 2 "$f" | cut -c1-300; done ;;
  z25)
    log "train.concurrent_kernels: GPU0 the headline command (configs/in256.py, 6 steps, one GPU) with it, then sampling with XLA_FLAGS=concurrent regions | GPU1 without it, then sampling without"
    (run_recipe 1 390 recipe_in256_h200_concurrent_off configs/in256.py 6
     CUDA_VISIBLE_DEVICES=1 timeout 150 python3 bench/train_step.py --variants "" --sampling \
        --out "$OUT/sampling_h200_concurrent_off.json" > /tmp/log_sampling_concurrent_off.txt 2>&1) &
    run_recipe 0 390 recipe_in256_h200_concurrent_on configs/in256.py 6 --set train.concurrent_kernels=true
    CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=--xla_gpu_graph_enable_concurrent_region=true timeout 150 python3 bench/train_step.py \
        --variants "" --sampling --out "$OUT/sampling_h200_concurrent_on.json" > /tmp/log_sampling_concurrent_on.txt 2>&1
    wait
    for f in /tmp/log_recipe_in256_h200_concurrent*.txt /tmp/log_sampling_concurrent*.txt; do
      echo "--- $f"; grep -E "Micro-batch|img/s|sampling|Error" "$f" | tail -n 6 | cut -c1-300; done ;;
  z26)
    log "train.concurrent_kernels at the recipe's micro-batch: GPU0 the 256px step at batch 64 with it, then sampling at batch 14,336 | GPU1 the GPU step-vs-XLA test's unrolled cases with the option, then the step at batch 64 without it"
    (CUDA_VISIBLE_DEVICES=1 XLA_FLAGS=--xla_gpu_graph_enable_concurrent_region=true timeout 200 python3 -m pytest -q -m gpu \
        tests/test_attention_in_step.py -k unroll -p no:cacheprovider > "$OUT/pytest_gpu_h200_attention_in_step_concurrent.log" 2>&1
     run_tree 1 "$PWD" 200 train_step_h200_b64_concurrent_off --variants default --batch_per_device 64) &
    run_tree 0 "$PWD" 200 train_step_h200_b64_concurrent_on --variants default --batch_per_device 64 \
        --set train.concurrent_kernels=true
    run_tree 0 "$PWD" 190 sampling_h200_batch14336 --variants "" --sampling --sampling_batch 14336 --sampling_steps 1 \
        --sampling_repeats 3
    wait
    tail -n 3 "$OUT/pytest_gpu_h200_attention_in_step_concurrent.log"
    for f in /tmp/log_train_step_h200_b64_concurrent*.txt /tmp/log_sampling_h200_batch14336.txt; do
      echo "--- $f"; tail -n 3 "$f" | cut -c1-300; done ;;
  z27)
    log "train.concurrent_kernels through jax.jit(compiler_options=...) at batch 32: GPU0 with it | GPU1 without it"
    (run_tree 1 "$PWD" 200 train_step_h200_b32_concurrent_off --variants default) &
    run_tree 0 "$PWD" 200 train_step_h200_b32_concurrent_on --variants default --set train.concurrent_kernels=true
    wait
    for f in /tmp/log_train_step_h200_b32_concurrent*.txt; do echo "--- $f"; tail -n 2 "$f" | cut -c1-300; done ;;
  z28)
    log "XLA_FLAGS=--xla_gpu_graph_enable_concurrent_region=true at batch 64 (the recipe's micro-batch): GPU0 with it | GPU1 without it"
    (run_flags 1 "" 220 train_step_h200_b64_flag_none --batch_per_device 64) &
    run_flags 0 "--xla_gpu_graph_enable_concurrent_region=true" 220 train_step_h200_b64_flag_concurrent_region \
        --batch_per_device 64
    wait
    for f in /tmp/log_train_step_h200_b64_flag*.txt; do echo "--- $f"; tail -n 2 "$f" | cut -c1-300; done ;;
  z29)
    log "profiles with command buffers on (the default), to compare device time with wall time: GPU0 the 256px step | GPU1 sampling"
    # XLA turns command buffers off while a profiler runs unless this flag says otherwise
    export XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true
    timeout 60 python3 -c "import jax; jax.numpy.ones(1).block_until_ready()" || { echo "flag refused"; exit 1; }
    (CUDA_VISIBLE_DEVICES=1 timeout 200 python3 bench/train_step.py --variants "" --sampling --profile \
        --out "$OUT/sampling_h200_profile_command_buffers_on.json" > /tmp/log_sampling_profile_cb.txt 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 220 python3 bench/train_step.py --variants default --profile \
        --out "$OUT/profile_h200_in256_command_buffers_on.json" > /tmp/log_step_profile_cb.txt 2>&1
    wait
    for f in /tmp/log_step_profile_cb.txt /tmp/log_sampling_profile_cb.txt; do echo "--- $f"; tail -n 4 "$f" | cut -c1-300; done ;;
  z30)
    unpack_base || exit 1
    log "the JVP call's pre-norms with a Pallas backward (kernels.norm_modulate_tangent): GPU1 its native tests, the tile sweep, then the 256px step after / before | GPU0 before, after (+ HLO), then the GPU step-vs-XLA test's unrolled cases"
    (CUDA_VISIBLE_DEVICES=1 timeout 120 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py -k norm_modulate_tangent \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_norm_tangent.log" 2>&1
     CUDA_VISIBLE_DEVICES=1 timeout 150 python3 bench/norm_tangent.py --out "$OUT/norm_tangent_h200.json" \
        > /tmp/log_norm_tangent_sweep.txt 2>&1
     run_tree 1 "$PWD" 180 train_step_h200_norm_tangent_gpu1 --variants default
     run_tree 1 /tmp/base 180 train_step_h200_before_norm_tangent_gpu1 --variants default) &
    run_tree 0 /tmp/base 180 train_step_h200_before_norm_tangent_gpu0 --variants default
    run_tree 0 "$PWD" 180 train_step_h200_norm_tangent_gpu0 --variants default --hlo_dir /tmp/hlo
    tar -C /tmp -czf "$OUT/hlo_h200_in256_norm_tangent.tgz" hlo 2>/dev/null
    CUDA_VISIBLE_DEVICES=0 timeout 190 python3 -m pytest -q -m gpu tests/test_attention_in_step.py -k unroll \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_attention_in_step_norm_tangent.log" 2>&1
    wait
    tail -n 3 "$OUT"/pytest_gpu_h200_norm_tangent.log "$OUT"/pytest_gpu_h200_attention_in_step_norm_tangent.log
    cat /tmp/log_norm_tangent_sweep.txt | cut -c1-300
    for f in /tmp/log_*norm_tangent_gpu*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-400; done ;;
  z31)
    TILES=${TILES:-4,2,0;4,2,1;2,1,0;2,1,1;2,2,0;2,2,1;4,4,0;4,4,1;4,1,1;8,2,1;8,4,1;16,4,1;1,1,1}
    log "bench/norm_tangent.py's sweep with rows kept in registers (keep) and smaller row tiles, at the 256px shape: GPU0"
    CUDA_VISIBLE_DEVICES=0 timeout 300 python3 bench/norm_tangent.py --shapes 32,256 --tiles "$TILES" --out "$OUT/norm_tangent_h200.json" \
        > /tmp/log_norm_tangent_sweep.txt 2>&1
    cut -c1-300 /tmp/log_norm_tangent_sweep.txt ;;
  z32)
    unpack_base || exit 1
    log "the JVP call's pre-norms with the swept tiles (2 rows, 1 warp, rows read twice): GPU1 the native kernel tests, the 256px step after / before | GPU0 before, after"
    ab_norm_tangent tiles 180 ;;
  z33)
    unpack_base || exit 1
    log "the JVP call's pre-norms, x passed through so the kernel also adds the residual's cotangent (in place): GPU1 the native kernel tests, the 256px step after / before | GPU0 before, after, then the GPU step-vs-XLA test's unrolled cases"
    ab_norm_tangent passthrough 170 step_test ;;
  z34)
    unpack_base || exit 1
    log "the 512px step (batch 16) at the same time: GPU0 with the JVP call's pre-norm kernel (x passed through) | GPU1 main"
    (run_tree 1 /tmp/base 250 train_step_h200_in512_before_norm_tangent --config configs/in512.py --batch_per_device 16 \
        --variants default) &
    run_tree 0 "$PWD" 250 train_step_h200_in512_norm_tangent --config configs/in512.py --batch_per_device 16 --variants default
    wait
    for f in /tmp/log_train_step_h200_in512_*norm_tangent*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-400; done ;;
  z35)
    log "XLA's dot merger (it joins the JVP call's primal and tangent matmuls only below 32 MB): GPU0 bench/jvp_matmul_pairs.py, then the 256px step with --xla_gpu_dot_merger_threshold_mb=1024 | GPU1 the step without flags, then with 1024"
    (run_flags 1 "" 200 train_step_h200_dot_merger_default_gpu1
     run_flags 1 --xla_gpu_dot_merger_threshold_mb=1024 200 train_step_h200_dot_merger_1024_gpu1) &
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench/jvp_matmul_pairs.py --out "$OUT/jvp_matmul_pairs_h200.json" \
        > "$OUT/jvp_matmul_pairs_h200.log" 2>&1
    run_flags 0 --xla_gpu_dot_merger_threshold_mb=1024 200 train_step_h200_dot_merger_1024_gpu0 --hlo_dir /tmp/hlo
    tar -C /tmp -czf "$OUT/hlo_h200_in256_dot_merger_1024.tgz" hlo 2>/dev/null
    wait
    tail -n 14 "$OUT/jvp_matmul_pairs_h200.log"
    for f in /tmp/log_train_step_h200_dot_merger_*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-400; done ;;
  z36)
    unpack_base || exit 1
    rm -f /tmp/ab_tiles_ready
    log "the flow-matching call's pre-norms with a Pallas backward (kernels.norm_modulate, residual_norm_modulate(passthrough=True)): GPU0 native tests, tile sweep (best patched into this copy), then the 256px step after / before | GPU1 before / after, then the GPU step-vs-XLA test's unrolled cases"
    (run_tree 1 /tmp/base 175 train_step_h200_before_norm_grad_gpu1 --variants default
     while [ ! -f /tmp/ab_tiles_ready ]; do sleep 2; done
     run_tree 1 "$PWD" 175 train_step_h200_norm_grad_gpu1 --variants default
     CUDA_VISIBLE_DEVICES=1 timeout 130 python3 -m pytest -q -m gpu tests/test_attention_in_step.py -k unroll \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_attention_in_step_norm_grad.log" 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 60 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py -k "norm_modulate_backward" \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_norm_grad.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 100 python3 bench/norm_grad.py --out "$OUT/norm_grad_h200.json" > "$OUT/norm_grad_h200.log" 2>&1
    best=$(python3 -c "import json; print(','.join(map(str, json.load(open('$OUT/norm_grad_h200.json'))['best_tiles'])))") \
        && sed -i "s/^TILES = .*/TILES = ($best)/" kernels/norm_grad.py
    grep -n "^TILES" kernels/norm_grad.py | tee "$OUT/ab_tiles_norm_grad.txt"; touch /tmp/ab_tiles_ready
    run_tree 0 "$PWD" 175 train_step_h200_norm_grad_gpu0 --variants default
    run_tree 0 /tmp/base 175 train_step_h200_before_norm_grad_gpu0 --variants default
    wait
    tail -n 3 "$OUT"/pytest_gpu_h200_*norm_grad.log; tail -n 22 "$OUT/norm_grad_h200.log"
    for f in /tmp/log_*norm_grad_gpu*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-400; done ;;
  z37)
    log "the headline command (configs/in256.py, 6 steps, micro-batch chosen automatically) on both GPUs, data parallel, with the JVP call's pre-norm kernel (item 34)"
    run_recipe 0,1 440 recipe_in256_h200x2_norm_tangent configs/in256.py 6
    tail -n 4 /tmp/log_recipe_in256_h200x2_norm_tangent.txt | cut -c1-600 ;;
  z38)
    log "native kernel suite: GPU0 plain, cuDNN, auto, bias_gelu, residual_norm_modulate | GPU1 tangent (norm_modulate_tangent too), grad of jvp, qkv"
    (CUDA_VISIBLE_DEVICES=1 timeout 420 python3 -m pytest -q -rs -m gpu kernels -k "tangent or grad_of_jvp or qkv" \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_kernels_gpu1.log" 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 420 python3 -m pytest -q -rs -m gpu kernels -k "not (tangent or grad_of_jvp or qkv)" \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_kernels_gpu0.log" 2>&1
    wait
    tail -n 4 "$OUT/pytest_gpu_h200_kernels_gpu0.log" "$OUT/pytest_gpu_h200_kernels_gpu1.log" ;;
  z39)
    unpack_base || exit 1
    log "the headline command on one GPU each, at the same time: GPU0 this tree (with the JVP call's pre-norm kernel, item 34) | GPU1 .baseline/base.tgz (main before it, 79d1f74)"
    (cd /tmp/base && PYTHONPATH=/tmp/base:/tmp/site OUT="$OUT" run_recipe 1 430 recipe_in256_h200_before_norm_tangent configs/in256.py 6) &
    run_recipe 0 430 recipe_in256_h200_norm_tangent configs/in256.py 6
    wait
    tail -n 2 /tmp/log_recipe_in256_h200_*norm_tangent.txt | cut -c1-600 ;;
  z40)
    log "the GPU step-vs-XLA test, all six cases, with item 34's kernel: GPU0 the layer-scan cases | GPU1 the unrolled ones"
    (CUDA_VISIBLE_DEVICES=1 timeout 190 python3 -m pytest -q -m gpu tests/test_attention_in_step.py -k unroll \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_attention_in_step_all_gpu1.log" 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 190 python3 -m pytest -q -m gpu tests/test_attention_in_step.py -k "not unroll" \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_attention_in_step_all_gpu0.log" 2>&1
    wait
    tail -n 3 "$OUT"/pytest_gpu_h200_attention_in_step_all_gpu*.log ;;
  z41)
    unpack_base || exit 1
    rm -f /tmp/ab_tiles_ready
    log "the plain forward applying the qkv prologue to each tile it loads (no split kernel): GPU0 native qkv tests, bench/qkv_prologue.py (best head-dim-64 tiles patched into this copy), then sampling after / before | GPU1 the 256px step + sampling before, then after"
    (run_tree 1 /tmp/base 215 train_step_sampling_h200_before_fused_prologue_gpu1 --variants default --sampling
     while [ ! -f /tmp/ab_tiles_ready ]; do sleep 2; done
     run_tree 1 "$PWD" 215 train_step_sampling_h200_fused_prologue_gpu1 --variants default --sampling) &
    CUDA_VISIBLE_DEVICES=0 timeout 110 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py -k "native_qkv_with_bias" \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_fused_prologue.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/qkv_prologue.py --out "$OUT/qkv_prologue_h200.json" > "$OUT/qkv_prologue_h200.log" 2>&1
    best=$(python3 -c "import json; print(', '.join(map(str, json.load(open('$OUT/qkv_prologue_h200.json'))['best_tiles'])))") \
        && python3 - "$best" <<'PY'
import re, sys
p = "kernels/config.py"
s = open(p).read()
i = s.index("_DEFAULTS = {")  # the first fwd_qkv line after it is head dim 64's, 2-byte inputs
j = s.index("fwd_qkv=", i)
k = s.index("\n", j)
open(p, "w").write(s[:j] + f"fwd_qkv=_kc({sys.argv[1]}),  # patched by z41 from the probe" + s[k:])
PY
    grep -n "fwd_qkv=" kernels/config.py | head -2 | tee "$OUT/ab_tiles_fused_prologue.txt"; touch /tmp/ab_tiles_ready
    run_tree 0 "$PWD" 100 sampling_h200_fused_prologue_gpu0 --variants "" --sampling
    run_tree 0 /tmp/base 100 sampling_h200_before_fused_prologue_gpu0 --variants "" --sampling
    wait
    tail -n 3 "$OUT/pytest_gpu_h200_fused_prologue.log" "$OUT/qkv_prologue_h200.log"
    for f in /tmp/log_*fused_prologue*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-400; done ;;
  z42)
    log "the native kernel suite and the GPU step-vs-XLA test (all six cases) with the fused qkv prologue: GPU0 plain, cuDNN, auto, bias_gelu, residual_norm_modulate, then the layer-scan step cases | GPU1 tangent (norm_modulate_tangent too), grad of jvp, qkv, then the unrolled step cases"
    (CUDA_VISIBLE_DEVICES=1 timeout 380 python3 -m pytest -q -rs -m gpu kernels -k "tangent or grad_of_jvp or qkv" \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_kernels_fused_prologue_gpu1.log" 2>&1
     CUDA_VISIBLE_DEVICES=1 timeout 170 python3 -m pytest -q -m gpu tests/test_attention_in_step.py -k unroll \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_attention_in_step_fused_prologue_gpu1.log" 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -q -rs -m gpu kernels -k "not (tangent or grad_of_jvp or qkv)" \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_kernels_fused_prologue_gpu0.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -q -m gpu tests/test_attention_in_step.py -k "not unroll" \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_attention_in_step_fused_prologue_gpu0.log" 2>&1
    wait
    tail -n 4 "$OUT"/pytest_gpu_h200_*fused_prologue_gpu*.log ;;
  z43)
    unpack_base || exit 1
    log "the fused qkv prologue (default tiles) against main, the 256px step + sampling alternating on both GPUs in opposite orders: GPU0 after, before | GPU1 before, after"
    (run_tree 1 /tmp/base 215 train_step_sampling_h200_before_fused_prologue_repeat_gpu1 --variants default --sampling
     run_tree 1 "$PWD" 215 train_step_sampling_h200_fused_prologue_repeat_gpu1 --variants default --sampling) &
    run_tree 0 "$PWD" 215 train_step_sampling_h200_fused_prologue_repeat_gpu0 --variants default --sampling
    run_tree 0 /tmp/base 215 train_step_sampling_h200_before_fused_prologue_repeat_gpu0 --variants default --sampling
    wait
    for f in /tmp/log_*fused_prologue_repeat*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-400; done ;;
  z44)
    unpack_base || exit 1
    rm -f /tmp/ab_tiles_ready
    log "a block's two gated residual adds and the next block's first pre-norm as one Pallas pass (kernels.block_end_norm_modulate) against .baseline/base.tgz (the fused qkv prologue): GPU0 native tests, tile sweep (best patched into this copy), sampling after / before, the GPU step-vs-XLA test's unrolled cases | GPU1 the 256px step + sampling before, then after"
    (run_tree 1 /tmp/base 215 train_step_sampling_h200_before_block_end_gpu1 --variants default --sampling
     while [ ! -f /tmp/ab_tiles_ready ]; do sleep 2; done
     run_tree 1 "$PWD" 215 train_step_sampling_h200_block_end_gpu1 --variants default --sampling) &
    CUDA_VISIBLE_DEVICES=0 timeout 80 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py -k "block_end or residual_norm" \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_block_end.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 100 python3 bench/residual_norm_modulate.py --block_end --tiles "1,1;2,1;1,2;2,2;4,2;4,4;8,4" \
        --out "$OUT/block_end_norm_modulate_h200.json" > "$OUT/block_end_norm_modulate_h200.log" 2>&1
    best=$(python3 -c "import json; print(', '.join(map(str, json.load(open('$OUT/block_end_norm_modulate_h200.json'))['best_tiles'])))") \
        && sed -i "s/^BLOCK_END_TILES = .*/BLOCK_END_TILES = ($best)/" kernels/modulation.py
    grep -n "^BLOCK_END_TILES" kernels/modulation.py | tee "$OUT/ab_tiles_block_end.txt"; touch /tmp/ab_tiles_ready
    run_tree 0 "$PWD" 100 sampling_h200_block_end_gpu0 --variants "" --sampling
    run_tree 0 /tmp/base 100 sampling_h200_before_block_end_gpu0 --variants "" --sampling
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -m gpu tests/test_attention_in_step.py -k unroll \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_attention_in_step_block_end.log" 2>&1
    wait
    tail -n 3 "$OUT/pytest_gpu_h200_block_end.log" "$OUT/block_end_norm_modulate_h200.log" "$OUT/pytest_gpu_h200_attention_in_step_block_end.log"
    for f in /tmp/log_*block_end*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-400; done ;;
  z45)
    unpack_base || exit 1
    log "the headline command on one GPU each, at the same time: GPU0 this tree (the fused qkv prologue, item 38) | GPU1 .baseline/base.tgz (main before it, cb34063)"
    (cd /tmp/base && PYTHONPATH=/tmp/base:/tmp/site OUT="$OUT" run_recipe 1 430 recipe_in256_h200_before_fused_prologue configs/in256.py 6) &
    run_recipe 0 430 recipe_in256_h200_fused_prologue configs/in256.py 6
    wait
    tail -n 2 /tmp/log_recipe_in256_h200_*fused_prologue.txt | cut -c1-600 ;;
  z46)
    unpack_base || exit 1
    rm -rf /tmp/mm && mkdir -p /tmp/mm && cp -r bench configs kernels tests tvm_jax pyproject.toml /tmp/mm/ || exit 1
    python3 - <<'PY' || exit 1
p = "/tmp/mm/kernels/config.py"; s = open(p).read(); i = s.index('jvp_dq="kernel"')
open(p, "w").write(s[:i] + 'jvp_dq="matmul"' + s[i + len('jvp_dq="kernel"'):])
PY
    (cd /tmp && PYTHONPATH=/tmp/mm:/tmp/site python3 -c "from kernels.config import default_config as d; assert d(64).jvp_dq == 'matmul' and d(128).jvp_dq == 'kernel'") || exit 1
    log "jvp_dq=matmul: GPU0 attention bench (kernel, matmul), 256px step before / matmul at hd64 | GPU1 native tangent tests, step matmul / before"
    echo '{"jvp_dq": "matmul"}' > /tmp/mm.json
    (CUDA_VISIBLE_DEVICES=1 timeout 170 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py -k "native_tangent or grad_of_jvp" \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_jvp_dq.log" 2>&1
     run_tree 1 /tmp/mm 170 train_step_h200_jvp_dq_matmul_gpu1 --variants default
     run_tree 1 /tmp/base 170 train_step_h200_before_jvp_dq_gpu1 --variants default) &
    shapes="32,18,256,64;32,18,1024,64;1,24,4096,128;1,24,1024,128;1,24,8192,128"
    for c in kernel matmul; do
      cfg=(); [ $c = matmul ] && cfg=(--config /tmp/mm.json)
      CUDA_VISIBLE_DEVICES=0 timeout 100 python3 bench/attention.py --shapes "$shapes" --no-xla --no-cudnn --kinds jvp_fwd,jvp_fwd_bwd \
          "${cfg[@]}" --out "$OUT/attention_h200_jvp_dq_$c.json" > "/tmp/log_attention_jvp_dq_$c.txt" 2>&1
    done
    run_tree 0 /tmp/base 170 train_step_h200_before_jvp_dq_gpu0 --variants default
    run_tree 0 /tmp/mm 170 train_step_h200_jvp_dq_matmul_gpu0 --variants default
    wait
    tail -n 3 "$OUT/pytest_gpu_h200_jvp_dq.log"
    for f in /tmp/log_*jvp_dq*.txt; do echo "--- $f"; tail -n 14 "$f" | cut -c1-300; done ;;
  z47)
    log "jvp_dq=auto at head dim 128: GPU0 attention bench (defaults), jvp_bwd_kv sweep with matmul | GPU1 native tangent tests"
    echo '{"jvp_dq": "matmul"}' > /tmp/mm.json
    (CUDA_VISIBLE_DEVICES=1 timeout 420 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py -k "native_tangent or grad_of_jvp" \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_jvp_dq.log" 2>&1) &
    shapes="32,18,256,64;32,18,1024,64;1,24,4096,128;1,24,1024,128;1,24,8192,128"
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/attention.py --shapes "$shapes" --no-xla --no-cudnn --kinds jvp_fwd,jvp_fwd_bwd \
        --out "$OUT/attention_h200_jvp_dq_auto.json" > /tmp/log_attention_jvp_dq_auto.txt 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 330 python3 bench/attention.py --shapes "1,24,4096,128;1,24,1024,128" --no-xla --no-cudnn \
        --kinds jvp_fwd_bwd --config /tmp/mm.json --sweep --sweep-kernels jvp_bwd_kv \
        --out "$OUT/attention_sweep_h200_jvp_dq_matmul.json" > /tmp/log_attention_sweep_jvp_dq_matmul.txt 2>&1
    wait
    tail -n 3 "$OUT/pytest_gpu_h200_jvp_dq.log"
    for f in /tmp/log_attention*jvp_dq*.txt; do echo "--- $f"; grep -v "^$" "$f" | tail -n 40 | cut -c1-200; done ;;
  z48)
    log "jvp_dq=matmul_qk: GPU0 attention bench, jvp_bwd_kv sweep | GPU1 native tests, kv tile 32x32 w4 under matmul and kernel"
    echo '{"jvp_dq": "matmul_qk"}' > /tmp/mmqk.json
    for c in matmul kernel; do
      echo "{\"jvp_dq\": \"$c\", \"jvp_bwd_kv\": {\"block_q\": 32, \"block_k\": 32, \"num_warps\": 4, \"num_stages\": 2}}" > /tmp/kv32_$c.json
    done
    (CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py -k "matmul_qk" \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_jvp_dq_matmul_qk.log" 2>&1
     for c in matmul kernel; do
       CUDA_VISIBLE_DEVICES=1 timeout 80 python3 bench/attention.py --shapes "1,24,4096,128;1,24,1024,128;1,24,8192,128" --no-xla \
           --no-cudnn --kinds jvp_fwd_bwd --config /tmp/kv32_$c.json --out "$OUT/attention_h200_kv32w4_$c.json" \
           > "/tmp/log_attention_kv32w4_$c.txt" 2>&1
     done) &
    CUDA_VISIBLE_DEVICES=0 timeout 100 python3 bench/attention.py --shapes "32,18,256,64;32,18,1024,64;1,24,4096,128;1,24,1024,128;1,24,8192,128" \
        --no-xla --no-cudnn --kinds jvp_fwd,jvp_fwd_bwd --config /tmp/mmqk.json \
        --out "$OUT/attention_h200_jvp_dq_matmul_qk.json" > /tmp/log_attention_jvp_dq_matmul_qk.txt 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 250 python3 bench/attention.py --shapes "1,24,4096,128;1,24,1024,128" --no-xla --no-cudnn \
        --kinds jvp_fwd_bwd --config /tmp/mmqk.json --sweep --sweep-kernels jvp_bwd_kv \
        --out "$OUT/attention_sweep_h200_jvp_dq_matmul_qk.json" > /tmp/log_attention_sweep_jvp_dq_matmul_qk.txt 2>&1
    wait
    tail -n 3 "$OUT/pytest_gpu_h200_jvp_dq_matmul_qk.log"
    for f in /tmp/log_attention*.txt; do echo "--- $f"; grep -v "^$" "$f" | grep -v "best config" | tail -n 22 | cut -c1-160; done ;;
  z49)
    log "jvp_bwd_impl: GPU0 attention bench (defaults; matmul forced), jvp_bwd_v sweep | GPU1 native tangent tests"
    echo '{"jvp_bwd_impl": "matmul"}' > /tmp/mm.json
    (CUDA_VISIBLE_DEVICES=1 timeout 420 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py -k "native_tangent or grad_of_jvp" \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_jvp_bwd_impl.log" 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 110 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd,jvp_fwd_bwd \
        --shapes "32,18,256,64;32,18,1024,64;1,24,4096,128;1,24,2048,128;1,24,1024,128;1,24,8192,128" \
        --out "$OUT/attention_h200_jvp_bwd_impl_defaults.json" > /tmp/log_attention_jvp_bwd_defaults.txt 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 60 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd --config /tmp/mm.json \
        --shapes "1,24,1024,128;1,24,8192,128" --out "$OUT/attention_h200_jvp_bwd_matmul_forced.json" \
        > /tmp/log_attention_jvp_bwd_forced.txt 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 240 python3 bench/attention.py --shapes "1,24,4096,128;1,24,2048,128" --no-xla --no-cudnn \
        --kinds jvp_fwd_bwd --sweep --sweep-kernels jvp_bwd_v \
        --out "$OUT/attention_sweep_h200_jvp_bwd_matmul.json" > /tmp/log_attention_sweep_jvp_bwd_v.txt 2>&1
    wait
    tail -n 3 "$OUT/pytest_gpu_h200_jvp_bwd_impl.log"
    for f in /tmp/log_attention*.txt; do echo "--- $f"; grep -v "^$" "$f" | grep -v "best config" | tail -n 26 | cut -c1-160; done ;;
  z50)
    log "GPU0 hd128 kernels forced vs defaults at 2,048 and 4,096 tokens | GPU1 native kernel suite without the tangent tests"
    echo '{"jvp_bwd_impl": "kernels"}' > /tmp/kernels.json
    (CUDA_VISIBLE_DEVICES=1 timeout 240 python3 -m pytest -q -m gpu kernels -k "not native_tangent and not grad_of_jvp" \
        -p no:cacheprovider > "$OUT/pytest_gpu_h200_kernels_jvp_bwd_impl_rest.log" 2>&1) &
    for run in 1 2; do
      CUDA_VISIBLE_DEVICES=0 timeout 50 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd --config /tmp/kernels.json \
          --shapes "1,24,2048,128;1,24,4096,128" --out "$OUT/attention_h200_jvp_bwd_kernels_forced_$run.json" \
          > "/tmp/log_attention_kernels_forced_$run.txt" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout 50 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd \
          --shapes "1,24,2048,128;1,24,4096,128" --out "$OUT/attention_h200_jvp_bwd_defaults_$run.json" \
          > "/tmp/log_attention_defaults_$run.txt" 2>&1
    done
    wait
    tail -n 3 "$OUT/pytest_gpu_h200_kernels_jvp_bwd_impl_rest.log"
    for f in /tmp/log_attention*.txt; do echo "--- $f"; grep "pallas" "$f" | head -4; done ;;
  z51)
    unpack_base || exit 1
    log "the 256px step at the same time: GPU0 this tree | GPU1 main (.baseline/base.tgz)"
    run_tree 1 /tmp/base 175 train_step_h200_before_jvp_bwd_impl_gpu1 --variants default &
    run_tree 0 "$PWD" 175 train_step_h200_jvp_bwd_impl_gpu0 --variants default
    wait
    for f in /tmp/log_*jvp_bwd_impl*.txt; do echo "--- $f"; tail -n 3 "$f" | cut -c1-300; done ;;
  z52)
    unpack_base || exit 1
    log "jvp_bwd_impl='matmul_all' and the merged dS matmuls: GPU0 error check + profile, A/B against main (.baseline/base.tgz) alternating twice, profiles | GPU1 native tests, then a jvp_bwd_v sweep under matmul_all"
    echo '{"jvp_bwd_impl": "matmul_all"}' > /tmp/mall.json
    echo '{"jvp_bwd_impl": "kernels"}' > /tmp/kernels.json
    (CUDA_VISIBLE_DEVICES=1 timeout 260 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py \
        -k "(native_tangent or grad_of_jvp) and matmul" -p no:cacheprovider > "$OUT/pytest_gpu_h200_jvp_bwd_matmul_all.log" 2>&1
     CUDA_VISIBLE_DEVICES=1 timeout 200 python3 bench/attention.py --shapes "1,24,4096,128" --no-xla --no-cudnn \
        --kinds jvp_fwd_bwd --config /tmp/mall.json --sweep --sweep-kernels jvp_bwd_v \
        --out "$OUT/attention_sweep_h200_jvp_bwd_matmul_all.json" > /tmp/log_attention_sweep_matmul_all.txt 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 100 python3 bench/attention.py --no-cudnn --kinds jvp_fwd_bwd,plain_fwd_bwd --profile \
        --shapes "1,24,4096,128" --config /tmp/mall.json --out "$OUT/attention_h200_matmul_all_check.json" \
        > /tmp/log_attention_matmul_all_check.txt 2>&1
    for run in 1 2; do
      CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/base:/tmp/site timeout 50 python3 /tmp/base/bench/attention.py --no-xla --no-cudnn \
          --kinds jvp_fwd_bwd --shapes "1,24,2048,128;1,24,4096,128" --out "$OUT/attention_h200_main_defaults_$run.json" \
          > "/tmp/log_attention_main_$run.txt" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout 50 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd \
          --shapes "1,24,2048,128;1,24,4096,128" --out "$OUT/attention_h200_merged_ds_defaults_$run.json" \
          > "/tmp/log_attention_merged_$run.txt" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout 50 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd --config /tmp/mall.json \
          --shapes "1,24,2048,128;1,24,4096,128" --out "$OUT/attention_h200_matmul_all_$run.json" \
          > "/tmp/log_attention_matmul_all_$run.txt" 2>&1
    done
    CUDA_VISIBLE_DEVICES=0 timeout 70 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd --profile \
        --shapes "1,24,4096,128" --out "$OUT/attention_h200_merged_ds_profile.json" > /tmp/log_attention_profile_merged.txt 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 70 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd --profile --config /tmp/kernels.json \
        --shapes "1,24,4096,128" --out "$OUT/attention_h200_kernels_profile.json" > /tmp/log_attention_profile_kernels.txt 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 70 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd --config /tmp/mall.json \
        --shapes "1,24,1024,128;1,24,8192,128" --out "$OUT/attention_h200_matmul_all_1024_8192.json" \
        > /tmp/log_attention_matmul_all_more.txt 2>&1
    wait
    tail -n 3 "$OUT/pytest_gpu_h200_jvp_bwd_matmul_all.log"
    for f in /tmp/log_attention*.txt; do echo "--- $f"; grep "pallas\|rel err\|profile\|sweep\|Error\|error" "$f" | grep -v "^ *B,H" | head -24 | cut -c1-260; done ;;
  z53)
    unpack_base || exit 1
    log "jvp_bwd_impl='matmul_kv' (the query-block kernel writes P, tP, dS, dtS; dk, dv, dtk, dtv as matmuls): GPU0 error check + profile, A/B against main and the merged dS matmuls alternating twice, jvp_bwd_q sweep under it, 1,024 and 8,192 tokens | GPU1 native tests; all files in one tarball"
    R=/tmp/z53; mkdir -p $R
    echo '{"jvp_bwd_impl": "matmul_kv"}' > /tmp/mkv.json
    (CUDA_VISIBLE_DEVICES=1 timeout 300 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py \
        -k "(native_tangent or grad_of_jvp) and matmul" -p no:cacheprovider > "$R/pytest_gpu_h200_jvp_bwd_matmul_kv.log" 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 90 python3 bench/attention.py --no-cudnn --kinds jvp_fwd_bwd,plain_fwd_bwd --profile \
        --shapes "1,24,4096,128" --config /tmp/mkv.json --out "$R/attention_h200_matmul_kv_check.json" \
        > "$R/log_attention_matmul_kv_check.txt" 2>&1
    for run in 1 2; do
      CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/base:/tmp/site timeout 45 python3 /tmp/base/bench/attention.py --no-xla --no-cudnn \
          --kinds jvp_fwd_bwd --shapes "1,24,2048,128;1,24,4096,128" --out "$R/attention_h200_main_defaults_z53_$run.json" \
          > "$R/log_attention_main_$run.txt" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout 45 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd \
          --shapes "1,24,2048,128;1,24,4096,128" --out "$R/attention_h200_merged_ds_z53_$run.json" \
          > "$R/log_attention_merged_$run.txt" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout 45 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd --config /tmp/mkv.json \
          --shapes "1,24,2048,128;1,24,4096,128" --out "$R/attention_h200_matmul_kv_$run.json" \
          > "$R/log_attention_matmul_kv_$run.txt" 2>&1
    done
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/attention.py --shapes "1,24,4096,128" --no-xla --no-cudnn \
        --kinds jvp_fwd_bwd --config /tmp/mkv.json --sweep --sweep-kernels jvp_bwd_q \
        --out "$R/attention_sweep_h200_jvp_bwd_matmul_kv.json" > "$R/log_attention_sweep_matmul_kv.txt" 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 60 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd --config /tmp/mkv.json \
        --shapes "1,24,1024,128;1,24,8192,128" --out "$R/attention_h200_matmul_kv_1024_8192.json" \
        > "$R/log_attention_matmul_kv_more.txt" 2>&1
    wait
    tar -C /tmp -czf "$OUT/z53.tgz" z53
    tail -n 3 "$R/pytest_gpu_h200_jvp_bwd_matmul_kv.log"
    for f in $R/log_attention*.txt; do echo "--- $f"; grep "pallas\|rel err\|profile\|sweep\|Error\|error" "$f" | grep -v "^ *1,24" | head -24 | cut -c1-300; done ;;
  z54)
    unpack_base || exit 1
    R=/tmp/z54; mkdir -p $R
    # One GPU (nvidia-h200) or two: the native tests run on GPU1 beside the timings, or after them on GPU0.
    if [ "$(nvidia-smi -L | wc -l)" -gt 1 ]; then TEST_GPU=1; else TEST_GPU=0; fi
    log "the merged dS matmuls (final code): A/B against main (.baseline/base.tgz) alternating three times, profile, 'matmul' forced at 1,024 and 8,192 (GPU0) | native tests of 'matmul' (GPU$TEST_GPU); all files in one tarball"
    echo '{"jvp_bwd_impl": "matmul"}' > /tmp/mm.json
    native() {
      CUDA_VISIBLE_DEVICES=$TEST_GPU timeout 170 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py \
        -k "(native_tangent or grad_of_jvp) and matmul" -p no:cacheprovider > "$R/pytest_gpu_h200_merged_ds_matmul.log" 2>&1
    }
    if [ "$TEST_GPU" = 1 ]; then native & fi
    for run in 1 2 3; do
      CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/base:/tmp/site timeout 45 python3 /tmp/base/bench/attention.py --no-xla --no-cudnn \
          --kinds jvp_fwd_bwd --shapes "1,24,2048,128;1,24,4096,128" --out "$R/attention_h200_main_defaults_z54_$run.json" \
          > "$R/log_attention_main_$run.txt" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout 45 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd \
          --shapes "1,24,2048,128;1,24,4096,128" --out "$R/attention_h200_merged_ds_z54_$run.json" \
          > "$R/log_attention_merged_$run.txt" 2>&1
    done
    CUDA_VISIBLE_DEVICES=0 timeout 60 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd --profile \
        --shapes "1,24,4096,128" --out "$R/attention_h200_merged_ds_profile.json" > "$R/log_attention_profile_merged.txt" 2>&1
    CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/base:/tmp/site timeout 60 python3 /tmp/base/bench/attention.py --no-xla --no-cudnn \
        --kinds jvp_fwd_bwd --config /tmp/mm.json --shapes "1,24,1024,128;1,24,8192,128" \
        --out "$R/attention_h200_main_matmul_1024_8192.json" > "$R/log_attention_main_matmul_more.txt" 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 60 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd --config /tmp/mm.json \
        --shapes "1,24,1024,128;1,24,8192,128" --out "$R/attention_h200_merged_ds_matmul_1024_8192.json" \
        > "$R/log_attention_merged_matmul_more.txt" 2>&1
    if [ "$TEST_GPU" = 0 ]; then native; fi
    wait
    tar -C /tmp -czf "$OUT/z54.tgz" z54
    tail -n 2 "$R"/pytest_*.log
    for f in $R/log_attention*.txt; do echo "--- $f"; grep "pallas\|profile\|Error\|error" "$f" | grep -v "^ *1,24" | head -8 | cut -c1-300; done ;;
  z55)
    unpack_base || exit 1
    R=/tmp/z55; mkdir -p $R
    log "one GPU: device time per kernel of main's code (this tree's bench/attention.py --profile run in /tmp/base) and of the merged dS matmuls, alternating twice; then the native tests of 'matmul'"
    cp bench/attention.py /tmp/base/bench/attention.py  # --profile; bench/ puts its own tree first on sys.path
    for run in 1 2; do
      CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/base:/tmp/site timeout 45 python3 /tmp/base/bench/attention.py --no-xla --no-cudnn \
          --kinds jvp_fwd_bwd --profile --shapes "1,24,4096,128" --out "$R/attention_h200_main_profile_$run.json" \
          > "$R/log_attention_main_profile_$run.txt" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout 45 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd --profile \
          --shapes "1,24,4096,128" --out "$R/attention_h200_merged_ds_profile_$run.json" > "$R/log_attention_merged_profile_$run.txt" 2>&1
    done
    CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py \
        -k "(native_tangent or grad_of_jvp) and matmul" -p no:cacheprovider > "$R/pytest_gpu_h200_merged_ds_matmul.log" 2>&1
    tar -C /tmp -czf "$OUT/z55.tgz" z55
    tail -n 2 "$R"/pytest_*.log
    for f in $R/log_attention*.txt; do echo "--- $f"; grep "pallas\|profile\|Error\|error" "$f" | grep -v "^ *1,24" | head -4 | cut -c1-400; done ;;
  z56)
    unpack_base || exit 1
    R=/tmp/z56; mkdir -p $R
    log "one GPU: the (1,24,2048/4096,128) call timed alone per sample (--min-sample-ms 2, the default) and 8 back-to-back per sample (--min-sample-ms 50): main (this tree's bench script in /tmp/base) and the merged dS matmuls, alternating twice"
    cp bench/attention.py /tmp/base/bench/attention.py
    for run in 1 2; do
      for ms in 2 50; do
        CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/base:/tmp/site timeout 45 python3 /tmp/base/bench/attention.py --no-xla --no-cudnn \
            --kinds jvp_fwd_bwd --min-sample-ms $ms --shapes "1,24,2048,128;1,24,4096,128" \
            --out "$R/attention_h200_main_sample${ms}ms_$run.json" > "$R/log_attention_main_sample${ms}ms_$run.txt" 2>&1
        CUDA_VISIBLE_DEVICES=0 timeout 45 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd --min-sample-ms $ms \
            --shapes "1,24,2048,128;1,24,4096,128" --out "$R/attention_h200_merged_ds_sample${ms}ms_$run.json" \
            > "$R/log_attention_merged_sample${ms}ms_$run.txt" 2>&1
      done
    done
    tar -C /tmp -czf "$OUT/z56.tgz" z56
    for f in $R/log_attention*.txt; do echo "--- $f"; grep "pallas" "$f" | grep -v "^ *1,24" | head -4 | cut -c1-200; done ;;
  z58)
    R=/tmp/z58; mkdir -p $R
    log "one GPU: issue 14's rows re-measured on main (attention at the three shapes; the 256px step and sampling), the (1,24,4096,128) call with XLA's command buffers off and on alternating twice (where does the single call's host time go), then the native GPU suite under the suite-wide compilation cache of conftest.py"
    for run in 1 2; do
      CUDA_VISIBLE_DEVICES=0 timeout 60 python3 bench/attention.py --no-xla --no-cudnn --kinds jvp_fwd_bwd \
          --shapes "32,18,256,64;32,18,1024,64;1,24,4096,128" --out "$R/attention_h200_z58_rows_$run.json" > "$R/log_attention_rows_$run.txt" 2>&1
      CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 45 python3 bench/attention.py --no-xla --no-cudnn \
          --kinds jvp_fwd_bwd --shapes "1,24,4096,128" --out "$R/attention_h200_z58_no_command_buffers_$run.json" \
          > "$R/log_attention_no_command_buffers_$run.txt" 2>&1
    done
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/train_step.py --variants default --sampling \
        --out "$R/train_step_sampling_h200_z58.json" > "$R/log_train_step.txt" 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 280 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py tests/test_attention_in_step.py \
        -p no:cacheprovider > "$R/pytest_gpu_h200_z58_suite_cache.log" 2>&1
    tar -C /tmp -czf "$OUT/z58.tgz" z58
    tail -n 3 "$R"/pytest_*.log
    grep -h "ms/step\|img/s" "$R/log_train_step.txt" | head -6
    for f in $R/log_attention*.txt; do echo "--- $f"; tail -n 5 "$f" | cut -c1-200; done ;;
  z59)
    R=/tmp/z59; mkdir -p $R
    log "one GPU: the native GPU suite (kernels and the step-vs-XLA test) under conftest.py's suite-wide compilation cache and its flag probe"
    CUDA_VISIBLE_DEVICES=0 timeout 520 python3 -m pytest -q -m gpu kernels/tests/test_gpu.py tests/test_attention_in_step.py \
        -p no:cacheprovider --durations=15 > "$R/pytest_gpu_h200_z59_suite_cache.log" 2>&1
    tar -C /tmp -czf "$OUT/z59.tgz" z59
    tail -n 25 "$R"/pytest_*.log ;;
  *) echo "usage: $0 h|i|j|k|l|m|n|o|p|r|s|t|u|v|w|x|y|z|z2|z3|z4|z5|z6|z7|z8|z9|z10|z11|z12|z13|z14|z15|z16|z17|z18|z19|z20|z21|z22|z23|z24|z25|z26|z27|z28|z29|z30|z31|z32|z33|z34|z35|z36|z37|z38|z39|z40|z41|z42|z43|z44|z45|z46|z47|z48|z49|z50|z51|z52|z53|z54|z55|z56|z58|z59" >&2; exit 2 ;;
esac
log done

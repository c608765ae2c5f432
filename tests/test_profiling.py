"""The step profiler's trace reading and grouping (on the CPU: XLA:CPU thunks stand in for GPU
kernels; the GPU path reads the device plane of the same ``jax.profiler`` trace format)."""
import jax
import jax.numpy as jnp

from tvm_jax import profiling


def test_profile_groups_a_jitted_function_by_family():
    def f(a, b):
        with jax.named_scope("optimizer"):
            c = a * 0.9 + b * 0.1
        return jnp.tanh(a @ b).sum() + c.sum()

    a = jnp.ones((256, 256))
    compiled = jax.jit(f).lower(a, a).compile()
    stacks = profiling.hlo_name_stacks(compiled.as_text())
    assert any("optimizer" in s for s in stacks.values()), stacks
    result = profiling.profile(lambda: compiled(a, a), calls=3, hlo_text=compiled.as_text())
    rows = result["rows"]
    assert rows and all(r["count"] >= 1 and r["total_ms"] >= 0 for r in rows)
    assert sum(r["count"] for r in rows) >= 3  # every call ran at least one op
    summary = result["summary"]
    assert abs(sum(v["share"] for v in summary.values()) - 1.0) < 1e-6
    assert sum(v["ms_per_call"] for v in summary.values()) > 0


def test_per_kernel_sums_each_kernels_rows_per_call():
    rows = [dict(kernel="gemm", total_ms=3.0), dict(kernel="fusion", total_ms=1.0), dict(kernel="gemm", total_ms=5.0)]
    assert list(profiling.per_kernel(rows, calls=2).items()) == [("gemm", 4.0), ("fusion", 0.5)]


def test_op_family_rules():
    fam = profiling.op_family
    assert fam("tvm_flash_jvp_fwd", "custom-call.3", "jit(step)/jvp(attention)/pallas_call") == \
        "attention forward + tangent (JVP)"
    assert fam("tvm_flash_jvp_bwd_kv", "custom-call.9", "transpose(jvp(pallas_call))") == "attention backward (JVP)"
    assert fam("tvm_flash_bwd_q", "custom-call.1", "pallas_call") == "attention backward (plain)"
    assert fam("tvm_split_qkv", "pallas_call.7", "jit(sample)/checkpoint/tvm_split_qkv/pallas_call") == \
        "attention prologue (qkv bias, q/k norms, split)"
    assert fam("tvm_qkv_tangent_bwd", "pallas_call.1530",
               "jit(step_fn)/transpose(jvp(jvp()))/tvm_qkv_tangent_bwd/pallas_call") == "attention prologue backward (JVP mode)"
    assert fam("tvm_bias_gelu", "pallas_call.15", "jit(sample)/checkpoint/tvm_bias_gelu/pallas_call") == \
        "MLP bias + GELU (Pallas)"
    assert fam("tvm_residual_norm_modulate", "pallas_call.9", "jit(sample)/tvm_residual_norm_modulate/pallas_call") == \
        "second pre-norm: residual, RMS norm, modulation (Pallas)"
    assert fam("tvm_norm_modulate_tangent_bwd", "pallas_call.77",
               "jit(step_fn)/transpose(jvp(jvp()))/tvm_norm_modulate_tangent_bwd/pallas_call") == \
        "pre-norms of the JVP call, backward (Pallas)"
    assert fam("tvm_flash_fwd_qkv", "pallas_call.3", "pallas_call") == "attention forward (plain)"
    assert fam("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN", "custom-call.12", "jit(step)/dot_general") == "matmuls"
    assert fam("gemm_fusion_dot_123", "gemm_fusion_dot.123", "") == "matmuls"
    assert fam("loop_multiply_fusion", "fusion.7", "jit(step)/optimizer/mul") == "optimizer and EMA updates"
    assert fam("loop_add_fusion", "fusion.9", "jit(step)/scale_by_adam/add") == "optimizer and EMA updates"
    # remat's recomputation scope contains the letters "ema" but is not an EMA update
    assert fam("input_add_reduce_fusion_4", "input_add_reduce_fusion.4",
               "jit(step_fn)/transpose(jvp(jvp()))/while/body/checkpoint/rematted_computation/add") == \
        "rematerialisation (forward work recomputed in the backward)"
    assert fam("loop_add_fusion_3", "loop_add_fusion.3", "jit(step_fn)/jvp()/while/body/checkpoint/add") == \
        "elementwise, reductions and normalisation"
    assert fam("input_reduce_fusion", "fusion.8", "jit(step)/jvp(rms_norm)/reduce_sum") == \
        "elementwise, reductions and normalisation"
    assert fam("cudnn_fmha_fwd", "custom-call.2", "") == "attention (cuDNN)"

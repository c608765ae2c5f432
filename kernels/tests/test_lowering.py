"""Lowers every Pallas kernel for CUDA on this CPU machine (Pallas -> Triton IR).

``jax.export`` for platform "cuda" runs the Pallas Triton lowering (which rejects ops and
shapes Triton cannot take) and embeds each kernel as a ``__gpu$xla.gpu.triton`` custom call.
The kernels are compiled by XLA only on a GPU, so this cannot catch Triton compile-time
failures (e.g. shared memory overflow), but it catches every unsupported-op/shape error and
a silent switch to the Mosaic GPU backend (a pallas_call without Triton CompilerParams).
"""
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kernels import AttentionConfig, KernelConfig, attention, attention_qkv, bias_gelu, default_config, flash_with_tangent
from kernels import gelu as gelu_mod
from kernels import qkv_tangent

TRITON = "__gpu$xla.gpu.triton"
KW = dict(impl="pallas", interpret=False)


def _lower(fn, *args):
    exp = export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)],
    )(*args)
    return exp.mlir_module()


def _kernels(text):
    """(name, num_warps, num_stages) of every Triton custom call in the module."""
    assert "mosaic" not in text.lower(), "a kernel lowered to Mosaic GPU instead of Triton"
    calls = [l for l in text.splitlines() if TRITON in l and "custom_call" in l]
    out = []
    for line in calls:
        name = re.search(r'name = "(\w+)"', line).group(1)
        warps = int(re.search(r"num_warps = (\d+)", line).group(1))
        stages = int(re.search(r"num_stages = (\d+)", line).group(1))
        out.append((name, warps, stages))
    return out


def _f32sum(x):
    return jnp.sum(x.astype(jnp.float32))


def _check(text, expected, dim, cfg=None, dtype=None):
    found = _kernels(text)
    full = lambda e: e if e.startswith("tvm_") else "tvm_flash_" + e  # noqa: E731
    assert sorted(n for n, _, _ in found) == sorted(full(e) for e in expected), found
    cfg = (cfg or default_config(dim, dtype)).resolve(dim, dtype)
    for name, warps, stages in found:
        if name == "tvm_qkv_tangent_bwd":  # likewise (kernels/qkv_tangent.py)
            assert (warps, stages) == (qkv_tangent.WARPS, 1), (name, warps, stages)
            continue
        kc = getattr(cfg, name.removeprefix("tvm_flash_"))
        assert (warps, stages) == (kc.num_warps, kc.num_stages), (name, warps, stages)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("seq", [256, 130])
def test_all_kernels_lower_to_triton(dim, seq):
    sd = jax.ShapeDtypeStruct((2, seq, 3, dim), jnp.bfloat16)

    fwd = _lower(lambda q, k, v: attention(q, k, v, **KW), sd, sd, sd)
    _check(fwd, ["fwd"], dim)

    bwd = _lower(jax.grad(lambda q, k, v: _f32sum(attention(q, k, v, **KW)), argnums=(0, 1, 2)), sd, sd, sd)
    _check(bwd, ["fwd", "bwd_kv", "bwd_q"], dim)

    tan = _lower(lambda *a: flash_with_tangent(*a, interpret=False), *(sd,) * 6)
    _check(tan, ["jvp_fwd"], dim)

    def tan_vjp(q, k, v, tq, tk, tv, do, dto):
        _, vjp = jax.vjp(lambda *a: flash_with_tangent(*a, interpret=False), q, k, v, tq, tk, tv)
        return vjp((do, dto))

    _check(_lower(tan_vjp, *(sd,) * 8), ["jvp_fwd", "jvp_bwd_kv", "jvp_bwd_q"], dim)

    # jvp_bwd_impl="matmul": jvp_bwd_v writes dS and dtS; dq, dk, dtq, dtk are four XLA dots (dtS
    # against [k | tk] and [q | tq], each concatenated once, dS against k and q).
    mm = AttentionConfig(jvp_bwd_impl="matmul")

    def tan_vjp_mm(q, k, v, tq, tk, tv, do, dto):
        _, vjp = jax.vjp(lambda *a: flash_with_tangent(*a, interpret=False, block_sizes=mm), q, k, v, tq, tk, tv)
        return vjp((do, dto))

    text = _lower(tan_vjp_mm, *(sd,) * 8)
    _check(text, ["jvp_fwd", "jvp_bwd_v"], dim)
    assert text.count("stablehlo.dot_general") == 4 and text.count("stablehlo.concatenate") == 2

    def loss(q, k, v, tq, tk, tv):
        o, to = jax.jvp(lambda a, b, c: attention(a, b, c, jvp=True, **KW), (q, k, v), (tq, tk, tv))
        return _f32sum(o) + _f32sum(to * to)

    _check(_lower(jax.grad(loss, argnums=tuple(range(6))), *(sd,) * 6), ["jvp_fwd", "jvp_bwd_kv", "jvp_bwd_q"], dim)
    # jvp=True primal alone: the plain forward kernel.
    _check(_lower(lambda q, k, v: attention(q, k, v, jvp=True, **KW), sd, sd, sd), ["fwd"], dim)


@pytest.mark.parametrize("seq,expected", [(2048, ["jvp_fwd", "jvp_bwd_v"]),
                                          (1024, ["jvp_fwd", "jvp_bwd_kv", "jvp_bwd_q"])])
def test_jvp_bwd_auto_at_head_dim_128(seq, expected):
    """The default at head dim 128 ("auto") takes the dS matmuls from 2,048 tokens on."""
    sd = jax.ShapeDtypeStruct((1, seq, 4, 128), jnp.bfloat16)

    def tan_vjp(q, k, v, tq, tk, tv, do, dto):
        _, vjp = jax.vjp(lambda *a: flash_with_tangent(*a, interpret=False), q, k, v, tq, tk, tv)
        return vjp((do, dto))

    _check(_lower(tan_vjp, *(sd,) * 8), expected, 128)


@pytest.mark.parametrize("dim,seq,dtype", [(64, 256, jnp.bfloat16), (48, 130, jnp.bfloat16), (64, 100, jnp.float32)])
def test_qkv_kernels_lower_to_triton(dim, seq, dtype):
    """attention_qkv's plain path: the forward reads the 5-D qkv array through squeezed block
    specs and applies the bias and q/k norms itself, with or without them; the backward runs the
    plain backward kernels."""
    sd = jax.ShapeDtypeStruct((2, seq, 3, 3, dim), dtype)
    w = jax.ShapeDtypeStruct((dim,), jnp.float32)
    bias = jax.ShapeDtypeStruct((3, 3, dim), dtype)
    fn = lambda a, b, c, d: attention_qkv(a, c, d, bias=b, **KW)  # noqa: E731
    _check(_lower(fn, sd, bias, w, w), ["fwd_qkv"], dim, dtype=dtype)
    grad = jax.grad(lambda *a: _f32sum(fn(*a)), argnums=(0, 1, 2, 3))
    _check(_lower(grad, sd, bias, w, w), ["fwd_qkv", "bwd_kv", "bwd_q"], dim, dtype=dtype)
    _check(_lower(lambda a: attention_qkv(a, **KW), sd), ["fwd_qkv"], dim, dtype=dtype)
    # jvp mode keeps the tangent kernels (the prologue by XLA before them); the reverse mode of
    # the prologue's JVP is one kernel where it applies (lengths a multiple of 16)
    fn_jvp = lambda a, b, c, d: attention_qkv(a, c, d, bias=b, jvp=True, **KW)  # noqa: E731
    loss = lambda a, b, c, d: _f32sum(jax.jvp(lambda x: fn_jvp(x, b, c, d), (a,), (a,))[1])  # noqa: E731
    prologue_bwd = ["tvm_qkv_tangent_bwd"] if seq % 16 == 0 else []
    _check(_lower(jax.grad(loss, argnums=(0, 1, 2, 3)), sd, bias, w, w),
           ["jvp_fwd", "jvp_bwd_kv", "jvp_bwd_q"] + prologue_bwd, dim, dtype=dtype)


@pytest.mark.parametrize(
    "dtype,dim,q_len,kv_len",
    [(jnp.float32, 64, 100, 100), (jnp.bfloat16, 32, 1000, 1000), (jnp.bfloat16, 256, 64, 64),
     (jnp.float16, 80, 77, 300)],
)  # fmt: skip
def test_other_dtypes_dims_and_lengths_lower(dtype, dim, q_len, kv_len):
    sq = jax.ShapeDtypeStruct((1, q_len, 2, dim), dtype)
    sk = jax.ShapeDtypeStruct((1, kv_len, 2, dim), dtype)

    def loss(q, k, v):
        o, to = jax.jvp(lambda a, b, c: attention(a, b, c, jvp=True, **KW), (q, k, v), (q, k, v))
        return _f32sum(o) + _f32sum(to)

    _check(_lower(jax.grad(loss, argnums=(0, 1, 2)), sq, sk, sk), ["jvp_fwd", "jvp_bwd_kv", "jvp_bwd_q"], dim, dtype=dtype)
    plain = jax.grad(lambda q, k, v: _f32sum(attention(q, k, v, **KW)), argnums=(0, 1, 2))
    _check(_lower(plain, sq, sk, sk), ["fwd", "bwd_kv", "bwd_q"], dim, dtype=dtype)


def test_custom_block_sizes_and_vmap_lower():
    cfg = AttentionConfig(
        fwd=KernelConfig(64, 32, 4, 4), jvp_fwd=KernelConfig(32, 128, 8, 1), jvp_bwd_kv=KernelConfig(16, 128, 4, 3),
        jvp_bwd_q=KernelConfig(128, 16, 2, 2),
    )  # fmt: skip
    sd = jax.ShapeDtypeStruct((2, 1, 512, 2, 64), jnp.bfloat16)  # vmapped leading axis

    def loss(q, k, v):
        o, to = jax.jvp(lambda a, b, c: attention(a, b, c, jvp=True, block_sizes=cfg, **KW), (q, k, v), (v, q, k))
        return _f32sum(o) + _f32sum(to)

    g = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))
    _check(_lower(g, sd, sd, sd), ["jvp_fwd", "jvp_bwd_kv", "jvp_bwd_q"], 64, cfg)


def test_lowering_under_mesh_and_inside_user_shard_map():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    mesh = jax.make_mesh((4,), ("d",))
    with jax.set_mesh(mesh):
        sd = jax.ShapeDtypeStruct((4, 128, 2, 64), jnp.bfloat16, sharding=NamedSharding(mesh, P("d")))

        def loss(q, k, v, tq, tk, tv):
            o, to = jax.jvp(lambda a, b, c: attention(a, b, c, jvp=True, **KW), (q, k, v), (tq, tk, tv))
            return _f32sum(o) + _f32sum(to)

        g = jax.grad(loss, argnums=tuple(range(6)))
        text = _lower(g, *(sd,) * 6)  # auto-wrapped in shard_map over the batch
        _check(text, ["jvp_fwd", "jvp_bwd_kv", "jvp_bwd_q"], 64)
        # The kernels sit in a manual computation split over the batch dim on "d".
        manual = [l for l in text.splitlines() if "manual_computation" in l or "SPMDFullToShardShape" in l]
        assert manual, "no shard_map around the kernels"
        assert all('[{"d"}, {}, {}, {}]' in l for l in manual if "in_shardings" in l), manual
        # Inside a user's shard_map with the default check_vma=True.
        inner = jax.shard_map(g, in_specs=P("d"), out_specs=P("d"))
        _check(_lower(inner, *(sd,) * 6), ["jvp_fwd", "jvp_bwd_kv", "jvp_bwd_q"], 64)


def test_fp32_at_head_dim_128_takes_the_smaller_tiles():
    """The H200-tuned head-dim-128 tiles exceed shared memory with 4-byte inputs; fp32 calls must
    compile with the 4-byte defaults (checked through the launch parameters of every kernel)."""
    f32, bf16 = default_config(128, jnp.float32), default_config(128, jnp.bfloat16)
    assert f32 != bf16 and default_config(128) == bf16
    assert f32.jvp_fwd.block_q * f32.jvp_fwd.block_k < bf16.jvp_fwd.block_q * bf16.jvp_fwd.block_k
    sd = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.float32)

    def loss(q, k, v):
        o, to = jax.jvp(lambda a, b, c: attention(a, b, c, jvp=True, **KW), (q, k, v), (q, k, v))
        return _f32sum(o) + _f32sum(to)

    _check(_lower(jax.grad(loss, argnums=(0, 1, 2)), sd, sd, sd), ["jvp_fwd", "jvp_bwd_kv", "jvp_bwd_q"], 128, cfg=f32)


@pytest.mark.parametrize("shape", [(32, 256, 4608), (2, 130, 96)])
def test_bias_gelu_lowers_to_triton(shape):
    """The MLP's bias + GELU kernel: one Triton call, its launch parameters; differentiated, the
    XLA path (no kernel)."""
    y = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    b = jax.ShapeDtypeStruct(shape[-1:], jnp.bfloat16)
    found = _kernels(_lower(lambda y, b: bias_gelu(y, b, **KW), y, b))
    assert found == [("tvm_bias_gelu", gelu_mod.TILES[2], 1)], found
    assert _kernels(_lower(jax.grad(lambda y, b: _f32sum(bias_gelu(y, b, **KW))), y, b)) == []


@pytest.mark.parametrize("shape", [(32, 256, 1152), (2, 130, 96)])
def test_residual_norm_modulate_lowers_to_triton(shape):
    """The block's second pre-norm kernel: one Triton call, loads in power-of-two chunks of the
    width; differentiated, the XLA path."""
    from kernels import residual_norm_modulate
    from kernels import modulation as mod

    b, n, c = shape
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    y = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((c,), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((b, c), jnp.float32)
    f = lambda *a: residual_norm_modulate(*a, **KW)  # noqa: E731
    assert _kernels(_lower(f, x, y, bias, g, g, g)) == [("tvm_residual_norm_modulate", mod.TILES[1], 1)]
    assert _kernels(_lower(jax.grad(lambda *a: _f32sum(f(*a))), x, y, bias, g, g, g)) == []

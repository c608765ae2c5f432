"""Native (compiled Triton) kernels on a CUDA GPU at real sizes with default block sizes.

Skipped without a GPU (root conftest). References: float64 JAX autodiff of the jnp
attention, computed on the CPU. Tolerances (relative Frobenius error): bf16 2e-2 (observed
~3e-3 in interpret mode; the output rounding alone is ~2.5e-3), fp32 1e-4 (IEEE fp32
matmuls, no TF32).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import AttentionConfig, attention, flash_with_tangent
from kernels.tests import helpers
from kernels.tests.helpers import assert_close, randn, ref_plain, ref_tangent
from kernels.tools.tile_sweep import max_ulps

pytestmark = pytest.mark.gpu

TOL = {jnp.bfloat16: 2e-2, jnp.float32: 1e-4}

SHAPES = [  # (batch, seq, heads, dim)
    (2, 256, 4, 64),
    (2, 256, 4, 128),
    (1, 1024, 4, 64),
    (1, 1024, 2, 128),
    (1, 1000, 2, 128),  # ragged
    (1, 4096, 2, 128),
    (2, 333, 3, 80),  # ragged, head dim padded to 128
]


def _cpu(fn, *args):
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        return fn(*(jax.device_put(np.asarray(jnp.asarray(a, jnp.float32)), cpu) for a in args))


def _id(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_native_plain(shape, dtype):
    if dtype == jnp.float32 and shape[1] > 1024:
        pytest.skip("fp32 checked at small sizes only")
    q, k, v, do = randn(hash(shape) % 1000, [shape] * 4, dtype)
    fn = jax.jit(lambda q, k, v, do: (lambda o_vjp: (o_vjp[0], o_vjp[1](do)))(
        jax.vjp(lambda a, b, c: attention(a, b, c, impl="pallas"), q, k, v)))  # fmt: skip
    o, grads = fn(q, k, v, do)
    o_ref, g_ref = _cpu(lambda *a: ref_plain(*a, shape[3] ** -0.5), q, k, v, do)
    assert_close("o", o, o_ref, TOL[dtype])
    for name, g, gr in zip(("dq", "dk", "dv"), grads, g_ref):
        assert_close(name, g, gr, TOL[dtype])


@pytest.mark.parametrize("impl", ["kernels", "matmul"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_native_tangent(shape, dtype, impl):
    """All six cotangents, from the two backward kernels and from jvp_bwd_v + dS matmuls."""
    if dtype == jnp.float32 and shape[1] > 1024:
        pytest.skip("fp32 checked at small sizes only")
    q, k, v, tq, tk, tv, do, dto = randn(hash(shape) % 1000 + 1, [shape] * 8, dtype)
    cfg = AttentionConfig(jvp_bwd_impl=impl)

    @jax.jit
    def fn(q, k, v, tq, tk, tv, do, dto):
        out, vjp = jax.vjp(functools.partial(flash_with_tangent, block_sizes=cfg), q, k, v, tq, tk, tv)
        return out, vjp((do, dto))

    zero = jnp.zeros_like(do)
    cts = [(do, dto), (do, zero), (zero, dto)]
    o_ref, to_ref, g_refs = _cpu(
        lambda *a: ref_tangent(*a[:6], [(a[6], a[7]), (a[6], 0 * a[7]), (0 * a[6], a[7])], shape[3] ** -0.5),
        q, k, v, tq, tk, tv, do, dto,
    )  # fmt: skip
    for (c_o, c_to), g_ref in zip(cts, g_refs):
        (o, to), grads = fn(q, k, v, tq, tk, tv, c_o, c_to)
        assert_close("o", o, o_ref, TOL[dtype])
        assert_close("t_o", to, to_ref, TOL[dtype])
        for name, g, gr in zip(("dq", "dk", "dv", "dtq", "dtk", "dtv"), grads, g_ref):
            if not np.any(gr):
                assert not np.any(np.asarray(g, np.float32)), name
            else:
                assert_close(name, g, gr, TOL[dtype])


@pytest.mark.parametrize("impl", ["kernels", "matmul"])
@pytest.mark.parametrize("shape", [(32, 256, 18, 64), (4, 1024, 18, 64)], ids=_id)
def test_native_grad_of_jvp_dit_shapes(shape, impl):
    q, k, v, tq, tk, tv, do, dto = randn(7, [shape] * 8, jnp.bfloat16)

    def loss(fn, q, k, v, tq, tk, tv):
        o, to = jax.jvp(fn, (q, k, v), (tq, tk, tv))
        f32 = lambda x: x.astype(jnp.float32)
        return jnp.sum(f32(o) * f32(do)) + jnp.sum(f32(to) * f32(dto))

    pallas = lambda a, b, c: attention(a, b, c, impl="pallas", jvp=True, block_sizes=AttentionConfig(jvp_bwd_impl=impl))
    xla = lambda a, b, c: attention(a, b, c, impl="xla")
    g = jax.jit(jax.grad(lambda *a: loss(pallas, *a), argnums=tuple(range(6))))(q, k, v, tq, tk, tv)
    _, _, (g_ref,) = _cpu(
        lambda *a: ref_tangent(*a[:6], [(a[6], a[7])], shape[3] ** -0.5), q, k, v, tq, tk, tv, do, dto
    )
    for name, x, y in zip(("dq", "dk", "dv", "dtq", "dtk", "dtv"), g, g_ref):
        assert_close(name, x, y, 2e-2)
    # and the XLA path agrees with the same reference
    gx = jax.jit(jax.grad(lambda *a: loss(xla, *a), argnums=tuple(range(6))))(q, k, v, tq, tk, tv)
    for name, x, y in zip(("dq", "dk", "dv", "dtq", "dtk", "dtv"), gx, g_ref):
        assert_close("xla " + name, x, y, 3e-2)


CUDNN_SHAPES = [  # (batch, seq, heads, dim): cuDNN takes head dims that are multiples of 8
    (32, 256, 18, 64),  # DiT-XL/2 at 256px
    (1, 1000, 2, 128),  # not a multiple of any tile
    (2, 334, 3, 80),  # even lengths only (see kernels/cudnn.py)
]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", CUDNN_SHAPES, ids=_id)
def test_native_cudnn_plain(shape, dtype):
    """impl="cudnn" (jax.nn.dot_product_attention's cuDNN kernels) against the float64 reference."""
    q, k, v, do = randn(hash(shape) % 1000 + 2, [shape] * 4, dtype)
    fn = jax.jit(lambda q, k, v, do: (lambda o_vjp: (o_vjp[0], o_vjp[1](do)))(
        jax.vjp(lambda a, b, c: attention(a, b, c, impl="cudnn"), q, k, v)))  # fmt: skip
    o, grads = fn(q, k, v, do)
    assert o.dtype == q.dtype and o.shape == q.shape
    o_ref, g_ref = _cpu(lambda *a: ref_plain(*a, shape[3] ** -0.5), q, k, v, do)
    assert_close("o", o, o_ref, TOL[jnp.bfloat16])
    for name, g, gr in zip(("dq", "dk", "dv"), grads, g_ref):
        assert_close(name, g, gr, TOL[jnp.bfloat16])


def test_native_cudnn_refuses_what_it_cannot_take():
    x = jnp.zeros((1, 64, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="impl='cudnn' supports dtypes bfloat16 and float16"):
        attention(x, x, x, impl="cudnn")
    y = jnp.zeros((1, 64, 2, 60), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 8"):
        attention(y, y, y, impl="cudnn")
    with pytest.raises(ValueError, match="forward-mode"):
        attention(y, y, y, impl="cudnn", jvp=True)
    z = jnp.zeros((1, 333, 2, 64), jnp.bfloat16)  # jax's cuDNN backward refuses odd lengths
    with pytest.raises(ValueError, match="even sequence lengths"):
        attention(z, z, z, impl="cudnn")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
def test_native_auto_plain_at_model_shape(dtype):
    """impl="auto" on this GPU (whatever the table picks) matches the reference; fp32 never
    reaches cuDNN (it would raise)."""
    shape = (4, 256, 18, 64)
    q, k, v, do = randn(11, [shape] * 4, dtype)
    fn = jax.jit(lambda q, k, v, do: (lambda o_vjp: (o_vjp[0], o_vjp[1](do)))(
        jax.vjp(lambda a, b, c: attention(a, b, c, impl="auto"), q, k, v)))  # fmt: skip
    o, grads = fn(q, k, v, do)
    o_ref, g_ref = _cpu(lambda *a: ref_plain(*a, shape[3] ** -0.5), q, k, v, do)
    assert_close("o", o, o_ref, TOL[dtype] if dtype == jnp.bfloat16 else 2e-3)
    for name, g, gr in zip(("dq", "dk", "dv"), grads, g_ref):
        assert_close(name, g, gr, TOL[dtype] if dtype == jnp.bfloat16 else 2e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(2, 256, 4, 64), (1, 1024, 4, 64), (2, 333, 3, 80)], ids=_id)
def test_native_qkv_with_bias_and_norms(shape, dtype):
    """attention_qkv's plain Pallas path (the forward adds the bias and normalises q and k on each
    tile it loads; the backward recomputes that prologue with XLA before the plain kernels):
    (1) against the float64 XLA composition (bias add, slices, kernels.qk_rms_norm, attention),
    gradients of the bias and norm weights included; (2) against what it replaces, the Pallas
    attention on q, k, v made by XLA, which must agree to bf16 rounding.

    bf16 tolerances for (1): the plain backward rounds dS to bf16 before dq = dS k; the bias gives
    every key a common direction, whose share of dq cancels exactly only in exact arithmetic, and
    the norm's VJP keeps what is left: observed in interpret mode at 1x1024x4x64 dq 1.7e-2,
    dwq 3.9e-2, dwk 3.4e-2 (the XLA bf16 path: 4.6e-3 / 5.9e-3 / 5.2e-3), identical to the
    composition (2); 6e-2 for the norm weights, 3e-2 otherwise."""
    from kernels import attention_qkv, attention_xla, qk_rms_norm
    from kernels import flash as flash_mod

    b, s, h, d = shape
    qkv, do, bias = randn(hash(shape) % 1000 + 7, [(b, s, 3, h, d), shape, (3, h, d)], dtype)
    rng = np.random.default_rng(3)
    wq, wk = (jnp.asarray(1.0 + 0.5 * rng.standard_normal(d), jnp.float32) for _ in range(2))

    def composition(qkv, bias, wq, wk, do):
        def f(a, x, y):
            q, k = qk_rms_norm(a[:, :, 0], x, eps=1e-6, dim=d), qk_rms_norm(a[:, :, 1], y, eps=1e-6, dim=d)
            return attention_xla(q, k, a[:, :, 2], scale=d ** -0.5)
        o, vjp = jax.vjp(f, qkv + bias, wq, wk)
        dqkv, dwq, dwk = vjp(do)
        return o, (dqkv, dqkv.sum(axis=(0, 1)), dwq, dwk)

    def with_grads(f):
        return jax.jit(lambda *a: (lambda o_vjp: (o_vjp[0], o_vjp[1](a[-1])))(jax.vjp(f, *a[:-1])))

    ours = with_grads(lambda a, c, x, y: attention_qkv(a, x, y, bias=c, impl="pallas"))
    pro = flash_mod.QKVPrologue(bias=True, norm=True, eps=1e-6, head_dim=d)
    replaced = with_grads(lambda *a: attention(*flash_mod.split_qkv(*a, pro), impl="pallas"))
    o, grads = ours(qkv, bias, wq, wk, do)
    o_old, grads_old = replaced(qkv, bias, wq, wk, do)
    biased = (qkv + bias).astype(dtype)  # the op adds the bias in qkv's dtype
    with helpers.x64():
        o_ref, g_ref = _cpu(lambda *a: composition(*(jnp.asarray(x, jnp.float64) for x in a)),
                            biased, jnp.zeros_like(bias), wq, wk, do)
    bf16 = dtype == jnp.bfloat16
    assert_close("o", o, np.asarray(o_ref), TOL[dtype])
    for name, g, gr in zip(("dqkv", "dbias", "dwq", "dwk"), grads, g_ref):
        assert_close(name, g, np.asarray(gr), (6e-2 if name in ("dwq", "dwk") else 3e-2) if bf16 else TOL[dtype])
    # (2) the composition it replaces, run the same way: the kernel's norm and XLA's may
    # round a bf16 element differently, nothing more
    f32 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
    assert_close("o vs replaced", o, f32(o_old), 5e-3 if bf16 else 1e-5)
    for name, g, gr in zip(("dqkv", "dbias", "dwq", "dwk"), grads, grads_old):
        assert_close(f"{name} vs replaced", g, f32(gr), 2e-2 if bf16 else 1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(32, 256, 4608), (3, 333, 96)], ids=_id)
def test_native_bias_gelu(shape, dtype):
    """The MLP's bias + GELU kernel compiled: the model's fc1 width at the step's batch, and a
    ragged one; within one rounding (bf16) or gelu_tanh's few-ulp float32 error of the float64
    value, and auto picks the kernel on the GPU."""
    from kernels import bias_gelu

    k1, k2 = jax.random.split(jax.random.key(0))
    y = (jax.random.normal(k1, shape, jnp.float32) * 3).astype(dtype)
    b = jax.random.normal(k2, shape[-1:], jnp.float32).astype(dtype)
    fn = jax.jit(lambda y, b: bias_gelu(y, b))
    assert "tvm_bias_gelu" in fn.lower(y, b).as_text()
    got = np.asarray(fn(y, b), np.float64)
    h = np.asarray((y.astype(jnp.float32) + b.astype(jnp.float32)).astype(dtype), np.float64)
    exact = h * 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    assert np.all(np.isfinite(got))
    assert max_ulps(got, exact, dtype) <= (1 if dtype == jnp.bfloat16 else 16)


@pytest.mark.parametrize("shape", [(32, 256, 1152), (3, 333, 96)], ids=_id)
def test_native_residual_norm_modulate(shape):
    """The block's second pre-norm kernel compiled at the model's width and a ragged shape: within
    one bf16 rounding of the float32 value computed op by op (the bias add rounded as the kernel
    rounds it), and auto picks the kernel on the GPU."""
    from kernels import residual_norm_modulate
    from kernels.modulation import reference

    b, n, c = shape
    k = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(k[0], shape, jnp.float32)
    y = jax.random.normal(k[1], shape, jnp.float32).astype(jnp.bfloat16)
    bias = (jax.random.normal(k[2], (c,), jnp.float32) * 0.1).astype(jnp.bfloat16)
    gate, shift, scale = (jax.random.normal(kk, (b, c), jnp.float32) for kk in k[3:])
    args = (x, y, bias, gate, shift, scale)
    fn = jax.jit(lambda *a: residual_norm_modulate(*a))
    assert "tvm_residual_norm_modulate" in fn.lower(*args).as_text()
    got = np.asarray(fn(*args), np.float64)
    want = np.asarray(reference(*args, eps=1e-6, out_dtype=jnp.float32), np.float64)
    assert np.all(np.isfinite(got))
    assert max_ulps(got, want) <= 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(4, 256, 3, 18, 64), (1, 1024, 3, 4, 128)], ids=_id)
def test_native_qkv_tangent_backward(shape, dtype):
    """The Pallas backward of the JVP-mode qkv prologue compiled at the DiT's shape (256 tokens,
    18 heads of 64) and at head dim 128: all five cotangents against float64 autodiff of the
    XLA prologue on the CPU."""
    from kernels.flash import QKVPrologue, split_qkv
    from kernels.qkv_tangent import split_qkv_tangent
    from kernels.tests.test_qkv_tangent import NAMES, _inputs, _pair_vjp

    pro = QKVPrologue(bias=True, norm=True, eps=1e-6, head_dim=shape[-1])
    qkv, tqkv, bias, wq, wk, cts = _inputs(21, shape, dtype)
    args = (qkv, tqkv, bias, wq, wk, *cts)
    kernel = lambda x, bb, w1, w2, p: split_qkv_tangent(x, bb, w1, w2, p, False)  # noqa: E731
    ours = jax.jit(lambda *a: _pair_vjp(kernel, pro, *a[:5], a[5:]))
    assert "tvm_qkv_tangent_bwd" in ours.lower(*args).as_text()
    got = ours(*args)

    def ref(*a):
        with helpers.x64():
            a = [jnp.asarray(x, jnp.float64) for x in a]
            return _pair_vjp(split_qkv, pro, *a[:5], tuple(a[5:]))

    want = _cpu(ref, *args)
    for name, g, r in zip(NAMES, got, want):
        assert_close(name, g, np.asarray(r), TOL[dtype])


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(8, 256, 1152), (3, 333, 96)], ids=_id)
def test_native_norm_modulate_tangent_backward(shape, out_dtype):
    """The Pallas backward of a pre-norm's JVP compiled at the model's width (256 tokens of
    1,152) and a ragged shape, with ``auto`` choosing it on the GPU: all six cotangents against
    float64 autodiff of the reference on the CPU."""
    from kernels import norm_modulate_tangent
    from kernels.norm_tangent import reference, reverse_of_jvp
    from kernels.tests.test_norm_tangent import NAMES, _inputs

    args, cts = _inputs(23, shape, out_dtype)
    kernel = lambda x, sh, sc: norm_modulate_tangent(x, sh, sc, out_dtype=out_dtype)  # noqa: E731  (auto)
    ours = jax.jit(lambda *a: reverse_of_jvp(kernel, *a[:6], a[6:]))
    assert "tvm_norm_modulate_tangent_bwd" in ours.lower(*args, *cts).as_text()
    got = ours(*args, *cts)

    def ref(*a):
        with helpers.x64():
            a = [jnp.asarray(x, jnp.float64) for x in a]
            return reverse_of_jvp(functools.partial(reference, eps=1e-6, out_dtype=jnp.float64), *a[:6], a[6:])

    want = _cpu(ref, *args, *cts)
    for name, g, r in zip(NAMES, got, want):
        assert_close(name, g, np.asarray(r), 1e-5)

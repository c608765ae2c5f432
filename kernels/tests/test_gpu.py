"""Native (compiled Triton) kernels on a CUDA GPU at real sizes with default block sizes.

Skipped without a GPU (root conftest). References: float64 JAX autodiff of the jnp
attention, computed on the CPU. Tolerances (relative Frobenius error): bf16 2e-2 (observed
~3e-3 in interpret mode; the output rounding alone is ~2.5e-3), fp32 1e-4 (IEEE fp32
matmuls, no TF32).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import attention, flash_with_tangent
from kernels.tests.helpers import assert_close, randn, ref_plain, ref_tangent

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


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_native_tangent(shape, dtype):
    if dtype == jnp.float32 and shape[1] > 1024:
        pytest.skip("fp32 checked at small sizes only")
    q, k, v, tq, tk, tv, do, dto = randn(hash(shape) % 1000 + 1, [shape] * 8, dtype)

    @jax.jit
    def fn(q, k, v, tq, tk, tv, do, dto):
        out, vjp = jax.vjp(flash_with_tangent, q, k, v, tq, tk, tv)
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


@pytest.mark.parametrize("shape", [(32, 256, 18, 64), (4, 1024, 18, 64)], ids=_id)
def test_native_grad_of_jvp_dit_shapes(shape):
    q, k, v, tq, tk, tv, do, dto = randn(7, [shape] * 8, jnp.bfloat16)

    def loss(fn, q, k, v, tq, tk, tv):
        o, to = jax.jvp(fn, (q, k, v), (tq, tk, tv))
        f32 = lambda x: x.astype(jnp.float32)
        return jnp.sum(f32(o) * f32(do)) + jnp.sum(f32(to) * f32(dto))

    pallas = lambda a, b, c: attention(a, b, c, impl="pallas", jvp=True)
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

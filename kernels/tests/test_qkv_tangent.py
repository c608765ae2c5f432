"""``kernels.qkv_tangent``: the qkv prologue of a JVP attention call, whose reverse mode is one
Pallas pass (interpret mode on the CPU).

The reference is JAX autodiff of the XLA prologue (``kernels.flash.split_qkv``): the reverse
mode of its JVP along qkv, in float64 (x64) for the error bounds, and the XLA form in the same
dtype for the fallbacks, which must be that function exactly.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kernels import AttentionConfig, attention_qkv, attention_xla
from kernels.flash import QKVPrologue, split_qkv
from kernels.qkv_tangent import kernel_applies, split_qkv_tangent
from kernels.tests.helpers import _f64, assert_close, randn, rel_err, x64

EPS = 1e-6
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # bf16: the rounding of the outputs themselves


def _inputs(seed, shape, dtype):
    b, s, _, h, d = shape
    qkv, tqkv, bias = randn(seed, [shape, shape, (3, h, d)], dtype)
    wq, wk = (1.0 + 0.3 * w for w in randn(seed + 1, [(d,), (d,)], jnp.float32))
    cts = tuple(randn(seed + 2, [(b, s, h, d)] * 6, dtype))
    return qkv, tqkv, bias, wq, wk, cts


def _pair_vjp(fn, pro, qkv, tqkv, bias, wq, wk, cts):
    """Cotangents of (qkv, tqkv, bias, wq, wk) of ``jax.jvp(fn along qkv)``'s two outputs."""
    def pair(qkv, tqkv, bias, wq, wk):
        return jax.jvp(lambda a: fn(a, bias, wq, wk, pro), (qkv,), (tqkv,))

    _, vjp = jax.vjp(pair, qkv, tqkv, bias, wq, wk)
    return vjp((cts[:3], cts[3:]))


def _ours(a, bias, wq, wk, pro):
    return split_qkv_tangent(a, bias, wq, wk, pro, True)


NAMES = ("dqkv", "dtqkv", "dbias", "dwq", "dwk")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,bias", [((2, 32, 3, 2, 16), True), ((1, 64, 3, 3, 64), True),
                                        ((2, 16, 3, 1, 32), False)])
def test_reverse_mode_of_the_jvp_matches_autodiff_of_the_xla_prologue(dtype, shape, bias):
    """All five cotangents (qkv, its tangent, bias, both norm weights) against float64 autodiff
    of the XLA prologue; the forward pair is XLA's, so it is the same numbers as before."""
    pro = QKVPrologue(bias=bias, norm=True, eps=EPS, head_dim=shape[-1])
    qkv, tqkv, b, wq, wk, cts = _inputs(3, shape, dtype)
    assert kernel_applies(qkv, pro)
    got = jax.jit(functools.partial(_pair_vjp, _ours, pro))(qkv, tqkv, b, wq, wk, cts)
    with x64():
        ref = _pair_vjp(split_qkv, pro, *(_f64(a) for a in (qkv, tqkv, b, wq, wk)), tuple(_f64(c) for c in cts))
    for name, g, r in zip(NAMES, got, ref):
        if name == "dbias" and not bias:
            continue  # no bias: its gradient is that of an unused input (zeros either way)
        assert g.dtype == {"dqkv": qkv.dtype, "dtqkv": qkv.dtype, "dbias": b.dtype}.get(name, jnp.float32), name
        assert_close(name, g, np.asarray(r), TOL[dtype])
    out = jax.jit(lambda *a: jax.jvp(lambda x: _ours(x, *a[2:], pro), (a[0],), (a[1],)))(qkv, tqkv, b, wq, wk)
    ref_out = jax.jit(lambda *a: jax.jvp(lambda x: split_qkv(x, *a[2:], pro), (a[0],), (a[1],)))(qkv, tqkv, b, wq, wk)
    for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out)):
        np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(r, np.float32))


def _kernel_in(fn, *args) -> bool:
    return "tvm_qkv_tangent_bwd" in str(jax.make_jaxpr(fn)(*args))


def test_the_kernel_runs_only_where_it_applies_and_the_rest_is_the_xla_function():
    """The Pallas backward appears in the gradient's jaxpr for the TVM pattern (a JVP along qkv);
    a JVP that also moves a norm weight and a sequence that is not a multiple of 16
    differentiate the XLA prologue instead, with identical results."""
    shape = (1, 32, 3, 2, 16)
    pro = QKVPrologue(bias=True, norm=True, eps=EPS, head_dim=16)
    qkv, tqkv, b, wq, wk, cts = _inputs(5, shape, jnp.float32)
    ours = functools.partial(_pair_vjp, _ours, pro)
    assert _kernel_in(ours, qkv, tqkv, b, wq, wk, cts)

    def moving_weight(fn, qkv, wq):  # tangents in qkv and wq
        return jax.jvp(lambda a, w: fn(a, b, w, wk, pro), (qkv, wq), (tqkv, jnp.ones_like(wq)))

    loss = lambda f, *a: sum(jnp.sum(x * x) for x in jax.tree.leaves(moving_weight(f, *a)))  # noqa: E731
    grad = jax.grad(functools.partial(loss, _ours), argnums=(0, 1))
    assert not _kernel_in(grad, qkv, wq)
    for g, r in zip(grad(qkv, wq), jax.grad(functools.partial(loss, split_qkv), argnums=(0, 1))(qkv, wq)):
        np.testing.assert_array_equal(g, r)

    short = _inputs(6, (1, 24, 3, 2, 16), jnp.float32)
    pro24 = QKVPrologue(bias=True, norm=True, eps=EPS, head_dim=16)
    assert not kernel_applies(short[0], pro24)
    assert not _kernel_in(functools.partial(_pair_vjp, _ours, pro24), *short)
    for g, r in zip(functools.partial(_pair_vjp, _ours, pro24)(*short), functools.partial(_pair_vjp, split_qkv, pro24)(*short)):
        np.testing.assert_array_equal(g, r)



def test_attention_qkv_in_jvp_mode_uses_it_and_differentiates_like_the_composition():
    """The TVM pattern through the public entry point (grad of a loss of ``jax.jvp`` outputs),
    at a length where the kernel applies, against the XLA composition."""
    b, s, h, d = 1, 32, 2, 16
    qkv, tqkv, bias, wq, wk, (do, *_) = _inputs(7, (b, s, 3, h, d), jnp.float32)
    kw = dict(impl="pallas", jvp=True, interpret=True, block_sizes=AttentionConfig.uniform(16, 16))

    def ours(a, bias, wq, wk):
        return attention_qkv(a, wq, wk, bias=bias, **kw)

    def ref(a, bias, wq, wk):
        q, k, v = split_qkv(a, bias, wq, wk, QKVPrologue(bias=True, norm=True, eps=EPS, head_dim=d))
        return attention_xla(q, k, v, scale=d ** -0.5)

    def loss(fn, qkv, bias, wq, wk):
        o, to = jax.jvp(lambda a: fn(a, bias, wq, wk), (qkv,), (tqkv,))
        return jnp.sum(o * do) + jnp.sum(to * to)

    assert _kernel_in(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2, 3)), qkv, bias, wq, wk)
    g = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2, 3)))(qkv, bias, wq, wk)
    g_ref = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2, 3)))(qkv, bias, wq, wk)
    for name, a, r in zip(("dqkv", "dbias", "dwq", "dwk"), g, g_ref):
        assert_close(name, a, np.asarray(r, np.float64), 1e-5)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_over_the_batch(axis_type):
    """Under a mesh the kernel runs on batch shards; the partial sums of the bias and weight
    gradients are reduced across devices by XLA: same cotangents as on one device."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    pro = QKVPrologue(bias=True, norm=True, eps=EPS, head_dim=16)
    qkv, tqkv, b, wq, wk, cts = _inputs(9, (4, 16, 3, 2, 16), jnp.float32)
    fn = jax.jit(functools.partial(_pair_vjp, _ours, pro))
    ref = fn(qkv, tqkv, b, wq, wk, cts)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    with jax.set_mesh(mesh):
        batch = NamedSharding(mesh, P("data"))
        put = lambda a: jax.device_put(a, batch)  # noqa: E731
        got = fn(put(qkv), put(tqkv), b, wq, wk, tuple(put(c) for c in cts))
    for name, g, r in zip(NAMES, got, ref):
        assert rel_err(g, np.asarray(r)) <= 1e-6, name

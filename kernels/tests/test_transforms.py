"""Pallas attention under eager, vmap and sharding (interpret mode on CPU).

The suite-wide conftest gives the CPU backend 4 virtual devices.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kernels import AttentionConfig, attention, attention_xla
from kernels.tests.helpers import assert_close, randn, rel_err

CFG = AttentionConfig.uniform(16, 16)
KW = dict(impl="pallas", interpret=True, block_sizes=CFG)


def _needs_devices(n):
    if len(jax.devices()) < n:
        pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count={n})")


def _loss_plain(q, k, v, do):
    return jnp.sum(attention(q, k, v, **KW) * do)


def _loss_jvp(q, k, v, tq, tk, tv, do, dto):
    o, to = jax.jvp(lambda a, b, c: attention(a, b, c, jvp=True, **KW), (q, k, v), (tq, tk, tv))
    return jnp.sum(o * do) + jnp.sum(to * dto)


def test_eager_call_matches_jit():
    q, k, v = randn(11, [(1, 20, 1, 16)] * 3, jnp.float32)
    eager = attention(q, k, v, **KW)
    jitted = jax.jit(lambda a, b, c: attention(a, b, c, **KW))(q, k, v)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
    assert_close("o", eager, attention_xla(q, k, v, scale=0.25), 1e-5)


def test_vmap_plain_and_jvp():
    """Extra leading batch axis via vmap: forward, grad and grad-of-jvp equal per-slice calls."""
    shape = (2, 1, 19, 2, 16)  # (vmapped, batch, seq, heads, dim)
    q, k, v, tq, tk, tv, do, dto = randn(12, [shape] * 8, jnp.float32)
    o = jax.jit(jax.vmap(lambda a, b, c: attention(a, b, c, **KW)))(q, k, v)
    ref = jnp.stack([attention_xla(q[i], k[i], v[i], scale=0.25) for i in range(2)])
    assert_close("vmap o", o, ref, 1e-5)

    g = jax.jit(jax.vmap(jax.grad(_loss_plain, argnums=(0, 1, 2))))(q, k, v, do)
    for i in range(2):
        gi = jax.grad(
            lambda a, b, c: jnp.sum(attention_xla(a, b, c, scale=0.25) * do[i]), argnums=(0, 1, 2)
        )(q[i], k[i], v[i])
        for x, y in zip(g, gi):
            assert_close("vmap grad", x[i], y, 1e-5)

    g = jax.jit(jax.vmap(jax.grad(_loss_jvp, argnums=tuple(range(6)))))(q, k, v, tq, tk, tv, do, dto)

    def ref_loss(q, k, v, tq, tk, tv, do, dto):
        o, to = jax.jvp(lambda a, b, c: attention_xla(a, b, c, scale=0.25), (q, k, v), (tq, tk, tv))
        return jnp.sum(o * do) + jnp.sum(to * dto)

    for i in range(2):
        args = [x[i] for x in (q, k, v, tq, tk, tv, do, dto)]
        gi = jax.grad(ref_loss, argnums=tuple(range(6)))(*args)
        for x, y in zip(g, gi):
            assert_close("vmap grad of jvp", x[i], y, 1e-5)


@pytest.mark.parametrize("mesh_shape,names", [((4,), ("data",)), ((2, 2), ("a", "b"))])
def test_sharded_jit_matches_unsharded_and_stays_batch_sharded(mesh_shape, names):
    _needs_devices(4)
    q, k, v, tq, tk, tv, do, dto = randn(13, [(4, 21, 2, 16)] * 8, jnp.float32)
    args = (q, k, v, tq, tk, tv, do, dto)
    grad_fn = jax.grad(_loss_jvp, argnums=tuple(range(6)))
    ref_o = jax.jit(lambda a, b, c: attention(a, b, c, **KW))(q, k, v)
    ref_g = jax.jit(grad_fn)(*args)

    mesh = jax.make_mesh(mesh_shape, names)
    with jax.set_mesh(mesh):
        batch = NamedSharding(mesh, P(names))
        sargs = [jax.device_put(x, batch) for x in args]
        fwd = jax.jit(lambda a, b, c: attention(a, b, c, **KW))
        o = fwd(*sargs[:3])
        assert rel_err(o, np.asarray(ref_o)) <= 1e-6
        assert o.sharding.is_equivalent_to(batch, o.ndim), o.sharding
        hlo = fwd.lower(*sargs[:3]).compile().as_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo

        sgrad = jax.jit(grad_fn)
        g = sgrad(*sargs)
        for x, y in zip(g, ref_g):
            assert rel_err(x, np.asarray(y)) <= 1e-6
            assert x.sharding.is_equivalent_to(batch, x.ndim), x.sharding
        hlo = sgrad.lower(*sargs).compile().as_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo

        # Replicated inputs are split locally onto the batch (no all-gather either).
        o = fwd(q, k, v)
        assert rel_err(o, np.asarray(ref_o)) <= 1e-6


def test_inside_user_shard_map_does_nothing_special():
    _needs_devices(4)
    q, k, v, do = randn(14, [(4, 18, 1, 16)] * 4, jnp.float32)
    mesh = jax.make_mesh((4,), ("d",))
    spec = P("d")
    # check_vma=False: the Pallas *interpreter* trips JAX's varying-axes check inside
    # shard_map; the compiled (Triton) path is lowered with check_vma=True in test_lowering.
    inner = jax.shard_map(
        lambda a, b, c: attention(a, b, c, **KW), mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False
    )
    with jax.set_mesh(mesh):
        sh = NamedSharding(mesh, spec)
        o = jax.jit(inner)(*(jax.device_put(x, sh) for x in (q, k, v)))
    assert_close("o", o, attention_xla(q, k, v, scale=0.25), 1e-5)


def test_partially_manual_mesh_shards_over_remaining_axes():
    _needs_devices(4)
    q, k, v = randn(15, [(4, 18, 1, 16)] * 3, jnp.float32)
    mesh = jax.make_mesh((2, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    inner = jax.shard_map(
        lambda a, b, c: attention(a, b, c, **KW),
        mesh=mesh, in_specs=P("a"), out_specs=P("a"), axis_names={"a"}, check_vma=False,
    )  # fmt: skip
    with jax.set_mesh(mesh):
        o = jax.jit(inner)(q, k, v)
    assert_close("o", o, attention_xla(q, k, v, scale=0.25), 1e-5)


def test_batch_not_divisible_by_mesh_raises():
    _needs_devices(4)
    q = jnp.zeros((3, 16, 1, 16), jnp.float32)
    with jax.set_mesh(jax.make_mesh((4,), ("data",))):
        with pytest.raises(ValueError, match="not divisible"):
            attention(q, q, q, **KW)
        # The XLA path has no such restriction.
        attention(q, q, q, impl="xla")


def test_autodiff_modes_that_are_not_supported_raise():
    q = randn(16, [(1, 16, 1, 16)], jnp.float32)[0]
    # Plain mode is a custom_vjp: forward-mode raises JAX's usual error (no silent fallback).
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(lambda x: attention(x, x, x, **KW), (q,), (q,))
    # jvp mode is a custom_jvp whose rule is a custom_vjp: reverse mode *without* an enclosing
    # jax.jvp cannot be transposed (use jvp=False there).
    with pytest.raises((ValueError, TypeError, NotImplementedError)):  # message varies by jax version
        jax.grad(lambda x: jnp.sum(attention(x, x, x, jvp=True, **KW)))(q)


def test_grad_of_jvp_through_remat_and_scan():
    """The DiT pattern: blocks under jax.checkpoint inside lax.scan, loss of jax.jvp outputs."""
    x, t = randn(17, [(1, 20, 2, 16)] * 2, jnp.float32)

    def model(attn):
        @jax.checkpoint
        def block(h):
            return attn(h, h * 0.5, h + 1.0) + h

        return lambda h: jax.lax.scan(lambda c, _: (block(c), None), h, None, length=2)[0]

    def loss(attn, x, t):
        o, to = jax.jvp(model(attn), (x,), (t,))
        return jnp.sum(o**2) + jnp.sum(to**2)

    pallas = lambda a, b, c: attention(a, b, c, jvp=True, **KW)
    xla = lambda a, b, c: attention_xla(a, b, c, scale=0.25)
    g = jax.jit(jax.grad(lambda x, t: loss(pallas, x, t), argnums=(0, 1)))(x, t)
    g_ref = jax.jit(jax.grad(lambda x, t: loss(xla, x, t), argnums=(0, 1)))(x, t)
    for a, b in zip(g, g_ref):
        assert_close("grad", a, b, 2e-5)


def test_matmul_backward_under_vmap_and_batch_sharding():
    """jvp_bwd_impl="matmul" (dS written by the kernel, four cotangents as XLA matmuls) under
    vmap and on a batch-sharded mesh: the same gradients as the two-kernel backward, still
    batch-sharded, and no collective (each device's dS is its own batch's)."""
    _needs_devices(4)
    kw = dict(impl="pallas", interpret=True)
    cfgs = {impl: AttentionConfig(jvp_bwd_impl=impl, jvp_bwd_v=CFG.jvp_bwd_kv, **{
        n: getattr(CFG, n) for n in ("fwd", "jvp_fwd", "jvp_bwd_kv", "jvp_bwd_q")}) for impl in ("kernels", "matmul")}

    def grad_fn(cfg):
        def loss(q, k, v, tq, tk, tv, do, dto):
            o, to = jax.jvp(lambda a, b, c: attention(a, b, c, jvp=True, block_sizes=cfg, **kw), (q, k, v), (tq, tk, tv))
            return jnp.sum(o * do) + jnp.sum(to * dto)
        return jax.grad(loss, argnums=tuple(range(6)))

    args = randn(14, [(4, 21, 2, 16)] * 8, jnp.float32)
    ref = jax.jit(grad_fn(cfgs["kernels"]))(*args)
    for impl, kernel in (("kernels", "tvm_flash_jvp_bwd_q"), ("matmul", "tvm_flash_jvp_bwd_v")):
        assert kernel in str(jax.make_jaxpr(grad_fn(cfgs[impl]))(*args)), impl
    mesh = jax.make_mesh((4,), ("data",))
    with jax.set_mesh(mesh):
        batch = NamedSharding(mesh, P("data"))
        sgrad = jax.jit(grad_fn(cfgs["matmul"]))
        sargs = [jax.device_put(x, batch) for x in args]
        for x, y in zip(sgrad(*sargs), ref):
            assert rel_err(x, np.asarray(y)) <= 1e-5
            assert x.sharding.is_equivalent_to(batch, x.ndim), x.sharding
        hlo = sgrad.lower(*sargs).compile().as_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo and "all-reduce" not in hlo

    stacked = [x.reshape(2, 2, *x.shape[1:]) for x in args]  # a vmapped leading axis of 2
    g = jax.jit(jax.vmap(grad_fn(cfgs["matmul"])))(*stacked)
    for x, y in zip(g, ref):
        assert rel_err(x.reshape(y.shape), np.asarray(y)) <= 1e-5

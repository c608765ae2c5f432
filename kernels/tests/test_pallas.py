"""Pallas kernels (interpret mode on CPU) against float64 references.

Error metric: relative Frobenius error ||out - ref|| / ||ref|| over every element, the
reference being JAX autodiff of the jnp attention in float64 on the same (rounded) inputs.
Tolerances: fp32 inputs 1e-5 for outputs and gradients (observed 2e-7..5e-7: fp32
accumulation, exp2 vs exp); bf16 inputs 1e-2 for outputs and gradients (observed ~2.5e-3,
which is the bf16 rounding of the outputs themselves; P and the dS/dtS tiles are also
rounded to bf16 before the matmuls); fp16 2e-3 (3 more mantissa bits than bf16).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import AttentionConfig, KernelConfig, attention, flash_with_tangent
from kernels import api
from kernels import flash as flash_mod
from kernels.tests.helpers import assert_close, randn, ref_plain, ref_tangent

TOL = {
    jnp.float32: dict(out=1e-5, grad=1e-5),
    jnp.bfloat16: dict(out=1e-2, grad=1e-2),
    jnp.float16: dict(out=2e-3, grad=2e-3),
}


def _mixed_cfg():
    return AttentionConfig(
        fwd=KernelConfig(32, 16),
        bwd_kv=KernelConfig(16, 32),
        bwd_q=KernelConfig(32, 16),
        jvp_fwd=KernelConfig(16, 32),
        jvp_bwd_kv=KernelConfig(16, 32),
        jvp_bwd_q=KernelConfig(32, 16),
        fwd_qkv=KernelConfig(32, 16),
        jvp_bwd_v=KernelConfig(16, 32),
    )


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    dtype: object
    batch: int
    q_len: int
    kv_len: int
    heads: int
    dim: int
    cfg: object  # AttentionConfig or None (defaults, clamped to the sequence)
    scale: float = None

    def __str__(self):
        return (
            f"{jnp.dtype(self.dtype).name}-B{self.batch}-Sq{self.q_len}-Sk{self.kv_len}-"
            f"H{self.heads}-D{self.dim}-{'default' if self.cfg is None else 'custom'}"
        )


CASES = [
    Case(1, jnp.float32, 2, 37, 37, 2, 32, AttentionConfig.uniform(16, 16)),
    Case(2, jnp.bfloat16, 1, 100, 100, 2, 64, _mixed_cfg()),
    Case(3, jnp.float32, 1, 130, 130, 1, 128, AttentionConfig.uniform(32, 32)),
    Case(4, jnp.bfloat16, 2, 64, 64, 1, 128, AttentionConfig.uniform(32, 16)),
    Case(5, jnp.float32, 1, 40, 72, 2, 48, AttentionConfig.uniform(16, 32), scale=0.3),
    Case(6, jnp.float16, 1, 16, 16, 1, 32, None),
    Case(7, jnp.float32, 1, 100, 100, 1, 64, None),
]


def _inputs(case, n_extra=0, salt=0):
    qs = (case.batch, case.q_len, case.heads, case.dim)
    ks = (case.batch, case.kv_len, case.heads, case.dim)
    return randn(1000 * case.seed + salt, [qs, ks, ks, qs, ks, ks, qs, qs][: 3 + n_extra], case.dtype)


def _scale(case):
    return case.dim**-0.5 if case.scale is None else case.scale


@pytest.mark.parametrize("case", CASES, ids=str)
def test_plain_forward_and_grads(case):
    q, k, v, do = (_inputs(case, 5)[i] for i in (0, 1, 2, 6))
    kw = dict(impl="pallas", interpret=True, block_sizes=case.cfg, scale=case.scale)

    @jax.jit
    def run(q, k, v, do):
        o, vjp = jax.vjp(lambda a, b, c: attention(a, b, c, **kw), q, k, v)
        return o, vjp(do)

    o, grads = run(q, k, v, do)
    o_ref, grads_ref = ref_plain(q, k, v, do, _scale(case))
    tol = TOL[case.dtype]
    assert o.dtype == q.dtype and o.shape == q.shape
    assert_close("o", o, o_ref, tol["out"])
    for name, g, gr, x in zip(("dq", "dk", "dv"), grads, grads_ref, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close(name, g, gr, tol["grad"])


def _with_bwd(cfg, impl: str):
    return dataclasses.replace(cfg or AttentionConfig(), jvp_bwd_impl=impl)


# jvp_bwd_impl="matmul" on the cases with ragged lengths, cross-attention, padded head dims and every dtype.
BWD_CASES = [(c, "kernels") for c in CASES] + [(CASES[i], "matmul") for i in (0, 1, 4, 5, 6)]


@pytest.mark.parametrize("case,impl", BWD_CASES, ids=lambda x: str(x))
def test_tangent_forward_and_all_cotangents(case, impl):
    q, k, v, tq, tk, tv, do, dto = _inputs(case, 5, salt=1)
    kw = dict(interpret=True, block_sizes=_with_bwd(case.cfg, impl), scale=case.scale)

    @jax.jit
    def run(q, k, v, tq, tk, tv, do, dto):
        out, vjp = jax.vjp(lambda *a: flash_with_tangent(*a, **kw), q, k, v, tq, tk, tv)
        return out, vjp((do, dto))

    zero = jnp.zeros_like(do)
    cts = [(do, dto), (do, zero), (zero, dto)]
    o_ref, to_ref, grads_ref = ref_tangent(q, k, v, tq, tk, tv, cts, _scale(case))
    tol = TOL[case.dtype]
    names = ("dq", "dk", "dv", "dtq", "dtk", "dtv")
    for (c_o, c_to), g_ref, label in zip(cts, grads_ref, ("both", "do only", "dto only")):
        (o, to), grads = run(q, k, v, tq, tk, tv, c_o, c_to)
        assert o.dtype == q.dtype and to.dtype == q.dtype and to.shape == q.shape
        assert_close("o", o, o_ref, tol["out"])
        assert_close("t_o", to, to_ref, tol["out"])
        for name, g, gr in zip(names, grads, g_ref):
            if label == "do only" and name.startswith("dt"):
                # t_o's cotangent is zero and o does not depend on tangents: exactly zero.
                assert not np.any(np.asarray(g, np.float32)), f"{name} ({label}) must be 0"
                continue
            assert_close(f"{name} ({label})", g, gr, tol["grad"])


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=str)
def test_grad_of_jvp_matches_reference(case):
    """jax.grad of a loss of jax.jvp(attention(jvp=True)) outputs (the TVM loss pattern)."""
    q, k, v, tq, tk, tv, do, dto = _inputs(case, 5, salt=2)
    scale = _scale(case)
    kw = dict(impl="pallas", jvp=True, interpret=True, block_sizes=case.cfg, scale=case.scale)

    def loss(fn, q, k, v, tq, tk, tv):
        o, to = jax.jvp(fn, (q, k, v), (tq, tk, tv))
        f32 = lambda x: x.astype(jnp.float32)
        return jnp.sum(f32(o) * f32(do)) + jnp.sum(f32(to) * f32(dto))

    ours = jax.jit(jax.grad(lambda *a: loss(lambda x, y, z: attention(x, y, z, **kw), *a), argnums=range(6)))(
        q, k, v, tq, tk, tv
    )
    _, _, (ref,) = ref_tangent(q, k, v, tq, tk, tv, [(do, dto)], scale)
    for name, g, gr in zip(("dq", "dk", "dv", "dtq", "dtk", "dtv"), ours, ref):
        assert_close(name, g, gr, TOL[case.dtype]["grad"])

    # The primal call in jvp mode (no tangents) runs the plain forward kernel.
    o = jax.jit(lambda a, b, c: attention(a, b, c, **kw))(q, k, v)
    o_ref, _ = ref_plain(q, k, v, do, scale)
    assert_close("o (jvp=True primal)", o, o_ref, TOL[case.dtype]["out"])


def test_kernels_write_every_output_element():
    """Interpret mode fills pallas outputs with NaN before the kernel runs; every element of
    every kernel output (padded rows included) must come back finite."""
    case = Case(8, jnp.float32, 1, 37, 50, 2, 32, AttentionConfig.uniform(16, 32))
    q, k, v, tq, tk, tv, do, dto = _inputs(case, 5)
    cfg = case.cfg.resolve(32)
    st, q_pad, k_pad, d_pad = api._plan(37, 50, 32, cfg, api._JVP_KERNELS, 0.2, True, jnp.float32)
    pq = lambda x: api._pad(x, q_pad, d_pad)
    pk = lambda x: api._pad(x, k_pad, d_pad)
    q, tq, do, dto = map(pq, (q, tq, do, dto))
    k, v, tk, tv = map(pk, (k, v, tk, tv))
    assert q.shape[1] == 48 and k.shape[1] == 64
    outs = list(flash_mod.fwd_call(q, k, v, st))
    o, to, lse, mu = flash_mod.jvp_fwd_call(q, k, v, tq, tk, tv, st)
    outs += [o, to, lse, mu]
    outs += list(flash_mod.bwd_call(q, k, v, outs[0], outs[1], do, st))
    outs += list(flash_mod.jvp_bwd_call(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, st))
    # jvp_bwd_impl="matmul": four cotangents are matmuls of the dS and dtS that jvp_bwd_v writes,
    # so every element of those must be written too.
    st_mm = dataclasses.replace(st, cfg=dataclasses.replace(st.cfg, jvp_bwd_impl="matmul"))
    outs += list(flash_mod.jvp_bwd_call(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, st_mm))
    for i, x in enumerate(outs):
        assert np.all(np.isfinite(np.asarray(x))), f"output {i} has unwritten (NaN) elements"


@pytest.mark.parametrize("impl", ["kernels", "matmul"])
def test_tangent_backward_with_overflowing_padded_keys(impl):
    """Real logits near -300 (base 2) put the row log-sum-exp there, so a zero-padded key's
    probability 2**(0 - lse) overflows to inf in the kv kernel, which does not mask keys.
    With jvp_bwd_impl="matmul" those keys' dS rows feed dq: they must be written as zeros."""
    b, sq, sk, h, d = 1, 24, 40, 1, 32  # 40 keys pad to 48 with 16-key blocks
    u = jnp.ones((d,), jnp.float32) / np.sqrt(d)
    rows = lambda n, c, key: (c * u + 0.01 * jax.random.normal(key, (n, d)))[None, :, None, :]
    keys = jax.random.split(jax.random.PRNGKey(3), 8)
    # q.k ~ -300, times 0.5 * log2(e): base-2 logits near -216, below exp2's float32 range of -128.
    # The size sits in q, so k's rows (what dq sums) stay small and the sums do not cancel badly.
    q, k = rows(sq, 150.0, keys[0]), rows(sk, -2.0, keys[1])
    v, tq, tk, tv = (0.1 * jax.random.normal(kk, x.shape) for kk, x in zip(keys[2:], (k, q, k, k)))
    do, dto = (jax.random.normal(kk, q.shape) for kk in keys[6:])
    cfg = dataclasses.replace(AttentionConfig.uniform(16, 16), jvp_bwd_impl=impl)
    out, vjp = jax.vjp(lambda *a: flash_with_tangent(*a, interpret=True, block_sizes=cfg, scale=0.5),
                       q, k, v, tq, tk, tv)
    grads = vjp((do, dto))
    _, _, (ref,) = ref_tangent(q, k, v, tq, tk, tv, [(do, dto)], 0.5)
    for name, g, gr in zip(("dq", "dk", "dv", "dtq", "dtk", "dtv"), grads, ref):
        assert np.all(np.isfinite(np.asarray(g))), f"{name} is not finite"
        assert_close(name, g, gr, 1e-4)


def test_padding_is_skipped_when_aligned():
    cfg = AttentionConfig.uniform(16, 16).resolve(32)
    st, q_pad, k_pad, d_pad = api._plan(64, 32, 32, cfg, api._PLAIN_KERNELS, 1.0, True, jnp.bfloat16)
    assert (q_pad, k_pad, d_pad) == (64, 32, 32)
    x = jnp.zeros((1, 64, 1, 32))
    assert api._pad(x, 64, 32) is x and api._unpad(x, 64, 32) is x
    # Defaults are clamped to the sequence so short sequences are not padded to 128.
    st, q_pad, k_pad, _ = api._plan(20, 20, 64, AttentionConfig().resolve(64), api._JVP_KERNELS, 1.0, True, jnp.float32)
    assert (q_pad, k_pad) == (32, 32)
    assert st.precision == jax.lax.Precision.HIGHEST

"""float64 checks of the math the kernels implement (no Pallas): the XLA reference's
derivatives, and a numpy model of the blocked (online-softmax) forward+tangent and of the
tangent backward formulas, against JAX autodiff of the jnp reference."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from kernels.reference import attention_xla
from kernels.tests.helpers import x64


def _np_blocked_forward(q, k, v, tq, tk, tv, c, block_k):
    """Online-softmax forward + tangent exactly as the jvp_fwd kernel (one head, float64)."""
    sq, d = q.shape
    m = np.full(sq, -np.inf)
    l = np.zeros(sq)
    acc_o = np.zeros((sq, d))
    acc_t = np.zeros((sq, d))
    acc_mu = np.zeros(sq)
    log2e = np.log2(np.e)
    for j0 in range(0, k.shape[0], block_k):
        kb, vb, tkb, tvb = (x[j0 : j0 + block_k] for x in (k, v, tk, tv))
        s2 = (q @ kb.T) * c * log2e
        ts = (tq @ kb.T + q @ tkb.T) * c
        m_new = np.maximum(m, s2.max(1))
        alpha = np.exp2(m - m_new)
        p = np.exp2(s2 - m_new[:, None])
        l = l * alpha + p.sum(1)
        acc_mu = acc_mu * alpha + (p * ts).sum(1)
        acc_o = acc_o * alpha[:, None] + p @ vb
        acc_t = acc_t * alpha[:, None] + (p * ts) @ vb + p @ tvb
        m = m_new
    o = acc_o / l[:, None]
    mu = acc_mu / l
    return o, acc_t / l[:, None] - mu[:, None] * o, m + np.log2(l), mu


def _np_tangent_backward(q, k, v, tq, tk, tv, o, to, lse2, mu, do, dto, c):
    """The tangent backward formulas of kernels.flash (one head, float64)."""
    p = np.exp2((q @ k.T) * c * np.log2(np.e) - lse2[:, None])
    ts = (tq @ k.T + q @ tk.T) * c
    nu = (dto * o).sum(1)[:, None]
    delta = ((do * o).sum(1) + (dto * to).sum(1))[:, None] - nu * mu[:, None]
    dtp = dto @ v.T
    dp = do @ v.T + dto @ tv.T + dtp * (ts - mu[:, None]) - nu * ts
    tp = p * (ts - mu[:, None])
    ds = p * (dp - delta)
    dts = p * (dtp - nu)
    return (
        c * (ds @ k + dts @ tk),
        c * (ds.T @ q + dts.T @ tq),
        p.T @ do + tp.T @ dto,
        c * dts @ k,
        c * dts.T @ q,
        p.T @ dto,
    )


def test_blocked_tangent_math_matches_autodiff_float64():
    rng = np.random.default_rng(101)
    sq, sk, d, c = 11, 23, 7, 0.41
    q, tq, do, dto = (rng.standard_normal((sq, d)) for _ in range(4))
    k, v, tk, tv = (rng.standard_normal((sk, d)) * 1.5 for _ in range(4))
    with x64():

        def f(q, k, v, tq, tk, tv):
            fn = lambda a, b, cc: attention_xla(a[None, :, None], b[None, :, None], cc[None, :, None], scale=c)[0, :, 0]
            return jax.jvp(fn, (q, k, v), (tq, tk, tv))

        args = [jnp.asarray(x) for x in (q, k, v, tq, tk, tv)]
        (o_ref, to_ref), vjp = jax.vjp(f, *args)
        for block_k in (4, 8, 32):
            o, to, lse2, mu = _np_blocked_forward(q, k, v, tq, tk, tv, c, block_k)
            np.testing.assert_allclose(o, o_ref, rtol=0, atol=1e-12)
            np.testing.assert_allclose(to, to_ref, rtol=0, atol=1e-12)
        for cts in ((do, dto), (do, 0 * dto), (0 * do, dto)):
            ref = vjp(tuple(jnp.asarray(x) for x in cts))
            ours = _np_tangent_backward(q, k, v, tq, tk, tv, o, to, lse2, mu, *cts, c)
            for name, a, b in zip(("dq", "dk", "dv", "dtq", "dtk", "dtv"), ours, ref):
                np.testing.assert_allclose(a, np.asarray(b), rtol=0, atol=1e-11, err_msg=name)


def test_xla_reference_check_grads_float64():
    rng = np.random.default_rng(102)
    with x64():
        q, k, v = (jnp.asarray(rng.standard_normal((1, 5, 2, 4))) for _ in range(3))
        f = lambda q, k, v: attention_xla(q, k, v, scale=0.5)
        check_grads(f, (q, k, v), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)
        # grad of jvp (the TVM loss pattern) is itself differentiable correctly
        tq, tk, tv = (jnp.asarray(rng.standard_normal((1, 5, 2, 4))) for _ in range(3))
        g = lambda q, k, v: jax.jvp(f, (q, k, v), (tq, tk, tv))[1]
        check_grads(g, (q, k, v), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)

"""The qkv prologue of a JVP attention call (bias, q/k RMS norms, split) with a Pallas backward.

In the training step the student's JVP call runs the prologue and its tangent with XLA before the
fused forward+tangent attention kernel. The backward of that pair, XLA's transpose of the JVP of
the norms, was one fusion per layer that moved about 520 MB at 1.8 TB/s on an H200 (0.28 ms per
layer, 7.6 ms of the 256px step; bench/NOTES.md item 25), where the memory rate is about 4.

:func:`split_qkv_tangent` keeps the forward (XLA's ``jax.jvp`` of
:func:`kernels.flash.split_qkv`: the same numbers as before) and gives its reverse mode one
Pallas pass: each program reads one block of rows of one head of one of q, k, v, together with
its tangent and the cotangents of both, and writes the cotangents of qkv and of its tangent
straight into the (B, S, 3, H, D) layout the qkv projection's transpose reads, plus per-program
partial sums of the bias and norm-weight gradients (summed by XLA: a few hundred KB).

The math, per row ``x`` (bias added, float32), weight ``w``, tangent ``tx``, ``D`` the head dim:
``r = rsqrt(sum(x^2)/D + eps)``, ``m = sum(x tx)/D``; forward ``y = w x r``, tangent
``ty = w (tx r - x r^3 m)``. With ``g``, ``h`` the cotangents of ``y``, ``ty`` and
``A = sum(w g x)/D``, ``B = sum(w h tx)/D``, ``C = sum(w h x)/D``:

* ``dx = r w g - r^3 x A - r^3 x B - r^3 m w h + 3 r^5 m x C - r^3 tx C``
* ``dtx = r w h - r^3 x C``
* ``dw = sum over rows of (g x r + h (tx r - x r^3 m))``, ``dbias = sum over rows of dx``

(v and its tangent pass through: ``dv``, ``dtv`` unchanged, ``dbias_v = sum dv``.)

The kernel runs where it applies: the norms on, the parameters without tangents (as in TVM's
step, where the JVP is along the step size only), the sequence a multiple of 16 and the head
dim a power of two. Every other case (a JVP that also moves the bias or a norm weight, other
lengths or head dims) differentiates the XLA form, so the function is the same everywhere. As for
the attention kernel it feeds (:func:`kernels.flash.flash_jvp_mode`), reverse mode needs an
enclosing ``jax.jvp``: JAX cannot transpose the ``custom_vjp`` inside the JVP rule, so plain
reverse mode goes through ``jvp=False``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.sharding import batch_sharded
from kernels.flash import SQUEEZED, QKVPrologue, split_qkv

_F32 = jnp.float32
# Rows per program (fewer when the sequence has fewer factors of two) and warps.
ROWS, WARPS = 64, 4


def _xla_pair(qkv, tqkv, bias, wq, wk, pro: QKVPrologue):
    """((q, k, v), (tq, tk, tv)): XLA's JVP of the prologue along qkv only."""
    return jax.jvp(lambda a: split_qkv(a, bias, wq, wk, pro), (qkv,), (tqkv,))


def _norm_bwd(x, tx, w, g, h, eps: float, dim: int):
    """(dx, dtx, dw rows) of ``(y, ty)`` for one block of rows (float32, see the docstring)."""
    inv = 1.0 / dim
    r = jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) * inv + eps)
    r3 = r * r * r
    m = jnp.sum(x * tx, axis=-1, keepdims=True) * inv
    gw, hw = g * w, h * w
    a = jnp.sum(gw * x, axis=-1, keepdims=True) * inv
    b = jnp.sum(hw * tx, axis=-1, keepdims=True) * inv
    c = jnp.sum(hw * x, axis=-1, keepdims=True) * inv
    dx = r * gw - r3 * (a + b - 3.0 * r * r * m * c) * x - r3 * m * hw - r3 * c * tx
    dtx = r * hw - r3 * c * x
    dw = g * x * r + h * (tx * r - x * (r3 * m))
    return dx, dtx, dw


def _kernel(x_ref, tx_ref, b_ref, wq_ref, wk_ref, dq_ref, dk_ref, dv_ref, dtq_ref, dtk_ref, dtv_ref,
            dx_ref, dtx_ref, dw_ref, db_ref, *, heads: int, pro: QKVPrologue):
    slot = pl.program_id(2) // heads

    @pl.when(slot == 2)
    def _v():
        dv = dv_ref[...]
        dx_ref[...] = dv
        dtx_ref[...] = dtv_ref[...]
        db_ref[...] = jnp.sum(dv.astype(_F32), axis=0)
        dw_ref[...] = jnp.zeros(dw_ref.shape, _F32)

    for j, w_ref, g_ref, h_ref in ((0, wq_ref, dq_ref, dtq_ref), (1, wk_ref, dk_ref, dtk_ref)):
        @pl.when(slot == j)
        def _qk(w_ref=w_ref, g_ref=g_ref, h_ref=h_ref):
            x = x_ref[...]
            if pro.bias:  # x + b rounded to x's dtype once, as the forward adds it
                x = (x.astype(_F32) + b_ref[...].astype(_F32)[None, :]).astype(x_ref.dtype)
            dx, dtx, dw = _norm_bwd(x.astype(_F32), tx_ref[...].astype(_F32), w_ref[...].astype(_F32)[None, :],
                                    g_ref[...].astype(_F32), h_ref[...].astype(_F32), pro.eps, pro.head_dim)
            dx_ref[...] = dx.astype(dx_ref.dtype)
            dtx_ref[...] = dtx.astype(dtx_ref.dtype)
            db_ref[...] = jnp.sum(dx, axis=0)
            dw_ref[...] = jnp.sum(dw, axis=0)


def _bwd_call(qkv, tqkv, bias, wq, wk, cts, pro: QKVPrologue, interpret: bool):
    """(dqkv, dtqkv, dbias (3, H, D) f32, dwq, dwk (D,) f32) from the six cotangents."""
    b, s, _, h, d = qkv.shape
    rows = math.gcd(s, ROWS)
    grid = (s // rows, b, 3 * h)
    slot_rows = pl.BlockSpec((SQUEEZED, rows, SQUEEZED, SQUEEZED, d), lambda i, n, jh: (n, i, jh // h, jh % h, 0))
    head_rows = pl.BlockSpec((SQUEEZED, rows, SQUEEZED, d), lambda i, n, jh: (n, i, jh % h, 0))
    partial = pl.BlockSpec((SQUEEZED, SQUEEZED, SQUEEZED, d), lambda i, n, jh: (n, i, jh, 0))
    bias_row = pl.BlockSpec((SQUEEZED, SQUEEZED, d), lambda i, n, jh: (jh // h, jh % h, 0))
    weight = pl.BlockSpec((d,), lambda i, n, jh: (0,))
    partial_shape = jax.ShapeDtypeStruct((b, s // rows, 3 * h, d), _F32)
    dqkv, dtqkv, dw, db = pl.pallas_call(
        functools.partial(_kernel, heads=h, pro=pro),
        grid=grid,
        in_specs=[slot_rows, slot_rows, bias_row, weight, weight] + [head_rows] * 6,
        out_specs=[slot_rows, slot_rows, partial, partial],
        out_shape=[jax.ShapeDtypeStruct(qkv.shape, qkv.dtype), jax.ShapeDtypeStruct(tqkv.shape, tqkv.dtype),
                   partial_shape, partial_shape],
        compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=1),
        interpret=interpret,
        name="tvm_qkv_tangent_bwd",
    )(qkv, tqkv, bias, wq, wk, *cts)
    return dqkv, dtqkv, dw, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _pair(qkv, tqkv, bias, wq, wk, pro: QKVPrologue, interpret: bool):
    return _xla_pair(qkv, tqkv, bias, wq, wk, pro)


def _pair_fwd(qkv, tqkv, bias, wq, wk, pro, interpret):
    return _xla_pair(qkv, tqkv, bias, wq, wk, pro), (qkv, tqkv, bias, wq, wk)


def _pair_bwd(pro, interpret, res, cts):
    qkv, tqkv, bias, wq, wk = res
    (dq, dk, dv), (dtq, dtk, dtv) = cts
    dtype = qkv.dtype
    cts = tuple(c.astype(dtype) for c in (dq, dk, dv, dtq, dtk, dtv))
    h = qkv.shape[3]

    def run(qkv, tqkv, dq, dk, dv, dtq, dtk, dtv, bias, wq, wk):
        return _bwd_call(qkv, tqkv, bias, wq, wk, (dq, dk, dv, dtq, dtk, dtv), pro, interpret)

    dqkv, dtqkv, dw, db = batch_sharded(run, (qkv, tqkv) + cts, 4,
                                        replicated=(bias.astype(dtype), wq.astype(_F32), wk.astype(_F32)))
    dw = jnp.sum(dw, axis=(0, 1)).reshape(3, h, -1)
    db = jnp.sum(db, axis=(0, 1)).reshape(3, h, -1)
    dwq, dwk = jnp.sum(dw[0], axis=0), jnp.sum(dw[1], axis=0)
    return dqkv, dtqkv, db.astype(bias.dtype), dwq.astype(wq.dtype), dwk.astype(wk.dtype)


_pair.defvjp(_pair_fwd, _pair_bwd)


def kernel_applies(qkv, pro: QKVPrologue) -> bool:
    """Whether the Pallas backward can take this prologue (else its XLA form is differentiated)."""
    _, s, _, _, d = qkv.shape
    return pro.norm and s % 16 == 0 and d >= 16 and d & (d - 1) == 0 and d == pro.head_dim


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def split_qkv_tangent(qkv, bias, wq, wk, pro: QKVPrologue, interpret: bool):
    """(q, k, v) of a (B, S, 3, H, D) qkv array with the prologue applied (bias (3, H, D), norm
    weights (D,)): :func:`kernels.flash.split_qkv`, whose JVP along qkv alone is reverse-
    differentiated by one Pallas pass (see the module docstring)."""
    return split_qkv(qkv, bias, wq, wk, pro)


def _split_qkv_tangent_jvp(pro, interpret, primals, tangents):
    qkv, bias, wq, wk = primals
    tqkv, tbias, twq, twk = tangents
    params_still = all(isinstance(t, SymbolicZero) for t in (tbias, twq, twk))
    if params_still and not isinstance(tqkv, SymbolicZero) and kernel_applies(qkv, pro):
        return _pair(qkv, tqkv, bias, wq, wk, pro, interpret)
    dense = tuple(jnp.zeros_like(p) if isinstance(t, SymbolicZero) else t for p, t in zip(primals, tangents))
    return jax.jvp(lambda *a: split_qkv(*a, pro), primals, dense)


split_qkv_tangent.defjvp(_split_qkv_tangent_jvp, symbolic_zeros=True)

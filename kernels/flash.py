"""Pallas (Triton) flash-attention kernels: plain and fused forward+tangent, with backwards.

Everything here works on *padded* arrays in BSHD layout ``(batch, seq, heads, dim)``:
the sequence lengths are multiples of every block size used, the head dim is a power of
two >= 16, and the true (unpadded) lengths are carried statically in :class:`Static`.
Padding and validation live in :mod:`kernels.attention`; padded key rows are masked to
``-inf`` in the kernels that sum over keys; padded query rows need no mask in the
kernels that sum over queries because their q, tq and cotangent rows are zero.

Math (per batch and head; ``c`` = softmax scale; all statistics fp32, per query row):

* ``S = c q k^T``, ``P = softmax(S)``, ``o = P v``. The kernels work in base 2:
  ``s2 = S log2(e)``, ``P = exp2(s2 - lse2)``, with ``lse2 = m2 + log2(l)`` saved.
* Tangent: ``tS = c (tq k^T + q tk^T)``, ``mu = rowsum(P * tS)``,
  ``tP = P * (tS - mu)``, ``t_o = tP v + P tv``. Online form: running max ``m``,
  ``l = sum exp(S - m)``, ``acc_o = sum p v``, ``acc_t = sum (p*tS) v + p tv``,
  ``acc_mu = sum p*tS``, all rescaled by ``exp(m_old - m_new)``; at the end
  ``o = acc_o/l``, ``mu = acc_mu/l``, ``t_o = acc_t/l - mu o``.
* Backward of (o, t_o) with cotangents (do, dto): ``nu = dto.o``,
  ``delta = do.o + dto.t_o - nu mu``, ``dtP = dto v^T``,
  ``dP = do v^T + dto tv^T + dtP (tS - mu) - nu tS``, ``dS = P (dP - delta)``,
  ``dtS = P (dtP - nu)``; ``dv = P^T do + tP^T dto``, ``dtv = P^T dto``,
  ``dq = c (dS k + dtS tk)``, ``dtq = c dtS k``, ``dk = c (dS^T q + dtS^T tq)``,
  ``dtk = c dtS^T q``. The plain backward is the special case ``dto = 0``.
* How that backward runs (``AttentionConfig.jvp_bwd_impl``): ``"kernels"``, two kernels over
  key blocks (dk, dv, dtk, dtv) and query blocks (dq, dtq), each recomputing P, tS and dP; or
  ``"matmul"``, one kernel over key blocks (dv, dtv) that also writes dS and dtS, and the four
  cotangents above that only need them as XLA matmuls (:func:`_qk_grads_from_ds`).

Matmul operands are in the input dtype, accumulation in fp32 (``preferred_element_type``);
fp32 inputs use IEEE fp32 matmuls (``Precision.HIGHEST``, no TF32).

Self-attention of a fused (batch, seq, 3, heads, dim) qkv projection (:func:`flash_qkv`, behind
``kernels.attention_qkv``): the forward kernel reads q, k, v in place through 5-D block specs
and applies the :class:`QKVPrologue` (the projection's bias, the q/k RMS norms) to every tile it
loads, so q, k, v are never written out (key and value tiles are prepared once per block of
query rows; ``AttentionConfig.fwd_qkv`` has its own tiles). The backward recomputes the
prologue with XLA and zeroes the padded rows' cotangents (the bias reaches them). The split
kernel (:func:`split_qkv_call`: the prologue as a memory pass that writes q, k, v) is what the
fused forward replaced; ``bench/qkv_prologue.py`` times the two against each other.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.config import AttentionConfig, KernelConfig, jvp_bwd_impl_choice
from kernels.reference import qk_rms_norm

_LOG2E = math.log2(math.e)
# Name of the values the kernels' backward needs from their forward (outputs and row
# statistics). A rematerialisation policy that saves this name (jax.checkpoint_policies.
# save_only_these_names) keeps them instead of re-running the forward kernel in the backward.
RESIDUALS_NAME = "tvm_attention_residuals"
_F32 = jnp.float32
# Squeezed block dimension (``None`` is the long-standing spelling; newer jax has pl.squeezed).
SQUEEZED = getattr(pl, "squeezed", None)


@dataclasses.dataclass(frozen=True)
class Static:
    """Static parameters of one attention call (hashable; a nondiff arg of the custom rules)."""

    scale: float
    q_len: int  # true query length (<= padded length)
    kv_len: int  # true key length
    cfg: AttentionConfig  # resolved and clamped: every field set
    interpret: bool
    precision: Any = None  # lax.Precision.HIGHEST for fp32 inputs, else None

    @property
    def qk_scale2(self) -> float:
        return self.scale * _LOG2E


# ----------------------------------------------------------------------------- helpers


def _mm(a, b, st: Static):
    """a @ b with fp32 accumulation. a: (m, k), b: (k, n)."""
    return lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), precision=st.precision, preferred_element_type=_F32
    )


def _mm_nt(a, b, st: Static):
    """a @ b.T with fp32 accumulation. a: (m, k), b: (n, k)."""
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=st.precision, preferred_element_type=_F32
    )


def _start(idx, block: int):
    start = idx * block
    if isinstance(start, int):
        return start
    return pl.multiple_of(start, block)


def _mask_keys(s, start, kv_len: int, block_k: int):
    """Sets the logits of padded keys (column index >= kv_len) to -inf. s: (bq, bk)."""
    cols = start + jnp.arange(block_k, dtype=jnp.int32)
    return jnp.where((cols < kv_len)[None, :], s, -jnp.inf)


def _key_block_logits(q, k, start, masked: bool, st):
    """Base-2 logits ``q k^T * scale * log2(e)`` of one key block (k: (bk, d)); with ``masked``,
    the padded keys of a ragged last block get -inf."""
    s = _mm_nt(q, k, st) * st.qk_scale2
    return _mask_keys(s, start, st.kv_len, k.shape[0]) if masked else s


def _loop_over_keys(body, init, kv_len: int, block_k: int):
    """Runs ``body(j, carry, masked)`` over all key blocks holding real keys.

    Full blocks run unmasked in a loop; a ragged last block is peeled and masked.
    """
    n_full = kv_len // block_k
    carry = init
    if n_full > 0:
        carry = lax.fori_loop(0, n_full, lambda j, c: body(j, c, False), carry)
    if kv_len % block_k:
        carry = body(n_full, carry, True)
    return carry


def _params(kc: KernelConfig):
    return plgpu.CompilerParams(num_warps=kc.num_warps, num_stages=kc.num_stages)


def _rows_spec(block: int, dim: int):
    """(batch, seq, heads, dim) array, one block of `block` rows at grid index i."""
    return pl.BlockSpec((SQUEEZED, block, SQUEEZED, dim), lambda i, b, h: (b, i, h, 0))


def _all_rows_spec(seq: int, dim: int):
    return pl.BlockSpec((SQUEEZED, seq, SQUEEZED, dim), lambda i, b, h: (b, 0, h, 0))


def _stat_rows_spec(block: int):
    """(batch, heads, seq) fp32 row statistics, one block at grid index i."""
    return pl.BlockSpec((SQUEEZED, SQUEEZED, block), lambda i, b, h: (b, h, i))


def _all_stat_spec(seq: int):
    return pl.BlockSpec((SQUEEZED, SQUEEZED, seq), lambda i, b, h: (b, h, 0))


def _like(x, fn=None):
    """ShapeDtypeStruct of ``fn(x)`` (default: of x) carrying x's manual-axes (vma) typing.

    Inside a user's ``shard_map`` with ``check_vma=True`` pallas_call needs out_shape types
    that say how outputs vary across mesh axes; ``jax.eval_shape`` derives them from x
    without computing anything.
    """
    return jax.eval_shape(fn or (lambda a: a), x)


def _stat_shape(x):
    """(B, H, S) fp32 row statistics of a (B, S, H, D) array."""
    return _like(x, lambda a: jnp.swapaxes(a[..., 0], 1, 2).astype(_F32))


def _row_dot(a, b):
    """sum_d a*b in fp32, (B, S, H, D) x2 -> (B, H, S). Elementwise + reduce (no TF32 matmul)."""
    r = jnp.sum(a.astype(_F32) * b.astype(_F32), axis=-1)
    return jnp.transpose(r, (0, 2, 1))


# ----------------------------------------------------------------------------- plain forward


def _fwd_tiles(q, key_tile, value_tile, o_ref, lse_ref, *, st: Static, kc: KernelConfig):
    """The plain forward of one block of query rows ``q`` (already loaded): ``key_tile(ks)`` and
    ``value_tile(ks)`` give the key and value rows ``ks`` as the kernel should use them."""
    bq, bk = kc.block_q, kc.block_k
    dt = q.dtype
    dim = q.shape[-1]

    def body(j, carry, masked):
        acc, m, l = carry
        start = _start(j, bk)
        ks = pl.ds(start, bk)
        k = key_tile(ks)
        v = value_tile(ks)
        s = _key_block_logits(q, k, start, masked, st)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _mm(p.astype(dt), v, st)
        return acc, m_new, l

    init = (
        jnp.zeros((bq, dim), _F32),
        jnp.full((bq,), -jnp.inf, _F32),
        jnp.zeros((bq,), _F32),
    )
    acc, m, l = _loop_over_keys(body, init, st.kv_len, bk)
    inv_l = 1.0 / l
    o_ref[...] = (acc * inv_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, st: Static, kc: KernelConfig):
    _fwd_tiles(q_ref[...], lambda ks: k_ref[ks, :], lambda ks: v_ref[ks, :], o_ref, lse_ref, st=st, kc=kc)


def fwd_call(q, k, v, st: Static):
    """Plain forward. Returns (o, lse2) with lse2 (B, H, Sq_pad) fp32 in base 2."""
    kc = st.cfg.fwd
    b, sq, h, d = q.shape
    sk = k.shape[1]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, kc=kc),
        grid=(sq // kc.block_q, b, h),
        in_specs=[_rows_spec(kc.block_q, d), _all_rows_spec(sk, d), _all_rows_spec(sk, d)],
        out_specs=[_rows_spec(kc.block_q, d), _stat_rows_spec(kc.block_q)],
        out_shape=[_like(q), _stat_shape(q)],
        compiler_params=_params(kc),
        interpret=st.interpret,
        name="tvm_flash_fwd",
    )(q, k, v)


@dataclasses.dataclass(frozen=True)
class QKVPrologue:
    """What happens to a qkv projection's output before attention (hashable: a nondiff arg):
    ``bias``: a (3, H, D) bias is added (in qkv's dtype, as a Linear layer adds it);
    ``norm``: q and k get the model's learnable RMS norm over the head dim
    (:func:`kernels.reference.qk_rms_norm`, weights (D,), ``eps``)."""

    bias: bool
    norm: bool
    eps: float = 1e-6
    head_dim: int = 0  # true head dim: the mean square's divisor (padded columns are zero)

    @property
    def identity(self) -> bool:
        return not (self.bias or self.norm)


def _qkv_slot_spec(slot: int, block: int, dim: int):
    """Rows of one of q/k/v (slot 0/1/2) of a (batch, seq, 3, heads, dim) qkv array, one block
    of ``block`` rows at grid index i."""
    return pl.BlockSpec((SQUEEZED, block, SQUEEZED, SQUEEZED, dim), lambda i, b, h: (b, i, slot, h, 0))


def _qkv_slot_all_spec(slot: int, seq: int, dim: int):
    return pl.BlockSpec((SQUEEZED, seq, SQUEEZED, SQUEEZED, dim), lambda i, b, h: (b, 0, slot, h, 0))


def _bias_spec(slot: int, dim: int):
    """One head's row of slot 0/1/2 of a (3, heads, dim) bias."""
    return pl.BlockSpec((SQUEEZED, SQUEEZED, dim), lambda i, b, h: (slot, h, 0))


def _add_bias(x, b):
    """x + b rounded to x's dtype once (what XLA computes for a bf16 Linear's bias add)."""
    return (x.astype(_F32) + b.astype(_F32)[None, :]).astype(x.dtype)


def _prologue_tile(x, b, w, pro: "QKVPrologue", *, norm: bool):
    """A tile of q, k or v rows after the :class:`QKVPrologue`: the bias ``b`` added (when
    ``pro.bias``), then, for q and k (``norm``), the RMS norm with weights ``w`` (when
    ``pro.norm``). The one definition for the split kernel and the fused forward."""
    if pro.bias:
        x = _add_bias(x, b)
    if norm and pro.norm:
        x = qk_rms_norm(x, w, eps=pro.eps, dim=pro.head_dim)
    return x


def _split_qkv_kernel(q_ref, k_ref, v_ref, bq_ref, bk_ref, bv_ref, wq_ref, wk_ref, qo_ref, ko_ref, vo_ref, *, pro):
    qo_ref[...] = _prologue_tile(q_ref[...], bq_ref[...], wq_ref[...], pro, norm=True)
    ko_ref[...] = _prologue_tile(k_ref[...], bk_ref[...], wk_ref[...], pro, norm=True)
    vo_ref[...] = _prologue_tile(v_ref[...], bv_ref[...], None, pro, norm=False)


_SPLIT_ROWS = 128  # rows per program of the split kernel (fewer when the sequence is shorter)
_SPLIT_WARPS = 4


def split_qkv_call(qkv, bias, wq, wk, pro: QKVPrologue, interpret: bool):
    """(q, k, v), each (B, S, H, D), of a (B, S, 3, H, D) qkv array with the prologue applied
    (bias (3, H, D) added; q, k RMS-normalised with the weights wq, wk (D,)), in one memory
    pass: each program reads a block of rows of one head straight from qkv. (XLA's fusion of
    the same norm tiles one head of a few hundred tokens at a time and ran at a third of the
    memory rate, and the bias add and the v slice were passes of their own.) The model's path
    no longer runs it: the forward kernel applies the prologue itself (:func:`fwd_qkv_call`);
    ``bench/qkv_prologue.py`` measures that against this kernel followed by the plain forward."""
    b, s, _, h, d = qkv.shape
    rows = math.gcd(s, _SPLIT_ROWS)  # s is a multiple of a power of two >= 16
    out = pl.BlockSpec((SQUEEZED, rows, SQUEEZED, d), lambda i, b, h: (b, i, h, 0))
    bias_spec = [_bias_spec(j, d) for j in range(3)]
    weight = pl.BlockSpec((d,), lambda i, b, h: (0,))
    o_shape = _like(qkv, lambda a: a[:, :, 0])
    return pl.pallas_call(
        functools.partial(_split_qkv_kernel, pro=pro),
        grid=(s // rows, b, h),
        in_specs=[_qkv_slot_spec(j, rows, d) for j in range(3)] + bias_spec + [weight, weight],
        out_specs=[out, out, out],
        out_shape=[o_shape] * 3,
        compiler_params=plgpu.CompilerParams(num_warps=_SPLIT_WARPS, num_stages=1),
        interpret=interpret,
        name="tvm_split_qkv",
    )(qkv, qkv, qkv, bias, bias, bias, wq, wk)


def _fwd_prologue_kernel(q_ref, k_ref, v_ref, bq_ref, bk_ref, bv_ref, wq_ref, wk_ref, o_ref, lse_ref, *,
                         st: Static, kc: KernelConfig, pro: QKVPrologue):
    bk, bv, wk = bk_ref[...], bv_ref[...], wk_ref[...]
    q = _prologue_tile(q_ref[...], bq_ref[...], wq_ref[...], pro, norm=True)
    _fwd_tiles(q, lambda ks: _prologue_tile(k_ref[ks, :], bk, wk, pro, norm=True),
               lambda ks: _prologue_tile(v_ref[ks, :], bv, None, pro, norm=False), o_ref, lse_ref, st=st, kc=kc)


def fwd_qkv_call(qkv, st: Static, bias=None, wq=None, wk=None, pro: QKVPrologue | None = None):
    """Plain forward reading q, k and v in place from a (B, S, 3, H, D) qkv array (no slicing
    copies). With a :class:`QKVPrologue` that is not the identity, the kernel applies it to each
    tile it loads (bias (3, H, D); norm weights wq, wk (D,)): the key and value tiles once per
    block of query rows, so ``st.cfg.fwd_qkv``'s ``block_q`` sets how often. Returns
    (o (B, S, H, D), lse2 (B, H, S) fp32)."""
    kc = st.cfg.fwd_qkv
    b, s, _, h, d = qkv.shape
    o_shape = _like(qkv, lambda a: a[:, :, 0])
    specs = [_qkv_slot_spec(0, kc.block_q, d), _qkv_slot_all_spec(1, s, d), _qkv_slot_all_spec(2, s, d)]
    operands = (qkv, qkv, qkv)
    kernel = functools.partial(_fwd_kernel, st=st, kc=kc)
    if pro is not None and not pro.identity:
        weight = pl.BlockSpec((d,), lambda i, b, h: (0,))
        specs += [_bias_spec(j, d) for j in range(3)] + [weight, weight]
        operands += (bias, bias, bias, wq, wk)
        kernel = functools.partial(_fwd_prologue_kernel, st=st, kc=kc, pro=pro)
    return pl.pallas_call(
        kernel,
        grid=(s // kc.block_q, b, h),
        in_specs=specs,
        out_specs=[_rows_spec(kc.block_q, d), _stat_rows_spec(kc.block_q)],
        out_shape=[o_shape, _stat_shape(o_shape)],
        compiler_params=_params(kc),
        interpret=st.interpret,
        name="tvm_flash_fwd_qkv",
    )(*operands)


# ----------------------------------------------------------------------------- plain backward


def _bwd_kv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, st, kc):
    bq, bk = kc.block_q, kc.block_k
    k = k_ref[...]
    v = v_ref[...]
    dt = k.dtype
    dim = k.shape[-1]

    def body(i, carry):
        dk, dv = carry
        qs = pl.ds(_start(i, bq), bq)
        q = q_ref[qs, :]
        do = do_ref[qs, :]
        lse = lse_ref[qs]
        delta = delta_ref[qs]
        # Transposed tiles (keys x queries) so the resident-key accumulators need no transposes.
        p_t = jnp.exp2(_mm_nt(k, q, st) * st.qk_scale2 - lse[None, :])
        dv = dv + _mm(p_t.astype(dt), do, st)
        dp_t = _mm_nt(v, do, st)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dk + _mm(ds_t.astype(dt), q, st)
        return dk, dv

    zeros = jnp.zeros((bk, dim), _F32)
    n_q = pl.cdiv(st.q_len, bq)  # query blocks past q_len are all padding: skipped
    dk, dv = lax.fori_loop(0, n_q, body, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_q_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, st, kc):
    bk = kc.block_k
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    dt = q.dtype

    def body(j, dq, masked):
        start = _start(j, bk)
        ks = pl.ds(start, bk)
        k = k_ref[ks, :]
        v = v_ref[ks, :]
        s = _key_block_logits(q, k, start, masked, st)
        p = jnp.exp2(s - lse[:, None])
        dp = _mm_nt(do, v, st)
        ds = p * (dp - delta[:, None])
        return dq + _mm(ds.astype(dt), k, st)

    dq = _loop_over_keys(body, jnp.zeros(q.shape, _F32), st.kv_len, bk)
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def bwd_call(q, k, v, o, lse, do, st: Static):
    """Plain backward. Returns (dq, dk, dv)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    delta = _row_dot(o, do)
    kc = st.cfg.bwd_kv
    dk, dv = pl.pallas_call(
        functools.partial(_bwd_kv_kernel, st=st, kc=kc),
        grid=(sk // kc.block_k, b, h),
        in_specs=[
            _all_rows_spec(sq, d),
            _rows_spec(kc.block_k, d),
            _rows_spec(kc.block_k, d),
            _all_rows_spec(sq, d),
            _all_stat_spec(sq),
            _all_stat_spec(sq),
        ],
        out_specs=[_rows_spec(kc.block_k, d), _rows_spec(kc.block_k, d)],
        out_shape=[_like(k), _like(v)],
        compiler_params=_params(kc),
        interpret=st.interpret,
        name="tvm_flash_bwd_kv",
    )(q, k, v, do, lse, delta)
    kc = st.cfg.bwd_q
    dq = pl.pallas_call(
        functools.partial(_bwd_q_kernel, st=st, kc=kc),
        grid=(sq // kc.block_q, b, h),
        in_specs=[
            _rows_spec(kc.block_q, d),
            _all_rows_spec(sk, d),
            _all_rows_spec(sk, d),
            _rows_spec(kc.block_q, d),
            _stat_rows_spec(kc.block_q),
            _stat_rows_spec(kc.block_q),
        ],
        out_specs=_rows_spec(kc.block_q, d),
        out_shape=_like(q),
        compiler_params=_params(kc),
        interpret=st.interpret,
        name="tvm_flash_bwd_q",
    )(q, k, v, do, lse, delta)
    return dq, dk, dv


# ----------------------------------------------------------------------------- fused forward + tangent


def _jvp_fwd_kernel(
    q_ref, k_ref, v_ref, tq_ref, tk_ref, tv_ref, o_ref, to_ref, lse_ref, mu_ref, *, st, kc
):
    bq, bk = kc.block_q, kc.block_k
    q = q_ref[...]
    tq = tq_ref[...]
    dt = q.dtype
    dim = q.shape[-1]

    def body(j, carry, masked):
        acc_o, acc_t, acc_mu, m, l = carry
        start = _start(j, bk)
        ks = pl.ds(start, bk)
        k = k_ref[ks, :]
        tk = tk_ref[ks, :]
        s = _key_block_logits(q, k, start, masked, st)
        ts = (_mm_nt(tq, k, st) + _mm_nt(q, tk, st)) * st.scale  # finite on padded keys: k, tk are 0 there
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        pts = p * ts
        l = l * alpha + jnp.sum(p, axis=1)
        acc_mu = acc_mu * alpha + jnp.sum(pts, axis=1)
        v = v_ref[ks, :]
        tv = tv_ref[ks, :]
        pc = p.astype(dt)
        acc_o = acc_o * alpha[:, None] + _mm(pc, v, st)
        acc_t = acc_t * alpha[:, None] + _mm(pts.astype(dt), v, st) + _mm(pc, tv, st)
        return acc_o, acc_t, acc_mu, m_new, l

    init = (
        jnp.zeros((bq, dim), _F32),
        jnp.zeros((bq, dim), _F32),
        jnp.zeros((bq,), _F32),
        jnp.full((bq,), -jnp.inf, _F32),
        jnp.zeros((bq,), _F32),
    )
    acc_o, acc_t, acc_mu, m, l = _loop_over_keys(body, init, st.kv_len, bk)
    inv_l = 1.0 / l
    o = acc_o * inv_l[:, None]
    mu = acc_mu * inv_l
    o_ref[...] = o.astype(o_ref.dtype)
    to_ref[...] = (acc_t * inv_l[:, None] - mu[:, None] * o).astype(to_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)
    mu_ref[...] = mu


def jvp_fwd_call(q, k, v, tq, tk, tv, st: Static):
    """Fused forward + tangent. Returns (o, t_o, lse2, mu); lse2, mu: (B, H, Sq_pad) fp32."""
    kc = st.cfg.jvp_fwd
    b, sq, h, d = q.shape
    sk = k.shape[1]
    rows = _rows_spec(kc.block_q, d)
    full = _all_rows_spec(sk, d)
    stat = _stat_rows_spec(kc.block_q)
    return pl.pallas_call(
        functools.partial(_jvp_fwd_kernel, st=st, kc=kc),
        grid=(sq // kc.block_q, b, h),
        in_specs=[rows, full, full, rows, full, full],
        out_specs=[rows, rows, stat, stat],
        out_shape=[
            _like(q),
            _like(q),
            _stat_shape(q),
            _stat_shape(q),
        ],
        compiler_params=_params(kc),
        interpret=st.interpret,
        name="tvm_flash_jvp_fwd",
    )(q, k, v, tq, tk, tv)


# ----------------------------------------------------------------------------- tangent backward


def _jvp_bwd_kv_kernel(
    q_ref, k_ref, v_ref, tq_ref, tk_ref, tv_ref, do_ref, dto_ref,
    lse_ref, mu_ref, delta_ref, nu_ref, *out_refs, st, kc, write_ds, mask_keys,
):  # fmt: skip
    """One key block of the tangent backward. ``jvp_bwd_kv`` (``write_ds`` False): dk, dv, dtk,
    dtv. ``jvp_bwd_v`` (``write_ds``, ``jvp_bwd_impl="matmul"``): dv, dtv, and that block's rows
    of dS and dtS, transposed (keys, queries) and rounded as the kv kernel rounds them for its
    matmuls. ``mask_keys``: the arrays hold padded keys; their dS rows are written as zeros
    (their probabilities are not masked here and may overflow; dk of padded keys is dropped)."""
    bq, bk = kc.block_q, kc.block_k
    k = k_ref[...]
    v = v_ref[...]
    tk = tk_ref[...]
    tv = tv_ref[...]
    dt = k.dtype
    dim = k.shape[-1]
    if write_ds and mask_keys:  # this block's real keys (program_id outside the loop: the interpreter needs that)
        real = (pl.program_id(0) * bk + jnp.arange(bk, dtype=jnp.int32) < st.kv_len)[:, None]

    def body(i, carry_in):
        qs = pl.ds(_start(i, bq), bq)
        q = q_ref[qs, :]
        tq = tq_ref[qs, :]
        do = do_ref[qs, :]
        dto = dto_ref[qs, :]
        lse = lse_ref[qs][None, :]
        mu = mu_ref[qs][None, :]
        delta = delta_ref[qs][None, :]
        nu = nu_ref[qs][None, :]
        # All tiles transposed: (keys, queries).
        p = jnp.exp2(_mm_nt(k, q, st) * st.qk_scale2 - lse)
        ts = (_mm_nt(k, tq, st) + _mm_nt(tk, q, st)) * st.scale
        dtp = _mm_nt(v, dto, st)
        dp = _mm_nt(v, do, st) + _mm_nt(tv, dto, st)
        tsc = ts - mu
        tp = p * tsc
        ds = p * (dp + dtp * tsc - nu * ts - delta)
        dts = p * (dtp - nu)
        pc = p.astype(dt)
        dv = carry_in[0] + _mm(pc, do, st) + _mm(tp.astype(dt), dto, st)
        dtv = carry_in[1] + _mm(pc, dto, st)
        dsc, dtsc = ds.astype(dt), dts.astype(dt)
        if not write_ds:
            return dv, dtv, carry_in[2] + _mm(dsc, q, st) + _mm(dtsc, tq, st), carry_in[3] + _mm(dtsc, q, st)
        if mask_keys:
            dsc, dtsc = jnp.where(real, dsc, 0), jnp.where(real, dtsc, 0)
        out_refs[2][:, qs] = dsc
        out_refs[3][:, qs] = dtsc
        return dv, dtv

    zeros = jnp.zeros((bk, dim), _F32)
    n_q = pl.cdiv(st.q_len, bq)
    acc = lax.fori_loop(0, n_q, body, (zeros,) * (2 if write_ds else 4))
    if write_ds:
        dv_ref, dtv_ref = out_refs[:2]
    else:
        dk_ref, dv_ref, dtk_ref, dtv_ref = out_refs
        dk_ref[...] = (acc[2] * st.scale).astype(dk_ref.dtype)
        dtk_ref[...] = (acc[3] * st.scale).astype(dtk_ref.dtype)
    dv_ref[...] = acc[0].astype(dv_ref.dtype)
    dtv_ref[...] = acc[1].astype(dtv_ref.dtype)


def _jvp_bwd_q_kernel(
    q_ref, k_ref, v_ref, tq_ref, tk_ref, tv_ref, do_ref, dto_ref,
    lse_ref, mu_ref, delta_ref, nu_ref,
    dq_ref, dtq_ref, *, st, kc,
):  # fmt: skip
    bk = kc.block_k
    q = q_ref[...]
    tq = tq_ref[...]
    do = do_ref[...]
    dto = dto_ref[...]
    lse = lse_ref[...][:, None]
    mu = mu_ref[...][:, None]
    delta = delta_ref[...][:, None]
    nu = nu_ref[...][:, None]
    dt = q.dtype

    def body(j, carry, masked):
        dq, dtq = carry
        start = _start(j, bk)
        ks = pl.ds(start, bk)
        k = k_ref[ks, :]
        tk = tk_ref[ks, :]
        v = v_ref[ks, :]
        tv = tv_ref[ks, :]
        s = _key_block_logits(q, k, start, masked, st)
        p = jnp.exp2(s - lse)
        ts = (_mm_nt(tq, k, st) + _mm_nt(q, tk, st)) * st.scale
        dtp = _mm_nt(dto, v, st)
        dp = _mm_nt(do, v, st) + _mm_nt(dto, tv, st)
        tsc = ts - mu
        ds = p * (dp + dtp * tsc - nu * ts - delta)
        dts = p * (dtp - nu)
        dtsc = dts.astype(dt)
        dq = dq + _mm(ds.astype(dt), k, st) + _mm(dtsc, tk, st)
        dtq = dtq + _mm(dtsc, k, st)
        return dq, dtq

    zeros = jnp.zeros(q.shape, _F32)
    dq, dtq = _loop_over_keys(body, (zeros, zeros), st.kv_len, bk)
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)
    dtq_ref[...] = (dtq * st.scale).astype(dtq_ref.dtype)


def _qk_grads_from_ds(ds, dts, q, k, tq, tk, st: Static):
    """dq, dk, dtq, dtk from the (B, H, Sk, Sq') transposed dS and dtS that ``jvp_bwd_v`` wrote
    (``jvp_bwd_impl="matmul"``), as batched XLA matmuls with fp32 accumulation (cuBLAS on a GPU):
    dq = (dS k + dtS tk) c, dtq = dtS k c over the keys; dk = (dS^T q + dtS^T tq) c, dtk = dtS^T q c
    over the query rows dS was written for. dtS meets two operands on each side, so it is one
    matmul of twice the width per side (dtS [k | tk], dtS^T [q | tq]): four matmuls, each matrix
    read once per side (six read dtS four times: 1.30 against 0.99 ms of cuBLAS time at (1, 24,
    4096, 128) on an H200, ``bench/NOTES.md`` item 41). dq and dtq rows past Sq' (padding beyond
    the last written query block) come back as zeros."""
    sq, wq, dim = q.shape[1], ds.shape[-1], k.shape[-1]
    q, tq = q[:, :wq], tq[:, :wq]

    def mm(spec, a, b):
        return jnp.einsum(spec, a, b, precision=st.precision, preferred_element_type=_F32)

    def out(x, pad=0):
        return jnp.pad((x * st.scale).astype(k.dtype), ((0, 0), (0, pad), (0, 0), (0, 0)))

    over_keys, over_queries = "bhkq,bkhd->bqhd", "bhkq,bqhd->bkhd"
    dts_k = mm(over_keys, dts, jnp.concatenate([k, tk], axis=-1))  # (dtS k, dtS tk)
    dts_q = mm(over_queries, dts, jnp.concatenate([q, tq], axis=-1))  # (dtS^T q, dtS^T tq)
    dq = out(mm(over_keys, ds, k) + dts_k[..., dim:], sq - wq)
    dtq = out(dts_k[..., :dim], sq - wq)
    dk = out(mm(over_queries, ds, q) + dts_q[..., dim:])
    dtk = out(dts_q[..., :dim])
    return dq, dk, dtq, dtk


def jvp_bwd_call(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, st: Static):
    """Backward of (o, t_o). Returns (dq, dk, dv, dtq, dtk, dtv)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    nu = _row_dot(dto, o)
    delta = _row_dot(do, o) + _row_dot(dto, to) - nu * mu
    args = (q, k, v, tq, tk, tv, do, dto, lse, mu, delta, nu)

    mode = jvp_bwd_impl_choice(st.cfg.jvp_bwd_impl, b, h, sq, sk, jnp.dtype(q.dtype).itemsize)
    by_matmul = mode == "matmul"
    kc = st.cfg.jvp_bwd_v if by_matmul else st.cfg.jvp_bwd_kv
    q_all = _all_rows_spec(sq, d)
    k_blk = _rows_spec(kc.block_k, d)
    stat_all = _all_stat_spec(sq)
    out_specs, out_shape = [k_blk] * 4, [_like(k)] * 4
    if by_matmul:  # dv, dtv, then dS and dtS: (B, H, Sk, Sq') with Sq' its query blocks up to q_len
        wq = pl.cdiv(st.q_len, kc.block_q) * kc.block_q
        ds_like = _like(q, lambda a: jnp.zeros((b, h, sk, wq), a.dtype) + a[0, 0, 0, 0])
        ds_blk = pl.BlockSpec((SQUEEZED, SQUEEZED, kc.block_k, wq), lambda j, b_, h_: (b_, h_, j, 0))
        out_specs, out_shape = [k_blk] * 2 + [ds_blk] * 2, [_like(k)] * 2 + [ds_like] * 2
    outs = pl.pallas_call(
        functools.partial(_jvp_bwd_kv_kernel, st=st, kc=kc, write_ds=by_matmul, mask_keys=sk != st.kv_len),
        grid=(sk // kc.block_k, b, h),
        in_specs=[q_all, k_blk, k_blk, q_all, k_blk, k_blk, q_all, q_all] + [stat_all] * 4,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_params(kc),
        interpret=st.interpret,
        name="tvm_flash_jvp_bwd_v" if by_matmul else "tvm_flash_jvp_bwd_kv",
    )(*args)
    if by_matmul:
        dv, dtv, ds, dts = outs
        dq, dk, dtq, dtk = _qk_grads_from_ds(ds, dts, q, k, tq, tk, st)
        return dq, dk, dv, dtq, dtk, dtv
    dk, dv, dtk, dtv = outs

    kc = st.cfg.jvp_bwd_q
    q_blk = _rows_spec(kc.block_q, d)
    k_all = _all_rows_spec(sk, d)
    stat_blk = _stat_rows_spec(kc.block_q)
    dq, dtq = pl.pallas_call(
        functools.partial(_jvp_bwd_q_kernel, st=st, kc=kc),
        grid=(sq // kc.block_q, b, h),
        in_specs=[q_blk, k_all, k_all, q_blk, k_all, k_all, q_blk, q_blk] + [stat_blk] * 4,
        out_specs=[q_blk, q_blk],
        out_shape=[_like(q)] * 2,
        compiler_params=_params(kc),
        interpret=st.interpret,
        name="tvm_flash_jvp_bwd_q",
    )(*args)
    return dq, dk, dv, dtq, dtk, dtv


# ----------------------------------------------------------------------------- autodiff rules


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def flash(q, k, v, st: Static):
    """Plain flash attention on padded arrays; reverse-differentiable (custom_vjp)."""
    return fwd_call(q, k, v, st)[0]


def _saveable(*arrays):
    return tuple(checkpoint_name(a, RESIDUALS_NAME) for a in arrays)


def _flash_fwd(q, k, v, st):
    o, lse = _saveable(*fwd_call(q, k, v, st))
    return o, (q, k, v, o, lse)


def _flash_bwd(st, res, do):
    q, k, v, o, lse = res
    return bwd_call(q, k, v, o, lse, do, st)


flash.defvjp(_flash_fwd, _flash_bwd)


def split_qkv(qkv, bias, wq, wk, pro: QKVPrologue):
    """The XLA form of :func:`split_qkv_call`: (q, k, v) of a (B, S, 3, H, D) qkv array with the
    prologue applied."""
    if pro.bias:
        qkv = qkv + bias.astype(qkv.dtype)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if pro.norm:
        q = qk_rms_norm(q, wq, eps=pro.eps, dim=pro.head_dim)
        k = qk_rms_norm(k, wk, eps=pro.eps, dim=pro.head_dim)
    return q, k, v


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def flash_qkv(qkv, bias, wq, wk, st: Static, pro: QKVPrologue):
    """Plain flash attention of a padded (B, S, 3, H, D) qkv array after its prologue (bias,
    q/k norms), which the forward kernel applies to each tile it reads in place
    (:func:`fwd_qkv_call`). Reverse-differentiable
    in qkv, bias and both norm weights: the backward recomputes the prologue (XLA) and runs the
    plain backward kernels."""
    return fwd_qkv_call(qkv, st, bias, wq, wk, pro)[0]


def _flash_qkv_fwd(qkv, bias, wq, wk, st, pro):
    o, lse = _saveable(*fwd_qkv_call(qkv, st, bias, wq, wk, pro))
    return o, (qkv, bias, wq, wk, o, lse)


def _flash_qkv_bwd(st, pro, res, do):
    qkv, bias, wq, wk, o, lse = res
    (q, k, v), split_vjp = jax.vjp(lambda *a: split_qkv(*a, pro), qkv, bias, wq, wk)
    grads = bwd_call(q, k, v, o, lse, do.astype(o.dtype), st)
    # Rows past the true length are padding. The kernels leave garbage in the padded key rows of
    # dk, dv (their p is not masked there) and callers drop those rows; here the bias is added
    # to every row, so its gradient would sum them: zero them first.
    real = (jnp.arange(qkv.shape[1]) < st.q_len)[None, :, None, None]
    return split_vjp(tuple(jnp.where(real, g, jnp.zeros((), g.dtype)) for g in grads))


flash_qkv.defvjp(_flash_qkv_fwd, _flash_qkv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def flash_tangent(q, k, v, tq, tk, tv, st: Static):
    """(o, t_o) from one fused kernel, on padded arrays; reverse-differentiable in all six inputs."""
    o, to, _, _ = jvp_fwd_call(q, k, v, tq, tk, tv, st)
    return o, to


def _flash_tangent_fwd(q, k, v, tq, tk, tv, st):
    o, to, lse, mu = _saveable(*jvp_fwd_call(q, k, v, tq, tk, tv, st))
    return (o, to), (q, k, v, tq, tk, tv, o, to, lse, mu)


def _flash_tangent_bwd(st, res, cts):
    do, dto = cts
    return jvp_bwd_call(*res, do.astype(res[6].dtype), dto.astype(res[7].dtype), st)


flash_tangent.defvjp(_flash_tangent_fwd, _flash_tangent_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def flash_jvp_mode(q, k, v, st: Static):
    """Flash attention whose JVP is the fused tangent kernel (so grad-of-jvp uses kernels).

    The primal (no tangents) runs the plain forward kernel. Reverse-mode differentiation of
    this function *without* an enclosing ``jax.jvp`` is not possible (JAX would have to
    transpose the custom_vjp inside the JVP rule); use the plain mode for that.
    """
    return fwd_call(q, k, v, st)[0]


@flash_jvp_mode.defjvp
def _flash_jvp_mode_rule(st, primals, tangents):
    q, k, v = primals
    tq, tk, tv = tangents
    o, to = flash_tangent(q, k, v, tq, tk, tv, st)
    return o, to

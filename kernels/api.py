"""Public attention entry points: validation, padding, impl choice and batch sharding."""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels import auto as _auto
from kernels import cudnn as _cudnn
from kernels import flash as _flash
from kernels import qkv_tangent as _qkv_tangent
from kernels.sharding import batch_sharded as _batch_sharded
from kernels.config import MAX_HEAD_DIM, AttentionConfig, padded_head_dim
from kernels.reference import attention_xla

IMPLS = ("auto", "xla", "pallas", "cudnn")
_PALLAS_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
# Kernels whose block sizes bound the padding, per mode.
_PLAIN_KERNELS = ("fwd", "bwd_kv", "bwd_q")
_JVP_KERNELS = ("fwd", "jvp_fwd", "jvp_bwd_kv", "jvp_bwd_q", "jvp_bwd_v")
_QKV_KERNELS = ("fwd_qkv", "bwd_kv", "bwd_q")  # attention_qkv's plain Pallas path


# ----------------------------------------------------------------------------- validation


def _as_array(x, name: str):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        try:
            x = jnp.asarray(x)
        except TypeError as e:
            raise ValueError(f"{name} must be an array, got {type(x).__name__}") from e
    return x


def _check_arrays(names, arrays, *, pallas: bool):
    arrays = [_as_array(a, n) for n, a in zip(names, arrays)]
    for n, a in zip(names, arrays):
        if a.ndim != 4:
            raise ValueError(
                f"{n} must have rank 4 (batch, seq, heads, head_dim), got shape {tuple(a.shape)}"
            )
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{n} must have a floating dtype, got {a.dtype}")
    q = arrays[0]
    for n, a in zip(names[1:], arrays[1:]):
        if a.dtype != q.dtype:
            raise ValueError(f"{n} dtype {a.dtype} does not match q dtype {q.dtype}")
    k = arrays[1]
    for n, a in zip(names[1:3], arrays[1:3]):
        if a.shape[0] != q.shape[0] or a.shape[2] != q.shape[2] or a.shape[3] != q.shape[3]:
            raise ValueError(
                f"{n} shape {tuple(a.shape)} does not match q shape {tuple(q.shape)} in "
                "batch, heads or head_dim (layout is (batch, seq, heads, head_dim))"
            )
    if arrays[2].shape != k.shape:
        raise ValueError(f"v shape {tuple(arrays[2].shape)} does not match k shape {tuple(k.shape)}")
    for i in range(3, len(arrays)):  # tangents: same shape as their primal
        if arrays[i].shape != arrays[i - 3].shape:
            raise ValueError(
                f"{names[i]} shape {tuple(arrays[i].shape)} does not match "
                f"{names[i - 3]} shape {tuple(arrays[i - 3].shape)}"
            )
    if pallas:
        if q.dtype not in _PALLAS_DTYPES:
            raise ValueError(
                f"impl='pallas' supports dtypes bfloat16, float16, float32; got {q.dtype}"
            )
        if q.shape[3] > MAX_HEAD_DIM:
            raise ValueError(f"impl='pallas' supports head_dim <= {MAX_HEAD_DIM}, got head_dim={q.shape[3]}")
        if min(q.shape) == 0 or min(k.shape) == 0:
            raise ValueError(f"impl='pallas' needs non-empty inputs, got q {q.shape}, k {k.shape}")
    return arrays


def _resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    try:
        scale = float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError("scale must be a static Python number (not a traced array)") from e
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _on_gpu() -> bool:
    """Whether ``impl="auto"`` runs the memory-pass kernels (``kernels.bias_gelu``,
    ``kernels.residual_norm_modulate``); tests stand in for a GPU by replacing it."""
    return jax.default_backend() == "gpu"


def _resolve_tiles(tiles, default: tuple, what: str) -> tuple:
    """Those kernels' ``tiles`` argument: ``default`` for None, else as many powers of two."""
    tiles = default if tiles is None else tuple(int(t) for t in tiles)
    if len(tiles) != len(default) or any(t < 1 or t & (t - 1) for t in tiles):
        raise ValueError(f"tiles must be {len(default)} powers of two {what}, got {tiles}")
    return tiles


def _resolve_eps(eps) -> float:
    """The memory-pass kernels' ``eps``: a static Python number (it is baked into the kernel)."""
    try:
        return float(eps)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError("eps must be a static Python number (not a traced array)") from e


def _check_per_sample(batch: int, width: int, **arrays) -> None:
    """Those kernels' per-sample vectors (adaLN gate, shift, scale) must be (batch, width)."""
    for name, a in arrays.items():
        if a.shape != (batch, width):
            raise ValueError(f"{name} must have shape (batch, width) = {(batch, width)}, got {a.shape}")


def _resolve_interpret(interpret) -> bool:
    if interpret is None:
        return jax.default_backend() == "cpu"
    if not isinstance(interpret, (bool, np.bool_)):
        raise ValueError(f"interpret must be None, True or False, got {interpret!r}")
    return bool(interpret)


def _resolve_config(block_sizes, head_dim: int, dtype=None) -> AttentionConfig:
    if block_sizes is None:
        block_sizes = AttentionConfig()
    elif isinstance(block_sizes, dict):
        block_sizes = AttentionConfig.from_dict(block_sizes)
    elif not isinstance(block_sizes, AttentionConfig):
        raise ValueError(
            f"block_sizes must be None, an AttentionConfig or a dict, got {type(block_sizes).__name__}"
        )
    return block_sizes.resolve(head_dim, dtype)


def _check_impl(impl) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def _check_jvp(jvp) -> None:
    if not isinstance(jvp, (bool, np.bool_)):
        raise ValueError(f"jvp must be a bool, got {jvp!r}")


def _choose(impl: str, q_len: int, kv_len: int, head_dim: int, dtype, jvp: bool) -> str:
    """The implementation that runs a call: ``impl`` itself, or auto's per-shape choice. A
    cuDNN call it cannot take raises ``ValueError`` naming the reason."""
    cudnn_reason = None
    if impl in ("cudnn", "auto"):
        cudnn_reason = _cudnn.unsupported_reason(q_len, kv_len, head_dim, dtype, jvp=jvp)
    if impl == "cudnn" and cudnn_reason:
        raise ValueError(f"impl='cudnn' {cudnn_reason}")
    if impl == "auto":
        mode = "jvp" if jvp else "plain"
        impl = _auto.choose_impl(mode, max(q_len, kv_len), head_dim, dtype, cudnn=cudnn_reason is None)
    return impl


# ----------------------------------------------------------------------------- padding


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _plan(q_len: int, kv_len: int, head_dim: int, cfg: AttentionConfig, kernels, scale, interpret, dtype):
    cfg = cfg.clamp(q_len, kv_len)
    q_mult = max(getattr(cfg, n).block_q for n in kernels)
    k_mult = max(getattr(cfg, n).block_k for n in kernels)
    st = _flash.Static(
        scale=scale,
        q_len=q_len,
        kv_len=kv_len,
        cfg=cfg,
        interpret=interpret,
        precision=lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None,
    )
    return st, _round_up(q_len, q_mult), _round_up(kv_len, k_mult), padded_head_dim(head_dim)


def _pad(x, seq: int, dim: int):
    ps, pd = seq - x.shape[1], dim - x.shape[3]
    if ps == 0 and pd == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, ps), (0, 0), (0, pd)))


def _unpad(x, seq: int, dim: int):
    if x.shape[1] == seq and x.shape[3] == dim:
        return x
    return x[:, :seq, :, :dim]


# ----------------------------------------------------------------------------- public API


def attention(
    q,
    k,
    v,
    *,
    scale: Optional[float] = None,
    impl: str = "auto",
    jvp: bool = False,
    interpret: Optional[bool] = None,
    block_sizes: Optional[AttentionConfig] = None,
):
    """Non-causal multi-head attention, layout (batch, seq, heads, head_dim).

    Args:
      q: (B, Sq, H, D). k, v: (B, Sk, H, D); same dtype as q (Sk may differ from Sq).
      scale: softmax scale (static float); default ``D ** -0.5``.
      impl: ``"xla"`` (jnp reference, differentiable in every mode), ``"pallas"`` (Triton
        kernels), ``"cudnn"`` (cuDNN's fused attention through
        ``jax.nn.dot_product_attention``; plain mode, bf16/fp16, head dim a multiple of 8,
        even sequence lengths, CUDA GPU only: anything else raises ``ValueError`` naming
        the reason, no fallback; see :mod:`kernels.cudnn`) or ``"auto"`` (per-shape choice
        among these from ``kernels/auto_table.json``, cuDNN only where it can take the call;
        XLA on CPU and for unmeasured shapes; see :mod:`kernels.auto`).
      jvp: Pallas only. ``False``: a ``custom_vjp`` (flash forward + flash backward): supports
        ``grad``/``vjp``/``vmap``/``jit``, not ``jax.jvp`` (raises JAX's error).
        ``True``: a ``custom_jvp`` whose JVP is the fused forward+tangent kernel
        (:func:`flash_with_tangent`), itself a ``custom_vjp``; so ``jax.grad`` of a function of
        ``jax.jvp(...)`` outputs runs Pallas kernels end to end. The primal alone runs the
        plain forward kernel. Reverse-mode of the primal alone (grad without jvp) is not
        supported in this mode (JAX cannot transpose the custom_vjp in the JVP rule).
      interpret: run the kernels in the Pallas interpreter; ``None`` = True iff the default
        backend is CPU.
      block_sizes: :class:`kernels.AttentionConfig` (or its dict form); ``None`` fields take
        per-head-dim defaults.

    Returns:
      (B, Sq, H, D) array with q's dtype.

    Ragged lengths are zero-padded to the block multiple (padded keys masked to -inf in the
    kernels); head dims that are not a power of two >= 16 are zero-padded to the next one
    (exact: zero columns change neither the logits nor the kept output columns). Head dims
    above 256 raise ``ValueError`` on the Pallas path. Under an active mesh
    (``jax.set_mesh``), the Pallas path wraps itself in ``jax.shard_map`` over the batch dim.
    """
    impl = _check_impl(impl)
    _check_jvp(jvp)
    q, k, v = _check_arrays(("q", "k", "v"), (q, k, v), pallas=impl == "pallas")
    head_dim = q.shape[3]
    scale = _resolve_scale(scale, head_dim)
    impl = _choose(impl, q.shape[1], k.shape[1], head_dim, q.dtype, jvp)
    if impl == "pallas":
        _check_arrays(("q", "k", "v"), (q, k, v), pallas=True)
    if impl == "xla":
        return attention_xla(q, k, v, scale=scale)
    if impl == "cudnn":
        return _batch_sharded(lambda q, k, v: _cudnn.attention_cudnn(q, k, v, scale=scale), (q, k, v), 1)

    interpret = _resolve_interpret(interpret)
    cfg = _resolve_config(block_sizes, head_dim, q.dtype)
    st, q_pad, k_pad, d_pad = _plan(
        q.shape[1], k.shape[1], head_dim, cfg, _JVP_KERNELS if jvp else _PLAIN_KERNELS,
        scale, interpret, q.dtype,
    )  # fmt: skip
    core = _flash.flash_jvp_mode if jvp else _flash.flash

    def run(q, k, v):
        o = core(_pad(q, q_pad, d_pad), _pad(k, k_pad, d_pad), _pad(v, k_pad, d_pad), st)
        return _unpad(o, q.shape[1], head_dim)

    return _batch_sharded(run, (q, k, v), 1)


def flash_with_tangent(
    q,
    k,
    v,
    tq,
    tk,
    tv,
    *,
    scale: Optional[float] = None,
    interpret: Optional[bool] = None,
    block_sizes: Optional[AttentionConfig] = None,
):
    """(o, t_o) = attention and its JVP along (tq, tk, tv), from one fused Pallas kernel.

    A ``jax.custom_vjp`` function: its backward takes cotangents of both outputs and returns
    cotangents of all six inputs (Pallas kernels). Only O(S) statistics per row are saved. The
    backward's working memory is linear in S too, except under ``jvp_bwd_impl="matmul"`` (at head
    dim 128 ``"auto"`` picks it from 2,048 tokens while it fits in 2 GiB), which holds dS and dtS,
    2·B·H·Sq·Sk elements, for its cuBLAS matmuls (:mod:`kernels.config`).
    Shapes/dtypes as in :func:`attention`; each tangent matches its primal.
    """
    names = ("q", "k", "v", "tq", "tk", "tv")
    q, k, v, tq, tk, tv = _check_arrays(names, (q, k, v, tq, tk, tv), pallas=True)
    head_dim = q.shape[3]
    scale = _resolve_scale(scale, head_dim)
    interpret = _resolve_interpret(interpret)
    cfg = _resolve_config(block_sizes, head_dim, q.dtype)
    st, q_pad, k_pad, d_pad = _plan(
        q.shape[1], k.shape[1], head_dim, cfg, _JVP_KERNELS, scale, interpret, q.dtype
    )

    def run(q, k, v, tq, tk, tv):
        qs, ks = (q_pad, d_pad), (k_pad, d_pad)
        o, to = _flash.flash_tangent(
            _pad(q, *qs), _pad(k, *ks), _pad(v, *ks), _pad(tq, *qs), _pad(tk, *ks), _pad(tv, *ks), st
        )
        return _unpad(o, q.shape[1], head_dim), _unpad(to, q.shape[1], head_dim)

    return _batch_sharded(run, (q, k, v, tq, tk, tv), 2)


def _check_qkv(qkv, q_norm_weight, k_norm_weight, bias):
    qkv = _as_array(qkv, "qkv")
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(
            f"qkv must have shape (batch, seq, 3, heads, head_dim) (q, k, v stacked on axis 2), "
            f"got shape {tuple(qkv.shape)}"
        )
    if not jnp.issubdtype(qkv.dtype, jnp.floating):
        raise ValueError(f"qkv must have a floating dtype, got {qkv.dtype}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("give both q_norm_weight and k_norm_weight, or neither (no q/k norm)")
    heads, dim = qkv.shape[3], qkv.shape[4]
    out = []
    for name, w, shape in (("q_norm_weight", q_norm_weight, (dim,)), ("k_norm_weight", k_norm_weight, (dim,)),
                           ("bias", bias, (3, heads, dim))):
        if w is not None:
            w = _as_array(w, name)
            if w.size != math.prod(shape) or (w.ndim > 1 and w.shape != shape):
                want = "(head_dim,)" if name != "bias" else "(3, heads, head_dim) or (3 * heads * head_dim,)"
                raise ValueError(f"{name} must have shape {want} = {shape}, got {tuple(w.shape)}")
            if not jnp.issubdtype(w.dtype, jnp.floating):
                raise ValueError(f"{name} must have a floating dtype, got {w.dtype}")
            w = w.reshape(shape)
        out.append(w)
    return qkv, out


def attention_qkv(
    qkv,
    q_norm_weight=None,
    k_norm_weight=None,
    *,
    bias=None,
    eps: float = 1e-6,
    scale: Optional[float] = None,
    impl: str = "auto",
    jvp: bool = False,
    interpret: Optional[bool] = None,
    block_sizes: Optional[AttentionConfig] = None,
):
    """Self-attention of a fused qkv projection: its bias, learnable q/k RMS norms, attention.

    Args:
      qkv: (B, S, 3, H, D): q, k, v stacked on axis 2 (a qkv projection's output reshaped).
      q_norm_weight, k_norm_weight: (D,) weights of the RMS norms of q and k over the head dim
        (``x * rsqrt(mean(x^2) + eps) * weight`` in float32, cast back to qkv's dtype:
        :func:`kernels.reference.qk_rms_norm`), or both ``None`` for no norm.
      bias: the projection's bias, (3, H, D) or flat (3 * H * D,), added to qkv first in qkv's
        dtype (as a Linear layer adds it), or ``None``.
      eps, scale, impl, jvp, interpret, block_sizes: as in :func:`attention`.

    Returns:
      (B, S, H, D) array with qkv's dtype: ``attention(norm(q + b_q), norm(k + b_k), v + b_v)``.

    Where the call runs the Pallas kernels in plain mode (``jvp=False``), the forward kernel
    reads q, k, v in place from qkv and adds the bias and normalises q and k on each tile it
    loads (no XLA slices, bias add or norm fusions, and q, k, v are never written out; its
    tiles are ``block_sizes.fwd_qkv``); the backward (a ``custom_vjp``) recomputes that
    prologue with XLA and runs the plain backward kernels.
    Every other case (``jvp=True``, XLA, cuDNN) applies the prologue with XLA and calls
    :func:`attention`, so the result is the same function everywhere; with ``jvp=True`` on the
    Pallas kernels and the norms on, the reverse mode of the prologue's JVP is one Pallas pass
    (:mod:`kernels.qkv_tangent`).
    """
    impl = _check_impl(impl)
    _check_jvp(jvp)
    qkv, (wq, wk, bias) = _check_qkv(qkv, q_norm_weight, k_norm_weight, bias)
    bias = None if bias is None else bias.astype(qkv.dtype)
    b, seq, _, heads, head_dim = qkv.shape
    try:
        eps = float(eps)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError("eps must be a static Python number (not a traced array)") from e
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    pro = _flash.QKVPrologue(bias=bias is not None, norm=wq is not None, eps=eps, head_dim=head_dim)
    chosen = _choose(impl, seq, seq, head_dim, qkv.dtype, jvp)
    if chosen != "pallas" or jvp:
        if chosen == "pallas" and pro.norm:  # jvp: XLA's prologue, one Pallas pass for its reverse mode
            bias = jnp.zeros((3, heads, head_dim), qkv.dtype) if bias is None else bias  # pro.bias says if it is added
            q, k, v = _qkv_tangent.split_qkv_tangent(qkv, bias, wq, wk, pro, _resolve_interpret(interpret))
        else:
            q, k, v = _flash.split_qkv(qkv, bias, wq, wk, pro)
        return attention(
            q, k, v, scale=scale, impl=chosen, jvp=jvp, interpret=interpret, block_sizes=block_sizes
        )
    one = jax.ShapeDtypeStruct((b, seq, heads, head_dim), qkv.dtype)
    _check_arrays(("q", "k", "v"), (one,) * 3, pallas=True)  # dtype, head dim, non-empty
    scale = _resolve_scale(scale, head_dim)
    interpret = _resolve_interpret(interpret)
    cfg = _resolve_config(block_sizes, head_dim, qkv.dtype)
    st, q_pad, k_pad, d_pad = _plan(seq, seq, head_dim, cfg, _QKV_KERNELS, scale, interpret, qkv.dtype)
    seq_pad = max(q_pad, k_pad)  # one array holds q and k: pad both to the larger multiple
    # Operands the prologue does not use are zeros (never read for the norm weights; an exact
    # +0 for the bias, which is only added when given).
    wq = jnp.zeros((head_dim,), jnp.float32) if wq is None else wq
    wk = jnp.zeros((head_dim,), jnp.float32) if wk is None else wk
    bias = jnp.zeros((3, heads, head_dim), qkv.dtype) if bias is None else bias

    def run(qkv, bias, wq, wk):
        ps, pd = seq_pad - seq, d_pad - head_dim
        if ps or pd:
            qkv = jnp.pad(qkv, ((0, 0), (0, ps), (0, 0), (0, 0), (0, pd)))
            bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pd)))
            wq, wk = (jnp.pad(w, (0, pd)) for w in (wq, wk))
        o = _flash.flash_qkv(qkv, bias, wq.astype(jnp.float32), wk.astype(jnp.float32), st, pro)
        return _unpad(o, seq, head_dim)

    return _batch_sharded(run, (qkv,), 1, replicated=(bias, wq, wk))

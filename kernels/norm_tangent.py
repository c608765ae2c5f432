"""The block's pre-norm and adaLN modulation in a JVP call, with a Pallas backward.

A DiT block normalises its float32 residual stream twice (weightless RMS norm) and modulates
each result with per-sample shift and scale: ``h = rms_norm(x) * (1 + scale) + shift``, cast to
the compute dtype of the matmul that reads it. In TVM's training step the student's JVP call
carries tangents through all of it (the residual stream and the modulation move with the step
size), and the step's backward differentiates that pair. XLA writes that reverse mode as several
passes over the token-sized tensors: row reductions for the norm's statistics, column reductions
over the tokens for the four modulation cotangents, and the elementwise cotangents of x and of
its tangent (bench/NOTES.md items 25 and 33).

:func:`norm_modulate_tangent` keeps the forward (XLA's ``jax.jvp`` of :func:`reference`: the same
numbers as before) and gives its reverse mode one Pallas pass: each program reads a block of rows
of x, its tangent and the cotangents of both outputs twice (the row statistics first, then the
cotangents; the second read is of rows just read), writes the cotangents of x and of its tangent,
and writes per-program column sums for the modulation's four cotangents, which XLA sums over the
programs (with the default of two rows per program they are each half the size of x).

The math, per row ``x`` (float32, width ``C``), tangent ``tx``, modulation ``s = 1 + scale``,
``ts`` the scale's tangent: ``r = rsqrt(sum(x^2)/C + eps)``, ``m = sum(x tx)/C``, ``n = x r``,
``tn = tx r - x r^3 m``; outputs ``h = n s + shift``, ``th = tn s + n ts + tshift``. With ``g``,
``k`` the cotangents of ``h``, ``th``: ``n_bar = g s + k ts``, ``tn_bar = k s``, and with
``A = sum(n_bar x)/C``, ``B = sum(tn_bar tx)/C``, ``Q = sum(tn_bar x)/C``:

* ``dx = r n_bar - r^3 (A + B - 3 r^2 m Q) x - r^3 m tn_bar - r^3 Q tx``
* ``dtx = r tn_bar - r^3 Q x``
* over the tokens of a sample: ``dshift = sum g``, ``dscale = sum (g n + k tn)``,
  ``dtshift = sum k``, ``dtscale = sum k n``.

With ``passthrough=True`` the op also returns x itself, which the model's residual add then
uses: the cotangent that reaches that x (the residual stream's, from the layers above) is added to
the norm's in the same pass, in place, instead of by a separate XLA add over two float32 tensors.

Measured on an H200 (bench/NOTES.md item 34): alone, at (32, 256, 1152), forward and reverse mode
take 0.156 ms against XLA's 0.204 (``bench/results/norm_tangent_h200.json``); in the 256px
training step the kernel without the pass-through gained nothing (208.6 / 207.5 ms against main's
208.6 / 209.1 on the two GPUs of one machine), with it 210.9 / 213.2 against 215.7 / 215.4, and
the 512px step 457.6 against 469.1 ms.

As for :mod:`kernels.qkv_tangent`, reverse mode needs an enclosing ``jax.jvp`` on the Pallas
path (JAX cannot transpose the ``custom_vjp`` inside the JVP rule); the model uses this function
only in its JVP calls (``DiT(..., jvp=True)``), and ``impl="xla"`` is plain XLA everywhere.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import api as _api
from kernels.flash import SQUEEZED
from kernels.reference import rms_norm
from kernels.sharding import batch_sharded

IMPLS = ("auto", "pallas", "xla")
_F32 = jnp.float32
_OUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# (rows, warps, keep) per program: rows is the most per block (fewer when the token count has
# fewer factors of two), keep 1 holds the rows in registers between the kernel's two passes, 0
# reads them again. Columns are read in chunks of a power of two (at most _CHUNK).
TILES = (2, 1, 0)
_CHUNK = 128


def reference(x, shift, scale, *, eps: float, out_dtype):
    """x (B, N, C) the residual stream (float32 or float64); shift, scale (B, C). Returns
    ``rms_norm(x) * (1 + scale) + shift`` in ``out_dtype``, computed as the model computes it."""
    n = rms_norm(x, eps)
    return (n * (1.0 + scale[:, None, :]) + shift[:, None, :]).astype(out_dtype)


def _xla_pair(x, tx, shift, tshift, scale, tscale, eps, out_dtype):
    """(h, th): XLA's JVP of :func:`reference`."""
    return jax.jvp(functools.partial(reference, eps=eps, out_dtype=out_dtype), (x, shift, scale), (tx, tshift, tscale))


def reverse_of_jvp(fn, x, tx, shift, tshift, scale, tscale, cts):
    """The step's use of a pre-norm, in miniature: the cotangents of (x, tx, shift, tshift, scale,
    tscale) that reverse mode gives ``jax.jvp(fn, (x, shift, scale), (tx, tshift, tscale))`` for the
    cotangents ``cts = (g, k)`` of its two outputs (for the tests and ``bench/norm_tangent.py``)."""
    def pair(x, tx, shift, tshift, scale, tscale):
        return jax.jvp(fn, (x, shift, scale), (tx, tshift, tscale))

    _, vjp = jax.vjp(pair, x, tx, shift, tshift, scale, tscale)
    return vjp(tuple(cts))


def _kernel(*refs, eps: float, width: int, chunk: int, keep: bool, accumulate: bool):
    if accumulate:  # the cotangents of the pass-through x and tx, added to the norm's (aliased outputs)
        x_ref, tx_ref, g_ref, k_ref, sc_ref, tsc_ref, ax_ref, atx_ref, *outs = refs
    else:
        (x_ref, tx_ref, g_ref, k_ref, sc_ref, tsc_ref, *outs), ax_ref, atx_ref = refs, None, None
    dx_ref, dtx_ref, dsh_ref, dsc_ref, dtsh_ref, dtsc_ref = outs
    rows = x_ref.shape[0]

    def load(j):
        cols = pl.ds(j * chunk, chunk)
        x, tx = x_ref[:, cols].astype(_F32), tx_ref[:, cols].astype(_F32)
        g, k = g_ref[:, cols].astype(_F32), k_ref[:, cols].astype(_F32)
        s = 1.0 + sc_ref[cols].astype(_F32)[None, :]
        ts = tsc_ref[cols].astype(_F32)[None, :]
        return cols, x, tx, g, k, g * s + k * ts, k * s

    sums, kept = None, []
    for j in range(width // chunk):  # pass 1: the row statistics, summed elementwise over the chunks
        loaded = load(j)
        if keep:  # held for pass 2 (else pass 2 reads the rows again, mostly from L2)
            kept.append(loaded)
        _, x, tx, _, _, nb, tnb = loaded
        terms = (x * x, x * tx, nb * x, tnb * tx, tnb * x)
        sums = terms if sums is None else tuple(s + t for s, t in zip(sums, terms))
    inv = 1.0 / width
    sq, m, a, b, q = (jnp.sum(s, axis=-1, keepdims=True) * inv for s in sums)  # one reduction each
    r = jax.lax.rsqrt(sq + eps)
    r3 = r * r * r
    cx = r3 * (a + b - 3.0 * r * r * m * q)
    for j in range(width // chunk):  # pass 2: the cotangents and the column sums
        cols, x, tx, g, k, nb, tnb = kept[j] if keep else load(j)
        dx = r * nb - cx * x - (r3 * m) * tnb - (r3 * q) * tx
        dtx = r * tnb - (r3 * q) * x
        if accumulate:
            dx, dtx = dx + ax_ref[:, cols].astype(_F32), dtx + atx_ref[:, cols].astype(_F32)
        dx_ref[:, cols] = dx.astype(dx_ref.dtype)
        dtx_ref[:, cols] = dtx.astype(dtx_ref.dtype)
        n = x * r
        tn = tx * r - x * (r3 * m)
        dsh_ref[cols] = jnp.sum(g, axis=0)
        dsc_ref[cols] = jnp.sum(g * n + k * tn, axis=0)
        dtsh_ref[cols] = jnp.sum(k, axis=0)
        dtsc_ref[cols] = jnp.sum(k * n, axis=0)


def _bwd_call(x, tx, g, k, scale, tscale, *acc, eps: float, interpret: bool, tiles):
    """(dx, dtx, and the per-program column sums (B, N / rows, C) of dshift, dscale, dtshift,
    dtscale); ``acc``: optional float32 (ax, atx) added to dx and dtx (and their buffers reused)."""
    bsz, n, c = x.shape
    rows, warps, keep = math.gcd(n, tiles[0]), tiles[1], bool(tiles[2])
    tokens = pl.BlockSpec((SQUEEZED, rows, c), lambda i, t: (i, t, 0))
    per_sample = pl.BlockSpec((SQUEEZED, c), lambda i, t: (i, 0))
    partial = pl.BlockSpec((SQUEEZED, SQUEEZED, c), lambda i, t: (i, t, 0))
    partial_shape = jax.ShapeDtypeStruct((bsz, n // rows, c), _F32)
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps, width=c, chunk=math.gcd(c, _CHUNK), keep=keep, accumulate=bool(acc)),
        grid=(bsz, n // rows),
        in_specs=[tokens] * 4 + [per_sample] * 2 + [tokens] * len(acc),
        input_output_aliases={6: 0, 7: 1} if acc else {},
        out_specs=[tokens, tokens] + [partial] * 4,
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(tx.shape, tx.dtype)]
        + [partial_shape] * 4,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="tvm_norm_modulate_tangent_bwd",
    )(x, tx, g, k, scale, tscale, *acc)


def _pair_out(x, tx, shift, tshift, scale, tscale, eps, out_dtype, passthrough):
    h, th = _xla_pair(x, tx, shift, tshift, scale, tscale, eps, out_dtype)
    return ((x, h), (tx, th)) if passthrough else (h, th)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _pair(x, tx, shift, tshift, scale, tscale, eps, out_dtype, interpret, tiles, passthrough):
    return _pair_out(x, tx, shift, tshift, scale, tscale, eps, out_dtype, passthrough)


def _pair_fwd(x, tx, shift, tshift, scale, tscale, eps, out_dtype, interpret, tiles, passthrough):
    out = _pair_out(x, tx, shift, tshift, scale, tscale, eps, out_dtype, passthrough)
    return out, (x, tx, scale, tscale)


def _pair_bwd(eps, out_dtype, interpret, tiles, passthrough, res, cts):
    x, tx, scale, tscale = res
    if passthrough:
        (ax, g), (atx, k) = cts
        acc = (ax.astype(x.dtype), atx.astype(tx.dtype))
    else:
        (g, k), acc = cts, ()
    g, k = g.astype(out_dtype), k.astype(out_dtype)

    def run(x, tx, g, k, scale, tscale, *acc):
        return _bwd_call(x, tx, g, k, scale, tscale, *acc, eps=eps, interpret=interpret, tiles=tiles)

    dx, dtx, *partials = batch_sharded(run, (x, tx, g, k, scale, tscale) + acc, 6)
    dshift, dscale, dtshift, dtscale = (jnp.sum(p, axis=1) for p in partials)
    return dx, dtx, dshift, dtshift, dscale, dtscale


_pair.defvjp(_pair_fwd, _pair_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5, 6, 7))
def _norm_modulate(x, shift, scale, eps, out_dtype, interpret, tiles, passthrough):
    h = reference(x, shift, scale, eps=eps, out_dtype=out_dtype)
    return (x, h) if passthrough else h


def _norm_modulate_jvp(eps, out_dtype, interpret, tiles, passthrough, primals, tangents):
    dense = tuple(jnp.zeros_like(p) if isinstance(t, SymbolicZero) else t for p, t in zip(primals, tangents))
    x, shift, scale = primals
    tx, tshift, tscale = dense
    return _pair(x, tx, shift, tshift, scale, tscale, eps, out_dtype, interpret, tiles, passthrough)


_norm_modulate.defjvp(_norm_modulate_jvp, symbolic_zeros=True)


def _resolve_tiles(tiles) -> tuple:
    """(rows, warps, keep): the memory-pass kernels' power-of-two check for the first two, and
    keep 0 or 1."""
    tiles = TILES if tiles is None else tuple(int(t) for t in tiles)
    if len(tiles) != 3 or tiles[2] not in (0, 1):
        raise ValueError(f"tiles must be (rows, warps, keep) with keep 0 or 1, got {tiles}")
    return _api._resolve_tiles(tiles[:2], TILES[:2], "(rows, warps)") + tiles[2:]


def kernel_applies(x, shift, scale, out_dtype) -> bool:
    """Whether the Pallas backward can take these inputs (float32 x, shift and scale, a bf16,
    f16 or f32 output, a width with a factor of 16 among its powers of two)."""
    return (x.ndim == 3 and x.size > 0 and all(a.dtype == _F32 for a in (x, shift, scale))
            and any(jnp.dtype(out_dtype) == d for d in _OUT_DTYPES) and math.gcd(x.shape[-1], _CHUNK) >= 16)


def norm_modulate_tangent(x, shift, scale, *, eps: float = 1e-6, out_dtype=None, impl: str = "auto",
                          interpret: bool | None = None, tiles=None, passthrough: bool = False):
    """:func:`reference` (shapes there; ``out_dtype`` defaults to x's dtype) for a call that
    ``jax.jvp`` differentiates and reverse mode then differentiates again: the TVM student's JVP
    call.

    impl: ``"pallas"`` (the Pallas backward of the JVP, see the module docstring), ``"xla"`` or
    ``"auto"`` (the kernel on a GPU where :func:`kernel_applies`, else XLA). On the Pallas path
    forward mode and the reverse mode of a forward-mode call work; plain reverse mode does not
    (use ``impl="xla"`` there). interpret: the Pallas interpreter (default: on the CPU). tiles:
    (rows, warps, keep) per program (default :data:`TILES`). passthrough: return ``(x, h)``, the
    same x, for the caller's residual add: on the Pallas path the backward then adds x's other
    cotangent to the norm's in the same pass (in place), instead of a separate add."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    x, shift, scale = (jnp.asarray(a) for a in (x, shift, scale))
    if x.ndim != 3:
        raise ValueError(f"x must be (batch, tokens, width), got shape {x.shape}")
    b, _, c = x.shape
    _api._check_per_sample(b, c, shift=shift, scale=scale)
    if not all(jnp.issubdtype(a.dtype, jnp.floating) for a in (x, shift, scale)):
        raise ValueError("x, shift and scale must be floating-point arrays")
    eps = _api._resolve_eps(eps)
    if not isinstance(passthrough, bool):
        raise ValueError(f"passthrough must be a bool, got {passthrough!r}")
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    applies = kernel_applies(x, shift, scale, out_dtype)
    if impl == "auto":
        impl = "pallas" if (_api._on_gpu() and applies) else "xla"
    if impl == "xla":
        h = reference(x, shift, scale, eps=eps, out_dtype=out_dtype)
        return (x, h) if passthrough else h
    if not applies:
        raise ValueError("impl='pallas' takes a non-empty float32 x (batch, tokens, width) with float32 shift and "
                         f"scale, a width with a power-of-two factor of at least 16 and a bf16/f16/f32 output; got "
                         f"x {x.dtype} {x.shape}, shift {shift.dtype}, scale {scale.dtype}, out_dtype {out_dtype}")
    tiles = _resolve_tiles(tiles)
    return _norm_modulate(x, shift, scale, eps, out_dtype, _api._resolve_interpret(interpret), tiles, passthrough)

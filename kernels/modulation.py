"""The block's second pre-norm, ``modulate(rms_norm(x + gate * (y + bias)), shift, scale)``, in
one Pallas pass.

After attention a DiT block adds the gated projection to the float32 residual stream, normalises
the sum (weightless RMS norm) and modulates it (adaLN shift and scale) for the MLP. XLA fuses
these into one normalisation fusion: 0.285 ms per block in the sampling profile at batch 256
(8 ms of a 122 ms call; ``bench/results/sampling_h200_gelu_kernel_profile.json``, ``fusion_43``),
0.258 ms timed alone. This kernel reads each row once (the residual x in float32, the
projection y without its bias), keeps the sum in registers and writes only the modulated
result, in the MLP's compute dtype: 0.233 ms alone with the swept tiles, one row per program
(``bench/results/residual_norm_modulate_h200.json``). Rows are read in chunks of a power of two
(Triton's tensors must be): 9 chunks of 128 at width 1,152.

The projection's bias add is rounded to y's dtype, as the Linear layer's output is (and as
PyTorch rounds it); under jit XLA may keep that sum in float32 (its excess-precision rule), so
the kernel and the jitted XLA path can differ by a bf16 rounding of the projection.

Derivatives as in :mod:`kernels.gelu`: the JVP rule is XLA's ``jax.jvp`` of :func:`reference`,
so only undifferentiated calls (sampling, the EMA teacher) run the kernel.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import api as _api
from kernels.sharding import batch_sharded
from kernels.flash import SQUEEZED
from kernels.reference import rms_norm

IMPLS = ("auto", "pallas", "xla")
_KERNEL_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# (rows, warps) per program; rows is the most per block (fewer when the token count has fewer
# factors of two). The fastest of bench/residual_norm_modulate.py's sweep on an H200
# (bench/results/residual_norm_modulate_h200.json), summed over batches 256 and 64 of 256 tokens.
TILES = (1, 1)
_CHUNK = 128  # columns per load (the largest power of two dividing the width, at most this)


def reference(x, y, bias, gate, shift, scale, *, eps: float, out_dtype):
    """x (B, N, C) the float32 residual stream; y (B, N, C) the projection without its bias
    (bias (C,) is added in y's dtype, as a Linear layer adds it); gate, shift, scale (B, C).
    Returns ``modulate(rms_norm(x + gate * (y + bias)), shift, scale)`` in ``out_dtype``, computed
    as the model computes it (float32, or float64 for float64 inputs)."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    r = (y + bias.astype(y.dtype)).astype(acc)
    x1 = x.astype(acc) + gate[:, None, :] * r
    n = rms_norm(x1, eps)
    return (n * (1.0 + scale[:, None, :]) + shift[:, None, :]).astype(out_dtype)


def _kernel(x_ref, y_ref, b_ref, g_ref, sh_ref, sc_ref, o_ref, *, eps, width, chunk):
    f32 = jnp.float32
    sums, parts = None, []
    for j in range(width // chunk):
        cols = pl.ds(j * chunk, chunk)
        y = y_ref[:, cols]
        r = (y.astype(f32) + b_ref[cols].astype(f32)[None, :]).astype(y.dtype).astype(f32)
        x1 = x_ref[:, cols].astype(f32) + g_ref[cols].astype(f32)[None, :] * r
        parts.append(x1)
        s = jnp.sum(x1 * x1, axis=-1, keepdims=True)
        sums = s if sums is None else sums + s
    inv = jax.lax.rsqrt(sums / width + eps)
    for j, x1 in enumerate(parts):
        cols = pl.ds(j * chunk, chunk)
        mod = x1 * inv * (1.0 + sc_ref[cols].astype(f32)[None, :]) + sh_ref[cols].astype(f32)[None, :]
        o_ref[:, cols] = mod.astype(o_ref.dtype)


def _call(x, y, bias, gate, shift, scale, eps, out_dtype, interpret, tiles):
    b, n, c = x.shape
    rows, warps = math.gcd(n, tiles[0]), tiles[1]
    tokens = pl.BlockSpec((SQUEEZED, rows, c), lambda i, t: (i, t, 0))
    per_batch = pl.BlockSpec((SQUEEZED, c), lambda i, t: (i, 0))
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps, width=c, chunk=math.gcd(c, _CHUNK)),
        grid=(b, n // rows),
        in_specs=[tokens, tokens, pl.BlockSpec((c,), lambda i, t: (0,)), per_batch, per_batch, per_batch],
        out_specs=tokens,
        out_shape=jax.ShapeDtypeStruct(x.shape, out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="tvm_residual_norm_modulate",
    )(x, y, bias, gate, shift, scale)


@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7, 8, 9))
def _fused(x, y, bias, gate, shift, scale, eps, out_dtype, interpret, tiles):
    def run(x, y, gate, shift, scale, bias):
        return _call(x, y, bias, gate, shift, scale, eps, out_dtype, interpret, tiles)

    return batch_sharded(run, (x, y, gate, shift, scale), 1, replicated=(bias,))


@_fused.defjvp
def _fused_jvp(eps, out_dtype, interpret, tiles, primals, tangents):
    return jax.jvp(functools.partial(reference, eps=eps, out_dtype=out_dtype), primals, tangents)


def residual_norm_modulate(x, y, bias, gate, shift, scale, *, eps: float = 1e-6, out_dtype=None,
                           impl: str = "auto", interpret: bool | None = None, tiles=None):
    """:func:`reference` (shapes there); ``out_dtype`` defaults to y's dtype.

    impl: ``"pallas"`` (the kernel), ``"xla"`` or ``"auto"`` (the kernel on a GPU when x is
    float32 and y is bf16, f16 or f32, else XLA). interpret: the Pallas interpreter (default: on
    the CPU). tiles: (rows, warps) per program, powers of two (default :data:`TILES`).
    Differentiable in all six inputs in every mode, through XLA."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    x, y, bias, gate, shift, scale = (jnp.asarray(a) for a in (x, y, bias, gate, shift, scale))
    if x.ndim != 3 or y.shape != x.shape:
        raise ValueError(f"x and y must have the same shape (batch, tokens, width), got {x.shape} and {y.shape}")
    b, _, c = x.shape
    if bias.shape != (c,):
        raise ValueError(f"bias must have shape ({c},), got {bias.shape}")
    _api._check_per_sample(b, c, gate=gate, shift=shift, scale=scale)
    if not all(jnp.issubdtype(a.dtype, jnp.floating) for a in (x, y, bias, gate, shift, scale)):
        raise ValueError("every input must be a floating-point array")
    eps = _api._resolve_eps(eps)
    out_dtype = jnp.dtype(y.dtype if out_dtype is None else out_dtype)
    kernel_ok = x.dtype == jnp.float32 and any(y.dtype == d for d in _KERNEL_DTYPES) and x.size > 0
    if impl == "auto":
        impl = "pallas" if (_api._on_gpu() and kernel_ok) else "xla"
    if impl == "xla":
        return reference(x, y, bias, gate, shift, scale, eps=eps, out_dtype=out_dtype)
    if not kernel_ok:
        raise ValueError(f"impl='pallas' takes a non-empty float32 x and a bf16/f16/f32 y, got {x.dtype}, {y.dtype}")
    interpret = _api._resolve_interpret(interpret)
    tiles = _api._resolve_tiles(tiles, TILES, "(rows, warps)")
    return _fused(x, y, bias.astype(y.dtype), gate.astype(jnp.float32), shift.astype(jnp.float32),
                  scale.astype(jnp.float32), eps, out_dtype, interpret, tiles)

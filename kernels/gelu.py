"""The MLP's first activation, ``gelu_tanh(y + bias)`` of a Linear layer's output, in one Pallas
pass.

``y`` is the fc1 matmul's output without its bias. XLA computes the bias add and the GELU as one
loop fusion; on an H200 it moves the (65,536 x 4,608) bf16 activation of a sampling batch of 256
at 2.6 TB/s (0.464 ms per block, 13 ms of a 125 ms sampling call). This kernel reads rows of
``y`` in 2-D blocks, adds the bias, applies :func:`kernels.reference.gelu_tanh` and writes the
result: 0.398 ms, 3.0 TB/s, with the swept tiles (``bench/results/bias_gelu_h200.json``). The
sampling call gained about 1 % (``bench/NOTES.md``). Moving the GELU into the matmul, the
bigger prize, is not on offer here: XLA's GEMM rewriter would fold a tanh GELU into cuBLASLt's
epilogue, but this XLA turns the bf16 tanh into a float32 one before the rewriter looks, and the
match fails.

Derivatives. The JVP rule (and through it the VJP, and the VJP of the JVP) is XLA's
``jax.jvp`` of the reference: a differentiated call computes exactly what it computed before
this kernel existed, and XLA fuses the activation with its tangent. Only an undifferentiated call
runs the kernel; in the model that means sampling and the EMA teacher inside the training step.
JAX calls the rule only when some input carries a tangent, so the teacher, whose inputs carry none
inside ``jax.grad``, runs the kernel.
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
from kernels.reference import gelu_tanh

IMPLS = ("auto", "pallas", "xla")
_KERNEL_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# (rows, columns, warps) per program: rows and columns are the most per block (fewer when the
# row count or the width has fewer factors of two). The fastest of bench/bias_gelu.py's sweep
# on an H200 (bench/results/bias_gelu_h200.json), summed over 65,536 and 8,192 rows of 4,608.
TILES = (2, 512, 1)


def reference(y, bias):
    """``gelu_tanh(y + bias)``, the bias added in y's dtype (rounded once, as a Linear layer adds
    it)."""
    return gelu_tanh(y + bias.astype(y.dtype))


def _kernel(y_ref, b_ref, o_ref):
    y = y_ref[...]
    h = (y.astype(jnp.float32) + b_ref[...].astype(jnp.float32)[None, :]).astype(y.dtype)
    o_ref[...] = gelu_tanh(h)


def _call(y2, bias, interpret: bool, tiles):
    m, f = y2.shape
    rows, cols, warps = math.gcd(m, tiles[0]), math.gcd(f, tiles[1]), tiles[2]
    return pl.pallas_call(
        _kernel,
        grid=(m // rows, f // cols),
        in_specs=[pl.BlockSpec((rows, cols), lambda i, j: (i, j)), pl.BlockSpec((cols,), lambda i, j: (j,))],
        out_specs=pl.BlockSpec((rows, cols), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct(y2.shape, y2.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="tvm_bias_gelu",
    )(y2, bias)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _bias_gelu(y, bias, interpret: bool, tiles):
    def run(y, bias):
        return _call(y.reshape(-1, y.shape[-1]), bias, interpret, tiles).reshape(y.shape)

    return batch_sharded(run, (y,), 1, replicated=(bias,))


@_bias_gelu.defjvp
def _bias_gelu_jvp(interpret, tiles, primals, tangents):
    return jax.jvp(reference, primals, tangents)


def bias_gelu(y, bias, *, impl: str = "auto", interpret: bool | None = None, tiles=None):
    """``gelu_tanh(y + bias)``: y (..., F), the batch first when y has more than one axis; bias
    (F,), cast to y's dtype.

    impl: ``"pallas"`` (the kernel), ``"xla"`` (:func:`reference`) or ``"auto"`` (the kernel on a
    GPU for bf16, f16 and f32 inputs, else XLA). interpret: run the kernel in the Pallas
    interpreter (default: on the CPU). tiles: (rows, columns, warps) per program, powers of two
    (default :data:`TILES`). Differentiable in both inputs in every mode, through XLA
    (see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    y, bias = jnp.asarray(y), jnp.asarray(bias)
    if y.ndim < 1 or bias.shape != y.shape[-1:]:
        raise ValueError(f"bias must have shape (F,) = {y.shape[-1:]} for y of shape {y.shape}, got {bias.shape}")
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise ValueError(f"y must be a floating-point array, got {y.dtype}")
    bias = bias.astype(y.dtype)
    if y.size == 0:
        return reference(y, bias)
    kernel_dtype = any(y.dtype == d for d in _KERNEL_DTYPES)
    if impl == "auto":
        impl = "pallas" if (_api._on_gpu() and kernel_dtype) else "xla"
    if impl == "xla":
        return reference(y, bias)
    if not kernel_dtype:
        raise ValueError(f"impl='pallas' takes bfloat16, float16 or float32 inputs, got {y.dtype}")
    interpret = _api._resolve_interpret(interpret)
    tiles = _api._resolve_tiles(tiles, TILES, "(rows, columns, warps)")
    if y.ndim == 1:
        return _bias_gelu(y[None], bias, interpret, tiles)[0]
    return _bias_gelu(y, bias, interpret, tiles)

"""cuDNN flash attention (``impl="cudnn"``): what it supports, and the call.

The call is ``jax.nn.dot_product_attention(..., implementation="cudnn")`` (no mask, no bias),
whose layout (batch, seq, heads, head_dim) is ours. It is a ``custom_vjp`` (forward and
backward are cuDNN fused kernels), so like the Pallas plain mode it supports ``grad``/``vjp``
but not ``jax.jvp``.

What JAX's cuDNN path takes (``jax/_src/cudnn/fused_attention_stablehlo.py``:
``check_layout`` / ``check_is_flash_attention``): a CUDA GPU, float16/bfloat16 inputs (fp8
needs scaling parameters we do not pass), head dim a multiple of 8 and at most 128 (256 on
compute capability >= 9.0); cuDNN's flash kernels need compute capability >= 8.0 (Ampere).
Sequence lengths must be even: its training-mode check rejects odd lengths "with a bias", and
on jax 0.11.2 that check saw ``has_bias=True`` for our calls, which pass no bias (seen on an
H200 on 2026-11-29: ``NotImplementedError: Unsupported sequence length Q 333, KV 333`` from
the vjp of (2, 333, 3, 80); ``bench/results/pytest_gpu_h200.log`` has the passing even-length
cases).
Whether a call will be differentiated is unknown when it is traced, so odd lengths are
refused for every call.
:func:`unsupported_reason` checks these up front, so ``impl="cudnn"`` fails with one clear
line and ``impl="auto"`` never picks cuDNN where it would fail.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MIN_COMPUTE_CAPABILITY = (8, 0)


def _compute_capability(device) -> Optional[tuple]:
    cc = getattr(device, "compute_capability", None)
    try:
        return tuple(int(x) for x in str(cc).split("."))
    except ValueError:
        return None


def _device_reason(device) -> Optional[str]:
    """Why cuDNN flash attention cannot run on ``device``; None if it can."""
    if device.platform != "gpu" or "cuda" not in getattr(device.client, "platform_version", "").lower():
        return f"needs a CUDA GPU, but the device is {device.platform} ({device.device_kind})"
    cc = _compute_capability(device)
    if cc is None or cc < MIN_COMPUTE_CAPABILITY:
        return f"needs compute capability >= 8.0, got {getattr(device, 'compute_capability', None)}"
    return None


def unsupported_reason(
    q_len: int, kv_len: int, head_dim: int, dtype, *, jvp: bool = False, device=None
) -> Optional[str]:
    """Why ``impl="cudnn"`` cannot take this call; None if it can."""
    if jvp:
        return "has no forward-mode (JVP) rule; jvp=True needs impl 'pallas', 'xla' or 'auto'"
    if jnp.dtype(dtype) not in DTYPES:
        return f"supports dtypes bfloat16 and float16 only, got {jnp.dtype(dtype).name}"
    if q_len % 2 or kv_len % 2:
        return f"needs even sequence lengths, got q {q_len}, kv {kv_len}"
    device = device if device is not None else jax.devices()[0]
    reason = _device_reason(device)
    if reason:
        return reason
    max_dim = 256 if _compute_capability(device) >= (9, 0) else 128
    if head_dim % 8 or head_dim > max_dim:
        return f"needs a head dim that is a multiple of 8 and <= {max_dim}, got {head_dim}"
    return None


def attention_cudnn(q, k, v, *, scale: float):
    """softmax(scale q k^T) v by cuDNN's fused kernels; (B, S, H, D) layout, checked inputs."""
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")

"""Attention kernels of tvm-jax (DESIGN section 6).

``attention(q, k, v, *, scale=None, impl="auto", jvp=False, interpret=None, block_sizes=None)``
is the general entry point (layout (batch, seq, heads, head_dim)); ``attention_qkv(qkv, q_norm_weight,
k_norm_weight, ...)`` takes the model's fused qkv projection and q/k RMS norms, which the plain
Pallas forward kernel applies as it loads q and k.
``flash_with_tangent`` exposes the fused forward+tangent kernel directly. The kernels' forward
outputs and row statistics carry the checkpoint name ``RESIDUALS_NAME``, so a remat policy can
keep them rather than re-run the forward kernels in the backward.
"""
from kernels.api import attention, attention_qkv, flash_with_tangent
from kernels.auto import choose_impl, load_table
from kernels.config import AttentionConfig, KernelConfig, default_config
from kernels.flash import RESIDUALS_NAME
from kernels.reference import attention_xla, qk_rms_norm, tangent_xla

__all__ = [
    "attention",
    "attention_qkv",
    "flash_with_tangent",
    "attention_xla",
    "tangent_xla",
    "qk_rms_norm",
    "AttentionConfig",
    "KernelConfig",
    "default_config",
    "choose_impl",
    "load_table",
    "RESIDUALS_NAME",
]

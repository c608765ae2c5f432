"""Attention kernels of tvm-jax (DESIGN section 6).

``attention(q, k, v, *, scale=None, impl="auto", jvp=False, interpret=None, block_sizes=None)``
is the general entry point (layout (batch, seq, heads, head_dim)); ``attention_qkv(qkv, q_norm_weight,
k_norm_weight, ...)`` takes the model's fused qkv projection, its bias and the q/k RMS norms, which
the plain forward kernel applies to each tile it loads. ``bias_gelu(y, bias)`` is the MLP's bias add
and tanh GELU in one Pallas pass; ``residual_norm_modulate`` the block's second pre-norm (gated
residual add, RMS norm, adaLN modulation) in one; ``norm_modulate_tangent`` a pre-norm and its
modulation in a JVP call, whose reverse mode is one Pallas pass.
``flash_with_tangent`` exposes the fused forward+tangent kernel directly. The kernels' forward
outputs and row statistics carry the checkpoint name ``RESIDUALS_NAME``, so a remat policy can
keep them rather than re-run the forward kernels in the backward.
"""
from kernels.api import attention, attention_qkv, flash_with_tangent
from kernels.auto import choose_impl, load_table
from kernels.gelu import bias_gelu
from kernels.modulation import residual_norm_modulate
from kernels.norm_tangent import norm_modulate_tangent
from kernels.config import AttentionConfig, KernelConfig, default_config
from kernels.flash import RESIDUALS_NAME
from kernels.reference import attention_xla, gelu_tanh, qk_rms_norm, tangent_xla

__all__ = [
    "attention",
    "attention_qkv",
    "flash_with_tangent",
    "attention_xla",
    "tangent_xla",
    "qk_rms_norm",
    "bias_gelu",
    "residual_norm_modulate",
    "norm_modulate_tangent",
    "gelu_tanh",
    "AttentionConfig",
    "KernelConfig",
    "default_config",
    "choose_impl",
    "load_table",
    "RESIDUALS_NAME",
]

"""XLA references of the kernels: attention (the ``impl="xla"`` path) in BSHD layout, the q/k
RMS norm of the qkv prologue and the MLP's tanh GELU.

Plain jnp: logits by einsum with fp32 accumulation (operands in the input dtype), softmax in
fp32, probabilities cast to the value dtype for the second einsum (fp32 accumulation), output
in the input dtype. Differentiable by JAX autodiff in every mode (grad, jvp, grad of jvp).
With float64 inputs (under x64) it is the float64 ground truth used by the tests.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def attention_xla(q, k, v, *, scale: float):
    """softmax(scale q k^T) v per batch and head. q: (B, Sq, H, D); k, v: (B, Sk, H, D)."""
    acc = jnp.promote_types(q.dtype, jnp.float32)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc)
    p = jax.nn.softmax(s * jnp.asarray(scale, acc), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=acc)
    return o.astype(q.dtype)


def tangent_xla(q, k, v, tq, tk, tv, *, scale: float):
    """(o, t_o) by JAX forward-mode autodiff of :func:`attention_xla`."""
    return jax.jvp(lambda a, b, c: attention_xla(a, b, c, scale=scale), (q, k, v), (tq, tk, tv))


def rms_norm(x, eps: float = 1e-6):
    """Weightless RMSNorm over the last axis, computed in (at least) float32: the model's
    pre-norms (``tvm_jax.dit``) and the second one's kernel reference
    (:func:`kernels.modulation.reference`)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


_GELU_2C = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_tanh(x):
    """tanh-approximate GELU, ``x * (1 + tanh(c (x + 0.044715 x^3))) / 2`` with ``c = sqrt(2/pi)``,
    as PyTorch's ``gelu(approximate="tanh")``; computed in (at least) float32 through the
    identity ``(1 + tanh(u)) / 2 = sigmoid(2u)``: one exponential instead of a tanh, and a
    derivative ``s (1 - s)`` that reuses the sigmoid. Returns x's dtype. The one definition: the
    model's MLP, :func:`kernels.bias_gelu`'s kernel and its derivative rule use it."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    x32 = x.astype(acc)
    u2 = x32 * (_GELU_2C + (_GELU_2C * 0.044715) * (x32 * x32))
    return (x32 * jax.nn.sigmoid(u2)).astype(x.dtype)


def qk_rms_norm(x, weight, *, eps: float, dim: int):
    """The model's learnable RMSNorm of q or k over the last axis: ``x * rsqrt(mean(x^2) + eps)
    * weight`` in (at least) float32, returned in x's dtype. ``dim`` is the true head dim (the
    mean's divisor), so zero-padded columns leave the result unchanged. Used by the XLA path,
    by the split kernel on each tile of rows, by that kernel's backward and by the model's
    ``RMSNorm`` module."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    x32 = x.astype(acc)
    mean_sq = jnp.sum(x32 * x32, axis=-1, keepdims=True) / dim
    return (x32 * jax.lax.rsqrt(mean_sq + eps) * weight.astype(acc)).astype(x.dtype)

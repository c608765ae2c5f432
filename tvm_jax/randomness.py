"""Per-example randomness: every random draw of a training example comes from its own key.

The training step derives one key per step, ``fold_in(base key, step)``, and gives example ``i``
of the *global* batch the key ``fold_in(step key, i)`` (:func:`example_keys`). The objectives
and samplers draw each example's times, noise, label dropout and guidance from its own key
(vmapped draws), so what an example sees depends only on the step and its index in the global
batch, never on how the batch is split into micro-batches or over how many devices: gradient
accumulation and a resume on another device count continue the same run.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def example_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
    """``fold_in(key, i)`` for every index in ``indices`` (any shape): a key array of that shape."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.ravel(indices)).reshape(jnp.shape(indices))


def per_example_keys(key: jax.Array, n: int) -> jax.Array:
    """``(n,)`` per-example keys from either one key (example ``i`` gets ``fold_in(key, i)``) or
    an ``(n,)`` array of per-example keys (returned as they are). Keys must be typed
    (``jax.random.key``), so a batch of keys and one key cannot be confused."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise TypeError(f"expected a typed key (jax.random.key), got an array of dtype {key.dtype}")
    if key.ndim == 0:
        return example_keys(key, jnp.arange(n))
    if key.shape != (n,):
        raise ValueError(f"expected one key or {n} per-example keys, got keys of shape {key.shape}")
    return key

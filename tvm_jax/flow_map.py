"""The flow map ``f(x_t, t, s) = x_t + (s - t) k F(x_t, t, t - s, label, beta)`` and its terminal
velocity ``df/ds``.

A *network function* here is any callable ``apply(params, x, t, gap, label, beta, jvp=False)``
returning an array shaped like ``x`` (``t, gap, beta``: (B,) float; ``label``: (B,) int). The DiT
provides one (:func:`tvm_jax.networks.network_fn`), and so can any other model, e.g. the MLP used
for the Gaussian-mixture benchmarks. ``jvp=True`` is passed when the call is differentiated with
``jax.jvp`` (the DiT uses it to select its forward-mode attention kernel).

``k = w = 1 / beta`` under the *scaled parameterisation*, ``k = 1`` otherwise.

Terminal velocity: ``df/ds = k (F + (s - t) dF/ds)``, where dF/ds is the JVP of F with tangents
``(x: 0, t: 0, s: 1)``, i.e. the tangent ``-1`` reaches F through its ``gap = t - s`` input.
Gradients flow through the JVP unless ``detach_jvp`` (then dF/ds is a constant for the gradient).
"""
from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp


class NetworkFn(Protocol):
    def __call__(self, params, x: jax.Array, t: jax.Array, gap: jax.Array, label: jax.Array,
                 beta: jax.Array, jvp: bool = False) -> jax.Array: ...


def per_sample(a: jax.Array, like: jax.Array) -> jax.Array:
    """Reshapes a (B,) array so it broadcasts against ``like`` (B, ...)."""
    return jnp.reshape(a, a.shape + (1,) * (like.ndim - a.ndim))


def output_scale(beta: jax.Array, scaled: bool) -> jax.Array:
    """``k``: ``1 / beta`` (= w) under the scaled parameterisation, else 1."""
    return 1.0 / beta if scaled else jnp.ones_like(beta)


def flow_map(apply: NetworkFn, params, x_t, t, s, label, beta, *, scaled: bool) -> jax.Array:
    """``f(x_t, t, s) = x_t + (s - t) k F(x_t, t, t - s, label, beta)``."""
    F = apply(params, x_t, t, t - s, label, beta)
    return x_t + per_sample((s - t) * output_scale(beta, scaled), x_t) * F


def terminal_velocity(apply: NetworkFn, params, x_t, t, s, label, beta, *, scaled: bool,
                      detach_jvp: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(f, df_ds, F)`` at ``(x_t, t, s)`` with one ``jax.jvp`` of the network."""

    def F_of_s(s_):
        return apply(params, x_t, t, t - s_, label, beta, jvp=True)

    F, dF_ds = jax.jvp(F_of_s, (s,), (jnp.ones_like(s),))
    if detach_jvp:
        dF_ds = jax.lax.stop_gradient(dF_ds)
    k = per_sample(output_scale(beta, scaled), x_t)
    ds = per_sample(s - t, x_t)
    f = x_t + ds * k * F
    df_ds = k * (F + ds * dF_ds)
    return f, df_ds, F


def scaled_velocity(apply: NetworkFn, params, x, t, label, beta, *, scaled: bool, jvp: bool = False) -> jax.Array:
    """``k F(x, t, 0, label, beta)``: the instantaneous velocity the flow map implies at ``s = t``."""
    return per_sample(output_scale(beta, scaled), x) * apply(params, x, t, jnp.zeros_like(t), label, beta, jvp=jvp)


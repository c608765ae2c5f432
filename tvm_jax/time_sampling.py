"""Training-time distributions for TVM: pairs ``s <= t`` and the flow-matching time ``s'``.

Convention: ``x_t = (1 - t) x0 + t eps``; t = 1 is noise, t = 0 is data; a step goes from t
down to s. ``logit-normal(m, sd)`` means ``sigmoid(N(m, sd^2))``.

Samplers (``name`` in :class:`TimeSamplerConfig`):

* ``"gap*"`` (the official one): ``gap = sigmoid(N(gap_mean, gap_std))``;
  ``s ~ logit-normal(s_mean, s_std)`` truncated to ``s <= 1 - gap`` by inverse CDF in logit
  space; ``t = min(s + gap, 1)``.
* ``"trunc"``: ``t ~ logit-normal(s_mean, s_std)``; ``s`` from the same logit-normal truncated
  to ``s <= t`` (inverse CDF). The gap distribution is implied, not chosen.
* ``"clamp"``: ``t`` and ``s`` drawn independently from ``logit-normal(s_mean, s_std)``, then
  ``s <- min(s, t)`` and ``t <- max(s, t)`` (the order statistics, as MeanFlow samples its pair).

For every sampler ``s' ~ logit-normal(s_mean, s_std)`` independently (the flow-matching term's
time), and with probability ``p_equal`` a sample gets ``t = s`` (its terminal term is zero).

Each sample draws from its own key (:mod:`tvm_jax.randomness`): :func:`sample_times` takes one
key (sample ``i`` uses ``fold_in(key, i)``) or a batch of per-sample keys.
The paper's names for the last two are "trunc" and "clamp"; DESIGN.md does not define them, so
the definitions above are ours.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri

from tvm_jax.randomness import per_example_keys

SAMPLERS = ("gap*", "trunc", "clamp")

# Keeps inverse-CDF draws strictly inside (0, 1) in float32.
_TINY = 1e-12


@dataclasses.dataclass(frozen=True)
class TimeSamplerConfig:
    name: str = "gap*"
    s_mean: float = -0.4
    s_std: float = 1.0
    gap_mean: float = -0.8
    gap_std: float = 1.0
    p_equal: float = 0.0

    def validate(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"objective.time_sampler: unknown sampler {self.name!r}; choose one of {SAMPLERS}")
        if not self.s_std > 0:
            raise ValueError(f"objective.s_std: must be positive, got {self.s_std}")
        if not self.gap_std > 0:
            raise ValueError(f"objective.gap_std: must be positive, got {self.gap_std}")
        if not 0.0 <= self.p_equal <= 1.0:
            raise ValueError(f"objective.p_equal: must be a probability in [0, 1], got {self.p_equal}")


class Times(NamedTuple):
    t: jax.Array  # (B,) start time
    s: jax.Array  # (B,) end time, s <= t
    s_fm: jax.Array  # (B,) flow-matching time s'


def _logit(p):
    return jnp.log(p) - jnp.log1p(-p)


def truncated_logit_normal(key, upper: jax.Array, mean: float, std: float) -> jax.Array:
    """Samples ``sigmoid(z)``, ``z ~ N(mean, std^2)`` conditioned on ``sigmoid(z) <= upper``.

    Inverse CDF: ``z = mean + std * Phi^-1(u * Phi((logit(upper) - mean) / std))``, u ~ U(0, 1).
    """
    upper = jnp.clip(upper, 0.0, 1.0)
    cdf_upper = ndtr((_logit(upper) - mean) / std)
    u = jax.random.uniform(key, upper.shape, jnp.float32) * cdf_upper
    z = mean + std * ndtri(jnp.clip(u, _TINY, 1.0 - _TINY))
    return jnp.minimum(jax.nn.sigmoid(z), upper)


def logit_normal(key, shape, mean: float, std: float) -> jax.Array:
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))


def sample_times(key: jax.Array, batch: int, config: TimeSamplerConfig) -> Times:
    """Draws ``(t, s, s')`` for ``batch`` samples; always ``0 <= s <= t <= 1``. ``key``: one key
    or ``(batch,)`` per-sample keys (see :func:`tvm_jax.randomness.per_example_keys`)."""
    if config.name not in SAMPLERS:
        raise ValueError(f"unknown time sampler {config.name!r}; choose one of {SAMPLERS}")
    return jax.vmap(lambda k: _sample_one(k, config))(per_example_keys(key, batch))


def _sample_one(key: jax.Array, config: TimeSamplerConfig) -> Times:
    """``(t, s, s')`` of one sample (scalars) from its own key."""
    k_gap, k_s, k_t, k_fm, k_eq = jax.random.split(key, 5)
    shape = ()
    if config.name == "gap*":
        gap = logit_normal(k_gap, shape, config.gap_mean, config.gap_std)
        s = truncated_logit_normal(k_s, 1.0 - gap, config.s_mean, config.s_std)
        t = jnp.minimum(s + gap, 1.0)
    elif config.name == "trunc":
        t = logit_normal(k_t, shape, config.s_mean, config.s_std)
        s = truncated_logit_normal(k_s, t, config.s_mean, config.s_std)
    else:  # "clamp"
        a = logit_normal(k_t, shape, config.s_mean, config.s_std)
        b = logit_normal(k_s, shape, config.s_mean, config.s_std)
        t, s = jnp.maximum(a, b), jnp.minimum(a, b)
    if config.p_equal > 0:
        t = jnp.where(jax.random.uniform(k_eq, shape) < config.p_equal, s, t)
    s_fm = logit_normal(k_fm, shape, config.s_mean, config.s_std)
    return Times(t=t, s=s, s_fm=s_fm)

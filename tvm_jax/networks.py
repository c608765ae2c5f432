"""Network functions: NNX models turned into pure ``F(params, x, t, gap, label, beta, jvp)``.

The objectives and samplers take a pure network function and explicit parameters (see
:mod:`tvm_jax.flow_map`). :func:`split_model` separates an NNX model into its static structure,
its trainable parameters (``nnx.Param``) and everything else (fixed buffers such as the DiT's
position table); :func:`network_fn` rebuilds the model inside the function from the first and
last, with the parameters passed explicitly.

Also here: :class:`FlowMLP`, a small residual MLP with the same ``F(x, t, gap, label, beta)``
signature for low-dimensional data (the Gaussian-mixture benchmarks).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tvm_jax.dit import DiT, DiTConfig, frequency_features


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict]:
    """``(graphdef, params, buffers)``; ``params`` holds every ``nnx.Param``. Both states are
    plain nested dicts of arrays (``nnx.to_pure_dict``), which optax, Orbax and the sharding
    rules handle as ordinary pytrees; ``nnx.merge`` accepts them as they are."""
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)


def network_fn(graphdef: nnx.GraphDef, buffers: nnx.State):
    """Pure ``apply(params, x, t, gap, label, beta, jvp=False)`` for a split NNX model."""

    def apply(params, x, t, gap, label, beta, jvp: bool = False):
        model = nnx.merge(graphdef, params, buffers)
        return model(x, t, gap, label, beta, jvp=jvp)

    return apply


def init_model(make: Callable[[nnx.Rngs], nnx.Module], seed: int = 0, out_shardings=None):
    """Builds ``make(rngs)`` inside ``jax.jit`` (fast, and shardable through ``out_shardings``, a
    pytree of shardings for ``(params, buffers)``); returns ``(graphdef, params, buffers)``."""
    graphdef, _, _ = split_model(nnx.eval_shape(lambda: make(nnx.Rngs(seed))))

    def init():
        _, params, buffers = split_model(make(nnx.Rngs(seed)))
        return params, buffers

    params, buffers = jax.jit(init, out_shardings=out_shardings)()
    return graphdef, params, buffers


def build_dit(config: DiTConfig, seed: int = 0) -> tuple[Any, dict]:
    """Initialises a DiT; returns ``(apply, params)``."""
    graphdef, params, buffers = init_model(lambda rngs: DiT(config, rngs=rngs), seed)
    return network_fn(graphdef, buffers), params


class FlowMLP(nnx.Module):
    """Residual MLP flow-map network for vectors: ``F(x, t, gap, label, beta)`` with x (B, d).

    Conditioning ``c = emb(t) + emb(gap) + emb(beta) + table[label]`` (frequency features and a
    linear layer each, label table with a null row), then ``depth`` residual blocks
    ``h += Linear(SiLU(Linear(RMS(h) * (1 + scale) + shift)))`` with scale/shift from ``c``.
    Output layer zero-initialised, like the DiT's.
    """

    def __init__(self, dim: int, num_classes: int, *, width: int = 256, depth: int = 4, rngs: nnx.Rngs):
        self.dim, self.num_classes = dim, num_classes
        self.inp = nnx.Linear(dim, width, rngs=rngs)
        self.t_emb = nnx.Linear(64, width, rngs=rngs)
        self.gap_emb = nnx.Linear(64, width, rngs=rngs)
        self.beta_emb = nnx.Linear(64, width, rngs=rngs)
        self.label_emb = nnx.Embed(num_classes + 1, width, rngs=rngs)
        self.mods = nnx.List([nnx.Linear(width, 2 * width, kernel_init=nnx.initializers.zeros, rngs=rngs)
                              for _ in range(depth)])
        self.fc1 = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
        self.fc2 = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
        self.out = nnx.Linear(width, dim, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x, t, gap, label, beta, *, jvp: bool = False):
        del jvp  # no attention: plain JAX autodiff in every mode
        b = x.shape[0]
        t, gap, beta = (jnp.broadcast_to(jnp.asarray(a, jnp.float32), (b,)) for a in (t, gap, beta))
        label = jnp.broadcast_to(jnp.asarray(label, jnp.int32), (b,))
        c = (self.t_emb(frequency_features(t, 64)) + self.gap_emb(frequency_features(gap, 64))
             + self.beta_emb(frequency_features(beta, 64)) + self.label_emb(label))
        c = nnx.silu(c)
        h = self.inp(x)
        for mod, fc1, fc2 in zip(self.mods, self.fc1, self.fc2):
            shift, scale = jnp.split(mod(c), 2, axis=-1)
            y = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)
            h = h + fc2(nnx.silu(fc1(y * (1 + scale) + shift)))
        return self.out(h)

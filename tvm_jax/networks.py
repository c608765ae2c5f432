"""Network functions: NNX models turned into pure ``F(params, x, t, gap, label, beta, jvp)``.

The objectives and samplers take a pure network function and explicit parameters (see
:mod:`tvm_jax.flow_map`). :func:`split_model` separates an NNX model into its static structure,
its trainable parameters (``nnx.Param``) and everything else (fixed buffers such as the DiT's
position table); :func:`network_fn` rebuilds the model inside the function from the first and
last, with the parameters passed explicitly.

Also here: :class:`FlowMLP`, a small residual MLP with the same ``F(x, t, gap, label, beta)``
signature for low-dimensional data (the Gaussian-mixture benchmarks), and :func:`build_network`,
which initialises the network an experiment config describes (DiT or MLP), optionally sharded.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tvm_jax import sharding as shd
from tvm_jax.config import dit_config
from tvm_jax.data import pipeline
from tvm_jax.dit import DiT, DiTConfig, frequency_features, unstack_layers


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict]:
    """``(graphdef, params, buffers)``; ``params`` holds every ``nnx.Param``. Both states are
    plain nested dicts of arrays (``nnx.to_pure_dict``), which optax, Orbax and the sharding
    rules handle as ordinary pytrees; ``nnx.merge`` accepts them as they are."""
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)


class LayeredParams(NamedTuple):
    """A DiT's parameters with its blocks also split per layer (``layer_loop="unroll"``).

    Made once inside the differentiated loss by :func:`layered_params`, so every call of the
    network in that loss (TVM's JVP call and its flow-matching call) reads the same per-layer
    pieces, and the backward joins each stacked gradient with one concatenate instead of one per
    call (bench/NOTES.md item 25). ``params["blocks"]`` stays for the model's structure; the
    forward reads ``layers`` instead."""

    params: Any
    layers: list


def layered_params(params, depth: int) -> LayeredParams:
    if not isinstance(params, dict) or "blocks" not in params:
        raise ValueError("layered_params: expected a DiT's parameters (a dict with 'blocks'), got "
                         f"{type(params).__name__}")
    return LayeredParams(params, unstack_layers(params["blocks"], depth))


def network_fn(graphdef: nnx.GraphDef, buffers: nnx.State):
    """Pure ``apply(params, x, t, gap, label, beta, jvp=False)`` for a split NNX model;
    ``params`` may be a :class:`LayeredParams` (DiT, ``layer_loop="unroll"``)."""

    def apply(params, x, t, gap, label, beta, jvp: bool = False):
        if isinstance(params, LayeredParams):
            model = nnx.merge(graphdef, params.params, buffers)
            return model(x, t, gap, label, beta, jvp=jvp, layers=params.layers)
        model = nnx.merge(graphdef, params, buffers)
        return model(x, t, gap, label, beta, jvp=jvp)

    return apply


def params_preparation(config) -> Callable | None:
    """What the training step applies to the parameters once, inside the differentiated loss,
    before the objective calls the network: the per-layer split of an unrolled DiT
    (:func:`layered_params`), or None (nothing to share)."""
    if config.model.type != "dit":
        return None
    cfg = dit_config(config)
    if cfg.layer_loop != "unroll":
        return None
    return functools.partial(layered_params, depth=cfg.depth)


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


# ----------------------------------------------------------------------------- experiment networks


@dataclasses.dataclass
class Network:
    """A built network: its pure function, initial parameters and the facts samplers need."""

    apply: Callable
    graphdef: Any
    params: Any
    buffers: Any
    null_label: int
    sample_shape: tuple[int, ...]
    prepare: Callable | None = None  # make_train_step's prepare_params (see params_preparation)


def make_module(config) -> Callable[[nnx.Rngs], nnx.Module]:
    if config.model.type == "dit":
        cfg = dit_config(config)
        return lambda rngs: DiT(cfg, rngs=rngs)
    shape = tuple(config.data.shape)
    return lambda rngs: FlowMLP(shape[0], config.data.num_classes, width=config.model.mlp_width,
                                depth=config.model.mlp_depth, rngs=rngs)


def abstract_params(config) -> dict:
    """The configured network's parameters as ``ShapeDtypeStruct``s (nothing is initialised)."""
    make = make_module(config)
    return split_model(nnx.eval_shape(lambda: make(nnx.Rngs(0))))[1]


def build_network(config, mesh=None, seed: int | None = None) -> Network:
    """Initialises the configured network (inside jit; sharded over ``mesh`` when given)."""
    make = make_module(config)
    seed = config.seed if seed is None else seed
    graphdef, params_shape, buffers_shape = split_model(nnx.eval_shape(lambda: make(nnx.Rngs(seed))))
    out_shardings = None
    if mesh is not None:
        out_shardings = (shd.state_shardings(params_shape, mesh), shd.state_shardings(buffers_shape, mesh))

    def init():
        _, params, buffers = split_model(make(nnx.Rngs(seed)))
        return params, buffers

    if out_shardings is not None and jax.default_backend() == "cpu" and mesh.devices.size > 1:
        # XLA:CPU can deadlock when several virtual devices run the batched SVD of the spectral
        # init at once (LAPACK's batch map waits on the thread pool the devices occupy), so on
        # CPU meshes initialise on one device of this process and place the result into its
        # shardings. (Under ``jax.set_mesh`` a bare jit would still run on every device of the
        # ambient mesh.) Every process computes the same values from the seed and fills its own
        # shards: a device_put from one device would be a cross-process transfer, which XLA:CPU
        # does not have.
        with jax.set_mesh(shd.make_mesh(1, jax.local_devices()[:1])):
            host = jax.device_get(jax.jit(init)())
        params, buffers = jax.tree.map(shd.from_host, host, out_shardings)
    else:
        params, buffers = jax.jit(init, out_shardings=out_shardings)()
    shape = pipeline.dataset_info(config).shape
    return Network(network_fn(graphdef, buffers), graphdef, params, buffers, config.data.num_classes, shape,
                   params_preparation(config))

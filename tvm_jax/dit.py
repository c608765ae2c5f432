"""The Lipschitz DiT of Terminal Velocity Matching, as Flax NNX modules.

The network is ``F(x, t, gap, label, beta)``: images/latents ``x`` in NHWC, the current time
``t``, the step length ``gap = t - s``, an integer class ``label`` (``num_classes`` is the null
label) and the guidance input ``beta = 1 / w``. It matches the official PyTorch model parameter
for parameter (see ``tvm_jax.weights.official`` for the name mapping):

* patch embedding: 2x2 stride-2 conv with bias, plus a fixed 2-D sin-cos table (first half of the
  channels encodes the column index, second half the row index, each half ``[sin, cos]``);
* three scalar embedders (t, gap, beta): 256 frequency features ``[cos(x f_i), sin(x f_i)]``,
  ``f_i = exp(-ln(10000) i / 128)``, x used raw, then Linear, SiLU, Linear;
* a label table with ``num_classes + 1`` rows; ``c = e_t + e_gap + e_beta + table[label]``;
* blocks with adaLN modulation ``Linear(SiLU(c)) -> 6H``; under *mod-norm* each of the 6 chunks is
  RMS-normalised (no weight, eps 1e-6); pre-norms are weightless RMSNorm (eps 1e-6);
* attention with a qkv Linear (bias), learnable RMSNorm (eps 1e-6) on q and k over the head dim,
  softmax scale ``head_dim**-0.5``, proj Linear; MLP H -> 4H -> H with tanh-GELU;
* final layer: mod-normed shift/scale, weightless RMSNorm, Linear(H, p*p*C), unpatchify.

The "Lipschitz" changes of the paper are switches (``mod_norm``, ``qk_norm``, ``norm``,
``init``); ``lipschitz=False`` in :func:`DiTConfig.create` turns all of them off, giving the naive
DiT (LayerNorm pre-norms, no mod-norm, no QK-norm, xavier-uniform init).

Design choices (not fixed by the official code):

* Blocks are stored *stacked* (every block parameter has a leading ``depth`` axis) and run with
  ``jax.lax.scan`` (``layer_loop="scan"``); this keeps compile times short for XL models and makes
  rematerialisation one switch (``remat``). ``layer_loop="unroll"`` traces one copy of the block
  per layer instead (same parameters, same numbers): compiles take about five times longer, but
  activations saved for the backward are separate buffers rather than copies into per-layer
  stacks, which makes ``remat="none"`` the fastest training step where memory allows (the 256px
  recipes use it; ``bench/NOTES.md``). Each stacked parameter is split once, so the backward
  assembles its gradient with one concatenate; the training step splits once for both student
  calls of the objective (``layers``, :class:`tvm_jax.networks.LayeredParams`).
* Under ``remat``, ``save_attention`` (default on) also keeps the Pallas attention kernels'
  outputs and row statistics (``kernels.RESIDUALS_NAME``), so the backward does not re-run the
  forward kernels.
* Parameters are float32; matmuls run in ``dtype`` (bfloat16 by default) with float32 residual
  stream, norms and conditioning sums; the output is float32. ``dtype="float64"`` (with
  ``jax_enable_x64`` and float64 parameters) runs everything in float64, for derivative checks.
* The fixed position table is an :class:`Buffer` (not an ``nnx.Param``), so optimisers and
  parameter counts skip it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels import RESIDUALS_NAME
from kernels import attention_qkv, bias_gelu, norm_modulate_tangent, qk_rms_norm, residual_norm_modulate
from kernels.reference import rms_norm  # the model's weightless pre-norm (one definition)

# name -> (hidden_size, depth, num_heads); patch size 2 for all of them.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "S/2": (384, 12, 6),
    "B/2": (768, 12, 12),
    "L/2": (1024, 24, 16),
    "XL/2": (1152, 28, 16),
    "XL/2-18h": (1152, 28, 18),
}

_NORMS = ("rms", "layer")
_INITS = ("spectral", "xavier_uniform")
_REMAT = ("none", "block", "dots")
_LAYER_LOOPS = ("scan", "unroll")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}
_ATTN_IMPLS = ("xla", "pallas", "auto")


class Buffer(nnx.Variable):
    """A fixed, non-trainable array stored with the model (the position table)."""


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Everything that defines a DiT. Build one with :meth:`create` (validates the fields)."""

    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 18
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    mod_norm: bool = True
    qk_norm: bool = True
    norm: str = "rms"
    init: str = "spectral"
    time_specinit: bool = False
    learn_guidance: bool = True
    dtype: str = "bfloat16"
    attention_impl: str = "xla"
    remat: str = "none"
    save_attention: bool = True
    layer_loop: str = "scan"

    @classmethod
    def create(cls, size: str | None = "XL/2-18h", *, lipschitz: bool = True, **overrides: Any) -> "DiTConfig":
        """Config for a named size (``MODEL_SIZES``) or ``size=None``/``"custom"`` with explicit
        ``hidden_size``/``depth``/``num_heads``. ``lipschitz=False`` gives the naive DiT."""
        fields: dict[str, Any] = {}
        if size not in (None, "custom"):
            if size not in MODEL_SIZES:
                raise ValueError(f"model.size: unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)} or 'custom'")
            fields.update(zip(("hidden_size", "depth", "num_heads"), MODEL_SIZES[size]))
        if not lipschitz:
            fields.update(mod_norm=False, qk_norm=False, norm="layer", init="xavier_uniform")
        fields.update(overrides)
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"model: unknown field(s) {sorted(unknown)}")
        config = cls(**fields)
        config.validate()
        return config

    def validate(self) -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"model.{field}: {msg}")

        for name in ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "num_classes"):
            value = getattr(self, name)
            need(isinstance(value, (int, np.integer)) and value > 0, name, f"must be a positive integer, got {value!r}")
        need(self.input_size % self.patch_size == 0, "input_size",
             f"{self.input_size} is not divisible by patch_size {self.patch_size} (the patch grid would not be whole)")
        need(self.hidden_size % self.num_heads == 0, "num_heads",
             f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        need(self.hidden_size % 4 == 0, "hidden_size", f"{self.hidden_size} must be divisible by 4 (2-D sin-cos table)")
        need(self.mlp_ratio > 0, "mlp_ratio", f"must be positive, got {self.mlp_ratio}")
        need(self.norm in _NORMS, "norm", f"unknown norm {self.norm!r}; choose one of {_NORMS}")
        need(self.init in _INITS, "init", f"unknown init {self.init!r}; choose one of {_INITS}")
        need(self.remat in _REMAT, "remat", f"unknown remat policy {self.remat!r}; choose one of {_REMAT}")
        need(self.layer_loop in _LAYER_LOOPS, "layer_loop",
             f"unknown layer loop {self.layer_loop!r}; choose one of {_LAYER_LOOPS}")
        need(isinstance(self.save_attention, (bool, np.bool_)), "save_attention",
             f"must be a bool, got {self.save_attention!r}")
        need(self.dtype in _DTYPES, "dtype", f"unknown dtype {self.dtype!r}; choose one of {sorted(_DTYPES)}")
        need(self.attention_impl in _ATTN_IMPLS, "attention_impl",
             f"unknown attention implementation {self.attention_impl!r}; choose one of {_ATTN_IMPLS}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]


# ----------------------------------------------------------------------------- initialisers


def spectral_normal(key, shape, dtype=jnp.float32):
    """Xavier-normal over the matrix view ``(prod(shape[:-1]), shape[-1])``, then divided by the
    largest singular value, so the (unstacked) matrix has spectral norm 1."""
    fan_in, fan_out = int(np.prod(shape[:-1])), int(shape[-1])
    std = math.sqrt(2.0 / (fan_in + fan_out))
    w = std * jax.random.normal(key, (fan_in, fan_out), jnp.float32)
    w = w / jnp.linalg.svd(w, compute_uv=False)[0]
    return w.reshape(shape).astype(dtype)


def xavier_uniform(key, shape, dtype=jnp.float32):
    """Xavier-uniform over the same matrix view as :func:`spectral_normal`."""
    fan_in, fan_out = int(np.prod(shape[:-1])), int(shape[-1])
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, jnp.float32, -limit, limit).astype(dtype)


def _matrix_init(config: DiTConfig):
    return spectral_normal if config.init == "spectral" else xavier_uniform


_zeros = nnx.initializers.zeros
_normal002 = nnx.initializers.normal(0.02)


def _linear(config: DiTConfig, d_in: int, d_out: int, rngs: nnx.Rngs, kernel_init=None) -> nnx.Linear:
    return nnx.Linear(
        d_in, d_out, use_bias=True,
        kernel_init=kernel_init or _matrix_init(config), bias_init=_zeros,
        dtype=config.compute_dtype, param_dtype=jnp.float32, rngs=rngs,
    )


def _matmul_and_bias(linear: nnx.Linear, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``linear(x)`` as (x @ kernel, bias) without adding them: the same dtype promotion and
    dot as ``nnx.Linear.__call__``, for a consumer that adds the bias itself."""
    inputs, kernel, bias = linear.promote_dtype((x, linear.kernel[...], linear.bias[...]), dtype=linear.dtype)
    y = linear.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=linear.precision)
    return y, bias


# ----------------------------------------------------------------------------- fixed tables


def sincos_table_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """``[sin(p w_i), cos(p w_i)]`` with ``w_i = 10000**(-i / (dim/2))``, i < dim/2 (float64)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_table_2d(dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, dim) table; tokens in row-major order; first half of the channels encodes
    the column index, second half the row index."""
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    return np.concatenate([sincos_table_1d(dim // 2, cols), sincos_table_1d(dim // 2, rows)], axis=1)


def frequency_features(x: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """``[cos(x f_i), sin(x f_i)]``, ``f_i = exp(-ln(max_period) i / (dim/2))``; x used raw."""
    half = dim // 2
    x = _acc(x)
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=x.dtype) / half)
    args = x[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ----------------------------------------------------------------------------- norms


def _acc(x: jax.Array) -> jax.Array:
    """``x`` in at least float32 (float64 stays float64): the dtype of norms and residuals."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Weightless LayerNorm over the last axis (the naive DiT's pre-norm), (at least) float32."""
    x = _acc(x)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class RMSNorm(nnx.Module):
    """RMSNorm with a learnable per-channel ``weight`` (init 1), as ``torch.nn.RMSNorm``. The model
    applies q's and k's through ``kernels.attention_qkv``; calling the module computes the same
    function (``kernels.qk_rms_norm``, the one definition of it)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return qk_rms_norm(x, self.weight[...], eps=self.eps, dim=x.shape[-1])


def _modulation(out: jax.Array, chunks: int, mod_norm: bool) -> list[jax.Array]:
    """Split adaLN output (B, chunks*H) into ``chunks`` (B, H) arrays, RMS-normalising each.

    The result is tiny (B, chunks, H) but every token reads it; the optimisation barrier makes
    XLA compute it once, instead of copying the mod-norm reduction into each token-wise fusion
    that consumes it (where every tile of tokens would redo it)."""
    out = _acc(out).reshape(out.shape[0], chunks, -1)
    if mod_norm:
        out = rms_norm(out)
    out = jax.lax.optimization_barrier(out)
    return [out[:, i] for i in range(chunks)]


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


# ----------------------------------------------------------------------------- modules


class ScalarEmbedder(nnx.Module):
    """256 frequency features -> Linear(256, H) -> SiLU -> Linear(H, H)."""

    def __init__(self, config: DiTConfig, rngs: nnx.Rngs, frequency_dim: int = 256):
        init = _matrix_init(config) if (config.time_specinit and config.init == "spectral") else _normal002
        self.frequency_dim = frequency_dim
        self.linear1 = _linear(config, frequency_dim, config.hidden_size, rngs, kernel_init=init)
        self.linear2 = _linear(config, config.hidden_size, config.hidden_size, rngs, kernel_init=init)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.linear1(frequency_features(x, self.frequency_dim))
        return _acc(self.linear2(nnx.silu(h)))


class PatchEmbed(nnx.Module):
    """2x2 (patch_size) stride-patch conv with bias, NHWC -> (B, tokens, H), row-major tokens."""

    def __init__(self, config: DiTConfig, rngs: nnx.Rngs):
        p = config.patch_size
        self.proj = nnx.Conv(
            config.in_channels, config.hidden_size, kernel_size=(p, p), strides=(p, p), padding="VALID",
            kernel_init=_matrix_init(config), bias_init=_zeros,
            dtype=config.compute_dtype, param_dtype=jnp.float32, rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.proj(x)
        return y.reshape(y.shape[0], -1, y.shape[-1])


class Attention(nnx.Module):
    def __init__(self, config: DiTConfig, rngs: nnx.Rngs):
        h = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.impl = config.attention_impl
        self.qkv = _linear(config, h, 3 * h, rngs)
        self.q_norm = RMSNorm(config.head_dim) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim) if config.qk_norm else None
        self.proj = _linear(config, h, h, rngs)

    def __call__(self, x: jax.Array, *, jvp: bool = False) -> jax.Array:
        return self.proj(self.attend(x, jvp=jvp))

    def attend(self, x: jax.Array, *, jvp: bool = False) -> jax.Array:
        """The attention output before the proj Linear, (B, N, H)."""
        b, n, _ = x.shape
        # The qkv Linear's bias and the q/k RMS norms (learnable weights, eps as the RMSNorm
        # modules) are applied by the attention op: on the plain Pallas path the forward kernel adds
        # the bias and normalises q and k on each tile it reads from qkv, instead of XLA passes.
        qkv, bias = _matmul_and_bias(self.qkv, x)
        qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim)
        norms = (None, None) if self.q_norm is None else (self.q_norm.weight[...], self.k_norm.weight[...])
        eps = 1e-6 if self.q_norm is None else self.q_norm.eps
        o = attention_qkv(qkv, *norms, bias=bias, eps=eps, scale=self.head_dim ** -0.5, impl=self.impl, jvp=jvp)
        return o.reshape(b, n, -1)


class MLP(nnx.Module):
    def __init__(self, config: DiTConfig, rngs: nnx.Rngs):
        hidden = int(config.hidden_size * config.mlp_ratio)
        self.fc1 = _linear(config, config.hidden_size, hidden, rngs)
        self.fc2 = _linear(config, hidden, config.hidden_size, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # fc1's bias and the tanh GELU run as one Pallas pass on a GPU (kernels.bias_gelu; XLA's
        # fusion of the two ran at half the memory rate); differentiated calls stay with XLA.
        y, bias = _matmul_and_bias(self.fc1, x)
        return self.fc2(bias_gelu(y, bias))


class DiTBlock(nnx.Module):
    def __init__(self, config: DiTConfig, rngs: nnx.Rngs):
        self.attn = Attention(config, rngs)
        self.mlp = MLP(config, rngs)
        self.adaLN = _linear(config, config.hidden_size, 6 * config.hidden_size, rngs, kernel_init=_zeros)
        self.mod_norm = config.mod_norm
        self.norm = rms_norm if config.norm == "rms" else layer_norm

    def __call__(self, x: jax.Array, c: jax.Array, *, jvp: bool = False) -> jax.Array:
        shift1, scale1, gate1, shift2, scale2, gate2 = _modulation(self.adaLN(nnx.silu(c)), 6, self.mod_norm)
        if self.norm is not rms_norm:
            h = _modulate(self.norm(x), shift1, scale1)
            x = x + gate1[:, None, :] * _acc(self.attn(h, jvp=jvp))
            return x + gate2[:, None, :] * _acc(self.mlp(_modulate(self.norm(x), shift2, scale2)))
        if jvp:
            # The JVP call: both pre-norms and their modulation through kernels.norm_modulate_tangent
            # (XLA's forward; the reverse mode of the pair is one Pallas pass on a GPU). An XLA
            # attention model stays XLA throughout (the reference of the GPU step check).
            # x passes through the op, so its backward also adds the residual's cotangent, in place.
            kw = dict(eps=1e-6, impl="xla" if self.attn.impl == "xla" else "auto", passthrough=True)
            x, h = norm_modulate_tangent(x, shift1, scale1, out_dtype=self.attn.qkv.dtype, **kw)
            x = x + gate1[:, None, :] * _acc(self.attn(h, jvp=True))
            x, h = norm_modulate_tangent(x, shift2, scale2, out_dtype=self.mlp.fc1.dtype, **kw)
            return x + gate2[:, None, :] * _acc(self.mlp(h))
        # Undifferentiated and plain reverse-mode calls: the gated residual add, the second norm and
        # its modulation run as one Pallas pass on a GPU (kernels.residual_norm_modulate, the same
        # function as the layer-norm path's lines above; differentiated calls stay with XLA). The
        # residual itself is added as before.
        h = _modulate(self.norm(x), shift1, scale1)
        y, bias = _matmul_and_bias(self.attn.proj, self.attn.attend(h))
        h = residual_norm_modulate(x, y, bias, gate1, shift2, scale2, eps=1e-6, out_dtype=self.mlp.fc1.dtype)
        x = x + gate1[:, None, :] * _acc(y + bias)
        return x + gate2[:, None, :] * _acc(self.mlp(h))


class FinalLayer(nnx.Module):
    def __init__(self, config: DiTConfig, rngs: nnx.Rngs):
        p, h = config.patch_size, config.hidden_size
        self.adaLN = _linear(config, h, 2 * h, rngs, kernel_init=_zeros)
        self.linear = _linear(config, h, p * p * config.in_channels, rngs, kernel_init=_zeros)
        self.mod_norm = config.mod_norm
        self.norm = rms_norm if config.norm == "rms" else layer_norm

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = _modulation(self.adaLN(nnx.silu(c)), 2, self.mod_norm)
        return self.linear(_modulate(self.norm(x), shift, scale))


def remat_policy(remat: str, save_attention: bool):
    """The ``jax.checkpoint`` policy of a block: ``"block"`` recomputes everything inside it,
    ``"dots"`` saves the matmul outputs; ``save_attention`` adds the attention kernels' outputs
    and row statistics (otherwise the backward re-runs the forward attention kernels)."""
    cp = jax.checkpoint_policies
    base = {"block": None, "dots": cp.dots_with_no_batch_dims_saveable}[remat]
    if not save_attention:
        return base
    attention = cp.save_only_these_names(RESIDUALS_NAME)
    return attention if base is None else cp.save_from_both_policies(base, attention)


class DiT(nnx.Module):
    """``F(x, t, gap, label, beta)``: see the module docstring."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        h = config.hidden_size
        self.x_embedder = PatchEmbed(config, rngs)
        grid = config.input_size // config.patch_size
        self.pos_embed = Buffer(jnp.asarray(sincos_table_2d(h, grid), jnp.float32))
        self.t_embedder = ScalarEmbedder(config, rngs)
        self.gap_embedder = ScalarEmbedder(config, rngs)
        self.beta_embedder = ScalarEmbedder(config, rngs) if config.learn_guidance else None
        self.label_embedder = nnx.Embed(config.num_classes + 1, h, embedding_init=_normal002,
                                        param_dtype=jnp.float32, rngs=rngs)

        @nnx.split_rngs(splits=config.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> DiTBlock:
            return DiTBlock(config, rngs)

        self.blocks = make_blocks(rngs)
        self.final_layer = FinalLayer(config, rngs)

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def conditioning(self, t, gap, label, beta) -> jax.Array:
        c = self.t_embedder(t) + self.gap_embedder(gap) + _acc(self.label_embedder(label))
        if self.beta_embedder is not None:
            c = c + self.beta_embedder(beta)
        return c

    def __call__(self, x: jax.Array, t, gap, label, beta, *, jvp: bool = False,
                 layers: list | None = None) -> jax.Array:
        """x: (B, H, W, C); t, gap, beta: scalars or (B,); label: int scalar or (B,).

        ``jvp=True`` selects the attention kernel that supports ``jax.jvp`` (and reverse-mode
        through it); set it when this call is differentiated in forward mode. ``layers``
        (``layer_loop="unroll"`` only): the blocks' parameters already split per layer by
        :func:`unstack_layers`, used instead of ``self.blocks``; calls that share one split
        share its transpose, one concatenate per stacked gradient.
        """
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.input_size, cfg.input_size, cfg.in_channels):
            raise ValueError(f"DiT input must be (B, {cfg.input_size}, {cfg.input_size}, {cfg.in_channels}), got {x.shape}")
        b = x.shape[0]
        acc = jnp.promote_types(cfg.compute_dtype, jnp.float32)
        t, gap, beta = (jnp.broadcast_to(jnp.asarray(a, acc), (b,)) for a in (t, gap, beta))
        label = jnp.broadcast_to(jnp.asarray(label, jnp.int32), (b,))
        c = self.conditioning(t, gap, label, beta)

        tokens = _acc(self.x_embedder(x)) + self.pos_embed[...][None]

        graphdef, block_state = nnx.split(self.blocks)

        def body(carry, state):
            return nnx.merge(graphdef, state)(carry, c, jvp=jvp), None

        if cfg.remat != "none":
            # Inside a scan, CSE cannot merge the recomputation with the forward. Unrolled it can, and
            # on an H200 XLA then merged all of it: the memory of no remat (bench/NOTES.md). So the
            # unrolled loop keeps the barriers: remat means remat; layer_loop="unroll" with
            # remat="none" is the fast setting where memory allows.
            body = jax.checkpoint(body, policy=remat_policy(cfg.remat, cfg.save_attention),
                                  prevent_cse=cfg.layer_loop != "scan")
        if layers is not None and (cfg.layer_loop != "unroll" or len(layers) != cfg.depth):
            raise ValueError(f"layers: {len(layers)} per-layer states given to a model with layer_loop="
                             f"{cfg.layer_loop!r} and depth {cfg.depth}; they need layer_loop='unroll' "
                             "and one state per block")
        if cfg.layer_loop == "scan":
            tokens, _ = jax.lax.scan(body, tokens, block_state)
        else:  # one copy of the block per layer: no stacked buffers for saved activations
            for layer in unstack_layers(block_state, cfg.depth) if layers is None else layers:
                tokens, _ = body(tokens, layer)

        out = _acc(self.final_layer(tokens, c))
        return unpatchify(out, cfg.patch_size, cfg.in_channels)


def unstack_layers(block_state, depth: int) -> list:
    """The stacked block parameters (leading ``depth`` axis) as ``depth`` per-layer trees.

    One split per stacked parameter: its transpose is one concatenate of the per-layer gradients
    (indexing layer by layer would pad each one to the stack and add them up). The barrier (a
    no-op forward) transposes to a barrier on that concatenate, so the backward writes each
    stacked gradient once; without it XLA fused the 28-operand concatenate into the optimiser and
    EMA updates (bench/NOTES.md item 24)."""
    leaves, treedef = jax.tree.flatten(block_state)
    for a in leaves:
        if a.ndim == 0 or a.shape[0] != depth:
            raise ValueError(f"unstack_layers: a block parameter of shape {a.shape} has no leading axis of "
                             f"the depth {depth}")
    pieces = [jnp.split(jax.lax.optimization_barrier(a), depth) for a in leaves]
    return [treedef.unflatten([p[i].reshape(p[i].shape[1:]) for p in pieces]) for i in range(depth)]


def unpatchify(tokens: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """(B, h*w, p*p*C) -> (B, h*p, w*p, C); inside a patch the order is (row, column, channel)."""
    b, n, _ = tokens.shape
    g = int(round(math.sqrt(n)))
    x = tokens.reshape(b, g, g, patch_size, patch_size, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * patch_size, g * patch_size, channels)


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (``nnx.Param`` leaves), works on abstract models too."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def dit_buffers(config: DiTConfig) -> dict:
    """The DiT's fixed (non-trainable) arrays, as ``split_model`` returns them, without building
    the model."""
    grid = config.input_size // config.patch_size
    return {"pos_embed": jnp.asarray(sincos_table_2d(config.hidden_size, grid), jnp.float32)}


def abstract_dit(config: DiTConfig) -> DiT:
    """The model's structure and shapes without allocating or initialising anything."""
    return nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0)))

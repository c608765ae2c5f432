"""Stable Diffusion VAE (diffusers ``AutoencoderKL``) in Flax NNX.

The module tree mirrors diffusers' ``AutoencoderKL`` (``Encoder``/``Decoder`` built from
``DownEncoderBlock2D``/``UpDecoderBlock2D``, ``UNetMidBlock2D`` with one single-head
self-attention, ``ResnetBlock2D``, ``Downsample2D``/``Upsample2D``) with attribute names
chosen so that the diffusers state-dict keys map one to one onto module paths. Activations
are NHWC; convolution kernels are HWIO, linear kernels (in, out).

Only the KL autoencoder used by Stable Diffusion is supported (``DownEncoderBlock2D`` /
``UpDecoderBlock2D`` blocks, SiLU activations, group norm). ``scaling_factor`` and the other
latent-normalisation fields of the diffusers config are read but not applied: the project
normalises latents itself.

Typical use::

    vae = load_vae("/path/to/sd-vae-ft-ema")          # diffusers-format folder
    mean, std = vae.encode(images)                      # images: (B, H, W, 3) in [-1, 1]
    recon = vae.decode(mean)                            # (B, H, W, 3), roughly [-1, 1]
    mean, std = encode_batched(vae, many_images, batch_size=64)   # numpy in, numpy out
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tvm_jax.weights import hub
from tvm_jax.weights.nnx_variables import (assign_arrays, check_keys, flat_variables, get_variable,
                                           raise_shape_dtype_errors, shape_dtype_error)

__all__ = [
    "VAEConfig",
    "AutoencoderKL",
    "load_vae",
    "load_diffusers_state_dict",
    "convert_diffusers_state_dict",
    "export_diffusers_state_dict",
    "encode_batched",
    "decode_batched",
    "to_uint8",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# Fixed by diffusers' Encoder/Decoder for every AutoencoderKL.
_RESNET_EPS = 1e-6
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The architecture-relevant subset of a diffusers ``AutoencoderKL`` config."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # Read for reference only; never applied by this module.
    sample_size: int = 256
    scaling_factor: float = 0.18215

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """Builds a config from a diffusers ``config.json`` dict, validating what we support."""
        if not isinstance(config, Mapping):
            raise TypeError(f"VAE config must be a mapping, got {type(config).__name__}")
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(f"VAE config: _class_name is {class_name!r}; only 'AutoencoderKL' is supported")
        block_out = config.get("block_out_channels", cls.block_out_channels)
        if not isinstance(block_out, (list, tuple)) or not block_out:
            raise ValueError(f"VAE config: block_out_channels must be a non-empty list, got {block_out!r}")
        block_out = tuple(int(c) for c in block_out)
        n = len(block_out)
        down = tuple(config.get("down_block_types", ("DownEncoderBlock2D",) * n))
        up = tuple(config.get("up_block_types", ("UpDecoderBlock2D",) * n))
        if len(down) != n or any(t != "DownEncoderBlock2D" for t in down):
            raise ValueError(
                f"VAE config: down_block_types must be {n} x 'DownEncoderBlock2D' (one per block_out_channels "
                f"entry), got {list(down)}"
            )
        if len(up) != n or any(t != "UpDecoderBlock2D" for t in up):
            raise ValueError(
                f"VAE config: up_block_types must be {n} x 'UpDecoderBlock2D', got {list(up)}"
            )
        act = config.get("act_fn", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"VAE config: act_fn {act!r} is not supported (only 'silu')")
        sample_size = config.get("sample_size", cls.sample_size)
        if isinstance(sample_size, (list, tuple)):
            sample_size = int(sample_size[0])
        out = cls(
            in_channels=int(config.get("in_channels", cls.in_channels)),
            out_channels=int(config.get("out_channels", cls.out_channels)),
            block_out_channels=block_out,
            layers_per_block=int(config.get("layers_per_block", cls.layers_per_block)),
            latent_channels=int(config.get("latent_channels", cls.latent_channels)),
            norm_num_groups=int(config.get("norm_num_groups", cls.norm_num_groups)),
            use_quant_conv=bool(config.get("use_quant_conv", True)),
            use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
            sample_size=int(sample_size),
            scaling_factor=float(config.get("scaling_factor", cls.scaling_factor)),
        )
        for c in out.block_out_channels:
            if c % out.norm_num_groups:
                raise ValueError(
                    f"VAE config: block_out_channels entry {c} is not divisible by norm_num_groups "
                    f"{out.norm_num_groups}"
                )
        if out.layers_per_block < 1:
            raise ValueError(f"VAE config: layers_per_block must be >= 1, got {out.layers_per_block}")
        return out


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


def _conv(cin, cout, k, *, stride=1, padding, dtype, precision, rngs):
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=stride,
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        precision=precision,
        rngs=rngs,
    )


def _conv3x3(cin, cout, *, dtype, precision, rngs):
    return _conv(cin, cout, 3, padding=((1, 1), (1, 1)), dtype=dtype, precision=precision, rngs=rngs)


def _conv1x1(cin, cout, *, dtype, precision, rngs):
    return _conv(cin, cout, 1, padding="VALID", dtype=dtype, precision=precision, rngs=rngs)


class GroupNorm(nnx.Module):
    """``torch.nn.GroupNorm`` on NHWC: statistics (biased variance) always in float32."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = _RESNET_EPS, *, dtype=None):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels not divisible into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        g = self.num_groups
        xf = x.astype(jnp.float32).reshape(b, h, w, g, c // g)
        mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        y = y * self.scale[...] + self.bias[...]
        return y.astype(self.dtype or x.dtype)


class ResnetBlock2D(nnx.Module):
    """diffusers ``ResnetBlock2D`` without time embedding (pre-norm, SiLU, 1x1 shortcut)."""

    def __init__(self, cin: int, cout: int, groups: int, *, dtype, precision, rngs):
        self.norm1 = GroupNorm(groups, cin, dtype=dtype)
        self.conv1 = _conv3x3(cin, cout, dtype=dtype, precision=precision, rngs=rngs)
        self.norm2 = GroupNorm(groups, cout, dtype=dtype)
        self.conv2 = _conv3x3(cout, cout, dtype=dtype, precision=precision, rngs=rngs)
        self.conv_shortcut = (
            _conv1x1(cin, cout, dtype=dtype, precision=precision, rngs=rngs) if cin != cout else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nnx.Module):
    """diffusers ``Attention`` as used in the VAE mid block.

    Group norm, then single-head self-attention over the H*W tokens with q/k/v/out linear
    projections, plus the residual. The softmax is computed in float32.
    """

    def __init__(self, channels: int, groups: int, *, dtype, precision, rngs):
        self.dtype = dtype
        self.group_norm = GroupNorm(groups, channels, dtype=dtype)
        lin = partial(nnx.Linear, dtype=dtype, param_dtype=jnp.float32, precision=precision, rngs=rngs)
        self.to_q = lin(channels, channels)
        self.to_k = lin(channels, channels)
        self.to_v = lin(channels, channels)
        self.to_out = nnx.List([lin(channels, channels)])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * (1.0 / math.sqrt(c)), axis=-1).astype(v.dtype)
        o = jnp.einsum("bqk,bkc->bqc", probs, v)
        o = self.to_out[0](o).reshape(b, h, w, c)
        return (o + x).astype(o.dtype)


class Downsample2D(nnx.Module):
    """Zero pad right/bottom by one, then a stride-2 3x3 convolution (no padding)."""

    def __init__(self, channels: int, *, dtype, precision, rngs):
        self.conv = _conv(channels, channels, 3, stride=2, padding="VALID", dtype=dtype, precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int, *, dtype, precision, rngs):
        self.conv = _conv3x3(channels, channels, dtype=dtype, precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, cin, cout, num_layers, groups, add_downsample, *, dtype, precision, rngs):
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw) for i in range(num_layers)]
        )
        self.downsamplers = nnx.List([Downsample2D(cout, **kw)]) if add_downsample else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, cin, cout, num_layers, groups, add_upsample, *, dtype, precision, rngs):
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw) for i in range(num_layers)]
        )
        self.upsamplers = nnx.List([Upsample2D(cout, **kw)]) if add_upsample else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nnx.Module):
    """resnet -> (attention) -> resnet, all at the lowest resolution."""

    def __init__(self, channels, groups, add_attention, *, dtype, precision, rngs):
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, **kw) for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, groups, **kw)]) if add_attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, precision, rngs):
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        ch = cfg.block_out_channels
        g = cfg.norm_num_groups
        self.conv_in = _conv3x3(cfg.in_channels, ch[0], **kw)
        blocks = []
        cout = ch[0]
        for i, c in enumerate(ch):
            cin, cout = cout, c
            blocks.append(DownEncoderBlock2D(cin, cout, cfg.layers_per_block, g, i < len(ch) - 1, **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = UNetMidBlock2D(ch[-1], g, cfg.mid_block_add_attention, **kw)
        self.conv_norm_out = GroupNorm(g, ch[-1], dtype=dtype)
        self.conv_out = _conv3x3(ch[-1], 2 * cfg.latent_channels, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, precision, rngs):
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        ch = cfg.block_out_channels
        g = cfg.norm_num_groups
        self.conv_in = _conv3x3(cfg.latent_channels, ch[-1], **kw)
        self.mid_block = UNetMidBlock2D(ch[-1], g, cfg.mid_block_add_attention, **kw)
        rev = list(reversed(ch))
        blocks = []
        cout = rev[0]
        for i, c in enumerate(rev):
            cin, cout = cout, c
            blocks.append(UpDecoderBlock2D(cin, cout, cfg.layers_per_block + 1, g, i < len(ch) - 1, **kw))
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = GroupNorm(g, ch[0], dtype=dtype)
        self.conv_out = _conv3x3(ch[0], cfg.out_channels, **kw)

    def __call__(self, z):
        x = self.conv_in(z)
        x = self.mid_block(x)
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------------------
# AutoencoderKL
# --------------------------------------------------------------------------------------


class AutoencoderKL(nnx.Module):
    """Flax NNX port of diffusers ``AutoencoderKL`` (NHWC).

    Parameters are always float32; ``dtype`` is the compute dtype of convolutions, linears
    and activations (e.g. ``jnp.bfloat16``). Group-norm statistics, the attention softmax,
    the latent moments and the decoder output are computed / returned in float32.
    """

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, precision=None):
        if not isinstance(config, VAEConfig):
            raise TypeError(f"config must be a VAEConfig (use AutoencoderKL.from_config for dicts), got {type(config)}")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        kw = dict(dtype=self.dtype, precision=precision, rngs=rngs)
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        lc = config.latent_channels
        self.quant_conv = _conv1x1(2 * lc, 2 * lc, **kw) if config.use_quant_conv else None
        self.post_quant_conv = _conv1x1(lc, lc, **kw) if config.use_post_quant_conv else None

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any] | VAEConfig, rngs: nnx.Rngs | None = None, *, dtype=jnp.float32, precision=None
    ) -> "AutoencoderKL":
        """Randomly initialised model from a diffusers config dict (or a ``VAEConfig``)."""
        cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
        return cls(cfg, rngs=rngs if rngs is not None else nnx.Rngs(0), dtype=dtype, precision=precision)

    def _check_input(self, x, channels: int, what: str):
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be NHWC with {channels} channels, got shape {tuple(x.shape)}")

    def encode_moments(self, images: jax.Array) -> jax.Array:
        """Raw ``2 * latent_channels`` moments (quant_conv output), float32."""
        self._check_input(images, self.config.in_channels, "encode: images")
        f = self.config.downsample_factor
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(
                f"encode: image height/width must be multiples of {f}, got {tuple(images.shape[1:3])}"
            )
        h = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h.astype(jnp.float32)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, 3) in [-1, 1] -> (mean, std) of the diagonal Gaussian posterior.

        Both are float32 of shape (B, H/f, W/f, latent_channels), f = 2**(len(blocks)-1) (8 for SD).
        The log-variance is clamped to [-30, 20] as in diffusers.
        """
        moments = self.encode_moments(images)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        logvar = jnp.clip(logvar, _LOGVAR_MIN, _LOGVAR_MAX)
        return mean, jnp.exp(0.5 * logvar)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, 3), float32, nominally [-1, 1]."""
        self._check_input(latents, self.config.latent_channels, "decode: latents")
        z = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Deterministic reconstruction: decode(posterior mean)."""
        mean, _ = self.encode(images)
        return self.decode(mean)


# --------------------------------------------------------------------------------------
# Weight loading
# --------------------------------------------------------------------------------------

# Pre-0.14 diffusers (and some converted checkpoints) name the mid-block attention weights
# query/key/value/proj_attn; current ones use to_q/to_k/to_v/to_out.0.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _normalise_key(key: str) -> str:
    """``...attentions.0.query.weight`` -> ``...attentions.0.to_q.weight`` (other keys unchanged)."""
    parts = key.split(".")
    if len(parts) >= 4 and parts[-2] in _LEGACY_ATTENTION_NAMES and parts[-4] == "attentions":
        parts = parts[:-2] + _LEGACY_ATTENTION_NAMES[parts[-2]].split(".") + parts[-1:]
    return ".".join(parts)


def _module_param_table(model: nnx.Module) -> dict[str, tuple[tuple, tuple[int, ...], str]]:
    """diffusers key -> (module path, expected diffusers shape, kind) for every Param in ``model``."""
    table = {}
    for path, arr_shape in flat_variables(model, nnx.Param):
        *mod_path, name = path
        if name == "kernel" and len(arr_shape) == 4:
            kind = "conv"
            h, w, i, o = arr_shape
            torch_shape = (o, i, h, w)
        elif name == "kernel" and len(arr_shape) == 2:
            kind = "linear"
            torch_shape = arr_shape[::-1]
        elif name in ("scale", "bias") and len(arr_shape) == 1:
            kind = "vector"
            torch_shape = arr_shape
        else:  # pragma: no cover - would be a bug in this module
            raise AssertionError(f"unexpected parameter {path} with shape {arr_shape}")
        torch_name = "weight" if name in ("kernel", "scale") else "bias"
        key = ".".join(str(p) for p in mod_path) + "." + torch_name
        table[key] = (tuple(path), torch_shape, kind)
    return table


def convert_diffusers_state_dict(
    model: nnx.Module, state_dict: Mapping[str, np.ndarray]
) -> dict[tuple, np.ndarray]:
    """Maps a diffusers ``AutoencoderKL`` state dict onto ``model``'s parameter paths.

    Accepts both the current (``to_q/to_k/to_v/to_out.0``) and the legacy
    (``query/key/value/proj_attn``) attention names, and 1x1-conv attention weights
    (shape (C, C, 1, 1) or (C, C, 1)). Raises ``KeyError`` listing every missing / unexpected
    key and ``ValueError`` listing every shape mismatch. Returns {param path: float32 array in
    JAX layout}.
    """
    table = _module_param_table(model)
    renamed: dict[str, tuple[str, np.ndarray]] = {}
    duplicates = []
    for k, v in state_dict.items():
        nk = _normalise_key(k)
        if nk in renamed:
            duplicates.append(f"{renamed[nk][0]!r} and {k!r}")
        renamed[nk] = (k, v)
    if duplicates:
        raise KeyError(f"VAE weights: several keys map to the same parameter: {', '.join(duplicates)}")
    check_keys(table, renamed, "VAE weights do not match the model config",
               shown={k: src for k, (src, _) in renamed.items()})
    out = {}
    bad = []
    for key, (path, torch_shape, kind) in table.items():
        src_key, arr = renamed[key]
        arr = np.asarray(arr)
        if kind == "linear" and arr.ndim in (3, 4) and all(s == 1 for s in arr.shape[2:]):
            arr = arr.reshape(arr.shape[:2])  # 1x1 conv attention projection -> linear
        error = shape_dtype_error(src_key, arr, torch_shape)
        if error:
            bad.append(error)
            continue
        arr = arr.astype(np.float32)
        if kind == "conv":
            arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif kind == "linear":
            arr = arr.T  # (out, in) -> (in, out)
        out[path] = np.ascontiguousarray(arr)
    raise_shape_dtype_errors(bad, "VAE weights have wrong shapes/dtypes")
    return out


def export_diffusers_state_dict(model: AutoencoderKL) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_diffusers_state_dict`: current diffusers key names, PyTorch layout."""
    out = {}
    for key, (path, _, kind) in _module_param_table(model).items():
        arr = np.asarray(get_variable(model, path)[...], dtype=np.float32)
        if kind == "conv":
            arr = arr.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif kind == "linear":
            arr = arr.T
        out[key] = np.ascontiguousarray(arr)
    return out


def load_diffusers_state_dict(model: AutoencoderKL, state_dict: Mapping[str, np.ndarray]) -> AutoencoderKL:
    """Copies a diffusers state dict (numpy arrays, PyTorch layout) into ``model`` in place.

    ``model`` may be abstract (from ``nnx.eval_shape``): every parameter gets a value.
    """
    return assign_arrays(model, convert_diffusers_state_dict(model, state_dict))


def vae_files(folder: str | Path) -> tuple[Path, Path]:
    """``(config.json, weights)`` paths of a diffusers ``AutoencoderKL`` folder; raises
    ``FileNotFoundError`` naming what is missing (cheap: reads nothing). ``hf://ORG/NAME[/SUBDIR]``
    names a folder on the Hugging Face Hub: just those two files are fetched into the standard
    Hugging Face cache (see :mod:`tvm_jax.weights.hub`)."""
    if hub.is_hub_path(folder):
        folder = hub.download_folder(folder, [CONFIG_NAME, WEIGHTS_NAME])
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"VAE folder not found: {folder}")
    cfg_path = folder / CONFIG_NAME
    w_path = folder / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"VAE folder {folder} has no {CONFIG_NAME}")
    if not w_path.is_file():
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt"))
        hint = f" (found: {', '.join(others)})" if others else ""
        raise FileNotFoundError(f"VAE folder {folder} has no {WEIGHTS_NAME}{hint}")
    return cfg_path, w_path


def load_vae(folder: str | Path, dtype=jnp.float32, *, precision=None) -> AutoencoderKL:
    """Loads a diffusers-format ``AutoencoderKL`` folder (local, or ``hf://ORG/NAME`` on the Hub).

    The folder must hold ``config.json`` and ``diffusion_pytorch_model.safetensors`` (read with
    ``safetensors.numpy``; no torch). ``dtype`` is the compute dtype; parameters stay float32.
    ``precision`` goes to every conv/linear (e.g. ``'highest'`` to rule out TF32 on GPUs).
    Raises ``FileNotFoundError`` for a missing folder/file, ``ValueError`` for an unsupported
    config, ``KeyError`` for missing/unexpected weight keys, ``ValueError`` for wrong shapes.
    """
    cfg_path, w_path = vae_files(folder)
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"VAE config {cfg_path} is not valid JSON: {e}") from e
    from safetensors.numpy import load_file

    cfg = VAEConfig.from_dict(config)
    state_dict = load_file(str(w_path))
    # Built abstractly: a random init of the SD VAE costs tens of seconds on CPU for nothing.
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0), dtype=dtype, precision=precision))
    return load_diffusers_state_dict(model, state_dict)


# --------------------------------------------------------------------------------------
# Batched helpers
# --------------------------------------------------------------------------------------


@partial(jax.jit, static_argnums=(0,))
def _encode_jit(graphdef, state, images):
    return nnx.merge(graphdef, state).encode(images)


@partial(jax.jit, static_argnums=(0,))
def _decode_jit(graphdef, state, latents):
    return nnx.merge(graphdef, state).decode(latents)


def _batched(fn, vae: nnx.Module, x, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("empty input batch")
    graphdef, state = nnx.split(vae)
    outs = []
    for start in range(0, n, batch_size):
        chunk = np.asarray(x[start : start + batch_size])
        m = chunk.shape[0]
        if m < batch_size and n > batch_size:  # pad the tail so the jitted shape stays fixed
            chunk = np.concatenate([chunk, np.zeros((batch_size - m,) + chunk.shape[1:], chunk.dtype)])
        res = fn(graphdef, state, chunk)
        outs.append(jax.tree.map(lambda a: np.asarray(a)[:m], res))
    return jax.tree.map(lambda *a: np.concatenate(a, axis=0), *outs)


def encode_batched(vae: AutoencoderKL, images, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Jitted, batched ``vae.encode`` over a (N, H, W, 3) array in [-1, 1] -> numpy (mean, std)."""
    images = np.asarray(images) if not isinstance(images, jax.Array) else images
    vae._check_input(images, vae.config.in_channels, "encode_batched: images")
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"encode_batched: images must be floats in [-1, 1], got dtype {images.dtype}")
    return tuple(_batched(_encode_jit, vae, images, batch_size))


def decode_batched(vae: AutoencoderKL, latents, batch_size: int) -> np.ndarray:
    """Jitted, batched ``vae.decode`` over (N, h, w, C) latents -> numpy float32 images."""
    latents = np.asarray(latents) if not isinstance(latents, jax.Array) else latents
    vae._check_input(latents, vae.config.latent_channels, "decode_batched: latents")
    return _batched(_decode_jit, vae, latents, batch_size)


def to_uint8(images):
    """Maps images in [-1, 1] to uint8 in [0, 255]: round((x + 1) * 127.5), clipped.

    numpy in -> numpy out; jax in -> jax out.
    """
    xp = jnp if isinstance(images, jax.Array) else np
    x = xp.asarray(images, dtype=xp.float32)
    return xp.clip(xp.round((x + 1.0) * 127.5), 0, 255).astype(xp.uint8)

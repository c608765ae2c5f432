"""The FID Inception-v3 (pytorch-fid's ``fid_inception_v3``) in Flax NNX, NHWC.

This is the network of TensorFlow's original FID implementation (``inception-2015-12-05``) as
ported by pytorch-fid, up to the 2048-d "pool3" features (global average pool after Mixed_7c).
It differs from torchvision's Inception-v3 in the same places pytorch-fid patches it:

* ``Mixed_5b/5c/5d`` (InceptionA), ``Mixed_6b..6e`` (InceptionC) and ``Mixed_7b`` (first
  InceptionE) average-pool their pool branch with ``count_include_pad=False``;
* ``Mixed_7c`` (second InceptionE) max-pools its pool branch instead of average pooling.

Every conv is a "BasicConv2d": bias-free conv, BatchNorm (eps 1e-3, inference mode from the
stored running statistics), ReLU. Input: NHWC float images in [0, 1], bilinearly resized to
299x299 (``F.interpolate(..., mode='bilinear', align_corners=False)`` semantics, no antialias)
and mapped to [-1, 1], exactly as pytorch-fid's ``InceptionV3(resize_input=True,
normalize_input=True)``.

Weights: :func:`load_inception` reads pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
(through :mod:`tvm_jax.weights.torch_io`, a restricted torch-free reader), or the same state dict
stored as ``.safetensors`` / ``.npz``. Keys are torchvision's (``Mixed_5b.branch1x1.conv.weight``,
``...bn.running_mean`` ...); the classifier (``fc.*``) and ``num_batches_tracked`` entries are
ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tvm_jax.weights.nnx_variables import (assign_arrays, check_keys, flat_variables, get_variable,
                                           raise_shape_dtype_errors, shape_dtype_error)

__all__ = [
    "FIDInceptionV3",
    "load_inception",
    "load_inception_state_dict",
    "inception_from_state_dict",
    "read_state_dict",
    "convert_torch_state_dict",
    "export_torch_state_dict",
    "resize_bilinear",
    "FID_WEIGHTS_FILENAME",
    "FEATURE_DIM",
]

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048
INPUT_SIZE = 299
_BN_EPS = 1e-3
# Entries of the pytorch-fid state dict that the feature extractor does not use.
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_IGNORED_PREFIXES = ("fc.",)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


class BatchNorm(nnx.Module):
    """Inference-mode ``torch.nn.BatchNorm2d`` on NHWC from stored running statistics."""

    def __init__(self, channels: int, eps: float = _BN_EPS):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))

    def __call__(self, x):
        inv = jax.lax.rsqrt(self.var[...] + self.eps) * self.scale[...]
        return (x - self.mean[...]) * inv + self.bias[...]


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, *, precision, rngs):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        self.conv = nnx.Conv(
            cin,
            cout,
            (kh, kw),
            strides=stride,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            param_dtype=jnp.float32,
            precision=precision,
            rngs=rngs,
        )
        self.bn = BatchNorm(cout)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x, k: int, stride: int, pad: int = 0):
    """``F.max_pool2d`` (padding counts as -inf)."""
    p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, stride, stride, 1), p)


def avg_pool_exclude_pad(x, k: int = 3, stride: int = 1, pad: int = 1):
    """``F.avg_pool2d(..., count_include_pad=False)``: mean over the in-image part of each window."""
    p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    win, strides = (1, k, k, 1), (1, stride, stride, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, win, strides, p)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, win, strides, p)
    return total / count


class InceptionA(nnx.Module):
    """pytorch-fid ``FIDInceptionA`` (Mixed_5b/5c/5d)."""

    def __init__(self, cin: int, pool_features: int, *, precision, rngs):
        c = dict(precision=precision, rngs=rngs)
        self.branch1x1 = BasicConv2d(cin, 64, 1, **c)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, **c)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **c)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, **c)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **c)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **c)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, **c)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """torchvision ``InceptionB`` (Mixed_6a): grid reduction 35 -> 17."""

    def __init__(self, cin: int, *, precision, rngs):
        c = dict(precision=precision, rngs=rngs)
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, **c)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, **c)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **c)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **c)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):
    """pytorch-fid ``FIDInceptionC`` (Mixed_6b..6e): factorised 7x7 convolutions."""

    def __init__(self, cin: int, channels_7x7: int, *, precision, rngs):
        c = dict(precision=precision, rngs=rngs)
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1, **c)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, **c)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **c)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **c)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, **c)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **c)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **c)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **c)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **c)
        self.branch_pool = BasicConv2d(cin, 192, 1, **c)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """torchvision ``InceptionD`` (Mixed_7a): grid reduction 17 -> 8."""

    def __init__(self, cin: int, *, precision, rngs):
        c = dict(precision=precision, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, **c)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, **c)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, **c)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **c)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **c)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, **c)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
    """pytorch-fid ``FIDInceptionE_1`` (``pool='avg'``, Mixed_7b) / ``FIDInceptionE_2`` (``pool='max'``, Mixed_7c)."""

    def __init__(self, cin: int, pool: str, *, precision, rngs):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        c = dict(precision=precision, rngs=rngs)
        self.branch1x1 = BasicConv2d(cin, 320, 1, **c)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, **c)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **c)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **c)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, **c)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **c)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **c)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **c)
        self.branch_pool = BasicConv2d(cin, 192, 1, **c)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = max_pool(x, 3, 1, 1) if self.pool == "max" else avg_pool_exclude_pad(x)
        bp = self.branch_pool(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """NHWC bilinear resize to (size, size) with ``align_corners=False`` and no antialiasing.

    Same as ``torch.nn.functional.interpolate(x, (size, size), mode='bilinear',
    align_corners=False)`` for up- and downsampling (half-pixel centres; samples that fall
    outside the image take the edge pixel).
    """
    b, h, w, c = x.shape
    if (h, w) == (size, size):
        return x
    return jax.image.resize(
        x, (b, size, size, c), method="bilinear", antialias=False, precision=jax.lax.Precision.HIGHEST
    )


class FIDInceptionV3(nnx.Module):
    """FID Inception-v3 up to the 2048-d pool3 features.

    ``__call__(images)``: NHWC float images in [0, 1] of any size (B, H, W, 3) -> (B, 2048)
    float32. ``precision`` is passed to every convolution; the default ``'highest'`` keeps
    float32 convolutions exact on GPUs (no TF32), so FID does not depend on the hardware.

    Construct with random weights only for experiments (``FIDInceptionV3(rngs=nnx.Rngs(0))``,
    slow on CPU); real use goes through :func:`load_inception` / :func:`inception_from_state_dict`.
    """

    def __init__(self, *, rngs: nnx.Rngs, precision: Any = "highest"):
        c = dict(precision=precision, rngs=rngs)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **c)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **c)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **c)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **c)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **c)
        self.Mixed_5b = InceptionA(192, 32, **c)
        self.Mixed_5c = InceptionA(256, 64, **c)
        self.Mixed_5d = InceptionA(288, 64, **c)
        self.Mixed_6a = InceptionB(288, **c)
        self.Mixed_6b = InceptionC(768, 128, **c)
        self.Mixed_6c = InceptionC(768, 160, **c)
        self.Mixed_6d = InceptionC(768, 160, **c)
        self.Mixed_6e = InceptionC(768, 192, **c)
        self.Mixed_7a = InceptionD(768, **c)
        self.Mixed_7b = InceptionE(1280, "avg", **c)
        self.Mixed_7c = InceptionE(2048, "max", **c)

    def features_from_normalized(self, x: jax.Array) -> jax.Array:
        """The network proper: NHWC input already resized and in [-1, 1] -> (B, 2048)."""
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = max_pool(x, 3, 2)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = max_pool(x, 3, 2)
        for blk in (
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
            self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c,
        ):  # fmt: skip
            x = blk(x)
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3: expected NHWC RGB images (B, H, W, 3), got shape {tuple(images.shape)}")
        x = resize_bilinear(images.astype(jnp.float32))
        return self.features_from_normalized(2.0 * x - 1.0)


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------

_LEAF_TO_TORCH = {
    ("conv", "kernel"): "conv.weight",
    ("bn", "scale"): "bn.weight",
    ("bn", "bias"): "bn.bias",
    ("bn", "mean"): "bn.running_mean",
    ("bn", "var"): "bn.running_var",
}


def _variable_table(model: FIDInceptionV3) -> dict[str, tuple[tuple, tuple[int, ...], bool]]:
    """torch key -> (variable path, torch shape, is_conv) for every variable of ``model``."""
    table = {}
    for path, shape in flat_variables(model, nnx.Variable):
        leaf_name = tuple(path[-2:])
        if leaf_name not in _LEAF_TO_TORCH:  # pragma: no cover - bug guard
            raise AssertionError(f"unexpected variable {path}")
        key = ".".join(str(p) for p in path[:-2]) + "." + _LEAF_TO_TORCH[leaf_name]
        is_conv = leaf_name == ("conv", "kernel")
        if is_conv:
            kh, kw, i, o = shape
            shape = (o, i, kh, kw)
        table[key] = (tuple(path), shape, is_conv)
    return table


def convert_torch_state_dict(model: FIDInceptionV3, state_dict: Mapping[str, np.ndarray]) -> dict[tuple, np.ndarray]:
    """pytorch-fid state dict -> {variable path: float32 array in JAX layout}.

    Raises ``KeyError`` listing missing/unexpected keys and ``ValueError`` listing shape errors.
    """
    table = _variable_table(model)
    keys = {
        k for k in state_dict if not (k.endswith(_IGNORED_SUFFIXES) or k.startswith(_IGNORED_PREFIXES))
    }
    check_keys(table, keys, "Inception weights do not match the FID Inception-v3")
    out, bad = {}, []
    for key, (path, shape, is_conv) in table.items():
        arr = np.asarray(state_dict[key])
        error = shape_dtype_error(key, arr, shape)
        if error:
            bad.append(error)
            continue
        arr = arr.astype(np.float32)
        out[path] = np.ascontiguousarray(arr.transpose(2, 3, 1, 0) if is_conv else arr)
    raise_shape_dtype_errors(bad, "Inception weights have wrong shapes/dtypes")
    return out


def export_torch_state_dict(model: FIDInceptionV3) -> dict[str, np.ndarray]:
    """Inverse of :func:`load_inception_state_dict` (torchvision key names, OIHW convs; no ``fc``)."""
    out = {}
    for key, (path, _, is_conv) in _variable_table(model).items():
        arr = np.asarray(get_variable(model, path)[...], np.float32)
        out[key] = np.ascontiguousarray(arr.transpose(3, 2, 0, 1) if is_conv else arr)
    return out


def load_inception_state_dict(model: FIDInceptionV3, state_dict: Mapping[str, np.ndarray]) -> FIDInceptionV3:
    """Copies a pytorch-fid state dict (numpy arrays, torch layout) into ``model`` in place.

    ``model`` may be abstract (from ``nnx.eval_shape``): every variable gets a value.
    """
    return assign_arrays(model, convert_torch_state_dict(model, state_dict))


def inception_from_state_dict(state_dict: Mapping[str, np.ndarray], *, precision: Any = "highest") -> FIDInceptionV3:
    """FID Inception-v3 holding ``state_dict`` (built abstractly first: no random init cost)."""
    model = nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0), precision=precision))
    return load_inception_state_dict(model, state_dict)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a flat {name: array} dict from ``.pth``/``.pt`` (torch zip, via ``tvm_jax.weights.torch_io``;
    no torch, no arbitrary unpickling), ``.safetensors`` or ``.npz``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt"):
        from tvm_jax.weights.torch_io import load_state_dict

        return dict(load_state_dict(path))
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    raise ValueError(f"Inception weights {path}: unsupported suffix {suffix!r} (expected .pth, .pt, .safetensors or .npz)")


def load_inception(path: str | Path, *, precision: Any = "highest") -> FIDInceptionV3:
    """Builds the FID Inception-v3 and loads weights from ``path`` (see :func:`read_state_dict`)."""
    return inception_from_state_dict(read_state_dict(path), precision=precision)

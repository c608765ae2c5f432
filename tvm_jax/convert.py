"""Official TVM (PyTorch) weights -> tvm-jax parameters and exported models.

Usage::

    python -m tvm_jax.convert SRC OUT [--weights=ema|net|ema_target] [--[no]scaled_param] [--w=W]
                                      [--naive] [--num_heads=N] [--input_size=N] [--norm=rms|layer]
                                      [--[no]mod_norm] [--allow_class=PATTERN] [--overwrite]
    python -m tvm_jax.convert hf://lumaai/tvm/im256_w2.pkl converted/im256_w2

``SRC`` is an official checkpoint pickle (``network-snapshot-*.pkl``, the released ``im*.pkl``), an
official ``training-state-*.pt``, a ``torch.save`` file of state dicts (``.pt``/``.pth``/``.bin``,
zip or legacy format) or a ``.safetensors`` file; the format is detected from the content.
``hf://ORG/NAME/FILE`` is downloaded into the standard Hugging Face cache first (needs the
``hub`` extra: ``pip install -e ".[hub]"``). Nothing is imported from torch and nothing from the file is executed (see
:mod:`tvm_jax.torch_io`). ``OUT`` becomes an exported model directory
(:func:`tvm_jax.model_io.save_model`) that ``python -m tvm_jax.main --mode=sample
--checkpoint=OUT`` and :func:`tvm_jax.model_io.load_model` read. Dashed spellings
(``--num-heads``, ``--input-size``, ``--allow-class``) are accepted too.

Which network: an official pickle holds ``net`` and usually ``ema``; ``--weights`` picks one
(default ``ema`` if present, the evaluation weights, else ``net``). A flat state dict that holds
several networks under different prefixes (``ema.``/``net.model.``/``model.``, ...) is handled
the same way (``net`` also matches ``model``/``state_dict``/``params`` prefixes); entries outside
the chosen network are ignored and counted in the export's metadata. Inside the chosen network
every key must be accounted for.

Name mapping (official -> ours; Linear ``weight`` (out, in) -> ``kernel`` (in, out); conv
``weight`` OIHW -> HWIO; block tensors are stacked along a leading depth axis)::

    x_embedder.proj.{weight,bias}                 x_embedder/proj/{kernel,bias}
    {t,s,guidance}_embedder.mlp.{0,2}.*           {t,gap,beta}_embedder/linear{1,2}/*
    y_embedder.embedding_table.weight             label_embedder/embedding
    blocks.{i}.attn.{qkv,proj}.*                  blocks/attn/{qkv,proj}/*          [i]
    blocks.{i}.attn.{q,k}_norm.weight             blocks/attn/{q,k}_norm/weight     [i]
    blocks.{i}.mlp.{fc1,fc2}.*                    blocks/mlp/{fc1,fc2}/*            [i]
    blocks.{i}.adaLN_modulation.1.*               blocks/adaLN/*                    [i]
    final_layer.linear.*                          final_layer/linear/*
    final_layer.adaLN_modulation.1.*              final_layer/adaLN/*
    pos_embed (1, T, H)                           not a parameter: checked against our fixed table

Key prefixes ``module.`` (DDP), ``_orig_mod.`` (torch.compile), ``net.``, ``ema.`` and
``model.`` (the TVMWrapper) are stripped when every key carries them.

The recipe comes from the file when it holds the official network objects (a snapshot pickle or a
training state): ``do_scale_param`` (stored as the export's ``scaled_param``), the blocks'
``do_mod_norm`` and pre-norm, the head count and the resolution (see
:func:`tvm_jax.torch_io.network_recipe`). Flags override it only when given, and a flag that
contradicts the file is reported with the file's value. A bare state dict records none of this
(no parameters tell mod-norm or the pre-norm): pass ``--[no]scaled_param``; the default model is
the paper's Lipschitz DiT (``mod_norm=True``, ``norm="rms"``), ``--naive`` selects the naive DiT
(no mod-norm, LayerNorm), ``--norm``/``--mod_norm`` set either one; without ``q_norm`` weights
pass ``--num_heads``. The CFG weight ``w`` is not in any file: ``--w``, else the released file's
name (``im256_w1p75.pkl`` -> 1.75). Latent models of the official resolutions (32 and 64 latents)
also record the official latent statistics and VAE (``hf://stabilityai/sd-vae-ft-ema``), so
``--mode=sample --checkpoint=OUT`` needs no ``--config``. The exported config keeps :class:`DiTConfig`'s compute defaults
(``dtype="bfloat16"``, ``attention_impl="xla"``); ``load_model`` can override both.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from tvm_jax import torch_io
from tvm_jax.dit import DiTConfig, sincos_table_2d

__all__ = [
    "ConversionError",
    "KNOWN_PREFIXES",
    "strip_prefixes",
    "infer_config",
    "official_shapes",
    "check_official",
    "official_to_params",
    "params_to_official",
    "read_source",
    "select_network",
    "convert",
    "main",
]

KNOWN_PREFIXES = ("module.", "_orig_mod.", "net.", "ema.", "model.")
FREQUENCY_DIM = 256  # the scalar embedders' frequency features
POS_EMBED_ATOL = 1e-5

# official embedder name -> ours
_EMBEDDERS = (("t_embedder", "t_embedder"), ("s_embedder", "gap_embedder"), ("guidance_embedder", "beta_embedder"))


class ConversionError(ValueError):
    """The state dict does not fit the model (or the model cannot be inferred from it)."""


# ----------------------------------------------------------------------------- the mapping


def _top_entries(config: DiTConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """(official name, our path, transform) for the non-block parameters."""
    entries = [
        ("x_embedder.proj.weight", ("x_embedder", "proj", "kernel"), "conv"),
        ("x_embedder.proj.bias", ("x_embedder", "proj", "bias"), "copy"),
    ]
    for official, ours in _EMBEDDERS:
        if official == "guidance_embedder" and not config.learn_guidance:
            continue
        for idx, layer in (("0", "linear1"), ("2", "linear2")):
            entries += [(f"{official}.mlp.{idx}.weight", (ours, layer, "kernel"), "linear"),
                        (f"{official}.mlp.{idx}.bias", (ours, layer, "bias"), "copy")]
    entries += [
        ("y_embedder.embedding_table.weight", ("label_embedder", "embedding"), "copy"),
        ("final_layer.linear.weight", ("final_layer", "linear", "kernel"), "linear"),
        ("final_layer.linear.bias", ("final_layer", "linear", "bias"), "copy"),
        ("final_layer.adaLN_modulation.1.weight", ("final_layer", "adaLN", "kernel"), "linear"),
        ("final_layer.adaLN_modulation.1.bias", ("final_layer", "adaLN", "bias"), "copy"),
    ]
    return entries


def _block_entries(config: DiTConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """(official name inside ``blocks.{i}.``, our path under ``blocks``, transform)."""
    entries = []
    for official, ours in (("attn.qkv", ("attn", "qkv")), ("attn.proj", ("attn", "proj")),
                           ("mlp.fc1", ("mlp", "fc1")), ("mlp.fc2", ("mlp", "fc2")),
                           ("adaLN_modulation.1", ("adaLN",))):
        entries += [(f"{official}.weight", ("blocks", *ours, "kernel"), "linear"),
                    (f"{official}.bias", ("blocks", *ours, "bias"), "copy")]
    if config.qk_norm:
        entries += [("attn.q_norm.weight", ("blocks", "attn", "q_norm", "weight"), "copy"),
                    ("attn.k_norm.weight", ("blocks", "attn", "k_norm", "weight"), "copy")]
    return entries


def _to_ours(array: np.ndarray, transform: str) -> np.ndarray:
    array = np.asarray(array, np.float32)
    if transform == "linear":
        return np.ascontiguousarray(array.T)
    if transform == "conv":  # OIHW -> HWIO
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    return np.array(array, copy=True)


def _to_official(array, transform: str) -> np.ndarray:
    array = np.asarray(array, np.float32)
    if transform == "linear":
        return np.ascontiguousarray(array.T)
    if transform == "conv":  # HWIO -> OIHW
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    return np.array(array, copy=True)


def official_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every official key of a DiT with this config and its shape (``pos_embed`` included; it
    is optional in a state dict)."""
    h, c, p = config.hidden_size, config.in_channels, config.patch_size
    mlp = int(h * config.mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, config.num_patches, h),
        "x_embedder.proj.weight": (h, c, p, p),
        "x_embedder.proj.bias": (h,),
        "y_embedder.embedding_table.weight": (config.num_classes + 1, h),
        "final_layer.linear.weight": (p * p * c, h),
        "final_layer.linear.bias": (p * p * c,),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h),
        "final_layer.adaLN_modulation.1.bias": (2 * h,),
    }
    for official, _ in _EMBEDDERS:
        if official == "guidance_embedder" and not config.learn_guidance:
            continue
        shapes.update({f"{official}.mlp.0.weight": (h, FREQUENCY_DIM), f"{official}.mlp.0.bias": (h,),
                       f"{official}.mlp.2.weight": (h, h), f"{official}.mlp.2.bias": (h,)})
    block = {
        "attn.qkv.weight": (3 * h, h), "attn.qkv.bias": (3 * h,),
        "attn.proj.weight": (h, h), "attn.proj.bias": (h,),
        "mlp.fc1.weight": (mlp, h), "mlp.fc1.bias": (mlp,),
        "mlp.fc2.weight": (h, mlp), "mlp.fc2.bias": (h,),
        "adaLN_modulation.1.weight": (6 * h, h), "adaLN_modulation.1.bias": (6 * h,),
    }
    if config.qk_norm:
        block.update({"attn.q_norm.weight": (config.head_dim,), "attn.k_norm.weight": (config.head_dim,)})
    for i in range(config.depth):
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return shapes


# ----------------------------------------------------------------------------- checks


def strip_prefixes(state_dict: dict[str, Any], prefixes: Sequence[str] = KNOWN_PREFIXES) -> dict[str, Any]:
    """Removes known wrapper prefixes (repeatedly) while *every* key carries the same one."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _fmt_config(config: DiTConfig) -> str:
    return (f"DiT(input {config.input_size}, channels {config.in_channels}, patch {config.patch_size}, hidden "
            f"{config.hidden_size}, depth {config.depth}, heads {config.num_heads}, mlp_ratio {config.mlp_ratio:g}, "
            f"classes {config.num_classes}, qk_norm {config.qk_norm}, learn_guidance {config.learn_guidance})")


def _is_float(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" or array.dtype == np.dtype(torch_io.ml_dtypes.bfloat16)


def check_official(state_dict: dict[str, Any], config: DiTConfig) -> None:
    """Raises :class:`ConversionError` naming every missing key, unexpected key, shape mismatch
    (expected vs got), non-float or non-finite tensor, and a ``pos_embed`` that is not our fixed
    sin-cos table. ``state_dict`` must already be prefix-free (see :func:`strip_prefixes`)."""
    expected = official_shapes(config)
    got = {k: np.asarray(v) if not isinstance(v, np.ndarray) else v for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(got) - {"pos_embed"}, key=_natural)
    unexpected = sorted(set(got) - set(expected), key=_natural)
    common = sorted(set(expected) & set(got), key=_natural)
    wrong = [f"{k} expected {expected[k]} got {tuple(got[k].shape)}" for k in common
             if tuple(got[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected)}")
    if wrong:
        problems.append(f"wrong shape: {'; '.join(wrong)}")
    present = [k for k in common if tuple(got[k].shape) == expected[k]]
    not_float = [f"{k} ({got[k].dtype})" for k in present if not _is_float(got[k])]
    if not_float:
        problems.append(f"not floating point: {', '.join(not_float)}")
    else:
        bad = [k for k in present if not np.all(np.isfinite(np.asarray(got[k], np.float32)))]
        if bad:
            problems.append(f"non-finite values in: {', '.join(bad)}")
    if "pos_embed" in present and not not_float:
        grid = config.input_size // config.patch_size
        table = sincos_table_2d(config.hidden_size, grid)
        diff = float(np.max(np.abs(np.asarray(got["pos_embed"], np.float64)[0] - table)))
        if diff > POS_EMBED_ATOL:
            problems.append(f"pos_embed differs from the fixed 2-D sin-cos table by up to {diff:.3g} "
                            f"(> {POS_EMBED_ATOL}): not a model this converter knows (different table layout?)")
    if problems:
        raise ConversionError(f"state dict does not match {_fmt_config(config)}: " + " | ".join(problems))


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _shape(sd: dict[str, Any], key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise ConversionError(f"cannot infer the model: {key} is missing")
    shape = tuple(np.shape(sd[key]))
    if len(shape) != ndim:
        raise ConversionError(f"cannot infer the model: {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def infer_config(state_dict: dict[str, Any], *, num_heads: int | None = None, input_size: int | None = None,
                 naive: bool = False, **overrides: Any) -> DiTConfig:
    """The :class:`DiTConfig` of an official state dict, read from its shapes, then checked
    against every key (:func:`check_official`). ``num_heads``/``input_size`` are needed only when
    the weights cannot tell (no ``q_norm``; no ``pos_embed``) and must agree when they can.
    ``naive`` selects the naive DiT's mod-norm/norm; ``overrides`` set other config fields."""
    sd = strip_prefixes(state_dict)
    hidden, channels, p, p2 = _shape(sd, "x_embedder.proj.weight", 4)
    if p != p2:
        raise ConversionError(f"x_embedder.proj.weight has a non-square {p}x{p2} patch kernel")
    found = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    if not found:
        raise ConversionError("cannot infer the model: no blocks.<i>.* keys")
    depth = max(found) + 1
    absent = sorted(set(range(depth)) - found)
    if absent:
        raise ConversionError(
            f"inconsistent depth: {', '.join(f'blocks.{i}.*' for i in absent)} missing while blocks up to "
            f"blocks.{depth - 1} are present (found blocks {sorted(found)})")
    mlp_hidden = _shape(sd, "blocks.0.mlp.fc1.weight", 2)[0]
    mlp_ratio = mlp_hidden / hidden
    if int(hidden * mlp_ratio) != mlp_hidden:
        raise ConversionError(
            f"blocks.0.mlp.fc1.weight: MLP width {mlp_hidden} is not expressible as hidden * mlp_ratio")
    qk_norm = "blocks.0.attn.q_norm.weight" in sd
    if qk_norm:
        (head_dim,) = _shape(sd, "blocks.0.attn.q_norm.weight", 1)
        if head_dim <= 0 or hidden % head_dim:
            raise ConversionError(
                f"blocks.0.attn.q_norm.weight: head dim {head_dim} does not divide hidden size {hidden}")
        heads = hidden // head_dim
        if num_heads is not None and num_heads != heads:
            raise ConversionError(f"--num_heads {num_heads} contradicts blocks.0.attn.q_norm.weight "
                                  f"(head dim {head_dim} -> {heads} heads)")
    else:
        if num_heads is None:
            raise ConversionError("cannot infer the number of heads: there are no attn.q_norm weights "
                                  "(model without QK-norm); pass --num_heads")
        if hidden % num_heads:
            raise ConversionError(f"--num_heads {num_heads} does not divide hidden size {hidden}")
        heads = num_heads
    rows = _shape(sd, "y_embedder.embedding_table.weight", 2)[0]
    if rows < 2:
        raise ConversionError(f"y_embedder.embedding_table.weight has {rows} row(s); expected classes + 1 (null row)")
    if "pos_embed" in sd:
        tokens = _shape(sd, "pos_embed", 3)[1]
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise ConversionError(f"pos_embed has {tokens} tokens, not a perfect square")
        size = grid * p
        if input_size is not None and input_size != size:
            raise ConversionError(f"--input_size {input_size} contradicts pos_embed ({tokens} tokens of patch {p} "
                                  f"-> input size {size})")
    elif input_size is None:
        raise ConversionError("cannot infer the input size: there is no pos_embed; pass --input_size")
    else:
        size = input_size
    fields = dict(input_size=size, in_channels=channels, patch_size=p, hidden_size=hidden, depth=depth,
                  num_heads=heads, mlp_ratio=mlp_ratio, num_classes=rows - 1, qk_norm=qk_norm,
                  learn_guidance=any(k.startswith("guidance_embedder.") for k in sd))
    fields.update(overrides)
    try:
        config = DiTConfig.create(None, lipschitz=not naive, **fields)
    except ValueError as e:
        raise ConversionError(f"the inferred model is not valid: {e}") from e
    check_official(sd, config)
    return config


# ----------------------------------------------------------------------------- conversion


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
    for part in path:
        tree = tree[part]
    return tree


def _abstract_params(config: DiTConfig) -> dict:
    from flax import nnx

    from tvm_jax.dit import abstract_dit
    from tvm_jax.networks import split_model

    params = split_model(abstract_dit(config))[1]
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def _paths(tree, prefix=()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_paths(v, prefix + (str(k),)))
        return out
    return {prefix: tree}


def official_to_params(state_dict: dict[str, Any], config: DiTConfig) -> dict:
    """Our parameters (a pure nested dict of float32 arrays, the structure of
    ``split_model(DiT(config))[1]``) from an official state dict. Known prefixes are stripped;
    anything that does not fit raises :class:`ConversionError` naming every problem."""
    sd = strip_prefixes(state_dict)
    check_official(sd, config)
    params: dict = {}
    for key, path, transform in _top_entries(config):
        _set(params, path, _to_ours(sd[key], transform))
    for key, path, transform in _block_entries(config):
        _set(params, path, np.stack([_to_ours(sd[f"blocks.{i}.{key}"], transform) for i in range(config.depth)]))
    expected = {p: tuple(x.shape) for p, x in _paths(_abstract_params(config)).items()}
    got = {p: tuple(x.shape) for p, x in _paths(params).items()}
    if expected != got:  # the mapping table and the model disagree: a bug here, not bad input
        raise AssertionError(f"converter mapping out of date with tvm_jax.dit: {sorted(set(expected) ^ set(got))} / "
                             f"{[p for p in expected if p in got and expected[p] != got[p]]}")
    return params


def params_to_official(params, config: DiTConfig, *, pos_embed: bool = True) -> dict[str, np.ndarray]:
    """The inverse of :func:`official_to_params`: official names, PyTorch layouts, float32.
    ``params`` is our pure dict (or an ``nnx.State``). ``pos_embed`` adds the fixed table as
    ``pos_embed`` (1, T, H), as the official state dict has it."""
    try:
        from flax import nnx

        if isinstance(params, nnx.State):
            params = nnx.to_pure_dict(params)
    except ImportError:  # pragma: no cover - flax is a dependency
        pass
    expected = {p: tuple(x.shape) for p, x in _paths(_abstract_params(config)).items()}
    got = {p: tuple(np.shape(x)) for p, x in _paths(params).items()}
    if expected != got:
        missing = sorted("/".join(p) for p in set(expected) - set(got))
        extra = sorted("/".join(p) for p in set(got) - set(expected))
        wrong = [f"{'/'.join(p)} expected {expected[p]} got {got[p]}" for p in sorted(set(expected) & set(got))
                 if expected[p] != got[p]]
        raise ConversionError(f"parameters do not match {_fmt_config(config)}: missing {missing}, unexpected {extra}, "
                              f"wrong shape {wrong}")
    sd: dict[str, np.ndarray] = {}
    if pos_embed:
        grid = config.input_size // config.patch_size
        sd["pos_embed"] = sincos_table_2d(config.hidden_size, grid).astype(np.float32)[None]
    for key, path, transform in _top_entries(config):
        sd[key] = _to_official(_get(params, path), transform)
    for key, path, transform in _block_entries(config):
        stacked = np.asarray(_get(params, path))
        for i in range(config.depth):
            sd[f"blocks.{i}.{key}"] = _to_official(stacked[i], transform)
    return dict(sorted(sd.items(), key=lambda kv: _natural(kv[0])))


# ----------------------------------------------------------------------------- reading a source file

_ANCHOR = "x_embedder.proj.weight"
_WEIGHT_ALIASES = {"ema": ("ema", "ema_model", "model_ema"), "net": ("net", "model", "state_dict", "params")}


def select_network(flat: dict[str, np.ndarray],
                   weights: str | None = None) -> tuple[dict[str, np.ndarray], str | None, str, int]:
    """Picks one DiT out of a flat state dict that may hold several under different prefixes.
    Returns ``(state dict with that prefix removed, chosen network name (None when the file holds
    only one), prefix, number of ignored keys)``."""
    roots = sorted({k[: -len(_ANCHOR)] for k in flat if k == _ANCHOR or k.endswith("." + _ANCHOR)})
    if not roots:
        sample = ", ".join(sorted(flat)[:5])
        raise ConversionError(f"no DiT weights found: no key ends with {_ANCHOR} ({len(flat)} keys, e.g. {sample})")

    def matches(root: str, name: str) -> bool:
        first = root.split(".", 1)[0]
        return bool(root) and first in _WEIGHT_ALIASES.get(name, (name,))

    if len(roots) == 1:
        root, want = roots[0], None
        if weights is not None and not matches(root, weights):
            raise ConversionError(f"--weights={weights} requested, but the file holds a single network "
                                  f"(under {root!r}); leave --weights unset")
    else:
        want = weights or ("ema" if any(matches(r, "ema") for r in roots) else "net")
        chosen = [r for r in roots if matches(r, want)]
        if len(chosen) != 1:
            raise ConversionError(f"the file holds several networks (prefixes {roots}); --weights={want} "
                                  f"{'matches none' if not chosen else 'is ambiguous'}")
        root = chosen[0]
    sub = {k[len(root):]: v for k, v in flat.items() if k.startswith(root)}
    return sub, want, root, len(flat) - len(sub)


def read_source(path: str, *, weights: str | None = None,
                allow_classes: Iterable[str] = ()) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(DiT state dict with official names, info)`` from an official pickle, a torch.save file
    (of state dicts, or of official modules such as ``training-state-*.pt``) or a safetensors file.
    ``info`` says what was read (format, which network, ignored keys) and, for official network
    objects, holds their ``recipe`` (:func:`tvm_jax.torch_io.network_recipe`)."""
    fmt = torch_io.detect_format(path)
    if fmt == "unknown":
        raise ConversionError(f"{path}: unrecognised format (expected an official .pkl, a torch.save .pt/.pth/.bin "
                              "or a .safetensors file)")
    if fmt == "safetensors":
        flat = torch_io.load_state_dict(path)
    else:
        obj = torch_io.read_official_object(path, allow_classes=allow_classes)
        if fmt == "pickle" or torch_io.holds_modules(obj):
            ckpt = torch_io.official_checkpoint(obj, path)
            which = weights or ckpt.default_weights
            if which not in ckpt.networks:
                raise ConversionError(f"--weights={which}: the checkpoint holds networks {sorted(ckpt.networks)}")
            info = {"source_format": "official-pickle" if fmt == "pickle" else f"official-{fmt}", "weights": which,
                    "networks": sorted(ckpt.networks), "prefix": "", "ignored_keys": 0,
                    "recipe": ckpt.recipes.get(which, {})}
            if isinstance(ckpt.metadata.get("dataset_kwargs"), dict):
                info["dataset_kwargs"] = ckpt.metadata["dataset_kwargs"]
            return ckpt.state_dict(which), info
        flat = torch_io.flatten_arrays(obj)
    sd, which, root, ignored = select_network(flat, weights)
    return sd, {"source_format": fmt, "weights": which, "prefix": root, "ignored_keys": ignored, "recipe": {}}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_out(out: str, overwrite: bool) -> str:
    from tvm_jax.model_io import output_directory

    target = output_directory(out)
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    return target


# What a flag is called in the official wrapper/modules (for messages), per converter setting.
_RECIPE_FIELDS = {
    "scaled_param": ("do_scale_param", "TVMWrapper.do_scale_param"),
    "mod_norm": ("do_mod_norm", "DiTBlock.do_mod_norm"),
    "norm": ("norm", "the blocks' norm1 class"),
    "num_heads": ("num_heads", "DiT.num_heads"),
    "input_size": ("img_resolution", "TVMWrapper.img_resolution"),
}
# The released checkpoints are named im<pixels>_w<w with p for the point>.pkl (im256_w1p75.pkl: w = 1.75).
_RELEASE_NAME = re.compile(r"^im\d+_w(\d+)(?:p(\d+))?(?:\.[A-Za-z]+)?$")
# Latent statistics and VAE of the official ImageNet recipes (configs/im256_*.yaml, im512_*.yaml:
# encoder.raw_mean/raw_std, final_std 1, stabilityai/sd-vae-ft-ema), by latent side length.
OFFICIAL_VAE = "hf://stabilityai/sd-vae-ft-ema"


def _official_latents(input_size: int, channels: int) -> dict[str, Any]:
    from tvm_jax.config import RAW_MEAN_256, RAW_MEAN_512, RAW_STD_256, RAW_STD_512

    stats = {32: (RAW_MEAN_256, RAW_STD_256, 256), 64: (RAW_MEAN_512, RAW_STD_512, 512)}.get(input_size)
    if channels != 4 or stats is None:
        return {}
    mean, std, pixels = stats
    return {"raw_mean": list(mean), "raw_std": list(std), "final_std": 1.0, "vae_path": OFFICIAL_VAE,
            "latent_stats_from": f"the official ImageNet {pixels}px configs"}


def _w_from_name(name: str) -> float | None:
    match = _RELEASE_NAME.match(os.path.basename(name))
    if not match:
        return None
    return float(f"{match.group(1)}.{match.group(2) or 0}")


def resolve_settings(recipe: dict[str, Any], flags: dict[str, Any], *, warn=None) -> tuple[dict[str, Any], dict]:
    """Converter settings from the file's recipe and the flags: a flag wins when given; a flag that
    contradicts the file is reported through ``warn`` (with the file's value) and recorded.
    Returns ``(settings, overridden)``; settings absent from both are left out."""
    settings: dict[str, Any] = {}
    overridden: dict[str, dict[str, Any]] = {}
    for name, (field, where) in _RECIPE_FIELDS.items():
        from_file, flag = recipe.get(field), flags.get(name)
        if flag is None:
            if from_file is not None:
                settings[name] = from_file
            continue
        settings[name] = flag
        if from_file is not None and from_file != flag:
            overridden[name] = {"flag": flag, "file": from_file}
            if warn is not None:
                warn(f"--{name}={flag} contradicts the checkpoint ({where} = {from_file!r}); using the flag")
    return settings, overridden


def convert(src: str, out: str, *, weights: str | None = None, naive: bool = False, num_heads: int | None = None,
            input_size: int | None = None, overwrite: bool = False, allow_classes: Iterable[str] = (),
            scaled_param: bool | None = None, w: float | None = None, mod_norm: bool | None = None,
            norm: str | None = None, warn=None, **overrides: Any) -> tuple[DiTConfig, dict, dict[str, Any]]:
    """Reads ``src`` (a path, or ``hf://ORG/NAME/FILE`` fetched into the Hugging Face cache), infers
    and checks the config, writes the exported model to ``out``; returns ``(config, params, metadata)``.

    An official network object records its recipe (:func:`tvm_jax.torch_io.network_recipe`):
    ``do_scale_param``, ``do_mod_norm``, the pre-norm, the head count and the resolution are taken
    from it; the arguments override it only when given (``None``: not given), and each
    contradiction is passed to ``warn`` with the file's value. A bare state dict records none of
    this: ``scaled_param`` must then be given (in256_w2, in256_w1p75 and in512_w2p25 use the scaled
    parameterisation, in512_w2p5 does not); mod-norm/norm default to the paper's Lipschitz DiT
    (``naive=True``: the naive DiT). ``w`` (the recipe's CFG weight, the sampler's default) is not
    in the file either: the released file names (``im256_w1p75.pkl``) give it."""
    if w is not None and not w >= 1.0:
        raise ConversionError(f"--w: the CFG weight must be >= 1, got {w}")
    from tvm_jax import hub
    from tvm_jax.model_io import save_model

    target = _check_out(out, overwrite)
    local = hub.download_file(src) if hub.is_hub_path(src) else src
    if not os.path.exists(local):
        raise FileNotFoundError(f"{src}: no such file")
    if not os.path.isfile(local):
        raise ConversionError(f"{src}: not a regular file")
    allow_classes = tuple(allow_classes)
    sd, info = read_source(local, weights=weights, allow_classes=allow_classes)
    recipe = info.pop("recipe")
    if naive:
        mod_norm = False if mod_norm is None else mod_norm
        norm = "layer" if norm is None else norm
    settings, overridden = resolve_settings(
        recipe, {"scaled_param": scaled_param, "mod_norm": mod_norm, "norm": norm, "num_heads": num_heads,
                 "input_size": input_size}, warn=warn)
    sd = strip_prefixes(sd)
    fields = {k: settings[k] for k in ("mod_norm", "norm") if k in settings}
    config = infer_config(sd, num_heads=settings.get("num_heads"), input_size=settings.get("input_size"),
                          naive=naive, **fields, **overrides)
    params = official_to_params(sd, config)
    if "scaled_param" not in settings:
        raise ConversionError(f"{src}: a bare state dict does not record whether the model uses the scaled "
                              "parameterisation (f = x + (s - t) w F): pass --scaled_param (in256_w2, in256_w1p75, "
                              "in512_w2p25) or --noscaled_param (in512_w2p5)")
    w_from = "--w" if w is not None else None
    if w is None and _w_from_name(src) is not None:
        w, w_from = _w_from_name(src), "the released file's name"
    metadata = {
        "converted_by": "tvm_jax.convert",
        "source": src if hub.is_hub_path(src) else os.path.abspath(src),
        **({"source_file": os.path.abspath(local)} if local != src else {}),
        "source_sha256": _sha256(local),
        **info,
        "recipe": recipe,
        "assumed": {k: getattr(config, k) for k in ("mod_norm", "norm") if k not in settings},
        "overridden": overridden,
        "scaled_param": bool(settings["scaled_param"]),
        **({"w": float(w), "w_from": w_from} if w is not None else {}),
        **_official_latents(config.input_size, config.in_channels),
        "allow_classes": list(allow_classes),
    }
    save_model(target, config, params, metadata=metadata, overwrite=overwrite)
    return config, params, metadata


# ----------------------------------------------------------------------------- CLI


def _flag_values():
    from absl import flags

    fv = flags.FlagValues()  # private: the library's other CLIs define flags of the same names globally
    flags.DEFINE_enum("weights", None, ["ema", "net", "ema_target"], "Which network of the checkpoint (default: "
                      "ema if present, else net).", flag_values=fv)
    flags.DEFINE_bool("naive", False, "The network is the naive DiT (no mod-norm, LayerNorm pre-norms); official "
                      "network objects record this themselves.", flag_values=fv)
    flags.DEFINE_enum("norm", None, ["rms", "layer"], "Pre-norm type (default: the file's, else rms; layer with "
                      "--naive).", flag_values=fv)
    flags.DEFINE_bool("mod_norm", None, "RMS-normalise the adaLN chunks (default: the file's do_mod_norm, else true; "
                      "false with --naive).", flag_values=fv)
    flags.DEFINE_integer("num_heads", None, "Attention heads (needed only for a bare state dict without q_norm "
                         "weights).", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("input_size", None, "Latent side length (needed only without pos_embed).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_multi_string("allow_class", [], "Extra class (module.Name, or a module.* pattern) to rebuild as an "
                              "inert stand-in when reading an official pickle.", flag_values=fv)
    flags.DEFINE_bool("scaled_param", None, "The checkpoint was trained with the scaled parameterisation "
                      "(f = x + (s - t) w F): true for in256_w2, in256_w1p75, in512_w2p25; false for in512_w2p5. "
                      "Default: the file's do_scale_param; required for a bare state dict.", flag_values=fv)
    flags.DEFINE_float("w", None, "The recipe's CFG weight, stored as the sampler's default (default: from a "
                       "released file's name, im256_w1p75.pkl -> 1.75).", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty OUT.", flag_values=fv)
    return fv


_USAGE = "usage: python -m tvm_jax.convert SRC|hf://ORG/NAME/FILE OUT [--weights=ema|net|ema_target] " \
         "[--[no]scaled_param] [--w=W] [--naive] [--num_heads=N] [--input_size=N] [--norm=rms|layer] " \
         "[--[no]mod_norm] [--allow_class=PATTERN] [--overwrite]"


def _normalise_flag(arg: str) -> str:
    # Accept --num-heads as well as absl's --num_heads.
    if arg.startswith("--") and len(arg) > 2:
        name, eq, value = arg[2:].partition("=")
        return "--" + name.replace("-", "_") + eq + value
    return arg


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 bad usage or input that cannot be converted)."""
    from absl import flags

    argv = list(sys.argv if argv is None else argv)
    fv = _flag_values()
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(_USAGE + "\n\n" + (__doc__ or "").split("\n\n")[0] + "\n\n" + fv.get_help())
        return 0
    try:
        args = argv[1:]
        cut = args.index("--") if "--" in args else len(args)
        args = [_normalise_flag(a) for a in args[:cut]] + args[cut:]
        positional = fv([argv[0] if argv else "convert"] + args)[1:]
    except flags.Error as e:
        print(f"error: {e}\n{_USAGE}", file=sys.stderr)
        return 2
    if len(positional) != 2:
        print(f"error: expected SRC and OUT, got {len(positional)} positional argument(s) {positional}\n{_USAGE}",
              file=sys.stderr)
        return 2
    src, out = positional
    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    try:
        config, params, metadata = convert(src, out, weights=fv.weights, naive=fv.naive, num_heads=fv.num_heads,
                                           input_size=fv.input_size, overwrite=fv.overwrite,
                                           allow_classes=fv.allow_class, scaled_param=fv.scaled_param, w=fv.w,
                                           norm=fv.norm, mod_norm=fv.mod_norm, warn=warn)
    except (ConversionError, torch_io.CheckpointFormatError, torch_io.UnsafePickleError, FileNotFoundError,
            FileExistsError, KeyError, OSError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, OSError) and e.strerror:  # in words, not "[Errno N] ..."
            message = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2
    n_params = sum(int(np.prod(np.shape(x))) for x in _paths(params).values())
    print(f"read {src} ({metadata['source_format']}, weights: {metadata['weights'] or 'the only network'}"
          f"{', ignored %d other keys' % metadata['ignored_keys'] if metadata['ignored_keys'] else ''})")
    print("inferred config: " + ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)))
    print(f"parameters: {n_params:,} (+ fixed position table {config.num_patches}x{config.hidden_size})")
    recipe = ", ".join(f"{k}={metadata[k]!r}" for k in ("scaled_param", "w") if k in metadata)
    print(f"recipe: {recipe}" + (f" (from the file: {sorted(metadata['recipe'])})" if metadata["recipe"] else ""))
    print(f"wrote {out}" + (f" (-> {os.path.realpath(out)})" if os.path.islink(out) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

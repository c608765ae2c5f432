"""Official TVM (PyTorch) DiT state dicts <-> tvm-jax parameters: the name mapping, the checks,
the inferred config and the reading of a source file (:mod:`tvm_jax.weights.torch_io` reads the
bytes; :mod:`tvm_jax.convert` is the command that writes an exported model).

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
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Sequence

import numpy as np

from tvm_jax.dit import DiTConfig, sincos_table_2d
from tvm_jax.weights import torch_io

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

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
:mod:`tvm_jax.weights.torch_io`). ``OUT`` becomes an exported model directory
(:func:`tvm_jax.weights.model_io.save_model`) that ``python -m tvm_jax.main --mode=sample
--checkpoint=OUT`` and :func:`tvm_jax.weights.model_io.load_model` read. Dashed spellings
(``--num-heads``, ``--input-size``, ``--allow-class``) are accepted too. The official names and how
they map to ours: :mod:`tvm_jax.weights.official`.

Which network: an official pickle holds ``net`` and usually ``ema``; ``--weights`` picks one
(default ``ema`` if present, the evaluation weights, else ``net``). A flat state dict that holds
several networks under different prefixes (``ema.``/``net.model.``/``model.``, ...) is handled
the same way (``net`` also matches ``model``/``state_dict``/``params`` prefixes); entries outside
the chosen network are ignored and counted in the export's metadata. Inside the chosen network
every key must be accounted for.

The recipe comes from the file when it holds the official network objects (a snapshot pickle or a
training state): ``do_scale_param`` (stored as the export's ``scaled_param``), the blocks'
``do_mod_norm`` and pre-norm, the head count and the resolution (see
:func:`tvm_jax.weights.torch_io.network_recipe`). Flags override it only when given, and a flag that
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
import os
import re
import sys
from typing import Any, Iterable, Sequence

import jax
import numpy as np

from tvm_jax.dit import DiTConfig
from tvm_jax.weights import torch_io
from tvm_jax.weights.official import (ConversionError, infer_config, official_to_params, read_source,
                                      strip_prefixes)

__all__ = ["convert", "resolve_settings", "main"]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_out(out: str, overwrite: bool) -> str:
    from tvm_jax.weights.model_io import output_directory

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

    An official network object records its recipe (:func:`tvm_jax.weights.torch_io.network_recipe`):
    ``do_scale_param``, ``do_mod_norm``, the pre-norm, the head count and the resolution are taken
    from it; the arguments override it only when given (``None``: not given), and each
    contradiction is passed to ``warn`` with the file's value. A bare state dict records none of
    this: ``scaled_param`` must then be given (in256_w2, in256_w1p75 and in512_w2p25 use the scaled
    parameterisation, in512_w2p5 does not); mod-norm/norm default to the paper's Lipschitz DiT
    (``naive=True``: the naive DiT). ``w`` (the recipe's CFG weight, the sampler's default) is not
    in the file either: the released file names (``im256_w1p75.pkl``) give it."""
    if w is not None and not w >= 1.0:
        raise ConversionError(f"--w: the CFG weight must be >= 1, got {w}")
    from tvm_jax.weights import hub
    from tvm_jax.weights.model_io import save_model

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
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
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

"""Exported models: a DiT's config and weights in one directory that the sampler can load.

Layout of an exported model directory::

    DIR/model_config.json   the DiTConfig fields (+ "format": "tvm-jax-model/1", free metadata)
    DIR/params/             Orbax (StandardCheckpointer) tree of the parameters, as a pure dict

Written by ``python -m tvm_jax.convert`` (official PyTorch weights) and by
``python -m tvm_jax.main --mode=export`` (a training run's EMA weights). Loading builds the model
abstractly from the config, restores the arrays against it and checks every shape.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from tvm_jax.dit import DiT, DiTConfig
from tvm_jax.networks import split_model

FORMAT = "tvm-jax-model/1"
CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def is_exported_model(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CONFIG_FILE)) and os.path.isdir(os.path.join(directory, PARAMS_DIR))


class ExportError(ValueError):
    """The exported model cannot be written where it was asked to go."""


def output_directory(path: str) -> str:
    """The directory an export to ``path`` writes: ``path`` itself (absolute), or, when ``path`` is
    a symbolic link to a directory, the link's target (the link stays and keeps pointing at the
    model). A dangling link, or one to something other than a directory, is refused."""
    path = os.path.abspath(path)
    if os.path.islink(path):
        target = os.path.realpath(path)
        if not os.path.exists(target):
            raise ExportError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: create that "
                              "directory or remove the link")
        if not os.path.isdir(target):
            raise ExportError(f"{path} is a symbolic link to {target}, which is not a directory")
        return target
    if os.path.exists(path) and not os.path.isdir(path):
        raise ExportError(f"{path} exists and is not a directory")
    return path


def save_model(directory: str, config: DiTConfig, params, *, metadata: dict[str, Any] | None = None,
               overwrite: bool = False) -> str:
    """Writes ``config`` and ``params`` (an ``nnx.State`` or pure dict) to ``directory`` (see
    :func:`output_directory` for symbolic links) and returns the directory written.

    Refuses to touch an existing non-empty directory unless ``overwrite`` (then the old content
    is replaced only after the new one was written completely next to it). On any failure
    nothing is left behind (no partial model, no ``.tmp-export``/``.old-export`` siblings) and an
    existing model is kept."""
    import shutil

    directory = output_directory(directory)
    if os.path.exists(directory) and os.listdir(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    config.validate()
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    _check_against_config(config, pure)
    tmp, old = directory + ".tmp-export", directory + ".old-export"
    try:
        for stale in (tmp, old):
            if os.path.lexists(stale):
                shutil.rmtree(stale)
        os.makedirs(tmp)
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(tmp, PARAMS_DIR), jax.tree.map(np.asarray, pure))
        meta = {"format": FORMAT, "config": dataclasses.asdict(config), "metadata": metadata or {}}
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        if os.path.exists(directory):
            os.replace(directory, old)
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(old, directory)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            where = e.filename or directory
            raise ExportError(f"cannot write the model to {directory}: {e.strerror or e} ({where})") from None
        raise
    return directory


def read_config(directory: str) -> tuple[DiTConfig, dict[str, Any]]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not an exported tvm-jax model: {CONFIG_FILE} is missing")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = set(meta["config"]) - fields
    if unknown:
        raise ValueError(f"{path}: unknown model config field(s) {sorted(unknown)}")
    config = DiTConfig(**meta["config"])
    config.validate()
    return config, meta.get("metadata", {})


def _abstract_params(config: DiTConfig) -> dict:
    _, params, _ = split_model(nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0))))
    return params


def _check_against_config(config: DiTConfig, pure) -> None:
    expected = dict(_flatten(_abstract_params(config)))
    got = dict(_flatten(pure))
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(np.shape(got[k])))
    if missing or extra or wrong:
        lines = []
        if missing:
            lines.append(f"missing: {missing}")
        if extra:
            lines.append(f"unexpected: {extra}")
        if wrong:
            lines.append("wrong shape: " + ", ".join(f"{k} {np.shape(got[k])} != {tuple(expected[k].shape)}"
                                                      for k in wrong))
        raise ValueError("parameters do not match the model config; " + "; ".join(lines))


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (str(k),))
    else:
        yield "/".join(prefix), tree


def load_model(directory: str, *, dtype: str | None = None, attention_impl: str | None = None):
    """Returns ``(config, params)`` (``params`` a pure dict, as :func:`tvm_jax.networks.split_model`
    gives). ``dtype``/``attention_impl`` override the stored compute settings (not the weights)."""
    config, _ = read_config(directory)
    overrides = {k: v for k, v in (("dtype", dtype), ("attention_impl", attention_impl)) if v is not None}
    if overrides:
        config = dataclasses.replace(config, **overrides)
        config.validate()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _abstract_params(config))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(os.path.join(os.path.abspath(directory), PARAMS_DIR), target)
    except Exception as e:  # orbax raises several types for structure/shape mismatches
        raise ValueError(f"{directory}: the stored parameters do not match {CONFIG_FILE}: {e}") from e
    _check_against_config(config, restored)
    return config, restored

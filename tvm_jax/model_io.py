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


def save_model(directory: str, config: DiTConfig, params, *, metadata: dict[str, Any] | None = None,
               overwrite: bool = False) -> str:
    """Writes ``config`` and ``params`` (an ``nnx.State`` or pure dict) to ``directory``.

    Refuses to touch an existing non-empty directory unless ``overwrite`` (then the old content
    is replaced only after the new one was written completely next to it)."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and os.listdir(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    config.validate()
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    _check_against_config(config, pure)
    tmp = directory + ".tmp-export"
    if os.path.exists(tmp):
        import shutil

        shutil.rmtree(tmp)
    os.makedirs(tmp)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(tmp, PARAMS_DIR), jax.tree.map(np.asarray, pure))
    meta = {"format": FORMAT, "config": dataclasses.asdict(config), "metadata": metadata or {}}
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    if os.path.exists(directory):
        import shutil

        old = directory + ".old-export"
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
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

"""Starting a training run from an exported model (``train.init_from=DIR``).

``DIR`` is an exported model directory (:mod:`tvm_jax.weights.model_io`: written by ``tvm_jax.convert``
from the official PyTorch weights, or by ``--mode=export`` from a run). Its architecture must be
the configured one: every architecture field of its ``model_config.json`` is compared with the
config (compute settings such as dtype, attention kernel and rematerialisation, and the
initialisation switches, may differ), then every parameter's path and shape with those the
config's network has. A mismatch is refused with the field or parameter named, before anything
is compiled. The weights then initialise the parameters and both EMAs; the optimiser starts
fresh. Resuming a workdir that already has a checkpoint takes precedence (the trainer says so).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from tvm_jax.weights import model_io
from tvm_jax.config import dit_config
from tvm_jax.dit import DiT, DiTConfig
from tvm_jax.networks import abstract_params, split_model

# DiTConfig fields that do not change what the weights mean.
COMPUTE_FIELDS = ("dtype", "attention_impl", "remat", "save_attention", "layer_loop", "init", "time_specinit")
# Where a DiTConfig field comes from in the experiment config (default: model.<name>).
CONFIG_FIELD = {"input_size": "data.shape", "in_channels": "data.shape", "num_classes": "data.num_classes"}


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """``"a/b/c" -> shape`` for every array of a nested dict."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(x)) for path, x in leaves}


def check_init_from(config, directory: str) -> DiTConfig:
    """Raises ``ValueError`` (starting ``train.init_from:``) unless ``directory`` holds an exported
    model with the configured architecture; returns its stored config. Reads no weights."""
    where = f"train.init_from: {directory}"
    if config.model.type != "dit":
        raise ValueError(f"train.init_from: exported models are DiTs, but model.type is {config.model.type!r}")
    if not model_io.is_exported_model(directory):
        raise ValueError(f"{where} is not an exported tvm-jax model (expected {model_io.CONFIG_FILE} and "
                         f"{model_io.PARAMS_DIR}/ inside; write one with tvm_jax.convert or --mode=export)")
    try:
        stored, _ = model_io.read_config(directory)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ValueError(f"train.init_from: {e}") from None
    expected = dit_config(config)
    fields = [f.name for f in dataclasses.fields(DiTConfig) if f.name not in COMPUTE_FIELDS]
    differ = [f"{CONFIG_FIELD.get(name, 'model.' + name)} ({name}): exported {getattr(stored, name)!r}, "
              f"config {getattr(expected, name)!r}"
              for name in fields if getattr(stored, name) != getattr(expected, name)]
    if differ:
        raise ValueError(f"{where} has a different architecture: {'; '.join(differ)}")
    have = _shapes(abstract_params(config))
    got = _shapes(split_model(nnx.eval_shape(lambda: DiT(stored, rngs=nnx.Rngs(0))))[1])
    wrong = [f"{k}: exported {got.get(k, 'missing')}, config {have.get(k, 'missing')}"
             for k in sorted(set(have) | set(got)) if got.get(k) != have.get(k)]
    if wrong:
        raise ValueError(f"{where}: parameter shapes differ from the config's model: {'; '.join(wrong[:5])}"
                         + (f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""))
    return stored


def load_init_params(config, directory: str, shardings) -> dict:
    """The exported weights, checked (:func:`check_init_from`), as the config's parameter dtypes,
    placed in ``shardings`` (the parameters' shardings)."""
    check_init_from(config, directory)
    try:
        _, params = model_io.load_model(directory)
    except (ValueError, OSError) as e:
        raise ValueError(f"train.init_from: {e}") from None
    target = abstract_params(config)
    return jax.tree.map(lambda a, t, s: jax.device_put(np.asarray(a, t.dtype), s), params, target, shardings)

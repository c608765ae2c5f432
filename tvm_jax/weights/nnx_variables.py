"""The variables of an NNX module addressed by path, and the checks of a foreign state dict
against them: what loading PyTorch weights into the FID Inception-v3
(:mod:`tvm_jax.evaluation.inception`) and the Stable Diffusion VAE (:mod:`tvm_jax.vae`) share.
Each of those maps its own key names and layouts; this module lists, reads and writes the
variables and words the errors the same way for both."""
from __future__ import annotations

from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def flat_variables(model: nnx.Module, variable_type) -> list[tuple[tuple, tuple[int, ...]]]:
    """[(path, shape)] of the variables of ``model`` (concrete or abstract)."""
    state = nnx.state(model, variable_type)
    flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
    out = []
    for path, leaf in flat:
        shape = getattr(leaf, "shape", None)
        if shape is None:
            shape = np.shape(leaf.value)
        out.append((tuple(path), tuple(shape)))
    return out


def get_variable(model: nnx.Module, path: tuple):
    """The variable of ``model`` at ``path`` (attribute names, integer indices into lists)."""
    obj = model
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def _assign(var: nnx.Variable, value: jax.Array) -> None:
    # set_value also works on the abstract (ShapeDtypeStruct) variables of an nnx.eval_shape model.
    if hasattr(var, "set_value"):
        var.set_value(value)
    else:  # older flax
        var.value = value


def assign_arrays(model: nnx.Module, arrays: Mapping[tuple, np.ndarray]) -> nnx.Module:
    """Sets every ``path -> array`` of ``arrays`` into ``model`` in place (which may be abstract,
    from ``nnx.eval_shape``) and returns it."""
    for path, arr in arrays.items():
        _assign(get_variable(model, path), jnp.asarray(arr))
    return model


def check_keys(expected: Iterable[str], given: Iterable[str], what: str, *,
               shown: Mapping[str, str] | None = None) -> None:
    """Raises ``KeyError`` listing the missing and the unexpected keys, headed by ``what``
    (e.g. "VAE weights do not match the model config"); nothing when the two sets agree.
    ``shown`` maps a given key to the name the file used (when keys were renamed first)."""
    expected, given = set(expected), set(given)
    missing = sorted(expected - given)
    unexpected = sorted((shown or {}).get(k, k) for k in given - expected)
    if missing or unexpected:
        msg = [f"{what}:"]
        if missing:
            msg.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            msg.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        raise KeyError("\n".join(msg))


def shape_dtype_error(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> str | None:
    """Why ``arr`` (stored under ``name``) cannot fill a variable of ``shape``: a wrong shape or a
    non-floating dtype; None when it can."""
    if tuple(arr.shape) != tuple(shape):
        return f"{name}: expected {tuple(shape)}, got {tuple(arr.shape)}"
    if not np.issubdtype(arr.dtype, np.floating):
        return f"{name}: expected a floating dtype, got {arr.dtype}"
    return None


def raise_shape_dtype_errors(errors: list[str], what: str) -> None:
    """Raises ``ValueError`` listing ``errors`` (from :func:`shape_dtype_error`) under ``what``."""
    if errors:
        raise ValueError(f"{what}:\n  " + "\n  ".join(sorted(errors)))

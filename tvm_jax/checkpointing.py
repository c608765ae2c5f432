"""Orbax checkpoints of a training run: train state and run metadata.

``WORKDIR/checkpoints/<step>/`` holds two items:

* ``state``: the :class:`~tvm_jax.training.TrainState` (params, optimiser state, both EMAs, step,
  RNG, skip counters), saved asynchronously and restored directly into its shardings;
* ``meta``: JSON with the model/objective/data settings of the run.

The data position needs no item of its own: the input pipeline's global batches are a function
of the step alone (:func:`tvm_jax.data.pipeline.make_loader`), so a resumed run, on any number of
processes, sees exactly the batches an uninterrupted one would. (Checkpoints of older versions
also hold a ``data`` item; it is ignored.)

Orbax writes each checkpoint to a temporary directory and renames it when complete (atomic),
keeps the newest ``keep`` and deletes older ones. Resuming refuses, with a clear error, a
checkpoint whose stored settings disagree with the config (and never writes into that
workdir), and reports a checkpoint it cannot read as corrupt instead of starting over.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

# Settings that must match between a checkpoint and the config that resumes it.
RESUME_KEYS = ("model", "objective", "data.shape", "data.num_classes", "data.source", "train.global_batch_size",
               "ema", "optimizer", "seed")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, or written by a different configuration)."""


def run_signature(config) -> dict[str, Any]:
    out = {}
    for key in RESUME_KEYS:
        node = config
        for part in key.split("."):
            node = node[part]
        out[key] = node.to_dict() if hasattr(node, "to_dict") else node
    return json.loads(json.dumps(out, default=list))


def checkpoint_directory(workdir: str, *, must_exist: bool = False) -> str:
    """``WORKDIR/checkpoints`` (absolute). ``must_exist``: raises ``FileNotFoundError`` if it is not
    a directory (reading a run must not create anything)."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if must_exist and not os.path.isdir(directory):
        what = "does not exist" if not os.path.exists(workdir) else f"has no checkpoints ({directory} is missing)"
        raise FileNotFoundError(f"--workdir {workdir} {what}: train first, or pass --checkpoint=DIR (an exported "
                                "model)")
    return directory


class Checkpointer:
    """``create=False``: for reading an existing run (no directory is made; see
    :func:`checkpoint_directory` with ``must_exist``)."""

    def __init__(self, workdir: str, *, keep: int, config, async_save: bool = True, create: bool = True):
        self.directory = checkpoint_directory(workdir, must_exist=not create)
        self.config = config
        self._closed = False
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta"),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, *, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave({"step": int(step), "signature": run_signature(self.config)}))
        return self.manager.save(step, args=args, force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, abstract_state, step: int | None = None):
        """Restores ``(state, step)`` into ``abstract_state``'s shapes/shardings. Raises
        :class:`CheckpointError` when the checkpoint cannot be used."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        where = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001  (orbax raises many types for unreadable data)
            raise CheckpointError(f"checkpoint {where} is unreadable (corrupt or incomplete: {e}); it was left "
                                  "untouched. Move it away to resume from an older one, or use a new workdir.") from e
        expected = run_signature(self.config)
        stored = meta.get("signature", {})
        diff = sorted(k for k in expected if stored.get(k) != expected[k])
        if diff:
            details = "; ".join(d for k in diff for d in _differences(stored.get(k, "<missing>"), expected[k], k))
            raise CheckpointError(
                f"checkpoint {where} was written with different settings for {diff} ({details}); refusing to resume "
                "(nothing was changed in the workdir). Use a new --workdir, or the original config.")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {where} does not match the model or is corrupt ({type(e).__name__}: {e}); "
                                  "it was left untouched.") from e
        logging.info("Restored checkpoint %s", where)
        return restored["state"], step

    def close(self) -> None:
        """Waits for a save in flight, then closes (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        self.manager.wait_until_finished()
        self.manager.close()


def _differences(stored, expected, name: str) -> list[str]:
    """``"name.field: checkpoint X, config Y"`` for every leaf where two signatures differ."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        return [d for k in sorted(set(stored) | set(expected))
                for d in _differences(stored.get(k, "<missing>"), expected.get(k, "<missing>"), f"{name}.{k}")]
    return [] if stored == expected else [f"{name}: checkpoint {stored!r}, config {expected!r}"]


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs (with shardings) describing ``tree``, for restoring into it."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

"""Declared sharding: a (data, fsdp) device mesh and named shardings for state and batches.

* The mesh spans every visible device (all hosts): ``data`` x ``fsdp`` with
  ``fsdp = config.mesh.fsdp`` (1 = pure data parallelism, parameters replicated).
* Batches are split along their leading axis over both axes, ``P(("data", "fsdp"))``.
* Parameters, optimiser moments and both EMAs are sharded FSDP-style over ``fsdp``: every array
  with at least ``MIN_SHARD_SIZE`` elements is split along its largest axis divisible by the fsdp
  size (the leading depth axis of stacked DiT blocks is skipped); smaller or indivisible arrays
  are replicated. XLA inserts the all-gathers and reduce-scatters.

Multi-host: call :func:`initialize_distributed` first (SLURM is detected by
``jax.distributed.initialize()``; plain ``--coordinator_address``/``--num_processes``/
``--process_id`` settings work too).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ("data", "fsdp")
MIN_SHARD_SIZE = 1 << 14


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Starts JAX's multi-process runtime when this is a multi-process job (no-op otherwise).

    Processes without GPUs exchange data through gloo (XLA:CPU has no cross-process collectives
    otherwise), so several CPU processes form one job too: that is how the tests check the
    multi-process paths."""
    if coordinator_address or num_processes:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = {}
    else:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh.fsdp: {fsdp} does not divide the {n} visible devices")
    return Mesh(np.asarray(devices).reshape(n // fsdp, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int, *, stacked: bool = False) -> P:
    """FSDP partition spec for one array (see the module docstring)."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARD_SIZE:
        return P()
    axes = range(1 if stacked and len(shape) > 1 else 0, len(shape))
    candidates = [a for a in axes if shape[a] % fsdp == 0]
    if not candidates:
        return P()
    best = max(candidates, key=lambda a: (shape[a], -a))
    spec = [None] * len(shape)
    spec[best] = "fsdp"
    return P(*spec)


def state_shardings(abstract_tree, mesh: Mesh):
    """NamedShardings for a pytree of arrays/ShapeDtypeStructs (params, optimiser state, EMAs)."""
    fsdp = mesh.shape["fsdp"]

    def one(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        stacked = "blocks" in names
        return NamedSharding(mesh, param_spec(tuple(np.shape(leaf)), fsdp, stacked=stacked))

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(f"train.global_batch_size {global_batch_size} is not divisible by the {n} devices "
                         f"of the mesh {dict(mesh.shape)}")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's part of a batch into global arrays sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def from_host(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array with ``sharding`` from a host value every process holds in full (each
    process places only its own shards; no cross-process transfer)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

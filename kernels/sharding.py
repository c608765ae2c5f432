"""Running a Pallas kernel on the batch shards of the active mesh.

A ``pallas_call`` is an opaque custom call that XLA's SPMD partitioner would replicate, so every
kernel of this package runs under ``jax.shard_map`` on per-device batch shards instead
(:func:`batch_sharded`). Shared by the attention entry points (:mod:`kernels.api`) and the
memory-pass kernels (:mod:`kernels.gelu`, :mod:`kernels.modulation`, :mod:`kernels.qkv_tangent`,
:mod:`kernels.norm_tangent`).
"""
from __future__ import annotations

import math

import jax


def mesh_batch_axes():
    """Non-manual axes of the active (abstract) mesh, in mesh order; () if none."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    if get is None:
        return None, ()
    mesh = get()
    if mesh is None or mesh.empty:
        return None, ()
    manual = jax.sharding.AxisType.Manual
    axes = tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != manual)
    return mesh, axes


def batch_sharded(fn, args, n_out: int, replicated=()):
    """Runs fn(*args, *replicated) with the batch dim of ``args`` split over all non-manual mesh
    axes (if a mesh is set); ``replicated`` arrays (e.g. norm weights) go to every device whole.

    A pallas_call is an opaque custom call that the SPMD partitioner would replicate, so the
    kernels run under ``jax.shard_map`` on per-device batch shards instead.
    """
    replicated = tuple(replicated)
    mesh, axes = mesh_batch_axes()
    if not axes:
        return fn(*args, *replicated)
    n = math.prod(mesh.shape[a] for a in axes)
    batch = args[0].shape[0]
    if batch % n:
        raise ValueError(
            f"batch size {batch} of a Pallas kernel call is not divisible by the {n} devices of mesh "
            f"axes {axes}; the Pallas kernels shard the batch dimension over all mesh axes"
        )
    spec = jax.sharding.PartitionSpec(axes)
    whole = jax.sharding.PartitionSpec()
    out_specs = spec if n_out == 1 else (spec,) * n_out
    explicit = jax.sharding.AxisType.Explicit
    if any(t == explicit for n, t in zip(mesh.axis_names, mesh.axis_types) if n in axes):
        # Explicit axes: the sharding is part of the type and shard_map checks it; move the
        # batch onto the mesh first (a local slice when the input is replicated).
        args = tuple(jax.reshard(a, spec) for a in args)
        replicated = tuple(jax.reshard(a, whole) for a in replicated)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(spec,) * len(args) + (whole,) * len(replicated),
        out_specs=out_specs,
        axis_names=frozenset(axes),
        check_vma=False,
    )(*args, *replicated)

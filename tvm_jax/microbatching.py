"""Micro-batches for gradient accumulation: how a global batch is split, and how big a split fits.

A step of global batch ``B`` over ``N`` devices (batch sharded ``P(("data", "fsdp"))``, so device
``d`` holds rows ``[d B/N, (d+1) B/N)``) with ``microbatch_size`` ``m`` runs ``B / (N m)``
micro-batches. Micro-batch ``j`` holds every device's ``j``-th local slice of ``m`` rows
(:func:`split_microbatches`): the reshape only regroups rows each device already has, so no data
moves between devices, and every micro-batch is again sharded over all devices.

:func:`compile_train_step` compiles the step for the configured micro-batch size, or, with
``microbatch_size = 0`` ("auto"), for the largest divisor of the per-device batch whose compiled
step fits the device: XLA's memory analysis of the compiled executable (arguments + outputs +
temporaries - donated/aliased bytes, per device) against the device's memory
(``memory_stats()["bytes_limit"]``) less a safety margin. Sizes are tried from the largest down;
after a size that does not fit, sizes that cannot fit either by that size's memory analysis
(:func:`_next_candidate`) are skipped, so a few compilations suffice. Devices that report no memory (the
CPU) get the whole per-device batch. The executable of the chosen size is the one training runs;
nothing is cached on disk. The benchmark scripts use the same function.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tvm_jax.sharding import DATA_AXES

SAFETY_MARGIN = 0.10  # of the device's memory, left free for the allocator and fragmentation


def micro_batch_count(global_batch: int, num_devices: int, microbatch_size: int) -> int:
    """Number of micro-batches per step; ``microbatch_size`` 0 means one (the whole per-device
    batch). Raises ``ValueError`` naming ``train.microbatch_size`` when it does not divide the
    per-device batch."""
    if global_batch % num_devices:
        raise ValueError(f"train.global_batch_size {global_batch} is not divisible by the {num_devices} devices")
    per_device = global_batch // num_devices
    if microbatch_size == 0:
        return 1
    if microbatch_size < 0 or per_device % microbatch_size:
        raise ValueError(
            f"train.microbatch_size: {microbatch_size} does not divide the per-device batch {per_device} "
            f"(train.global_batch_size {global_batch} over {num_devices} devices); use one of "
            f"{divisors(per_device)}, or 0 to choose automatically")
    return per_device // microbatch_size


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def split_microbatches(tree, micro_batches: int, num_devices: int, batch_sharding: NamedSharding | None = None):
    """``(B, ...)`` arrays -> ``(micro_batches, B / micro_batches, ...)``, micro-batch ``j`` made of
    every device's ``j``-th local slice (see the module docstring). With ``batch_sharding`` the
    layout is pinned with sharding constraints (each step is local to the devices)."""

    def constrain(a, spec):
        if batch_sharding is None:
            return a
        return jax.lax.with_sharding_constraint(a, NamedSharding(batch_sharding.mesh, spec))

    def one(a):
        rest = a.shape[1:]
        per_device = a.shape[0] // num_devices
        m = per_device // micro_batches
        a = constrain(a.reshape(num_devices, micro_batches, m, *rest), P(DATA_AXES))
        a = constrain(jnp.swapaxes(a, 0, 1), P(None, DATA_AXES))
        return constrain(a.reshape(micro_batches, num_devices * m, *rest), P(None, DATA_AXES))

    return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------- memory


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is XLA's out-of-memory error (a ``jax.errors.JaxRuntimeError``, formerly
    ``XlaRuntimeError``, whose message starts with ``RESOURCE_EXHAUSTED``)."""
    if not isinstance(error, jax.errors.JaxRuntimeError):
        return False
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def device_memory_limit(device=None) -> int | None:
    """Bytes the device's allocator may use, or None when the device does not say (the CPU)."""
    device = jax.local_devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def compiled_memory_bytes(compiled) -> int | None:
    """Per-device bytes of a compiled executable: arguments + outputs + temporaries - aliased."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    microbatch_size: int  # examples per device per micro-step
    compiled: jax.stages.Compiled
    estimated_bytes: int | None  # per device, from XLA's memory analysis
    limit_bytes: int | None  # the device's memory (None: unknown, e.g. CPU)


def _gib(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _compile(lower: Callable[[int], jax.stages.Lowered], size: int):
    """``lower(size).compile()``, logged before and after: an XL step takes from 20 s (layer scan)
    to about 100 s (unrolled layers) to compile, and automatic sizing may compile several."""
    logging.info("Compiling the training step for micro-batches of %d per device ...", size)
    start = time.perf_counter()
    compiled = lower(size).compile()
    logging.info("Compiled the step for micro-batches of %d in %.1f s", size, time.perf_counter() - start)
    return compiled


def compile_train_step(lower: Callable[[int], jax.stages.Lowered], per_device_batch: int, microbatch_size: int, *,
                       memory_limit: int | None = None, margin: float = SAFETY_MARGIN) -> CompiledStep:
    """Compiles ``lower(size)`` (the step lowered for micro-batches of ``size`` examples per
    device) for ``microbatch_size``, or for the largest divisor of ``per_device_batch`` that fits
    when ``microbatch_size`` is 0. ``memory_limit`` defaults to the first local device's memory.
    Raises ``ValueError`` (naming the settings to change) when not even one example per device
    fits."""
    if microbatch_size:
        compiled = _compile(lower, microbatch_size)
        choice = CompiledStep(microbatch_size, compiled, compiled_memory_bytes(compiled), None)
        logging.info("Micro-batch size %d per device (train.microbatch_size); estimated memory %s per device",
                     microbatch_size, _gib(choice.estimated_bytes))
        return choice
    limit = device_memory_limit() if memory_limit is None else memory_limit
    if limit is None:
        compiled = _compile(lower, per_device_batch)
        logging.info("Micro-batch size %d per device (the whole per-device batch: the device reports no memory "
                     "limit); estimated memory %s per device", per_device_batch,
                     _gib(compiled_memory_bytes(compiled)))
        return CompiledStep(per_device_batch, compiled, compiled_memory_bytes(compiled), None)
    usable = int(limit * (1.0 - margin))
    candidates = sorted(divisors(per_device_batch), reverse=True)
    tried = []
    i = 0
    while i < len(candidates):
        size = candidates[i]
        try:
            compiled = _compile(lower, size)
        except jax.errors.JaxRuntimeError as e:  # XLA may give up on memory while compiling
            if not is_out_of_memory(e):
                raise
            tried.append(f"{size}: out of memory while compiling")
            i += 1
            continue
        estimate = compiled_memory_bytes(compiled)
        if estimate is None or estimate <= usable:
            logging.info("Micro-batch size %d per device (chosen automatically: %d micro-batches of the per-device "
                         "batch %d); estimated memory %s of %s per device (%.0f%% kept free)%s", size,
                         per_device_batch // size, per_device_batch, _gib(estimate), _gib(limit), 100 * margin,
                         f"; too large: {', '.join(tried)}" if tried else "")
            return CompiledStep(size, compiled, estimate, limit)
        tried.append(f"{size}: {_gib(estimate)}")
        i = max(i + 1, _next_candidate(candidates, compiled, size, usable))
        del compiled
    raise ValueError(
        f"train.microbatch_size: not even 1 example per device fits in {_gib(usable)} ({_gib(limit)} per device less "
        f"{100 * margin:.0f}%); estimated per micro-batch size: {', '.join(tried)}. Shard the parameters "
        "(mesh.fsdp), rematerialise activations (model.remat) or use more devices")


def _next_candidate(candidates: list[int], compiled, size: int, usable: int) -> int:
    """Index of the largest size worth compiling next. Arguments and outputs (state, batch) do not
    depend on the micro-batch size, and temporaries (activations per example plus a fixed part)
    shrink at most in proportion to it, so ``fixed + temp * m / size`` underestimates the memory
    at ``m``: sizes above the largest ``m`` it lets fit would not fit either and are skipped
    (saving their compilations)."""
    m = compiled.memory_analysis()
    fixed = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    for j, candidate in enumerate(candidates):
        if fixed + m.temp_size_in_bytes * candidate / size <= usable:
            return j
    return len(candidates)

"""Where a compiled step spends its device time: trace it, aggregate the device's ops, group them.

:func:`profile` runs a compiled function a few times under ``jax.profiler.trace`` and returns
:func:`aggregate_trace` of the trace: one row per executed op (the kernel's name, the
HLO instruction it belongs to and that instruction's JAX name stack from the compiled module's
metadata) with its count and total device time. :func:`summarise` groups the rows into families
(:func:`op_family`) in milliseconds per call, :func:`per_kernel` by kernel name.

Name stacks reach the rows only where the trace names the HLO instruction of each kernel: on a
GPU, run with XLA's command buffers off (``XLA_FLAGS=--xla_gpu_enable_command_buffer=``), else
the kernels are reported under the command buffer and only their kernel names are grouped. With
names, work that rematerialisation recomputes in the backward (JAX's ``rematted_computation``
scope) is its own family.

Which events count: on a GPU, the kernels on the device planes (``/device:GPU:N``, one event per
kernel launch, CUPTI's timing); elsewhere, the host threads' XLA thunks that carry an ``hlo_op``
(this is what the CPU tests exercise). Only the first device plane is read, so a multi-device
step reports one device's time.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
from typing import Any, Callable, Iterable

import jax

# Families, in the order rows are tested against them (first match wins). Each is a predicate on
# the row (kernel name, HLO instruction, JAX name stack), all lower-cased.
_ATTENTION_KERNELS = {  # kernels/flash.py names its pallas_calls tvm_*; tested in this order
    "attention forward + tangent (JVP)": ("jvp_fwd",),
    "attention backward (JVP)": ("jvp_bwd",),
    "attention forward (plain)": ("flash_fwd", "fwd_kernel"),
    "attention backward (plain)": ("flash_bwd", "bwd_kv", "bwd_q"),
    "attention prologue (qkv bias, q/k norms, split)": ("split_qkv",),
    "attention prologue backward (JVP mode)": ("qkv_tangent_bwd",),  # kernels/qkv_tangent.py
}
_CUDNN_ATTENTION = ("cudnn", "fmha", "flash_attention", "sdpa")
_MATMUL = ("gemm", "nvjet", "xmma", "cutlass", "cublas", "dot", "matmul", "sm90_", "wgmma")
_OPTIMIZER = ("optimizer", "adam", "incremental_update", "ema")
_COPY = ("copy", "memcpy", "memset", "transpose", "dynamic-update-slice", "dynamic_update_slice", "all-gather",
         "all-reduce", "reduce-scatter", "collective", "nccl")


def op_family(kernel: str, hlo_op: str = "", name_stack: str = "") -> str:
    """The family of one device op (see the module docstring)."""
    k, h, n = kernel.lower(), hlo_op.lower(), name_stack.lower()
    for scope in ("optimizer", "ema"):
        if f"/{scope}/" in f"/{n}/" or n.endswith(f"/{scope}") or n.startswith(f"{scope}/"):
            return "optimizer and EMA updates"
    if "bias_gelu" in k or "bias_gelu" in n:  # kernels/gelu.py
        return "MLP bias + GELU (Pallas)"
    if "residual_norm_modulate" in k or "residual_norm_modulate" in n:  # kernels/modulation.py
        return "second pre-norm: residual, RMS norm, modulation (Pallas)"
    if "norm_modulate_tangent" in k or "norm_modulate_tangent" in n:  # kernels/norm_tangent.py
        return "pre-norms of the JVP call, backward (Pallas)"
    if "pallas" in n or "pallas" in k or any(tag in k for tags in _ATTENTION_KERNELS.values() for tag in tags):
        for family, tags in _ATTENTION_KERNELS.items():
            if any(tag in k for tag in tags):
                return family
        return "attention (other Pallas kernels)"
    if "rematted_computation" in n:
        return "rematerialisation (forward work recomputed in the backward)"
    if any(tag in k or tag in h for tag in _CUDNN_ATTENTION):
        return "attention (cuDNN)"
    if any(tag in k or tag in h for tag in _MATMUL):
        return "matmuls"
    if any(tag in k or tag in h for tag in _COPY):
        return "copies, layout changes and collectives"
    if any(re.search(rf"(?<![a-z]){tag}(?![a-z])", n) for tag in _OPTIMIZER):  # words: not "rematted"
        return "optimizer and EMA updates"
    return "elementwise, reductions and normalisation"


def hlo_name_stacks(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its ``op_name`` metadata (JAX's name stack) in a module's text."""
    out = {}
    pattern = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name="([^"]*)"', re.M)
    for name, op_name in pattern.findall(hlo_text):
        out[name] = op_name
    return out


def _stat(event, name: str) -> Any:
    for key, value in event.stats:
        if key == name:
            return value
    return None


def aggregate_trace(trace_dir: str, name_stacks: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows ``{kernel, hlo_op, name_stack, count, total_ms, family}`` of a ``jax.profiler`` trace
    directory, largest total first."""
    from jax.profiler import ProfileData

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    data = ProfileData.from_file(paths[-1])
    planes = list(data.planes)
    device = [p for p in planes if p.name.startswith("/device:GPU")]
    device.sort(key=lambda p: p.name)
    name_stacks = name_stacks or {}
    totals: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0, 0.0])
    if device:
        events = (e for line in device[0].lines for e in line.events)
    else:
        events = (e for p in planes if p.name.startswith("/host") for line in p.lines for e in line.events
                  if _stat(e, "hlo_op") is not None)
    for e in events:
        hlo_op = _stat(e, "hlo_op")
        if hlo_op is None and not device:
            continue
        key = (e.name, str(hlo_op or ""))
        totals[key][0] += 1
        totals[key][1] += e.duration_ns / 1e6
    rows = []
    for (kernel, hlo_op), (count, total_ms) in totals.items():
        stack = name_stacks.get(hlo_op, "")
        rows.append(dict(kernel=kernel, hlo_op=hlo_op, name_stack=stack, count=int(count), total_ms=total_ms,
                         family=op_family(kernel, hlo_op, stack)))
    rows.sort(key=lambda r: -r["total_ms"])
    return rows


def summarise(rows: Iterable[dict[str, Any]], calls: int) -> dict[str, dict[str, float]]:
    """family -> ``{ms_per_call, share}`` (share of the summed device time), largest first."""
    per: dict[str, float] = collections.defaultdict(float)
    for r in rows:
        per[r["family"]] += r["total_ms"] / calls
    total = sum(per.values()) or 1.0
    return {f: {"ms_per_call": ms, "share": ms / total} for f, ms in sorted(per.items(), key=lambda kv: -kv[1])}


def per_kernel(rows: Iterable[dict[str, Any]], calls: int) -> dict[str, float]:
    """kernel name -> ms per call, summed over the rows (HLO instructions) that ran it, largest
    first."""
    per: dict[str, float] = collections.defaultdict(float)
    for r in rows:
        per[r["kernel"]] += r["total_ms"] / calls
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def profile(run: Callable[[], Any], *, calls: int = 2, hlo_text: str = "") -> dict[str, Any]:
    """Traces ``calls`` calls of ``run()`` (one call of the compiled step, say; it keeps its own
    state) and returns ``{"calls", "summary", "rows"}``; ``hlo_text`` (``compiled.as_text()``)
    lends the rows their JAX name stacks."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(calls):
                jax.block_until_ready(run())
        rows = aggregate_trace(tmp, hlo_name_stacks(hlo_text))
    return {"calls": calls, "summary": summarise(rows, calls), "rows": rows}

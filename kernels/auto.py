"""``impl="auto"``: pick Pallas, cuDNN or XLA per shape, from committed GPU measurements.

The table is ``kernels/auto_table.json``, written by ``bench/attention.py --write-table``::

    {
      "format": 1,
      "entries": [
        {
          "device_kind": "NVIDIA H100 80GB HBM3",   # jax.devices()[0].device_kind
          "mode": "jvp",              # "jvp": fwd+tangent then backward through (o, t_o)
                                      # "plain": fwd then backward (no tangent)
          "dtype": "bfloat16",        # input dtype name
          "head_dim": 128,            # head dim the kernels run at (next pow2, >= 16)
          "seq_bucket": 4096,         # next power of two >= seq length (>= 16)
          "shape": [1, 24, 4096, 128],# measured (batch, heads, seq, head_dim), informational
          "pallas_ms": 8.1,           # median latency of the whole call, ms (null: failed)
          "xla_ms": 13.0,
          "cudnn_ms": 2.1,            # optional, plain mode: cuDNN's fused attention
          "date": "2025-01-01",
          "jax_version": "0.11.2",
          "config": {...}             # optional: AttentionConfig.to_dict() that was measured
        }
      ]
    }

Decision for a call (mode, seq_len, head_dim, dtype) on device kind ``K``:

* not on a GPU backend → ``"xla"``;
* candidates: ``"xla"`` and ``"pallas"``, plus ``"cudnn"`` only when the caller says cuDNN
  can take the call (``cudnn=True``: mode, dtype, lengths, head dim and GPU checked by
  :func:`kernels.cudnn.unsupported_reason`);
* matching entries = same mode, dtype, padded head dim and seq bucket;
* a group of entries picks the candidate with the smallest ``sum(<impl>_ms)`` over the
  group, counting only candidates measured (non-null) in every entry of the group; ties go
  to ``"xla"``, then ``"pallas"``; an empty group picks ``"xla"``;
* if the table has any entry for ``K``: the group is K's matching entries;
* if the table has no entry at all for ``K`` (an unmeasured GPU): each other GPU's matching
  entries pick for that GPU; the choice is theirs iff there is at least one such GPU and
  they all agree; otherwise ``"xla"``.

So an unmeasured shape always falls back to XLA, the measured-safe default, and cuDNN is
never chosen for a call it cannot take.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from kernels.config import MIN_BLOCK, next_pow2, padded_head_dim

TABLE_PATH = Path(__file__).with_name("auto_table.json")
TABLE_FORMAT = 1
MODES = ("plain", "jvp")
IMPLS = ("xla", "pallas", "cudnn")  # in tie-break order
_REQUIRED = ("device_kind", "mode", "dtype", "head_dim", "seq_bucket", "pallas_ms", "xla_ms")

_cache: dict = {}


def seq_bucket(seq_len: int) -> int:
    return max(MIN_BLOCK, next_pow2(int(seq_len)))


def _validate_table(table: Any, where: str) -> dict:
    if not isinstance(table, Mapping) or "entries" not in table:
        raise ValueError(f"auto table {where}: expected an object with an 'entries' list")
    if table.get("format", TABLE_FORMAT) != TABLE_FORMAT:
        raise ValueError(f"auto table {where}: unsupported format {table.get('format')!r}")
    entries = table["entries"]
    if not isinstance(entries, list):
        raise ValueError(f"auto table {where}: 'entries' must be a list")
    for i, e in enumerate(entries):
        missing = [k for k in _REQUIRED if k not in e]
        if missing:
            raise ValueError(f"auto table {where}: entry {i} lacks {missing}")
        if e["mode"] not in MODES:
            raise ValueError(f"auto table {where}: entry {i} has unknown mode {e['mode']!r}")
        if e["mode"] != "plain" and "cudnn_ms" in e:
            raise ValueError(f"auto table {where}: entry {i} has cudnn_ms in mode {e['mode']!r} (plain only)")
    return dict(table)


def load_table(path: str | os.PathLike | None = None) -> dict:
    """Loads (and caches, keyed by path and mtime) the auto table. Missing file = empty."""
    path = Path(path) if path is not None else TABLE_PATH
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return {"format": TABLE_FORMAT, "entries": []}
    key = (str(path), mtime)
    if key not in _cache:
        with open(path) as f:
            _cache[key] = _validate_table(json.load(f), str(path))
    return _cache[key]


def _fastest(entries, candidates) -> str:
    """The candidate with the smallest summed latency over ``entries`` (see module docstring)."""
    best, best_ms = "xla", float("inf")
    for impl in candidates:
        times = [e.get(f"{impl}_ms") for e in entries]
        if times and all(t is not None for t in times) and sum(times) < best_ms:
            best, best_ms = impl, sum(times)
    return best


def choose_impl(
    mode: str,
    seq_len: int,
    head_dim: int,
    dtype,
    *,
    device_kind: str | None = None,
    backend: str | None = None,
    table: Mapping | str | os.PathLike | None = None,
    cudnn: bool = False,
) -> str:
    """Returns ``"pallas"``, ``"cudnn"`` or ``"xla"`` (see module docstring).

    ``table``: dict, path or None (the shipped table). ``cudnn``: whether cuDNN can take this
    call (the caller checks; see :func:`kernels.cudnn.unsupported_reason`).
    """
    import jax
    import numpy as np

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if backend is None:
        backend = jax.default_backend()
    if backend != "gpu":
        return "xla"
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    if table is None or isinstance(table, (str, os.PathLike)):
        table = load_table(table)
    else:
        table = _validate_table(table, "<dict>")
    dtype_name = np.dtype(dtype).name
    dim = padded_head_dim(int(head_dim))
    bucket = seq_bucket(seq_len)
    entries = table["entries"]
    candidates = IMPLS if cudnn else IMPLS[:2]
    match = [
        e
        for e in entries
        if e["mode"] == mode
        and e["dtype"] == dtype_name
        and int(e["head_dim"]) == dim
        and int(e["seq_bucket"]) == bucket
    ]
    if any(e["device_kind"] == device_kind for e in entries):
        return _fastest([e for e in match if e["device_kind"] == device_kind], candidates)
    by_gpu: dict = {}
    for e in match:
        by_gpu.setdefault(e["device_kind"], []).append(e)
    picks = {_fastest(v, candidates) for v in by_gpu.values()}
    return picks.pop() if len(picks) == 1 else "xla"


def entry_key(e: Mapping) -> tuple:
    return (
        e["device_kind"],
        e["mode"],
        e["dtype"],
        int(e["head_dim"]),
        int(e["seq_bucket"]),
        tuple(e.get("shape") or ()),
    )


def update_table(new_entries, path: str | os.PathLike | None = None) -> dict:
    """Adds entries to the table file, replacing those with the same key (GPU, mode, shape)."""
    path = Path(path) if path is not None else TABLE_PATH
    table = load_table(path) if path.exists() else {"format": TABLE_FORMAT, "entries": []}
    new_entries = list(new_entries)
    _validate_table({"entries": new_entries}, "<new entries>")
    new_keys = {entry_key(e) for e in new_entries}
    kept = [e for e in table["entries"] if entry_key(e) not in new_keys]
    entries = sorted(
        kept + new_entries,
        key=lambda e: (e["device_kind"], e["mode"], e["dtype"], e["head_dim"], e["seq_bucket"]),
    )
    out = {"format": TABLE_FORMAT, "entries": entries}
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    return out

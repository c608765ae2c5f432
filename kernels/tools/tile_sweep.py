"""Timing and tile sweeps of the memory-bound kernels (``kernels.bias_gelu``,
``kernels.residual_norm_modulate``, ``kernels.norm_modulate_tangent``), used by
``bench/bias_gelu.py``, ``bench/residual_norm_modulate.py`` and ``bench/norm_tangent.py``.

:func:`sweep_tiles` checks every candidate's values before timing it: within one bf16 unit in the
last place of a float64/float32 reference (elements with |value| > 1e-3; the far tails are tiny
and their relative error says nothing), then the median over ``iters`` samples of back-to-back
calls lasting about 2 ms each.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def sweep_parser(doc: str, default_tiles: str, tiles_help: str) -> argparse.ArgumentParser:
    """The sweep scripts' command line: --tiles, --iters, --interpret, --out (the caller adds
    its shape options)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", default=default_tiles, help=tiles_help)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke test)")
    p.add_argument("--out", default=None)
    return p


def parse_tiles(text: str) -> list[tuple[int, ...]]:
    """``"a,b;c,d"`` -> [(a, b), (c, d)]."""
    return [tuple(int(v) for v in t.split(",")) for t in text.split(";") if t]


def start_report(default_tiles, interpret: bool) -> dict:
    """The report's header (device, date, jax, command, the kernel's default tiles); refuses to
    time without a GPU unless ``interpret`` (a CPU smoke test)."""
    dev = jax.devices()[0]
    if dev.platform != "gpu" and not interpret:
        raise SystemExit("no GPU: pass --interpret for a CPU smoke test")
    return {"device_kind": dev.device_kind, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "jax_version": jax.__version__, "command": " ".join([sys.executable] + sys.argv),
            "default_tiles": list(default_tiles), "shapes": []}


def time_ms(fn, args, iters: int) -> float:
    """Median milliseconds per call of ``fn(*args)`` (jitted), after a warm-up call."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    n = max(1, int(2e-3 / max(time.perf_counter() - t0, 1e-6)))
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(samples)


def max_ulps(got, exact, dtype=jnp.bfloat16) -> float:
    """The largest |got - exact| in units in the last place of ``dtype`` at exact's magnitude,
    over the elements with |exact| > 1e-3 (the far tails are tiny and their relative error says
    nothing). ``got`` and ``exact`` may be matching tuples of arrays (the largest over them)."""
    if isinstance(got, (tuple, list)):
        if not isinstance(exact, (tuple, list)) or len(got) != len(exact):
            raise ValueError("max_ulps: got and exact must be arrays or tuples of the same length")
        return max(max_ulps(g, e, dtype) for g, e in zip(got, exact))
    got, exact = np.asarray(got, np.float64), np.asarray(exact, np.float64)
    keep = np.abs(exact) > 1e-3
    ulp = 2.0 ** (np.floor(np.log2(np.abs(exact[keep]))) - jnp.finfo(dtype).nmant)
    return float(np.max(np.abs(got[keep] - exact[keep]) / ulp))


def rel_err(got, want) -> float:
    """||got - want|| / ||want|| over all elements, in float64 (any float dtype, bf16 included)."""
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def sweep_tiles(make_fn, args, exact, tiles, iters: int, nbytes: int):
    """Rows ``{tiles, ms, tb_per_s, max_ulps}`` (or ``{tiles, ms: None, error}``) for each
    candidate, ``make_fn(tiles)`` giving the jitted kernel call; a candidate more than one bf16
    unit from ``exact`` counts as failed."""
    rows = []
    for t in tiles:
        try:
            fn = make_fn(t)
            err = max_ulps(fn(*args), exact)
            if err > 1:
                raise AssertionError(f"{err:.2f} bf16 ulps from the reference (> 1)")
            ms = time_ms(fn, args, iters)
            row = {"tiles": list(t), "ms": ms, "tb_per_s": nbytes / ms / 1e9, "max_ulps": err}
        except Exception as e:  # noqa: BLE001 - a tile that fails to compile, run or check
            row = {"tiles": list(t), "ms": None, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(f"  tiles {tuple(t)}: " + (f"{row['ms']:.4f} ms {row['tb_per_s']:.2f} TB/s" if row["ms"] else row["error"]),
              flush=True)
    return rows


def best_tiles(shapes) -> list:
    """The tiles with the smallest summed time over every shape's rows (a tile that failed on
    any shape is out)."""
    totals: dict = {}
    for entry in shapes:
        for row in entry["pallas"]:
            key = tuple(row["tiles"])
            totals[key] = totals.get(key, 0.0) + (row["ms"] if row["ms"] is not None else float("inf"))
    best = min(totals, key=totals.get) if totals else None
    if best is None or totals[best] == float("inf"):
        raise SystemExit("every tile failed")
    return list(best)


def finish_report(report: dict, out: str | None) -> dict:
    """Adds ``best_tiles`` (:func:`best_tiles` over the report's shapes), prints it and writes
    the report to ``out`` if given."""
    report["best_tiles"] = best_tiles(report["shapes"])
    print("best tiles:", tuple(report["best_tiles"]), flush=True)
    if out:
        write_json(out, report)
    return report


def write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)

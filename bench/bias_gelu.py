"""Times the MLP's bias + tanh GELU: XLA's fusion against the Pallas kernel (kernels.bias_gelu)
for a sweep of tiles, at the model's fc1 output shapes (bf16).

    python bench/bias_gelu.py --out bench/results/bias_gelu_h200.json

Per shape (rows = batch x tokens, width 4H = 4608): the XLA reference ``gelu_tanh(y + bias)``
under jit, and the kernel at each (rows, columns, warps) of ``--tiles``; median of ``--iters``
timed samples (each of enough calls to last ~2 ms), and the memory rate (bytes read and
written: y, bias, out). The best tiles over all shapes (the smallest summed time) are reported
as ``best_tiles``. The kernel's values are checked before timing: within one bf16 unit in the
last place of the exact (float64) value.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels import bias_gelu  # noqa: E402
from kernels.gelu import TILES, reference  # noqa: E402

DEFAULT_TILES = "32,512,4;8,512,4;16,256,4;8,1024,4;4,1024,4;16,512,8;8,512,2;64,256,8;2,512,1;1,1024,4"


def time_ms(fn, args, iters):
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="65536,8192", help="comma-separated row counts (batch x tokens)")
    p.add_argument("--width", type=int, default=4608)
    p.add_argument("--tiles", default=DEFAULT_TILES, help="';'-separated rows,columns,warps")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke test)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    tiles = [tuple(int(v) for v in t.split(",")) for t in args.tiles.split(";") if t]
    dev = jax.devices()[0]
    if dev.platform != "gpu" and not args.interpret:
        raise SystemExit("no GPU: pass --interpret for a CPU smoke test")
    report = {"device_kind": dev.device_kind, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "jax_version": jax.__version__, "command": " ".join([sys.executable] + sys.argv),
              "default_tiles": list(TILES), "shapes": []}
    totals = {t: 0.0 for t in tiles}
    for rows in (int(r) for r in args.rows.split(",")):
        k1, k2 = jax.random.split(jax.random.key(0))
        y = (jax.random.normal(k1, (rows, args.width), jnp.float32) * 3).astype(jnp.bfloat16)
        b = jax.random.normal(k2, (args.width,), jnp.float32).astype(jnp.bfloat16)
        nbytes = 2 * y.size * 2 + b.size * 2
        xla = jax.jit(reference)
        h = np.asarray((y.astype(jnp.float32) + b.astype(jnp.float32)).astype(jnp.bfloat16), np.float64)
        exact = h * 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
        keep = np.abs(exact) > 1e-3
        ulp = 2.0 ** (np.floor(np.log2(np.abs(exact[keep]))) - 7)
        entry = {"rows": rows, "width": args.width, "bytes": nbytes, "xla": {}, "pallas": []}
        ms = time_ms(xla, (y, b), args.iters)
        entry["xla"] = {"ms": ms, "tb_per_s": nbytes / ms / 1e9}
        print(f"rows {rows}: xla {ms:.4f} ms {nbytes / ms / 1e9:.2f} TB/s", flush=True)
        for t in tiles:
            fn = jax.jit(lambda y, b, t=t: bias_gelu(y, b, impl="pallas", interpret=args.interpret, tiles=t))
            try:
                got = np.asarray(fn(y, b), np.float64)
                err = float(np.max(np.abs(got[keep] - exact[keep]) / ulp))
                if err > 1:
                    raise AssertionError(f"{err:.2f} bf16 ulps from the exact value (> 1)")
                ms = time_ms(fn, (y, b), args.iters)
                row = {"tiles": list(t), "ms": ms, "tb_per_s": nbytes / ms / 1e9, "max_ulps_vs_exact": err}
                totals[t] += ms
            except Exception as e:  # noqa: BLE001 - a tile that fails to compile or run
                row = {"tiles": list(t), "ms": None, "error": f"{type(e).__name__}: {e}"[:300]}
                totals[t] = float("inf")
            entry["pallas"].append(row)
            print(f"  tiles {t}: " + (f"{row['ms']:.4f} ms {row['tb_per_s']:.2f} TB/s" if row["ms"] else row["error"]),
                  flush=True)
        report["shapes"].append(entry)
    best = min(totals, key=totals.get)
    if totals[best] == float("inf"):
        raise SystemExit("every tile failed")
    report["best_tiles"] = list(best)
    print("best tiles:", best, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()

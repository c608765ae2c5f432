"""Probe: can a Pallas matmul on the Hopper-native Mosaic GPU backend (wgmma, TMA, warp
specialisation) match cuBLAS at the model's largest token-wise matmul? If it can, a matmul with
the MLP's bias + GELU (or a gated residual) in its epilogue becomes worth writing on that
backend; the Triton-backend attempt ran at about 70 % of cuBLAS's rate (branch linear-gelu).
What came of it (bench/NOTES.md, "Changes", item 22): alone, the Mosaic kernel beat cuBLAS at
this shape; inside the model it made sampling and the step slower, and it was not kept.

Times, at sampling's fc1 (M = 65,536 tokens, K = 1,152, N = 4,608, bf16 in and out):
XLA's dot (cuBLAS) and jax's own example kernel
``jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu.matmul`` for a few of its tuning configs,
each checked against XLA's product first (relative Frobenius error < 1e-2).

    python bench/matmul_probe.py --out bench/results/matmul_probe_h200.json
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels.tools.tile_sweep import start_report, time_ms, write_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="65536,1152,4608", help="M,K,N")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        m, k, n = (int(v) for v in args.shape.split(","))
    except ValueError:
        raise SystemExit(f"--shape: expected M,K,N (three integers), got {args.shape!r}") from None
    if jax.devices()[0].platform != "gpu":
        raise SystemExit("no GPU: the probe times Mosaic GPU kernels, which run only on a Hopper GPU")
    report = start_report((), interpret=False)
    report.update(shape=[m, k, n], rows=[])
    kk = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(kk[0], (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kk[1], (k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16)
    flop = 2.0 * m * k * n
    dot = jax.jit(jnp.dot)
    ref = np.asarray(dot(x, w), np.float32)
    ms = time_ms(dot, (x, w), args.iters)
    report["xla_dot"] = {"ms": ms, "tflops": flop / ms / 1e9}
    print(f"xla dot (cuBLAS): {ms:.4f} ms {flop / ms / 1e9:.0f} TFLOP/s", flush=True)

    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    dims = hm.MatmulDimension
    for tm, tn, minor, width, wg in itertools.product((128, 256), (128, 256), (dims.M, dims.N), (8, 16), (dims.M, dims.N)):
        cfg = dict(tile_m=tm, tile_n=tn, tile_k=64, max_concurrent_steps=4, grid_minor_dim=minor,
                   grid_tile_width=width, wg_dimension=wg)
        label = {**cfg, "grid_minor_dim": str(minor), "wg_dimension": str(wg)}
        try:
            fn = jax.jit(lambda a, b, cfg=cfg: hm.matmul(a, b, None, hm.TuningConfig(**cfg)))
            got = np.asarray(fn(x, w), np.float32)
            err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            if not err < 1e-2:
                raise AssertionError(f"relative error {err:.3e} against XLA's product")
            ms = time_ms(fn, (x, w), args.iters)
            row = {"config": label, "ms": ms, "tflops": flop / ms / 1e9, "rel_err": err}
        except Exception as e:  # noqa: BLE001 - a config that fails to compile, run or check
            row = {"config": label, "ms": None, "error": f"{type(e).__name__}: {e}"[:300]}
        report["rows"].append(row)
        print(f"  {label}: " + (f"{row['ms']:.4f} ms {row['tflops']:.0f} TFLOP/s" if row["ms"] else row["error"][:150]),
              flush=True)
        if args.out:  # after every row: a run stopped at its time limit keeps what it measured
            write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()

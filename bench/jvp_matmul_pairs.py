"""Probe: does the JVP call gain from one matmul for the primal and the tangent of each linear?

In the student's JVP call every token-wise Linear multiplies the primal activations and their
tangent by the same weight, and XLA emits two cuBLAS calls with M = B*N rows each (the step's
optimised HLO: 56 dots per weight shape where one with 2M rows would do). Its reverse mode does the
same twice more: two input-gradient matmuls and two weight-gradient matmuls (K = M each) plus an
add. This probe times, at the DiT-XL/2 256px shapes (M = 32 x 256 tokens), the pair of calls
against one call on the stacked operands, with the concatenate in the call and without it (operands
that arrive stacked), for the forward, the input gradient and the weight gradient of qkv, proj,
fc1 and fc2; each stacked result is checked against the pair's. The weight gradients come out in
float32 here (in the step's optimised HLO its weight-gradient matmuls write bf16).
What came of it (bench/NOTES.md, "Changes", item 35): pre-stacked, qkv, fc1 and fc2 take 2.57 ms
per layer against 2.64 as pairs on an H200; raising XLA's dot-merger threshold so that it stacks
them made the step slower.

    python bench/jvp_matmul_pairs.py --out bench/results/jvp_matmul_pairs_h200.json
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels.tools.tile_sweep import start_report, time_ms, write_json  # noqa: E402

LINEARS = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}


def _cat(u, v):
    return jnp.concatenate([u, v], 0)


def _dot_f32(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


# Per matmul role: the pair of calls on (a, a_dot, b[, b_dot]), the one call on stacked operands,
# and how the pair's operands stack into the latter's.
ROLES = {
    "forward": (lambda x, xd, w: (x @ w, xd @ w),  # y = x W
                lambda xs, w: xs @ w,
                lambda x, xd, w: (_cat(x, xd), w)),
    "input_grad": (lambda g, gd, w: (g @ w.T, gd @ w.T),  # g W^T
                   lambda gs, w: gs @ w.T,
                   lambda g, gd, w: (_cat(g, gd), w)),
    "weight_grad": (lambda x, xd, g, gd: _dot_f32(x.T, g) + _dot_f32(xd.T, gd),  # x^T g + xd^T gd, float32
                    lambda xs, gs: _dot_f32(xs.T, gs),
                    lambda x, xd, g, gd: (_cat(x, xd), _cat(g, gd))),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32 * 256, help="M = batch x tokens")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.tokens <= 0:
        raise SystemExit(f"--tokens must be positive, got {args.tokens}")
    report = start_report((), interpret=jax.devices()[0].platform != "gpu")
    report.update(tokens=args.tokens, rows=[])
    m = args.tokens
    key = jax.random.key(0)
    for name, (k, n) in LINEARS.items():
        ks = jax.random.split(jax.random.fold_in(key, k * n), 5)
        bf = lambda kk, shape: jax.random.normal(kk, shape, jnp.float32).astype(jnp.bfloat16)
        x, xd, w = bf(ks[0], (m, k)), bf(ks[1], (m, k)), (bf(ks[2], (k, n)) * k ** -0.5).astype(jnp.bfloat16)
        g, gd = bf(ks[3], (m, n)), bf(ks[4], (m, n))
        cases = {"forward": (x, xd, w), "input_grad": (g, gd, w), "weight_grad": (x, xd, g, gd)}
        for kind, operands in cases.items():
            pair_fn, stacked_fn, stack = ROLES[kind]
            pair, prestacked = jax.jit(pair_fn), jax.jit(stacked_fn)
            stacked = jax.jit(lambda *ops, f=stacked_fn, st=stack: f(*st(*ops)))  # the concatenate inside
            a = pair(*operands)
            b = stacked(*operands)
            a = np.concatenate([np.asarray(t, np.float32) for t in a], 0) if isinstance(a, tuple) else np.asarray(a)
            b = np.asarray(b, np.float32)
            err = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
            if err > 1e-2:
                raise SystemExit(f"{name} {kind}: stacked result differs from the pair's (rel. error {err:.3g})")
            t_pair = time_ms(pair, operands, args.iters)
            t_stacked = time_ms(stacked, operands, args.iters)
            t_pre = time_ms(prestacked, stack(*operands), args.iters)
            flop = 2.0 * 2 * m * k * n
            row = dict(linear=name, kind=kind, k=k, n=n, pair_ms=t_pair, stacked_ms=t_stacked, prestacked_ms=t_pre,
                       pair_tflops=flop / t_pair / 1e9, stacked_tflops=flop / t_stacked / 1e9, rel_err=err)
            report["rows"].append(row)
            print(f"{name:5s} {kind:12s} pair {t_pair:.4f} ms ({row['pair_tflops']:.0f} TFLOP/s)  "
                  f"stacked {t_stacked:.4f} ms ({row['stacked_tflops']:.0f})  prestacked {t_pre:.4f}  err {err:.1e}", flush=True)
    totals = {f"total_{c}_ms": sum(r[f"{c}_ms"] for r in report["rows"]) for c in ("pair", "stacked", "prestacked")}
    report.update(totals)
    print("one layer, all roles: pair {total_pair_ms:.3f} ms, stacked {total_stacked_ms:.3f} ms, "
          "prestacked {total_prestacked_ms:.3f} ms".format(**totals), flush=True)
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()

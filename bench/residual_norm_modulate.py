"""Times the block's second pre-norm (gated residual add, RMS norm, adaLN modulation): XLA's
fusion against the Pallas kernel (kernels.residual_norm_modulate) for a sweep of (rows, warps),
at the model's shapes (x float32, y bf16, width 1,152, out bf16).

    python bench/residual_norm_modulate.py --out bench/results/residual_norm_modulate_h200.json

Timing, checks and ``best_tiles`` as in ``bench/bias_gelu.py`` (``kernels.tools.tile_sweep``; the
reference is the float32 value computed op by op, the projection's bias add rounded to bf16 as
the kernel rounds it: under jit XLA may keep it in float32, its excess-precision rule).
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels import residual_norm_modulate  # noqa: E402
from kernels.modulation import TILES, reference  # noqa: E402
from kernels.tools.tile_sweep import finish_report, parse_tiles, start_report, sweep_parser, sweep_tiles, time_ms  # noqa: E402

DEFAULT_TILES = "4,4;1,1;2,1;2,2;4,2;8,4;8,8;16,8;1,2"


def main(argv=None):
    p = sweep_parser(__doc__, DEFAULT_TILES, "';'-separated rows,warps")
    p.add_argument("--shapes", default="256,256;64,256", help="';'-separated batch,tokens")
    p.add_argument("--width", type=int, default=1152)
    args = p.parse_args(argv)
    tiles = parse_tiles(args.tiles)
    report = start_report(TILES, args.interpret)
    for shape in args.shapes.split(";"):
        b, n = (int(v) for v in shape.split(","))
        c = args.width
        k = jax.random.split(jax.random.key(0), 6)
        x = jax.random.normal(k[0], (b, n, c), jnp.float32)
        y = jax.random.normal(k[1], (b, n, c), jnp.float32).astype(jnp.bfloat16)
        bias = (jax.random.normal(k[2], (c,), jnp.float32) * 0.1).astype(jnp.bfloat16)
        gate, shift, scale = (jax.random.normal(kk, (b, c), jnp.float32) for kk in k[3:])
        xs = (x, y, bias, gate, shift, scale)
        nbytes = x.size * 4 + y.size * 2 * 2 + 3 * b * c * 4
        exact = reference(*xs, eps=1e-6, out_dtype=jnp.float32)  # op by op, not jitted
        ms = time_ms(jax.jit(lambda *a: reference(*a, eps=1e-6, out_dtype=jnp.bfloat16)), xs, args.iters)
        print(f"{b}x{n}x{c}: xla {ms:.4f} ms {nbytes / ms / 1e9:.2f} TB/s", flush=True)
        make = lambda t: jax.jit(lambda *a: residual_norm_modulate(  # noqa: E731
            *a, impl="pallas", interpret=args.interpret, tiles=t))
        report["shapes"].append({"batch": b, "tokens": n, "width": c, "bytes": nbytes,
                                 "xla": {"ms": ms, "tb_per_s": nbytes / ms / 1e9},
                                 "pallas": sweep_tiles(make, xs, exact, tiles, args.iters, nbytes)})
    return finish_report(report, args.out)


if __name__ == "__main__":
    main()

"""Times a pre-norm and its modulation as the training step's JVP call uses them, forward and
reverse mode together (``kernels.norm_tangent.reverse_of_jvp``): XLA's fusions against the Pallas
backward (kernels.norm_modulate_tangent, whose forward is XLA's) for a sweep of (rows, warps,
keep), at
the model's shapes (x and its tangent float32, width 1,152, outputs and their cotangents bf16).

    python bench/norm_tangent.py --out bench/results/norm_tangent_h200.json

Timing, checks and ``best_tiles`` as in ``bench/bias_gelu.py`` (``kernels.tools.tile_sweep``); the
reference of the check is XLA's float32 autodiff of the same function, and every one of the six
cotangents must be within one bf16 unit of it. ``bytes`` counts what the whole computation must
move at least: x, its tangent and the two bf16 cotangents read, the two bf16 outputs and the two
float32 cotangents of x written.
"""
from __future__ import annotations

import functools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels import norm_modulate_tangent  # noqa: E402
from kernels.norm_tangent import TILES, reference, reverse_of_jvp  # noqa: E402
from kernels.tools.tile_sweep import finish_report, parse_tiles, start_report, sweep_parser, sweep_tiles, time_ms  # noqa: E402

DEFAULT_TILES = "4,2,0;4,2,1;2,1,0;2,1,1;2,2,0;2,2,1;4,4,0;4,4,1;4,1,1;8,2,1;8,4,1;16,4,1;1,1,1"


def main(argv=None):
    p = sweep_parser(__doc__, DEFAULT_TILES, "';'-separated rows,warps,keep")
    p.add_argument("--shapes", default="32,256;16,1024", help="';'-separated batch,tokens")
    p.add_argument("--width", type=int, default=1152)
    args = p.parse_args(argv)
    tiles = parse_tiles(args.tiles)
    report = start_report(TILES, args.interpret)
    for shape in args.shapes.split(";"):
        b, n = (int(v) for v in shape.split(","))
        c = args.width
        k = jax.random.split(jax.random.key(0), 8)
        x, tx = (jax.random.normal(kk, (b, n, c), jnp.float32) for kk in k[:2])
        shift, tshift, scale, tscale = (jax.random.normal(kk, (b, c), jnp.float32) for kk in k[2:6])
        cts = tuple(jax.random.normal(kk, (b, n, c), jnp.float32).astype(jnp.bfloat16) for kk in k[6:])
        xs = (x, tx, shift, tshift, 0.3 * scale, tscale, cts)
        nbytes = x.size * (4 + 4 + 2 + 2) + x.size * (2 + 2 + 4 + 4)
        xla = jax.jit(functools.partial(reverse_of_jvp, functools.partial(reference, eps=1e-6, out_dtype=jnp.bfloat16)))
        exact = xla(*xs)
        ms = time_ms(xla, xs, args.iters)
        print(f"{b}x{n}x{c}: xla {ms:.4f} ms {nbytes / ms / 1e9:.2f} TB/s", flush=True)

        def make(t):
            fn = lambda a, sh, sc: norm_modulate_tangent(  # noqa: E731
                a, sh, sc, eps=1e-6, out_dtype=jnp.bfloat16, impl="pallas", interpret=args.interpret, tiles=t)
            return jax.jit(functools.partial(reverse_of_jvp, fn))

        report["shapes"].append({"batch": b, "tokens": n, "width": c, "bytes": nbytes,
                                 "xla": {"ms": ms, "tb_per_s": nbytes / ms / 1e9},
                                 "pallas": sweep_tiles(make, xs, exact, tiles, args.iters, nbytes)})
    return finish_report(report, args.out)


if __name__ == "__main__":
    main()

"""Times the MLP's bias + tanh GELU: XLA's fusion against the Pallas kernel (kernels.bias_gelu)
for a sweep of tiles, at the model's fc1 output shapes (bf16).

    python bench/bias_gelu.py --out bench/results/bias_gelu_h200.json

Per shape (rows = batch x tokens, width 4H = 4608): the XLA reference ``gelu_tanh(y + bias)``
under jit, and the kernel at each (rows, columns, warps) of ``--tiles``, timed and checked by
``kernels.tools.tile_sweep`` (within one bf16 unit in the last place of the float64 value),
with the memory rate (bytes read and written: y, bias, out). ``best_tiles``: the smallest
summed time over the shapes.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels import bias_gelu  # noqa: E402
from kernels.gelu import TILES, reference  # noqa: E402
from kernels.tools.tile_sweep import finish_report, parse_tiles, start_report, sweep_parser, sweep_tiles, time_ms  # noqa: E402

DEFAULT_TILES = "32,512,4;8,512,4;16,256,4;8,1024,4;4,1024,4;16,512,8;8,512,2;64,256,8;2,512,1;1,1024,4"


def main(argv=None):
    p = sweep_parser(__doc__, DEFAULT_TILES, "';'-separated rows,columns,warps")
    p.add_argument("--rows", default="65536,8192", help="comma-separated row counts (batch x tokens)")
    p.add_argument("--width", type=int, default=4608)
    args = p.parse_args(argv)
    tiles = parse_tiles(args.tiles)
    report = start_report(TILES, args.interpret)
    for rows in (int(r) for r in args.rows.split(",")):
        k1, k2 = jax.random.split(jax.random.key(0))
        y = (jax.random.normal(k1, (rows, args.width), jnp.float32) * 3).astype(jnp.bfloat16)
        b = jax.random.normal(k2, (args.width,), jnp.float32).astype(jnp.bfloat16)
        nbytes = 2 * y.size * 2 + b.size * 2
        h = np.asarray((y.astype(jnp.float32) + b.astype(jnp.float32)).astype(jnp.bfloat16), np.float64)
        exact = h * 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
        ms = time_ms(jax.jit(reference), (y, b), args.iters)
        print(f"rows {rows}: xla {ms:.4f} ms {nbytes / ms / 1e9:.2f} TB/s", flush=True)
        make = lambda t: jax.jit(lambda y, b: bias_gelu(y, b, impl="pallas", interpret=args.interpret, tiles=t))  # noqa: E731
        report["shapes"].append({"rows": rows, "width": args.width, "bytes": nbytes,
                                 "xla": {"ms": ms, "tb_per_s": nbytes / ms / 1e9},
                                 "pallas": sweep_tiles(make, (y, b), exact, tiles, args.iters, nbytes)})
    return finish_report(report, args.out)


if __name__ == "__main__":
    main()

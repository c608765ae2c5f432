"""Times the plain attention of a qkv projection two ways, at the model's shapes (bf16):
the split kernel (bias, q/k norms, q/k/v written out) followed by the plain forward kernel,
against the forward kernel that reads qkv in place and applies that prologue to every tile it
loads (``tvm_flash_fwd_qkv``), for a sweep of the latter's tiles.

    python bench/qkv_prologue.py --out bench/results/qkv_prologue_h200.json

Each shape (batch, tokens, heads, head dim) is sampling's (256 images), the training step's
teacher (64) and flow-matching call (32), all at 256 tokens, and one at 1,024 tokens (512px).
Before timing, both paths are checked against float32 attention of the float32 prologue (XLA):
a tile whose relative error is more than 1.5 times the split path's (plus 1e-4) counts as
failed. ``best_tiles``: the smallest summed time over the shapes.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels import AttentionConfig, KernelConfig, attention, attention_qkv, attention_xla  # noqa: E402
from kernels import flash as flash_mod  # noqa: E402
from kernels.config import default_config  # noqa: E402
from kernels.tools.tile_sweep import finish_report, parse_tiles, rel_err, start_report, sweep_parser, time_ms  # noqa: E402

DEFAULT_TILES = ("64,64,4,3;128,64,4,3;128,64,8,3;128,128,8,2;128,32,4,3;64,128,4,3;256,64,8,3;"
                 "256,64,8,2;256,128,8,2")
DEFAULT_SHAPES = "256,256,18,64;64,256,18,64;32,256,18,64;16,1024,18,64"
EPS = 1e-6


def inputs(shape, seed: int = 0):
    """qkv (B, S, 3, H, D) bf16 as a qkv Linear would make it, its bf16 bias and the norm weights."""
    b, s, h, d = shape
    ks = jax.random.split(jax.random.key(seed), 4)
    qkv = jax.random.normal(ks[0], (b, s, 3, h, d), jnp.float32).astype(jnp.bfloat16)
    bias = (0.5 * jax.random.normal(ks[1], (3, h, d), jnp.float32)).astype(jnp.bfloat16)
    wq = 1.0 + 0.2 * jax.random.normal(ks[2], (d,), jnp.float32)
    wk = 1.0 + 0.2 * jax.random.normal(ks[3], (d,), jnp.float32)
    return qkv, bias, wq, wk


def main(argv=None):
    p = sweep_parser(__doc__, DEFAULT_TILES, "';'-separated block_q,block_k,warps,stages of the fused kernel")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="';'-separated batch,tokens,heads,head_dim")
    args = p.parse_args(argv)
    tiles = parse_tiles(args.tiles)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
    if any(len(s) != 4 for s in shapes) or any(len(t) != 4 for t in tiles):
        raise SystemExit("--shapes needs batch,tokens,heads,head_dim and --tiles block_q,block_k,warps,stages")
    report = start_report(default_config(64).fwd_qkv.to_dict().values(), args.interpret)
    for b, s, h, d in shapes:
        qkv, bias, wq, wk = inputs((b, s, h, d))
        pro = flash_mod.QKVPrologue(bias=True, norm=True, eps=EPS, head_dim=d)
        q32, k32, v32 = flash_mod.split_qkv(qkv.astype(jnp.float32), bias.astype(jnp.float32), wq, wk, pro)
        want = jax.jit(lambda q, k, v: attention_xla(q, k, v, scale=d ** -0.5))(q32, k32, v32)
        # Bytes of the split path: qkv read, q/k/v written by the split, read again by the forward, o written.
        nbytes = qkv.size * 2 * 3 + b * s * h * d * 2
        split = jax.jit(lambda *a: attention(*flash_mod.split_qkv_call(*a, pro, args.interpret), impl="pallas",
                                             interpret=args.interpret))
        split_err = rel_err(split(qkv, bias, wq, wk), want)
        split_ms = time_ms(split, (qkv, bias, wq, wk), args.iters)
        print(f"shape {(b, s, h, d)}: split + forward {split_ms:.4f} ms (rel err {split_err:.2e})", flush=True)
        rows = []
        for t in tiles:
            try:
                cfg = AttentionConfig(fwd_qkv=KernelConfig(*t))
                fused = jax.jit(lambda a, c, x, y, cfg=cfg: attention_qkv(
                    a, x, y, bias=c, eps=EPS, impl="pallas", interpret=args.interpret, block_sizes=cfg))
                err = rel_err(fused(qkv, bias, wq, wk), want)
                if not err <= 1.5 * split_err + 1e-4:
                    raise AssertionError(f"relative error {err:.2e} against the split path's {split_err:.2e}")
                ms = time_ms(fused, (qkv, bias, wq, wk), args.iters)
                row = {"tiles": list(t), "ms": ms, "rel_err": err}
            except Exception as e:  # noqa: BLE001 - a tile that is invalid or fails to compile, run or check
                row = {"tiles": list(t), "ms": None, "error": f"{type(e).__name__}: {e}"[:300]}
            rows.append(row)
            print(f"  fused {tuple(t)}: " + (f"{row['ms']:.4f} ms (rel err {row['rel_err']:.2e})" if row["ms"]
                                             else row["error"]), flush=True)
        report["shapes"].append({"shape": [b, s, h, d], "bytes_split_path": nbytes,
                                 "split_then_forward": {"ms": split_ms, "rel_err": split_err}, "pallas": rows})
    return finish_report(report, args.out)


if __name__ == "__main__":
    main()

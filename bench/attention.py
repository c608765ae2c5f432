"""Benchmark of the attention kernels (Pallas/Triton vs XLA, cuDNN as the plain ceiling).

Run on an H100/H200 from the repository root:

    python bench/attention.py --out bench/results/attention_$(date +%Y%m%d).json
    python bench/attention.py --write-table            # also updates kernels/auto_table.json
    python bench/attention.py --sweep --shapes 1,24,4096,128 --out sweep.json

Per shape (batch, heads, seq, dim), bf16 inputs from N(0, 1), and impl in {pallas, xla}:

* ``jvp_fwd``: forward + tangent, ``jax.jvp`` of attention (pallas: one fused kernel);
* ``jvp_fwd_bwd``: the "one call" of the TVM loss: ``jax.vjp`` of
  ``(q, k, v, tq, tk, tv) -> jax.jvp(attention, (q, k, v), (tq, tk, tv))`` applied to
  random cotangents of both o and t_o, jitted as one function (all six input cotangents);
* ``plain_fwd_bwd``: forward + backward without tangents (pallas, xla, and cuDNN through
  ``attention(impl="cudnn")``, i.e. ``jax.nn.dot_product_attention(implementation="cudnn")``,
  where cuDNN takes the shape).

Latency: jit, warm up, then the median over ``--iters`` samples (>= 20) of back-to-back
calls rotating over 3 input sets, each synchronised with ``block_until_ready`` (a sample
holds enough calls to last >= ~2 ms, ``--min-sample-ms``, and reports the per-call mean; a call
longer than that is timed alone, host dispatch and sync included). TFLOP/s counts the
matmuls of the math, no recomputation: 12·B·H·S²·D for jvp_fwd, 36·B·H·S²·D for
jvp_fwd_bwd, 12·B·H·S²·D for plain_fwd_bwd (4 forward + 8 backward). Peak memory is the
compiled executable's ``memory_analysis()``: argument + output + temp bytes (- aliased).

Before timing, the Pallas (and cuDNN) outputs and all gradients are compared with XLA's
(relative Frobenius error, printed and stored). ``--write-table`` stores per shape and mode the
pallas, xla and (plain mode) cudnn latencies that ``impl="auto"`` chooses from.

``--sweep`` times candidate KernelConfigs for each kernel (the others at their defaults):
fwd on the plain forward, bwd_kv/bwd_q on plain fwd+bwd, jvp_fwd on jvp_fwd, jvp_bwd_kv/
jvp_bwd_q on jvp_fwd_bwd under ``jvp_bwd_impl="kernels"``, jvp_bwd_v on jvp_fwd_bwd under
``"matmul"`` (``SWEEP_IMPL``); it reports the best per kernel and the combined best config
(JSON, loadable with ``--config``). Configs that fail to compile are reported as failed.
With several shapes, ``best_config_per_head_dim`` merges them: per kernel, the candidate
with the smallest summed slowdown relative to each shape's fastest (candidate lists per
head dim in ``SWEEP``).

``--profile`` traces two more calls of each Pallas kind and stores where one call's device time
goes, per kernel and per op family (``tvm_jax.profiling``).

Needs only jax and numpy (and ``tvm_jax`` for ``--profile``). ``--interpret`` runs everything in
the Pallas interpreter (a CPU smoke test of this script with tiny shapes; timings then mean
nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels import AttentionConfig, KernelConfig, attention  # noqa: E402
from kernels import auto as auto_table  # noqa: E402
from kernels.config import padded_head_dim  # noqa: E402
from kernels.tools.tile_sweep import rel_err as rel, write_json  # noqa: E402

DEFAULT_SHAPES = "1,24,1024,128;1,24,4096,128;1,24,8192,128;1,1,16384,128;32,18,256,64;32,18,1024,64"
FLOP_FACTOR = {"jvp_fwd": 12, "jvp_fwd_bwd": 36, "plain_fwd_bwd": 12, "plain_fwd": 4}
DEFAULT_KINDS = "jvp_fwd,jvp_fwd_bwd,plain_fwd_bwd"

# Candidate configs for --sweep, per padded head dim: (block_q, block_k, num_warps, num_stages).
# Head dim 128: pruned offline (sm_90a compile of the Triton IR, see kernels/config.py): mostly
# configs that compile without heavy register spilling, plus the spill-free mma.sync
# alternatives. Head dim 64 (DiT-XL/2): half the registers per row, so larger tiles and 4 warps
# join the list; its lists start with the defaults they were swept against.
SWEEP = {
    128: {
        "fwd": [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 8, 2),
                (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3)],
        "bwd_kv": [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2), (32, 128, 8, 3),
                   (64, 64, 8, 3), (128, 32, 8, 2), (32, 64, 8, 2)],
        "bwd_q": [(128, 64, 8, 2), (128, 32, 8, 2), (128, 128, 8, 2), (64, 64, 8, 2), (128, 64, 8, 3),
                  (64, 128, 8, 2), (128, 64, 4, 2)],
        "jvp_fwd": [(64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 8, 3), (128, 32, 8, 2), (128, 64, 8, 2),
                    (128, 64, 8, 3), (64, 32, 8, 2), (32, 64, 8, 2), (64, 128, 8, 2), (128, 16, 8, 2)],
        "jvp_bwd_kv": [(32, 64, 8, 2), (64, 32, 8, 2), (16, 64, 8, 2), (64, 64, 8, 2), (32, 32, 8, 2),
                       (128, 16, 8, 2), (32, 128, 8, 2), (16, 128, 8, 2), (64, 32, 8, 3), (32, 64, 8, 3),
                       (32, 32, 4, 2), (64, 32, 4, 3)],
        "jvp_bwd_q": [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 16, 8, 2), (32, 64, 8, 2),
                      (128, 16, 8, 2), (64, 32, 8, 3), (128, 32, 8, 3)],
        # jvp_bwd_impl="matmul"'s kernel: no dk, dtk accumulators, so 128-key (wgmma) tiles fit.
        "jvp_bwd_v": [(32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2), (16, 128, 8, 2), (16, 128, 8, 3),
                      (32, 64, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2), (64, 32, 8, 3), (16, 256, 8, 2)],
    },
    64: {
        "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 2), (128, 64, 4, 4), (128, 128, 8, 3),
                (128, 128, 4, 2), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3)],
        "bwd_kv": [(64, 128, 8, 2), (32, 128, 8, 2), (32, 128, 4, 2), (64, 128, 8, 3), (64, 128, 4, 2),
                   (128, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (128, 64, 8, 2), (16, 128, 8, 2)],
        "bwd_q": [(128, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 2),
                  (128, 32, 4, 2), (64, 64, 4, 2), (64, 128, 8, 2), (128, 128, 8, 3)],
        "jvp_fwd": [(64, 64, 8, 3), (64, 64, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2),
                    (128, 32, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 8, 2),
                    (64, 32, 4, 3)],
        "jvp_bwd_kv": [(32, 64, 8, 2), (32, 64, 8, 3), (32, 64, 4, 2), (64, 64, 8, 2), (64, 64, 8, 3),
                       (32, 128, 8, 2), (64, 128, 8, 2), (16, 128, 8, 2), (16, 64, 4, 2), (64, 32, 8, 3),
                       (128, 64, 8, 2)],
        "jvp_bwd_q": [(128, 32, 8, 2), (128, 32, 8, 3), (128, 32, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3),
                      (64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 8, 2), (64, 32, 4, 3), (128, 16, 8, 2)],
        "jvp_bwd_v": [(32, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2),
                      (16, 128, 4, 2)],
    },
}  # fmt: skip
SWEEP_MEASURE = {
    "fwd": "plain_fwd",
    "bwd_kv": "plain_fwd_bwd",
    "bwd_q": "plain_fwd_bwd",
    "jvp_fwd": "jvp_fwd",
    "jvp_bwd_kv": "jvp_fwd_bwd",
    "jvp_bwd_q": "jvp_fwd_bwd",
    "jvp_bwd_v": "jvp_fwd_bwd",
}
# The tangent backward's kernels run under one jvp_bwd_impl each: a sweep of one sets it.
SWEEP_IMPL = {"jvp_bwd_kv": "kernels", "jvp_bwd_q": "kernels", "jvp_bwd_v": "matmul"}


def parse_shapes(text):
    shapes = []
    for part in text.replace(" ", "").split(";"):
        if part:
            vals = tuple(int(x) for x in part.split(","))
            if len(vals) != 4:
                raise SystemExit(f"--shapes: expected batch,heads,seq,dim; got {part!r}")
            shapes.append(vals)
    return shapes


# ----------------------------------------------------------------------------- functions


def make_fns(impl, scale, cfg, interpret):
    """The jitted benchmark functions for one impl ('pallas' | 'xla' | 'cudnn')."""
    if impl == "cudnn":
        attn_plain = lambda q, k, v: attention(q, k, v, impl="cudnn", scale=scale)
        attn_jvp = None
    else:
        kw = dict(impl=impl, scale=scale)
        if impl == "pallas":
            kw.update(block_sizes=cfg, interpret=interpret)
        attn_plain = lambda q, k, v: attention(q, k, v, jvp=False, **kw)
        attn_jvp = lambda q, k, v: attention(q, k, v, jvp=True, **kw)

    fns = {}

    def plain_fwd(q, k, v, *_):
        return attn_plain(q, k, v)

    def plain_fwd_bwd(q, k, v, tq, tk, tv, do, dto):
        o, vjp = jax.vjp(attn_plain, q, k, v)
        return o, vjp(do)

    fns["plain_fwd"] = jax.jit(plain_fwd)
    fns["plain_fwd_bwd"] = jax.jit(plain_fwd_bwd)
    if attn_jvp is not None:

        def tangent(q, k, v, tq, tk, tv):
            return jax.jvp(attn_jvp, (q, k, v), (tq, tk, tv))

        def jvp_fwd(q, k, v, tq, tk, tv, *_):
            return tangent(q, k, v, tq, tk, tv)

        def jvp_fwd_bwd(q, k, v, tq, tk, tv, do, dto):
            out, vjp = jax.vjp(tangent, q, k, v, tq, tk, tv)
            return out, vjp((do, dto))

        fns["jvp_fwd"] = jax.jit(jvp_fwd)
        fns["jvp_fwd_bwd"] = jax.jit(jvp_fwd_bwd)
    return fns


def make_inputs(shape, n_sets, seed=0):
    b, h, s, d = shape
    sets = []
    key = jax.random.PRNGKey(seed)
    for _ in range(n_sets):
        key, *ks = jax.random.split(key, 9)
        sets.append(tuple(jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in ks))
    return sets


def compile_fn(fn, args):
    """AOT-compiles a jitted function once (timed calls and memory stats share it)."""
    return fn.lower(*args).compile()


def memory_mb(compiled):
    try:
        ma = compiled.memory_analysis()
        if ma is None:
            return None
        total = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
        total -= getattr(ma, "alias_size_in_bytes", 0) or 0
        return total / 2**20
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None


def time_ms(fn, arg_sets, iters, min_sample_s=2e-3):
    jax.block_until_ready(fn(*arg_sets[0]))  # compile + warm up
    for a in arg_sets:
        jax.block_until_ready(fn(*a))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[1 % len(arg_sets)]))
    once = time.perf_counter() - t0
    reps = max(1, min(50, int(math.ceil(min_sample_s / max(once, 1e-6)))))
    samples = []
    for i in range(iters):
        t0 = time.perf_counter()
        out = None
        for r in range(reps):
            out = fn(*arg_sets[(i * reps + r) % len(arg_sets)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples) * 1e3


def tflops(kind, shape, ms):
    if ms is None:
        return None
    b, h, s, d = shape
    return FLOP_FACTOR[kind] * b * h * s * s * d / (ms * 1e-3) / 1e12


def correctness(pallas, xla, args, cudnn=None):
    """Relative error of every output/gradient of pallas vs xla (jvp_fwd_bwd and plain_fwd_bwd),
    and of cudnn vs xla (plain_fwd_bwd) when cudnn compiled."""
    for d in (pallas, xla):
        for kind in ("jvp_fwd_bwd", "plain_fwd_bwd"):
            if isinstance(d.get(kind), str):
                raise RuntimeError(f"{kind} did not compile: {d[kind]}")
    out = {}
    (o, to), g = pallas["jvp_fwd_bwd"](*args)
    (xo, xto), xg = xla["jvp_fwd_bwd"](*args)
    out["jvp"] = {"o": rel(o, xo), "t_o": rel(to, xto)}
    for name, a, b in zip(("dq", "dk", "dv", "dtq", "dtk", "dtv"), g, xg):
        out["jvp"][name] = rel(a, b)
    o, g = pallas["plain_fwd_bwd"](*args)
    xo, xg = xla["plain_fwd_bwd"](*args)
    out["plain"] = {"o": rel(o, xo)}
    for name, a, b in zip(("dq", "dk", "dv"), g, xg):
        out["plain"][name] = rel(a, b)
    if cudnn is not None and not isinstance(cudnn.get("plain_fwd_bwd"), str):
        o, g = cudnn["plain_fwd_bwd"](*args)
        out["cudnn_plain"] = {"o": rel(o, xo)}
        for name, a, b in zip(("dq", "dk", "dv"), g, xg):
            out["cudnn_plain"][name] = rel(a, b)
    return out


def _err(e):
    msg = f"{type(e).__name__}: {e}"
    return msg[:500]


def compile_all(fns, kinds, args):
    """{kind: compiled executable or the error string}."""
    out = {}
    for kind in kinds:
        if kind in fns:
            try:
                out[kind] = compile_fn(fns[kind], args)
            except Exception as e:  # noqa: BLE001 - cuDNN refusing a shape, compile failure
                out[kind] = _err(e)
    return out


def measure(compiled, arg_sets, iters, shape, min_sample_s=2e-3):
    res = {}
    for kind, fn in compiled.items():
        if isinstance(fn, str):
            res[kind] = {"ms": None, "error": fn}
            continue
        try:
            ms = time_ms(fn, arg_sets, iters, min_sample_s)
            res[kind] = {"ms": ms, "tflops": tflops(kind, shape, ms), "peak_mb": memory_mb(fn)}
        except Exception as e:  # noqa: BLE001 - OOM at run time
            res[kind] = {"ms": None, "error": _err(e)}
    return res


def profile_kinds(compiled, args, calls=2):
    """{kind: {ms_per_call_by_family, by_kernel}} of two traced calls of each compiled kind: where
    one call's device time goes (tvm_jax.profiling; by_kernel: ms per call per kernel name)."""
    from tvm_jax import profiling

    out = {}
    for kind, fn in compiled.items():
        if isinstance(fn, str):
            continue
        prof = profiling.profile(lambda fn=fn: fn(*args), calls=calls, hlo_text=fn.as_text())
        out[kind] = {"ms_per_call_by_family": prof["summary"], "by_kernel": profiling.per_kernel(prof["rows"], calls)}
        top = ", ".join(f"{k[:40]} {v:.3f}" for k, v in list(out[kind]["by_kernel"].items())[:6])
        print(f"  profile {kind}: {top}", flush=True)
    return out


# ----------------------------------------------------------------------------- sweep


def sweep_candidates(head_dim):
    """--sweep candidates for a head dim: the head-dim-64 lists up to 64, else the 128 ones."""
    return SWEEP[64 if padded_head_dim(head_dim) <= 64 else 128]


def sweep_shape(shape, base_cfg, arg_sets, iters, interpret, kernels):
    b, h, s, d = shape
    scale = d**-0.5
    candidates = sweep_candidates(d)
    results = {}
    best = {}
    for name in kernels:
        kind = SWEEP_MEASURE[name]
        rows = []
        for bq, bk, w, st in candidates[name]:
            kc = KernelConfig(bq, bk, w, st)
            impl = {"jvp_bwd_impl": SWEEP_IMPL[name]} if name in SWEEP_IMPL else {}
            cfg = dataclasses.replace(base_cfg, **{name: kc}, **impl)
            fns = make_fns("pallas", scale, cfg, interpret)
            try:
                ms = time_ms(compile_fn(fns[kind], arg_sets[0]), arg_sets, iters)
                rows.append({"config": kc.to_dict(), "ms": ms})
            except Exception as e:  # noqa: BLE001
                rows.append({"config": kc.to_dict(), "ms": None, "error": _err(e)})
            r = rows[-1]
            print(f"  sweep {name:10s} {bq:4d} {bk:4d} w{w} s{st}: "
                  + (f"{r['ms']:.3f} ms" if r["ms"] is not None else "FAILED " + r["error"][:120]),
                  flush=True)  # fmt: skip
        ok = [r for r in rows if r["ms"] is not None]
        results[name] = {"measured_on": kind, "rows": rows}
        if ok:
            best[name] = min(ok, key=lambda r: r["ms"])
    best_cfg = dataclasses.replace(
        base_cfg, **{n: KernelConfig(**r["config"]) for n, r in best.items()}
    )
    return {"kernels": results, "best": {n: r for n, r in best.items()}, "best_config": best_cfg.to_dict()}


def best_config_per_head_dim(report):
    """One config per padded head dim over all swept shapes of that head dim.

    Per kernel: the candidate with the smallest sum over shapes of (its ms / the shape's best
    ms), among candidates that ran at every shape; so each shape weighs the same whatever
    its absolute time. A kernel with no such candidate keeps the first shape's config.
    """
    by_dim = {}
    for e in report["shapes"]:
        if "sweep" in e:
            by_dim.setdefault(padded_head_dim(e["shape"][3]), []).append(e)
    out = {}
    for dim, entries in by_dim.items():
        cfg = dict(entries[0]["sweep"]["best_config"])
        for name in entries[0]["sweep"]["kernels"]:
            scores = {}
            for e in entries:
                rows = [r for r in e["sweep"]["kernels"][name]["rows"] if r["ms"] is not None]
                if not rows:
                    scores = {}
                    break
                fastest = min(r["ms"] for r in rows)
                ok = {json.dumps(r["config"], sort_keys=True): r["ms"] / fastest for r in rows}
                scores = ok if e is entries[0] else {c: scores[c] + v for c, v in ok.items() if c in scores}
            if scores:
                cfg[name] = json.loads(min(scores, key=scores.get))
        out[str(dim)] = cfg
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="';'-separated batch,heads,seq,dim")
    p.add_argument("--iters", type=int, default=20, help="timed samples per measurement (>= 20 on GPU)")
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--write-table", action="store_true", help="update kernels/auto_table.json")
    p.add_argument("--table", default=None, help="auto table path (default kernels/auto_table.json)")
    p.add_argument("--sweep", action="store_true", help="sweep block sizes per kernel")
    p.add_argument("--sweep-kernels", default=",".join(SWEEP_MEASURE),
                   help="kernels to sweep (fwd_qkv, the plain forward with the qkv prologue, has its own "
                        "sweep: bench/qkv_prologue.py)")
    p.add_argument("--config", default=None, help="AttentionConfig JSON (e.g. a sweep's best_config)")
    p.add_argument("--no-xla", action="store_true", help="skip the XLA timings")
    p.add_argument("--no-cudnn", action="store_true", help="skip cuDNN")
    p.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke test)")
    p.add_argument("--min-sample-ms", type=float, default=2.0,
                   help="each timed sample holds back-to-back calls (one sync at its end) lasting at least this "
                        "long, at most 50 calls; with the default 2 ms a call of 2 ms or more is timed alone, "
                        "its host dispatch and sync inside the figure, while more calls per sample overlap "
                        "them with the previous call's device work")
    p.add_argument("--profile", action="store_true", help="also trace 2 calls of each timed Pallas kind and "
                   "store the device time per kernel and per op family (tvm_jax.profiling)")
    p.add_argument("--kinds", default=DEFAULT_KINDS,
                   help=f"what to time, of {sorted(FLOP_FACTOR)} (plain_fwd: the forward alone, as sampling runs it)")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in FLOP_FACTOR for k in kinds):
        raise SystemExit(f"--kinds: expected a comma-separated subset of {sorted(FLOP_FACTOR)}, got {args.kinds!r}")

    if not args.min_sample_ms > 0:
        raise SystemExit(f"--min-sample-ms must be > 0, got {args.min_sample_ms}")
    shapes = parse_shapes(args.shapes)
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    if not on_gpu and not args.interpret:
        raise SystemExit("no GPU: pass --interpret for a CPU smoke test of this script")
    iters = args.iters
    if on_gpu and iters < 20:
        print(f"note: --iters {iters} < 20")
    user_cfg = None
    if args.config:
        with open(args.config) as f:
            d = json.load(f)
        user_cfg = AttentionConfig.from_dict(d.get("best_config", d))
    sweep_kernels = [k for k in args.sweep_kernels.split(",") if k]
    for k in sweep_kernels:
        if k not in SWEEP_MEASURE:
            raise SystemExit(f"--sweep-kernels: unknown kernel {k!r}; choose from {tuple(SWEEP_MEASURE)}")

    report = {
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "command": " ".join([sys.executable] + sys.argv),
        "iters": iters,
        "min_sample_ms": args.min_sample_ms,
        "flop_factors": FLOP_FACTOR,
        "shapes": [],
    }
    print(f"device: {dev.device_kind}  jax {jax.__version__}", flush=True)
    t_start = time.time()
    for shape in shapes:
        b, h, s, d = shape
        scale = d**-0.5
        cfg = (user_cfg or AttentionConfig()).resolve(d)
        print(f"\n== shape B={b} H={h} S={s} D={d}", flush=True)
        entry = {"shape": list(shape), "config": cfg.to_dict()}
        arg_sets = make_inputs(shape, 3)
        fns = {"pallas": make_fns("pallas", scale, cfg, args.interpret)}
        if not args.no_xla:
            fns["xla"] = make_fns("xla", scale, None, False)
        if not args.no_cudnn:
            fns["cudnn"] = make_fns("cudnn", scale, None, False)

        compiled = {impl: compile_all(f, kinds, arg_sets[0]) for impl, f in fns.items()}
        if "xla" in compiled and {"jvp_fwd_bwd", "plain_fwd_bwd"} <= set(kinds):  # what it compares
            try:
                entry["rel_err_pallas_vs_xla"] = correctness(
                    compiled["pallas"], compiled["xla"], arg_sets[0], compiled.get("cudnn")
                )
                worst = max(v for grp in entry["rel_err_pallas_vs_xla"].values() for v in grp.values())
                print("  rel err pallas vs xla:", json.dumps(entry["rel_err_pallas_vs_xla"]), flush=True)
                if worst > 5e-2:
                    print(f"  WARNING: relative error {worst:.3e} > 5e-2", flush=True)
            except Exception as e:  # noqa: BLE001
                entry["rel_err_pallas_vs_xla"] = {"error": _err(e)}
                print("  correctness check failed:", _err(e), flush=True)

        entry["results"] = {}
        for impl, comp in compiled.items():
            entry["results"][impl] = measure(comp, arg_sets, iters, shape, args.min_sample_ms * 1e-3)
            for kind, r in entry["results"][impl].items():
                if r.get("ms") is not None:
                    tf = r.get("tflops")
                    mem = r.get("peak_mb")
                    print(f"  {impl:6s} {kind:14s} {r['ms']:9.3f} ms"
                          + (f" {tf:7.1f} TFLOP/s" if tf else "")
                          + (f" {mem:9.1f} MB" if mem is not None else ""), flush=True)  # fmt: skip
                else:
                    print(f"  {impl:6s} {kind:14s} FAILED {r.get('error', '')[:200]}", flush=True)
        if args.profile:
            entry["profile"] = profile_kinds(compiled["pallas"], arg_sets[0])
        del compiled
        if args.sweep:
            entry["sweep"] = sweep_shape(shape, cfg, arg_sets, iters, args.interpret, sweep_kernels)
            print("  best config:", json.dumps(entry["sweep"]["best_config"]), flush=True)
        report["shapes"].append(entry)
        del arg_sets, fns
        if args.out:  # after every shape, so a run stopped at its time limit keeps what it measured
            write_json(args.out, report)
    if args.sweep:
        report["best_config_per_head_dim"] = best_config_per_head_dim(report)
        print("best config per head dim:", json.dumps(report["best_config_per_head_dim"]), flush=True)
    report["total_s"] = time.time() - t_start

    if args.out:
        write_json(args.out, report)
        print(f"\nwrote {args.out}")
    if args.write_table:
        if not on_gpu:
            raise SystemExit("--write-table needs GPU measurements")
        entries = table_entries(report)
        auto_table.update_table(entries, args.table)
        print(f"updated {args.table or auto_table.TABLE_PATH} with {len(entries)} entries")
    print_summary(report)
    return report


def table_entries(report):
    entries = []
    for e in report["shapes"]:
        b, h, s, d = e["shape"]
        res = e["results"]
        if "xla" not in res:
            continue
        for mode, kind in (("jvp", "jvp_fwd_bwd"), ("plain", "plain_fwd_bwd")):
            xla_ms = res["xla"].get(kind, {}).get("ms")
            pallas_ms = res["pallas"].get(kind, {}).get("ms")
            if xla_ms is None and pallas_ms is None:
                continue
            cudnn = {}
            if mode == "plain" and "cudnn" in res:  # null: cuDNN refused or failed the shape
                cudnn["cudnn_ms"] = res["cudnn"].get(kind, {}).get("ms")
            entries.append(
                {
                    **cudnn,
                    "device_kind": report["device_kind"],
                    "mode": mode,
                    "dtype": "bfloat16",
                    "head_dim": padded_head_dim(d),
                    "seq_bucket": auto_table.seq_bucket(s),
                    "shape": [b, h, s, d],
                    "pallas_ms": pallas_ms,
                    "xla_ms": xla_ms,
                    "date": report["date"][:10],
                    "jax_version": report["jax_version"],
                    "config": e["config"],
                }
            )
    return entries


def print_summary(report):
    print("\nsummary (ms; TFLOP/s; peak MB)")
    cols = (("jvp_fwd", 18), ("jvp_fwd_bwd", 26), ("plain_fwd_bwd", 18), ("plain_fwd", 18))
    hdr = f"{'B,H,S,D':>16s} {'impl':6s} " + " ".join(f"{k:>{w}s}" for k, w in cols)
    print(hdr)
    for e in report["shapes"]:
        for impl, res in e["results"].items():
            cells = []
            for kind, width in cols:
                r = res.get(kind)
                if r is None:
                    cells.append(f"{'-':>{width}s}")
                elif r.get("ms") is None:
                    cells.append(f"{'failed':>{width}s}")
                else:
                    txt = f"{r['ms']:.3f}; {r['tflops']:.0f}"
                    if kind == "jvp_fwd_bwd" and r.get("peak_mb") is not None:
                        txt += f"; {r['peak_mb']:.0f}"
                    cells.append(f"{txt:>{width}s}")
            print(f"{','.join(map(str, e['shape'])):>16s} {impl:6s} " + " ".join(cells))


if __name__ == "__main__":
    main()

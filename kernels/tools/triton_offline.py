"""Dev tool (no GPU needed): registers, spills and shared memory of the kernels for sm_90a.

Two phases, usually in two environments:

1. ``dump`` (the project venv, jax): lowers the six kernels for CUDA via ``jax.export`` and
   writes each kernel's Triton IR (``.ttir``) with its num_warps/num_stages::

       python -m kernels.tools.triton_offline dump OUT_DIR --dim 128 --seq 4096 \
           [--config best.json] [--grid]   # --grid: all (bq, bk) in 16..128 x warps 4/8 x stages 2/3

2. ``compile`` (any venv with ``pip install triton``; it bundles ptxas): compiles every
   ``.ttir`` for sm_90a and prints shared memory, registers and spill bytes::

       python kernels/tools/triton_offline.py compile OUT_DIR [--arch 90]

Caveats: phase 1 hooks a private jax function (``lower_jaxpr_to_triton_module``) to get the
IR as text, so it may need updating for other jax versions; pip Triton is not the Triton
inside XLA, so numbers are indicative. A tile whose MMA M dimension is < 64 shows up as
``mma.sync`` (``mma=v2``) instead of wgmma (``mma=v3``).
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile


def dump(out_dir, dim, seq, cfg_path=None, grid=False):
    import jax
    import jax.numpy as jnp
    from jax import export
    from jax._src.pallas.triton import pallas_call_registration as reg

    from kernels import AttentionConfig, KernelConfig, attention
    from kernels.config import KERNEL_NAMES

    captured = {}
    orig = reg.lowering.lower_jaxpr_to_triton_module

    def hook(jaxpr, grid_mapping, *a, **k):
        res = orig(jaxpr, grid_mapping, *a, **k)
        captured[jaxpr.debug_info.func_name] = res.module.operation.get_asm(enable_debug_info=False)
        return res

    reg.lowering.lower_jaxpr_to_triton_module = hook
    os.makedirs(out_dir, exist_ok=True)

    def lower(fn, *shapes):
        export.export(
            jax.jit(fn), platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*shapes)  # fmt: skip

    def one(cfg):
        captured.clear()
        sd = jax.ShapeDtypeStruct((1, seq, 2, dim), jnp.bfloat16)
        kw = dict(impl="pallas", interpret=False, block_sizes=cfg)
        f32 = lambda x: jnp.sum(x.astype(jnp.float32))

        def loss(q, k, v, tq, tk, tv):
            o, to = jax.jvp(lambda a, b, c: attention(a, b, c, jvp=True, **kw), (q, k, v), (tq, tk, tv))
            return f32(o) + f32(to)

        lower(jax.grad(lambda q, k, v: f32(attention(q, k, v, **kw)), argnums=(0, 1, 2)), sd, sd, sd)
        lower(jax.grad(loss, argnums=tuple(range(6))), *(sd,) * 6)
        resolved = cfg.resolve(dim).clamp(seq, seq)
        for name, text in captured.items():
            key = name.removeprefix("tvm_flash_")
            kc = getattr(resolved, key)
            tag = f"{key}__{kc.block_q}_{kc.block_k}_{kc.num_warps}_{kc.num_stages}"
            with open(os.path.join(out_dir, tag + ".ttir"), "w") as f:
                f.write(text)
            with open(os.path.join(out_dir, tag + ".json"), "w") as f:
                json.dump({"num_warps": kc.num_warps, "num_stages": kc.num_stages}, f)

    if grid:
        for bq, bk, w, s in itertools.product((16, 32, 64, 128), (16, 32, 64, 128), (4, 8), (2, 3)):
            kc = KernelConfig(bq, bk, w, s)
            one(AttentionConfig(**{n: kc for n in KERNEL_NAMES}))
    else:
        cfg = AttentionConfig()
        if cfg_path:
            with open(cfg_path) as f:
                d = json.load(f)
            cfg = AttentionConfig.from_dict(d.get("best_config", d))
        one(cfg)
    print(f"wrote {len(glob.glob(os.path.join(out_dir, '*.ttir')))} kernels to {out_dir}")


def _stats(args):
    path, arch = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as tcompile

    with open(path[:-5] + ".json") as f:
        opts = json.load(f)
    name = os.path.basename(path)[:-5]
    try:
        k = tcompile(path, target=GPUTarget("cuda", arch, 32), options=opts)
    except Exception as e:  # noqa: BLE001
        return name, f"COMPILE FAILED: {str(e)[:300]}"
    mma = "v3" if "warp_group_dot" in k.asm["ttgir"] else ("v2" if "tt.dot" in k.asm["ttgir"] or "mma" in k.asm["ttgir"] else "?")
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next((p for p in (os.path.join(bindir, "ptxas-blackwell"), os.path.join(bindir, "ptxas")) if os.path.exists(p)), "ptxas")
    with tempfile.TemporaryDirectory() as td:
        ptx = os.path.join(td, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        r = subprocess.run([ptxas, "-v", f"--gpu-name={sm}", ptx, "-o", ptx + ".o"], capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return name, (
        f"smem={k.metadata.shared // 1024:4d}K regs={regs.group(1) if regs else '?':>4s} "
        f"spill_stores={spill.group(1) if spill else '?':>5s}B mma={mma}"
    )


def compile_all(out_dir, arch=90, jobs=2):
    from concurrent.futures import ProcessPoolExecutor

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    paths = sorted(glob.glob(os.path.join(out_dir, "*.ttir")))
    with ProcessPoolExecutor(jobs) as ex:
        for name, line in ex.map(_stats, [(p, arch) for p in paths]):
            print(f"{name:32s} {line}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out_dir")
    d.add_argument("--dim", type=int, default=128)
    d.add_argument("--seq", type=int, default=4096)
    d.add_argument("--config", default=None)
    d.add_argument("--grid", action="store_true")
    c = sub.add_parser("compile")
    c.add_argument("out_dir")
    c.add_argument("--arch", type=int, default=90)
    c.add_argument("--jobs", type=int, default=2)
    a = p.parse_args(argv)
    if a.cmd == "dump":
        dump(a.out_dir, a.dim, a.seq, a.config, a.grid)
    else:
        compile_all(a.out_dir, a.arch, a.jobs)


if __name__ == "__main__":
    sys.exit(main())

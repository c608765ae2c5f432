"""Benchmark of one TVM training step (and of sampling) on the visible GPUs.

Default: the in256_w2 recipe (DiT-XL/2-18h, bf16 compute, fp32 params, AdamW, evaluation EMA and
EMA target, JVP attention) at ``--batch_per_device`` 32 on synthetic 32x32x4 latents, over a
data-parallel mesh of all visible devices. For every variant it reports:

* ms/step: median over ``--steps`` (>= 10) steps after compilation and 2 warm-up steps, each
  step synchronised (``block_until_ready``); images/s = global batch / median step time;
* compile time (lower + compile of the jitted step);
* peak GPU memory: ``compiled.memory_analysis()`` (arguments + outputs + temporaries - aliased,
  per device; reliable per variant) and the allocator's ``peak_bytes_in_use`` (the process-wide
  maximum so far, so only the first variant's is its own);
* model FLOP utilisation: model FLOPs per step counted from the model (:func:`dit_forward_flops`
  times the forward-equivalent passes of the TVM step, :data:`TVM_PASSES`: 11 per example,
  rematerialisation not counted) divided by step time, by the device count and by the chip's
  measured dense bf16 matmul peak (``--peak_tflops``, 790 from ANCHORS.md). XLA's own
  ``cost_analysis()`` count is stored too but is not usable here: it counts the body of the
  layer scan once (``model.layer_loop="scan"``) and cannot see inside Pallas kernels.

Variants (``--variants``, comma list): ``default`` (the config as given), ``detach_jvp``,
``naive`` (the naive DiT: no Lipschitz changes), ``xla_attention``/``pallas_attention`` (force an
attention implementation), ``remat_dots``/``remat_block`` (rematerialisation policies),
``remat_none``, ``recompute_attention`` (remat re-runs the forward attention kernels in the
backward: ``model.save_attention = False``), ``fsdp`` (parameter sharding over all devices,
``mesh.fsdp = #devices``). ``--set model.remat=none`` etc. change the base config.
``--sampling`` also times 1- and 4-step sampling of batch 256 (XL/2-18h, bf16) in ms and img/s
(with ``--profile``: the 1-step call's device time by op family too), with the sampler's compiled
memory; ``--sampling_batch``, ``--sampling_steps`` and ``--sampling_repeats`` change the batches,
step counts and timed calls (a batch that does not fit is reported as an error, the others kept).

    python bench/train_step.py --out bench/results/train_step_h100.json
    python bench/train_step.py --config=configs/in512.py --variants=default --batch_per_device=8

Writes JSON with the GPU name, date, jax version and command line; prints a table last.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tvm_jax import profiling  # noqa: E402
from tvm_jax import sharding as shd  # noqa: E402
from tvm_jax.config import load_config_file, objective_config, train_step_config, validate_config  # noqa: E402
from tvm_jax.objectives import make_objective  # noqa: E402
from tvm_jax.microbatching import compiled_memory_bytes  # noqa: E402
from tvm_jax.networks import build_network  # noqa: E402
from tvm_jax.training import init_train_state, jit_train_step, make_optimizer, make_train_step  # noqa: E402

VARIANTS = ("default", "detach_jvp", "naive", "xla_attention", "pallas_attention", "remat_none", "remat_dots",
            "remat_block", "recompute_attention", "fsdp")


def _parse_override(kind: type | None, value: str):
    """``--set`` value in the type of the config entry it replaces (bools by name: bool("False") is True)."""
    if kind is None:
        return value
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--set expects true/false for a bool entry, got {value!r}")
        return value.lower() in ("true", "1")
    return kind(value)


def _entry_type(node, key: str) -> type | None:
    """The type of a config entry: its value's, or for an unset placeholder the one it was declared with."""
    if node[key] is not None:
        return type(node[key])
    try:
        return node.get_ref(key).get_type()
    except (AttributeError, KeyError, TypeError):
        return None


def variant_config(base_path: str, variant: str, batch_per_device: int, overrides: list[str]):
    c = load_config_file(base_path)
    c.data.source = "synthetic"
    n = len(jax.devices())
    c.train.global_batch_size = batch_per_device * n
    for item in overrides:
        key, value = item.split("=", 1)
        node = c
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = _parse_override(_entry_type(node, parts[-1]), value)
    if variant == "detach_jvp":
        c.objective.detach_jvp = True
    elif variant == "naive":
        c.model.lipschitz = False
    elif variant == "xla_attention":
        c.model.attention_impl = "xla"
    elif variant == "pallas_attention":
        c.model.attention_impl = "pallas"
    elif variant == "remat_none":
        c.model.remat = "none"
    elif variant == "remat_dots":
        c.model.remat = "dots"
    elif variant == "remat_block":
        c.model.remat = "block"
    elif variant == "recompute_attention":
        c.model.save_attention = False
    elif variant == "fsdp":
        c.mesh.fsdp = n
    elif variant != "default":
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    validate_config(c)
    return c


def memory_mb(compiled) -> float | None:
    """The compiled executable's per-device memory in MiB (as the trainer's micro-batch choice counts it)."""
    n = compiled_memory_bytes(compiled)
    return None if n is None else n / 2**20


def flops_of(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001
        return None


def dit_forward_flops(config) -> float:
    """Matmul FLOPs of one DiT forward pass for one image: token-wise linears (qkv, proj, MLP)
    and attention (QK^T and PV) in every block, patch embedding and final layer; the per-sample
    conditioning path (adaLN modulation, embedders) is negligible and left out."""
    from tvm_jax.config import dit_config

    d = dit_config(config)
    h, tokens = d.hidden_size, (d.input_size // d.patch_size) ** 2
    mlp = int(h * d.mlp_ratio)
    per_block = 2 * tokens * (4 * h * h + 2 * h * mlp) + 4 * tokens * tokens * h
    patch = d.patch_size ** 2 * d.in_channels
    return float(d.depth * per_block + 2 * tokens * patch * h * 2)


# Forward-equivalent passes per training example of the TVM step (no rematerialisation counted):
# f = F(x_t, t, s) with its tangent (2) and the backward through both (4), the EMA-target teacher
# on 2 inputs per example (2, no backward), and the FM term's forward and backward (3).
# detach_jvp: the backward runs through the primal only (2 instead of 4).
TVM_PASSES = {"default": 11.0, "detach_jvp": 9.0}


def model_flops_per_step(config) -> float | None:
    if config.model.type != "dit" or config.objective.name != "tvm":
        return None
    passes = TVM_PASSES["detach_jvp" if config.objective.detach_jvp else "default"]
    return passes * dit_forward_flops(config) * config.train.global_batch_size


def has_kernel_calls(compiled) -> bool:
    """Whether the compiled step calls Pallas kernels (Triton or Mosaic GPU custom calls), whose
    FLOPs XLA's cost analysis cannot see."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001
        return False
    # Pallas calls are custom calls with these targets; XLA's own Triton GEMM fusions are not.
    return any(f'custom_call_target="{tag}' in text for tag in ("__gpu$xla.gpu.triton", "mosaic_gpu"))


def peak_in_use_mb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**20 if stats else None


def save_hlo(compiled, hlo_dir: str | None, name: str) -> None:
    """The optimised HLO of a compiled function as ``<hlo_dir>/<name>.hlo.txt.gz`` (to read what
    each fused kernel of a profile computes)."""
    if not hlo_dir:
        return
    import gzip

    os.makedirs(hlo_dir, exist_ok=True)
    with gzip.open(os.path.join(hlo_dir, f"{name}.hlo.txt.gz"), "wt") as f:
        f.write(compiled.as_text())


def bench_variant(config, steps: int, peak_tflops: float, profile: bool = False, hlo_dir: str | None = None,
                  name: str = "step") -> dict:
    mesh = shd.make_mesh(config.mesh.fsdp)
    with jax.set_mesh(mesh):
        net = build_network(config, mesh)
        opt = make_optimizer(config)
        init = lambda p: init_train_state(p, opt, config.seed)  # noqa: E731
        state_sh = shd.state_shardings(jax.eval_shape(init, net.params), mesh)
        state = jax.jit(init, out_shardings=state_sh, donate_argnums=(0,))(net.params)
        del net.params
        batch_sh = shd.batch_sharding(mesh)
        step_fn = make_train_step(net.apply, make_objective(objective_config(config)), opt, train_step_config(config),
                                  batch_sharding=batch_sh, param_shardings=state_sh.params, prepare_params=net.prepare)
        jitted = jit_train_step(step_fn, state_sh, batch_sh)
        gb = config.train.global_batch_size
        rng = np.random.default_rng(0)
        batches = [shd.global_batch({"x": rng.standard_normal((gb, *config.data.shape), dtype=np.float32),
                                     "label": rng.integers(0, config.data.num_classes, gb).astype(np.int32)}, mesh)
                   for _ in range(3)]
        t0 = time.perf_counter()
        lowered = jitted.lower(state, batches[0])
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        save_hlo(compiled, hlo_dir, name)
        for i in range(2):
            state, metrics = compiled(state, batches[i % 3])
        jax.block_until_ready(metrics)
        times = []
        for i in range(steps):
            t = time.perf_counter()
            state, metrics = compiled(state, batches[i % 3])
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - t) * 1e3)
        m = jax.device_get(metrics)
        ms = statistics.median(times)
        prof = None
        if profile:  # two more steps under the profiler: device time per op family (tvm_jax.profiling)
            held = {"state": state}

            def one_step():
                held["state"], step_metrics = compiled(held["state"], batches[0])
                return step_metrics

            prof = profiling.profile(one_step, calls=2, hlo_text=compiled.as_text())
            state = held["state"]
        xla_flops = flops_of(compiled)
        flops = model_flops_per_step(config)
        n_dev = mesh.devices.size
        out = {
            "ms_per_step": ms, "ms_min": min(times), "ms_max": max(times), "images_per_s": gb / ms * 1e3,
            "global_batch": gb, "devices": n_dev, "compile_s": compile_s,
            "compiled_memory_mb_per_device": memory_mb(compiled), "process_peak_bytes_in_use_mb": peak_in_use_mb(),
            "model_flops_per_step": flops, "xla_cost_analysis_flops": xla_flops,
            "pallas_calls_in_step": has_kernel_calls(compiled),
            "mfu_vs_measured_peak": (flops / (ms / 1e3) / (peak_tflops * 1e12) / n_dev) if flops else None,
            "loss": float(m["loss"]), "skipped_total": int(m["skipped_total"]),
            "attention_impl": config.model.attention_impl, "fsdp": config.mesh.fsdp, "remat": config.model.remat,
        }
        if prof is not None:
            out["profile"] = {"ms_per_step_by_family": prof["summary"],
                              "all_ops": prof["rows"],  # every row, largest first: families can be re-derived
                              "device_ms_per_step": sum(v["ms_per_call"] for v in prof["summary"].values())}
        del state, batches, compiled, lowered
    gc.collect()
    return out


def bench_sampling(config, batch: int, steps_list=(1, 4), profile: bool = False, hlo_dir: str | None = None,
                   repeats: int = 10) -> dict:
    from tvm_jax.sampling import make_sampler

    mesh = shd.make_mesh(1)
    out = {}
    with jax.set_mesh(mesh):
        net = build_network(config, mesh)
        noise = jax.device_put(jax.random.normal(jax.random.key(0), (batch, *config.data.shape)), shd.batch_sharding(mesh))
        labels = jax.device_put(jnp.arange(batch) % config.data.num_classes, shd.batch_sharding(mesh))
        for n in steps_list:
            sampler = make_sampler(net.apply, steps=n, w=config.sample.w, null_label=config.data.num_classes,
                                   scaled=config.objective.scaled_param).lower(net.params, noise, labels).compile()
            save_hlo(sampler, hlo_dir, f"sampling_{n}step_batch{batch}")
            jax.block_until_ready(sampler(net.params, noise, labels))
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                jax.block_until_ready(sampler(net.params, noise, labels))
                times.append((time.perf_counter() - t) * 1e3)
            ms = statistics.median(times)
            out[f"{n}step"] = {"ms_per_batch": ms, "images_per_s": batch / ms * 1e3, "batch": batch, "repeats": repeats,
                               "compiled_memory_mb": memory_mb(sampler)}
            if profile and n == 1:  # device time per op family of one 1-step sampling call
                prof = profiling.profile(lambda: sampler(net.params, noise, labels), calls=2,
                                         hlo_text=sampler.as_text())
                out[f"{n}step"]["profile"] = {"ms_per_call_by_family": prof["summary"], "all_ops": prof["rows"]}
        del net
    gc.collect()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "in256.py"))
    p.add_argument("--variants", default="default,detach_jvp,naive")
    p.add_argument("--batch_per_device", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak_tflops", type=float, default=790.0)
    p.add_argument("--profile", action="store_true", help="also trace 2 steps per variant and group the device "
                   "time by op family (tvm_jax.profiling)")
    p.add_argument("--sampling", action="store_true")
    p.add_argument("--sampling_batch", default="256", help="comma list of sampling batch sizes")
    p.add_argument("--sampling_steps", default="1,4", help="comma list of sampling step counts")
    p.add_argument("--sampling_repeats", type=int, default=10, help="timed sampling calls per batch and step count "
                   "(after one untimed call); fewer for the largest batches")
    p.add_argument("--set", action="append", default=[], help="config override a.b=value (repeatable)")
    p.add_argument("--out", default=None)
    p.add_argument("--hlo_dir", default=None, help="also write each compiled step/sampler's optimised HLO here (gzip)")
    args = p.parse_args(argv)
    if args.steps < 10:
        p.error("--steps must be >= 10")
    if args.sampling_repeats < 1:
        p.error("--sampling_repeats must be >= 1")
    try:
        sampling_steps = [int(n) for n in args.sampling_steps.split(",")]
    except ValueError:
        p.error(f"--sampling_steps must be a comma list of step counts, got {args.sampling_steps!r}")
    if any(n < 1 for n in sampling_steps):
        p.error(f"--sampling_steps must all be >= 1, got {args.sampling_steps!r}")

    report = {
        "gpu": jax.devices()[0].device_kind, "num_devices": len(jax.devices()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__, "command": " ".join(sys.argv), "config": os.path.relpath(args.config, ROOT),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "batch_per_device": args.batch_per_device, "flops_source": "analytic model FLOPs (dit_forward_flops x TVM_PASSES x global batch; no "
                        "rematerialisation); xla_cost_analysis_flops is XLA's count for reference only (it "
                        "counts a scan body once and cannot see inside Pallas kernels)",
        "peak_tflops_assumed": args.peak_tflops, "variants": {},
    }
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        try:
            cfg = variant_config(args.config, variant, args.batch_per_device, args.set)
            report["variants"][variant] = bench_variant(cfg, args.steps, args.peak_tflops, args.profile,
                                                        hlo_dir=args.hlo_dir, name=f"step_{variant}")
        except Exception as e:  # noqa: BLE001  (one failing variant must not lose the others)
            report["variants"][variant] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            traceback.print_exc()
        print(variant, json.dumps(report["variants"][variant]), flush=True)
        if args.out:  # after every variant, so a time limit cannot lose the finished ones
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
    if args.sampling:
        cfg = variant_config(args.config, "default", args.batch_per_device, args.set)
        report["sampling"] = {}
        for batch in [int(b) for b in args.sampling_batch.split(",")]:
            try:  # a batch that does not fit must not lose the others
                for name, r in bench_sampling(cfg, batch, sampling_steps, profile=args.profile and batch == 256,
                                              hlo_dir=args.hlo_dir, repeats=args.sampling_repeats).items():
                    report["sampling"][name if batch == 256 else f"{name}_batch{batch}"] = r
            except Exception as e:  # noqa: BLE001
                report["sampling"][f"batch{batch}"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                traceback.print_exc()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\n{report['gpu']} x{report['num_devices']}, batch {args.batch_per_device}/device, {report['config']}")
    print(f"{'variant':18s} {'ms/step':>9s} {'img/s':>8s} {'mem MB':>9s} {'peak MB':>9s} {'MFU':>6s} {'compile s':>9s}")
    for name, r in report["variants"].items():
        if "error" in r:
            print(f"{name:18s} ERROR {r['error'][:90]}")
            continue
        mfu = f"{r['mfu_vs_measured_peak']:.1%}" if r["mfu_vs_measured_peak"] else "-"
        print(f"{name:18s} {r['ms_per_step']:9.1f} {r['images_per_s']:8.1f} {r['compiled_memory_mb_per_device'] or 0:9.0f} "
              f"{r['process_peak_bytes_in_use_mb'] or 0:9.0f} {mfu:>6s} {r['compile_s']:9.1f}")
    for name, r in (report.get("sampling") or {}).items():
        if isinstance(r, dict) and "ms_per_batch" in r:
            print(f"sampling {name}: {r['ms_per_batch']:.1f} ms per batch of {r['batch']}, {r['images_per_s']:.0f} img/s, "
                  f"{r['compiled_memory_mb'] or 0:.0f} MB")
        elif isinstance(r, dict) and "error" in r:
            print(f"sampling {name}: ERROR {r['error'][:200]}")
    return report


if __name__ == "__main__":
    main()

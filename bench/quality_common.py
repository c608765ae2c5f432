"""Shared helpers of the quality benchmarks (``bench/quality_gmm.py``, ``bench/quality_digits.py``)
and of ``tests/test_quality.py``.

* :func:`make_adamw`: the library's optimiser (:func:`tvm_jax.training.make_optimizer`) from
  plain arguments;
* :func:`train`: the library's jitted training step (:func:`tvm_jax.training.make_train_step`
  on :func:`tvm_jax.training.init_train_state`) driven by a batch function, with a loss
  history, the count of skipped (non-finite) steps and timings;
* :func:`model_flow_map` / :func:`fm_velocity`: the one-jump map ``f(x_t, t, s)`` of a
  flow-map model (TVM, MeanFlow) and of a velocity model (FM: one Euler step, CFG);
* :func:`sample`: N-step samples with :func:`tvm_jax.sampling.flow_map_sample` (flow-map
  models) or :func:`tvm_jax.sampling.euler_sample` (FM, CFG with two network calls);
* :func:`run_metadata` / :func:`write_json`: what every result file records.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
import types
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tvm_jax.flow_map import flow_map, per_sample  # noqa: E402
from tvm_jax.sampling import euler_sample, flow_map_sample  # noqa: E402
from tvm_jax.training import (  # noqa: E402
    TrainState, TrainStepConfig, init_train_state, make_optimizer, make_train_step,
)


# ----------------------------------------------------------------------------- optimiser / training


@dataclasses.dataclass(frozen=True)
class OptConfig:
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    schedule: str = "constant"  # "constant" (the library's optimiser) or "cosine"
    decay_steps: int = 0  # cosine: steps over which lr decays to final_lr_fraction * lr
    final_lr_fraction: float = 0.05


def make_adamw(opt: OptConfig):
    """The library's AdamW (:func:`tvm_jax.training.make_optimizer`, which reads
    ``config.optimizer.<field>``); with ``schedule="cosine"`` the constant learning rate is
    replaced by ``optax.cosine_decay_schedule(lr, decay_steps, final_lr_fraction)``, everything
    else (betas, eps, weight decay, clipping) unchanged."""
    if opt.schedule == "constant":
        return make_optimizer(types.SimpleNamespace(optimizer=opt))
    if opt.schedule != "cosine":
        raise ValueError(f"unknown lr schedule {opt.schedule!r}")
    if opt.decay_steps < 1:
        raise ValueError("cosine schedule needs decay_steps >= 1")
    lr = optax.cosine_decay_schedule(opt.lr, opt.decay_steps, alpha=opt.final_lr_fraction)
    return make_optimizer(types.SimpleNamespace(optimizer=dataclasses.replace(opt, lr=lr)))


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    losses: list[tuple[int, float]]  # (step, mean loss over the last log interval)
    metrics_last: dict[str, float]  # step metrics averaged over the last log interval
    skipped: int  # steps whose loss or gradient was not finite (update discarded)
    nonfinite_loss_steps: int  # steps whose loss was not finite
    train_seconds: float  # wall time of the steps after the first (compiling) one
    compile_seconds: float  # wall time of the first step (compilation + one step)
    steps: int

    def summary(self) -> dict[str, Any]:
        """The JSON record of a run's training (both benchmarks store it as ``"train"``)."""
        return {"steps": self.steps, "seconds": self.train_seconds, "compile_seconds": self.compile_seconds,
                "sec_per_step": self.train_seconds / max(self.steps - 1, 1), "skipped_steps": self.skipped,
                "nonfinite_loss_steps": self.nonfinite_loss_steps, "loss_curve": self.losses,
                "final_metrics": self.metrics_last}


def train(apply, loss_fn, params, *, steps: int, batches: Iterator[dict], opt: OptConfig, ema_decay: float,
          target_decay: float, seed: int, log_every: int = 100, verbose: bool = True,
          name: str = "", compiler_options: dict | None = None) -> TrainResult:
    """Runs ``steps`` steps of the library's training step (jitted, state donated;
    ``compiler_options``: XLA options for its compilation, as ``jax.jit`` takes them).

    ``batches`` yields ``{"x": (B, ...) float32, "label": (B,) int32}`` numpy or jax arrays, a
    fresh batch per step. The params are copied first (the caller's arrays survive donation).
    """
    optimizer = make_adamw(opt)
    step_fn = jax.jit(make_train_step(apply, loss_fn, optimizer, TrainStepConfig(ema_decay, target_decay)),
                      donate_argnums=0, compiler_options=compiler_options)
    state = init_train_state(jax.tree.map(jnp.array, params), optimizer, seed)
    losses: list[tuple[int, float]] = []
    window: list[dict] = []
    metrics_last: dict[str, float] = {}
    nonfinite_loss = 0
    t_start = time.time()
    compile_seconds = 0.0
    t_after_first = t_start
    for i in range(steps):
        batch = next(batches)
        state, metrics = step_fn(state, {"x": jnp.asarray(batch["x"], jnp.float32),
                                         "label": jnp.asarray(batch["label"], jnp.int32)})
        window.append(metrics)
        if i == 0:
            jax.block_until_ready(state)
            t_after_first = time.time()
            compile_seconds = t_after_first - t_start
        if (i + 1) % log_every == 0 or i + 1 == steps:
            host = jax.device_get(window)
            loss_vals = np.array([m["loss"] for m in host], np.float64)
            nonfinite_loss += int(np.sum(~np.isfinite(loss_vals)))
            finite = loss_vals[np.isfinite(loss_vals)]
            mean_loss = float(finite.mean()) if finite.size else float("nan")
            losses.append((i + 1, mean_loss))
            metrics_last = {k: float(np.mean([float(m[k]) for m in host])) for k in host[-1]
                            if k not in ("skipped_total",)}
            window = []
            if verbose:
                el = time.time() - t_start
                print(f"  [{name}] step {i + 1}/{steps} loss {mean_loss:.4f} "
                      f"skipped {int(host[-1]['skipped_total'])} ({el:.0f}s)", flush=True)
    jax.block_until_ready(state)
    train_seconds = time.time() - t_after_first
    return TrainResult(state=state, losses=losses, metrics_last=metrics_last, skipped=int(state.skipped),
                       nonfinite_loss_steps=nonfinite_loss, train_seconds=train_seconds,
                       compile_seconds=compile_seconds, steps=steps)


# ----------------------------------------------------------------------------- model maps and samplers


def fm_velocity(apply, params, x, t, labels, w: float, null_label: int):
    """CFG velocity of a flow-matching model: ``w F(x, t, 0, c, 1) + (1 - w) F(x, t, 0, null, 1)``
    (the plain conditional velocity for ``w = 1``), exactly as :func:`euler_sample` forms it."""
    b = x.shape[0]
    ones, zeros = jnp.ones((b,), jnp.float32), jnp.zeros((b,), jnp.float32)
    if w == 1.0:
        return apply(params, x, t, zeros, labels, ones)
    null = jnp.full_like(labels, null_label)
    u = apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.zeros((2 * b,)),
              jnp.concatenate([labels, null]), jnp.ones((2 * b,)))
    u_c, u_u = jnp.split(u, 2)
    return w * u_c + (1.0 - w) * u_u


@functools.partial(jax.jit, static_argnames=("apply", "kind", "w", "null_label", "scaled"))
def model_flow_map(apply, params, x_t, t, s, labels, *, kind: str, w: float, null_label: int,
                   scaled: bool = True):
    """The model's one-jump map ``f(x_t, t, s)``.

    ``kind="flow_map"`` (TVM, MeanFlow): ``x_t + (s - t) k F(x_t, t, t - s, label, 1/w)``
    (:func:`tvm_jax.flow_map.flow_map`); ``kind="velocity"`` (FM): one Euler step
    ``x_t + (s - t) u_w(x_t, t)`` with the CFG velocity of :func:`fm_velocity`.
    """
    labels = jnp.asarray(labels, jnp.int32)
    if kind == "flow_map":
        beta = jnp.where(labels == null_label, 1.0, 1.0 / w).astype(jnp.float32)
        return flow_map(apply, params, x_t, t, s, labels, beta, scaled=scaled)
    if kind == "velocity":
        u = fm_velocity(apply, params, x_t, t, labels, w, null_label)
        return x_t + per_sample(s - t, x_t) * u
    raise ValueError(f"unknown model kind {kind!r}")


@functools.partial(jax.jit, static_argnames=("apply", "kind", "steps", "w", "null_label", "scaled"))
def sample(apply, params, noise, labels, *, kind: str, steps: int, w: float, null_label: int, scaled: bool = True):
    """``steps``-step samples: :func:`flow_map_sample` for flow-map models, :func:`euler_sample`
    (CFG by two network calls) for FM."""
    if kind == "flow_map":
        return flow_map_sample(apply, params, noise, labels, steps=steps, w=w, scaled=scaled, null_label=null_label)
    if kind == "velocity":
        return euler_sample(apply, params, noise, labels, steps=steps, w=w, null_label=null_label)
    raise ValueError(f"unknown model kind {kind!r}")


def batched(fn: Callable, *arrays, batch: int = 1024):
    """Applies ``fn`` to slices of ``arrays`` (leading axis) and concatenates the numpy results."""
    n = arrays[0].shape[0]
    outs = [np.asarray(fn(*(a[i:i + batch] for a in arrays))) for i in range(0, n, batch)]
    return np.concatenate(outs, axis=0)


# ----------------------------------------------------------------------------- metadata / output


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_state() -> dict[str, Any] | None:
    """HEAD and ``git status --porcelain`` of the library folders (untracked/modified files)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--", "tvm_jax", "kernels", "bench"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        return {"head": out.stdout.strip(), "status_library_and_bench": status.stdout.strip().splitlines()}
    except (OSError, subprocess.SubprocessError):
        return None


def _platform_version() -> str | None:
    """The backend's version string (CUDA/driver versions on GPU)."""
    try:
        return str(jax.devices()[0].client.platform_version)
    except Exception:  # noqa: BLE001 - best effort
        return None


def _nvidia_smi() -> list[str] | None:
    """``name, driver, memory`` of each GPU from nvidia-smi (None without one)."""
    if jax.default_backend() != "gpu":
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata(argv: list[str]) -> dict[str, Any]:
    import flax
    import optax
    import scipy

    return {
        "command": " ".join(["python"] + argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(),
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind,
            "platform_version": _platform_version(),
            "nvidia_smi": _nvidia_smi(),
        },
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jax.lib.__version__
                     if hasattr(jax, "lib") and hasattr(jax.lib, "__version__") else None,
                     "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
                     "scipy": scipy.__version__},
        "git": _git_state(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def to_jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else str(v)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.ndarray, jax.Array)):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def save_figure(fig, path: str, dpi: int) -> None:
    """Lays out, writes (creating the folder) and closes a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(to_jsonable(payload), f, indent=1)
        f.write("\n")

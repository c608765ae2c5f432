"""The training loop: pre-flight checks, sharded state, data, checkpoints, metrics, samples.

:func:`train` is what ``python -m tvm_jax.main --mode=train`` runs. Everything that can be
checked without compiling is checked first (:func:`preflight`): the config, the data (path,
shape, label count), the batch against the device count and the micro-batch size, the
``train.init_from`` model, and that the workdir is writable. Then the model and the train state
are created directly in their shardings on a ``(data, fsdp)`` mesh of all devices (from the
``train.init_from`` weights for a new run), the step is compiled for the configured or the
largest fitting micro-batch size (:func:`tvm_jax.microbatching.compile_train_step`), the latest
checkpoint (if any) is restored together with the data-iterator position, and the step runs
until ``train.num_steps``.

Periodic work: a log line with the loss terms, gradient norm, skipped steps, images/s, an ETA and
the terminal and FM losses per quarter of time (TensorBoard gets the same scalars) every
``train.log_every`` steps (clu ``ReportProgress`` adds its own progress notes); sample
grids from the EMA weights at ``sample.steps`` NFE every ``train.sample_every`` steps (PNG files
in ``WORKDIR/samples`` and TensorBoard images); checkpoints every ``train.checkpoint_every``
steps and at the end. SIGTERM/SIGINT save a checkpoint of the step reached, then raise
``SystemExit(128 + signal number)`` (exit status 143 for SIGTERM); rerunning resumes from it.

Failures: every step's count of consecutive non-finite steps is checked against
``train.max_skipped_steps`` (read one step late, so the device never waits for the host), and
:class:`TrainingAborted` stops a diverged run, as it does a run none of whose steps was finite.
On any exception the loop waits for a checkpoint being saved and closes the checkpointer and
the metric writer before the exception propagates (so the latest completed checkpoint stays
valid and no background thread is left to fail later); ``tvm_jax.main`` then prints its cause
in one line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tvm_jax import images as image_utils
from tvm_jax import sharding as shd
from tvm_jax.checkpointing import Checkpointer, abstract_like
from tvm_jax.config import objective_config, train_step_config, validate_config
from tvm_jax.data import pipeline
from tvm_jax.fine_tune import check_init_from, load_init_params
from tvm_jax.metric_writing import create_writer, periodic_actions
from tvm_jax.microbatching import compile_train_step, micro_batch_count
from tvm_jax.networks import build_network
from tvm_jax.objectives import BIN_SUFFIXES, make_objective
from tvm_jax.paths import writable_directory
from tvm_jax.sampling import make_sampler
from tvm_jax.training import (TrainState, init_train_state, jit_train_step, make_optimizer, make_train_step,
                              parameter_norm)


class TrainingAborted(RuntimeError):
    """Training stopped because it diverged (``train.max_skipped_steps`` consecutive non-finite
    steps, or every step of the run non-finite); the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- checks


def check_workdir(workdir: str) -> str:
    if not workdir:
        raise ValueError("--workdir is required")
    return writable_directory(workdir, "--workdir")


def preflight(config, workdir: str | None) -> pipeline.DatasetInfo:
    """Every check that needs no compilation: config, data, batch vs devices, workdir."""
    validate_config(config)
    info = pipeline.dataset_info(config)
    if tuple(info.shape) != tuple(config.data.shape):
        raise ValueError(f"data.shape: the dataset ({info.description}) has examples of shape {tuple(info.shape)} "
                         f"but the config says {tuple(config.data.shape)}")
    if info.num_classes != config.data.num_classes:
        raise ValueError(f"data.num_classes: the config says {config.data.num_classes} classes but the dataset "
                         f"({info.description}) has {info.num_classes}")
    mesh = shd.make_mesh(config.mesh.fsdp)
    shd.check_batch_divisible(config.train.global_batch_size, mesh)
    micro_batch_count(config.train.global_batch_size, mesh.devices.size, config.train.microbatch_size)
    pipeline.process_batch_size(config.train.global_batch_size)
    if config.data.source == "latents" and config.data.get("vae_path", ""):
        from tvm_jax.vae import CONFIG_NAME, WEIGHTS_NAME, vae_files

        try:
            vae_files(config.data.vae_path)
        except FileNotFoundError as e:
            raise ValueError(f"data.vae_path: {e} (a diffusers AutoencoderKL folder holds {CONFIG_NAME} and "
                             f"{WEIGHTS_NAME})") from None
    if config.train.init_from and not (workdir is not None and has_checkpoint(workdir)):
        check_init_from(config, config.train.init_from)
    if workdir is not None:
        check_workdir(workdir)
    return info


def has_checkpoint(workdir: str) -> bool:
    """Whether ``WORKDIR/checkpoints`` holds a finished checkpoint (a step-named directory)."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


# ----------------------------------------------------------------------------- samples


def sample_grid_labels(config, n: int) -> np.ndarray:
    return (np.arange(n) % config.data.num_classes).astype(np.int32)


def make_samplers(config, apply, null_label: int) -> dict[str, Callable]:
    """name -> jitted ``sample(params, noise, labels)`` for the configured step counts."""
    s = config.sample
    if s.method == "euler":
        return {f"euler{n}": make_sampler(apply, steps=int(n), w=s.w, null_label=null_label, method="euler")
                for n in s.euler_steps}
    return {f"{n}step": make_sampler(apply, steps=int(n), w=s.w, null_label=null_label,
                                     scaled=config.objective.scaled_param) for n in s.steps}


def render_samples(config, x: np.ndarray, labels: np.ndarray, path: str, title: str = "",
                   decode: Callable | None = None) -> np.ndarray:
    """Writes a PNG of samples (image grid, or a scatter plot for vector data); returns the
    uint8 image for TensorBoard. ``decode`` (latents -> pixels in [-1, 1], the VAE) is applied
    first when given; latents without it show their first three channels."""
    x = np.asarray(x)
    if decode is not None:
        x = np.asarray(decode(x))
    if x.ndim == 2:
        image_utils.scatter_png(path, {title or "samples": x}, labels={title or "samples": labels})
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"))
    if config.data.source in ("latents", "synthetic") and x.shape[-1] != 3:
        x = image_utils.latents_to_rgb(x)
    grid = image_utils.make_grid(image_utils.to_uint8(x))
    image_utils.save_png(path, grid, scale=max(1, 128 // x.shape[1]))
    return grid


# ----------------------------------------------------------------------------- training


class _Interrupt:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        logging.warning("Received signal %d: saving a checkpoint and stopping after this step.", signum)
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config, workdir: str) -> TrainState:
    info = preflight(config, workdir)
    workdir = check_workdir(workdir)
    mesh = shd.make_mesh(config.mesh.fsdp)
    logging.info("Mesh %s over %d devices (%s); data: %s", dict(mesh.shape), mesh.devices.size,
                 jax.devices()[0].device_kind, info.description)
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints, config=config)
    try:
        with jax.set_mesh(mesh):
            return _train(config, workdir, mesh, ckpt)
    except BaseException:
        _close_after_error(ckpt)
        raise


def _close_after_error(ckpt: Checkpointer) -> None:
    """Waits for a save in flight (it completes, or the last completed checkpoint stays the latest)
    and closes the checkpointer, so no background save is abandoned; a failure here is logged in
    one line, not raised over the original error (which is what the caller reports)."""
    try:
        ckpt.close()
    except Exception as e:  # noqa: BLE001
        logging.warning("The checkpointer could not finish cleanly (%s: %s); the last completed checkpoint in %s "
                        "is kept.", type(e).__name__, (str(e).strip().splitlines() or [""])[0], ckpt.directory)


class _DivergenceCheck:
    """``train.max_skipped_steps`` every step without a host sync per step: the step's metrics carry
    the consecutive count, read one step late (after the next step was dispatched), or at once
    where the loop syncs anyway (logging, checkpoints)."""

    def __init__(self, limit: int, start_step: int, skipped_at_start: int):
        self.limit = limit
        self.start, self.skipped_at_start = start_step, skipped_at_start
        self.pending: tuple[int, jax.Array] | None = None

    def after_dispatch(self, step: int, metrics) -> None:
        """Checks the previous step, then remembers this one."""
        self.flush()
        self.pending = (step, metrics["consecutive_skipped"])

    def flush(self) -> None:
        if self.pending is not None:
            step, count = self.pending
            self.pending = None
            count = int(jax.device_get(count))
            if count >= self.limit:
                raise TrainingAborted(
                    f"training diverged: {count} consecutive steps up to step {step} had a non-finite loss or gradient "
                    f"(limit train.max_skipped_steps = {self.limit}); their updates were discarded and the last good "
                    "checkpoint is kept. Lower optimizer.lr or set optimizer.max_grad_norm, then resume.")

    def check_run(self, step: int, skipped_total: int) -> None:
        """At the end: a run none of whose steps was finite did not train."""
        ran = step - self.start
        if ran > 0 and skipped_total - self.skipped_at_start == ran:
            raise TrainingAborted(
                f"training diverged: every step of this run (steps {self.start + 1} to {step}) had a non-finite loss "
                f"or gradient, so nothing was trained (the parameters are still those of step {self.start}). Lower "
                "optimizer.lr or set optimizer.max_grad_norm.")


def _train(config, workdir: str, mesh, ckpt: Checkpointer) -> TrainState:
    resuming = ckpt.latest_step() is not None
    init_from = config.train.init_from
    if resuming and init_from:
        logging.info("Resuming from the checkpoint of step %d in %s; train.init_from=%s is ignored (it only "
                     "initialises a new run).", ckpt.latest_step(), ckpt.directory, init_from)
    net = build_network(config, mesh)
    optimizer = make_optimizer(config)
    objective = make_objective(objective_config(config))
    init = lambda p: init_train_state(p, optimizer, config.seed)  # noqa: E731
    state_sh = shd.state_shardings(jax.eval_shape(init, net.params), mesh)
    if init_from and not resuming:
        net.params = load_init_params(config, init_from, state_sh.params)
        logging.info("Initialised the parameters and both EMAs from %s", init_from)
    state = jax.jit(init, out_shardings=state_sh)(net.params)
    del net.params
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    logging.info("Model: %s, %.2fM trainable parameters", config.model.type, n_params / 1e6)

    batch_sh = shd.batch_sharding(mesh)
    global_batch = config.train.global_batch_size
    abstract_batch = {"x": jax.ShapeDtypeStruct((global_batch, *config.data.shape), jnp.float32, sharding=batch_sh),
                      "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=batch_sh)}
    step_config = train_step_config(config)

    def lower(microbatch_size: int):
        step_fn = make_train_step(net.apply, objective, optimizer,
                                  dataclasses.replace(step_config, microbatch_size=microbatch_size),
                                  batch_sharding=batch_sh, param_shardings=state_sh.params,
                                  prepare_params=net.prepare)
        return jit_train_step(step_fn, state_sh, batch_sh).lower(abstract_like(state, state_sh), abstract_batch)

    train_step = compile_train_step(lower, global_batch // mesh.devices.size, step_config.microbatch_size).compiled

    if resuming:
        state, _ = ckpt.restore(abstract_like(state, state_sh))
    start = int(jax.device_get(state.step))
    data_iter = iter(pipeline.make_loader(config, global_batch_size=global_batch, seed=config.seed,
                                          start_step=start))

    samplers = make_samplers(config, net.apply, net.null_label)
    n_img = config.sample.num_images
    grid_noise = jax.random.normal(jax.random.key(config.seed + 1), (n_img, *net.sample_shape))
    grid_labels = jnp.asarray(sample_grid_labels(config, n_img))

    with contextlib.closing(create_writer(os.path.join(workdir, "tensorboard"))) as writer:
        if start == 0:
            writer.write_hparams(_flat_config(config))
        total = config.train.num_steps
        progress = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                                   every_steps=config.train.log_every, every_secs=None)

        decode = None
        if config.data.source == "latents" and config.data.get("vae_path", ""):
            from tvm_jax.generate import make_decoder

            decode = make_decoder(config)  # grids in pixels; without a VAE they show latent channels
            logging.info("Sample grids are decoded to pixels with the VAE in %s", config.data.vae_path)

        def write_samples(step: int) -> None:
            images = {}
            for name, sampler in samplers.items():
                x = np.asarray(jax.device_get(sampler(state.ema_params, grid_noise, grid_labels)))
                path = os.path.join(workdir, "samples", f"step{step:08d}_{name}.png")
                if jax.process_index() == 0:
                    images[f"samples/{name}"] = render_samples(config, x, np.asarray(grid_labels), path,
                                                               title=f"step {step}, {name}", decode=decode)[None]
            writer.write_images(step, images)
            logging.info("Wrote sample grids for step %d (%s)", step, ", ".join(samplers))

        if start >= total:
            logging.info("Already trained to step %d (train.num_steps = %d): nothing to do.", start, total)
            ckpt.close()
            return state
        logging.info("Training from step %d to %d (global batch %d)", start, total, global_batch)

        divergence = _DivergenceCheck(config.train.max_skipped_steps, start, int(jax.device_get(state.skipped)))
        step = start
        t_log, step_log = time.time(), start
        t_start = time.time()
        with _Interrupt() as interrupt:
            while step < total:
                batch = shd.global_batch(next(data_iter), mesh)
                state, metrics = train_step(state, batch)
                step += 1
                divergence.after_dispatch(step, metrics)
                progress(step)
                log_now = step % config.train.log_every == 0 or step == total
                save_now = step % config.train.checkpoint_every == 0 or step == total or interrupt.signal is not None
                if log_now or save_now:
                    divergence.flush()  # this step's count, before it is logged or saved
                if step == total:
                    divergence.check_run(step, int(jax.device_get(metrics["skipped_total"])))
                if log_now:
                    m = jax.device_get(metrics)
                    now = time.time()
                    rate = (step - step_log) * global_batch / max(now - t_log, 1e-9)
                    t_log, step_log = now, step
                    scalars = {f"train/{k}": float(v) for k, v in _reported(m).items()}
                    scalars["train/images_per_sec"] = rate
                    scalars["train/param_norm"] = float(parameter_norm(state.params))
                    writer.write_scalars(step, scalars)
                    eta = (total - step) * (now - t_start) / max(step - start, 1)
                    logging.info("step %d/%d  loss %.4f  grad_norm %.3f  skipped %d  %.1f img/s  ETA %s%s", step, total,
                                 float(m["loss"]), float(m["grad_norm"]), int(m["skipped_total"]), rate,
                                 _format_seconds(eta), _binned_summary(m))
                if step % config.train.sample_every == 0 or step == total:
                    write_samples(step)
                stopping = interrupt.signal is not None  # read once: a signal may arrive at any moment
                if save_now or stopping:
                    if stopping and not save_now:
                        divergence.flush()
                    ckpt.save(step, state, force=True)
                if stopping:
                    ckpt.wait()
                    logging.warning("Stopped by signal %d at step %d; checkpoint saved in %s.", interrupt.signal, step,
                                    ckpt.directory)
                    break
        divergence.flush()
        ckpt.close()
        writer.flush()
        if interrupt.signal is not None:
            raise SystemExit(128 + interrupt.signal)
        return state


def _reported(metrics: dict) -> dict:
    """The metrics to write: per-time-bin losses only where the bin had samples, no counts."""
    return {k: v for k, v in metrics.items()
            if not k.endswith("_count") and not (k.endswith(BIN_SUFFIXES) and float(metrics[k + "_count"]) == 0)}


def _binned_summary(metrics: dict) -> str:
    """``"  terminal by t quarter 0.1/0.2/0.3/0.4  fm by t quarter ..."`` for the progress line ("-":
    empty bin); the FM baseline, which has no ``t``, bins by its own time ``s'``."""
    parts = []
    tvm = "terminal" + BIN_SUFFIXES[0] in metrics
    for name, time_name in (("terminal", "t"), ("fm", "t" if tvm else "s'")):
        if name + BIN_SUFFIXES[0] in metrics:
            values = [f"{float(metrics[name + b]):.4g}" if float(metrics[name + b + "_count"]) > 0 else "-"
                      for b in BIN_SUFFIXES]
            parts.append(f"{name} by {time_name} quarter {'/'.join(values)}")
    return "".join("  " + p for p in parts)


def _format_seconds(s: float) -> str:
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _flat_config(config) -> dict[str, Any]:
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if hasattr(v, "items"):
                walk(v, prefix + k + ".")
            else:
                out[prefix + k] = v

    walk(config, "")
    return out

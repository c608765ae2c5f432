"""The training loop: pre-flight checks, sharded state, data, checkpoints, metrics, samples.

:func:`train` is what ``python -m tvm_jax.main --mode=train`` runs. Everything that can be
checked without compiling is checked first (:func:`preflight`): the config, the data (path,
shape, label count), the batch against the device count, and that the workdir is writable.
Then the model and the train state are created directly in their shardings on a
``(data, fsdp)`` mesh of all devices, the latest checkpoint (if any) is restored together with
the data-iterator position, and the jitted step runs until ``train.num_steps``.

Periodic work: a log line with the loss terms, gradient norm, skipped steps, images/s and an ETA
every ``train.log_every`` steps (clu ``ReportProgress`` adds its own progress notes); sample
grids from the EMA weights at ``sample.steps`` NFE every ``train.sample_every`` steps (PNG files
in ``WORKDIR/samples`` and TensorBoard images); checkpoints every ``train.checkpoint_every``
steps and at the end. SIGTERM/SIGINT save a checkpoint of the step reached, then raise
``SystemExit(128 + signal number)`` (exit status 143 for SIGTERM); rerunning resumes from it.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from tvm_jax import images as image_utils
from tvm_jax import sharding as shd
from tvm_jax.checkpointing import Checkpointer, abstract_like
from tvm_jax.config import dit_config, objective_config, validate_config
from tvm_jax.data import pipeline
from tvm_jax.dit import DiT
from tvm_jax.metric_writing import create_writer, periodic_actions
from tvm_jax.networks import FlowMLP, network_fn, split_model
from tvm_jax.objectives import make_objective
from tvm_jax.sampling import make_sampler
from tvm_jax.training import TrainState, init_train_state, make_optimizer, make_train_step


class TrainingAborted(RuntimeError):
    pass


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass
class Network:
    """A built network: its pure function, initial parameters and the facts samplers need."""

    apply: Callable
    graphdef: Any
    params: Any
    buffers: Any
    null_label: int
    sample_shape: tuple[int, ...]


def make_module(config) -> Callable[[nnx.Rngs], nnx.Module]:
    if config.model.type == "dit":
        cfg = dit_config(config)
        return lambda rngs: DiT(cfg, rngs=rngs)
    shape = tuple(config.data.shape)
    return lambda rngs: FlowMLP(shape[0], config.data.num_classes, width=config.model.mlp_width,
                                depth=config.model.mlp_depth, rngs=rngs)


def build_network(config, mesh=None, seed: int | None = None) -> Network:
    """Initialises the configured network (inside jit; sharded over ``mesh`` when given)."""
    make = make_module(config)
    seed = config.seed if seed is None else seed
    graphdef, abstract_params, abstract_buffers = split_model(nnx.eval_shape(lambda: make(nnx.Rngs(seed))))
    out_shardings = None
    if mesh is not None:
        out_shardings = (shd.state_shardings(abstract_params, mesh), shd.state_shardings(abstract_buffers, mesh))

    def init():
        _, params, buffers = split_model(make(nnx.Rngs(seed)))
        return params, buffers

    if out_shardings is not None and jax.default_backend() == "cpu" and mesh.devices.size > 1:
        # XLA:CPU can deadlock when several virtual devices run the batched SVD of the spectral
        # init at once (LAPACK's batch map waits on the thread pool the devices occupy), so on
        # CPU meshes initialise on one device of this process and place the result into its
        # shardings. (Under ``jax.set_mesh`` a bare jit would still run on every device of the
        # ambient mesh.) Every process computes the same values from the seed and fills its own
        # shards: a device_put from one device would be a cross-process transfer, which XLA:CPU
        # does not have.
        with jax.set_mesh(shd.make_mesh(1, jax.local_devices()[:1])):
            host = jax.device_get(jax.jit(init)())
        params, buffers = jax.tree.map(shd.from_host, host, out_shardings)
    else:
        params, buffers = jax.jit(init, out_shardings=out_shardings)()
    shape = pipeline.dataset_info(config).shape
    return Network(network_fn(graphdef, buffers), graphdef, params, buffers, config.data.num_classes, shape)


# ----------------------------------------------------------------------------- checks


def check_workdir(workdir: str) -> str:
    if not workdir:
        raise ValueError("--workdir is required")
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir} exists and is not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"--workdir {workdir} is not writable: {e.strerror or e}") from None
    return workdir


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
    shd.check_batch_divisible(config.train.global_batch_size, shd.make_mesh(config.mesh.fsdp))
    pipeline.process_batch_size(config.train.global_batch_size)
    if config.data.source == "latents" and config.data.get("vae_path", ""):
        from tvm_jax.vae import CONFIG_NAME, WEIGHTS_NAME, vae_files

        try:
            vae_files(config.data.vae_path)
        except FileNotFoundError as e:
            raise ValueError(f"data.vae_path: {e} (a diffusers AutoencoderKL folder holds {CONFIG_NAME} and "
                             f"{WEIGHTS_NAME})") from None
    if workdir is not None:
        check_workdir(workdir)
    return info


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

    with jax.set_mesh(mesh):
        net = build_network(config, mesh)
        optimizer = make_optimizer(config)
        objective = make_objective(objective_config(config))
        state_sh = shd.state_shardings(jax.eval_shape(lambda p: init_train_state(p, optimizer, config.seed), net.params),
                                       mesh)
        state = jax.jit(lambda p: init_train_state(p, optimizer, config.seed), out_shardings=state_sh)(net.params)
        del net.params
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        logging.info("Model: %s, %.2fM trainable parameters", config.model.type, n_params / 1e6)

        step_fn = make_train_step(net.apply, objective, optimizer, ema_decay=config.ema.decay,
                                  target_decay=config.ema.target_decay)
        batch_sh = shd.batch_sharding(mesh)
        train_step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, shd.replicated(mesh)),
                             donate_argnums=(0,))

        ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints, config=config)
        if ckpt.latest_step() is not None:
            state, _ = ckpt.restore(abstract_like(state, state_sh))
        start = int(jax.device_get(state.step))
        data_iter = iter(pipeline.make_loader(config, global_batch_size=config.train.global_batch_size,
                                              seed=config.seed, start_step=start))

        samplers = make_samplers(config, net.apply, net.null_label)
        n_img = config.sample.num_images
        grid_noise = jax.random.normal(jax.random.key(config.seed + 1), (n_img, *net.sample_shape))
        grid_labels = jnp.asarray(sample_grid_labels(config, n_img))

        writer = create_writer(os.path.join(workdir, "tensorboard"))
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
            writer.close()
            ckpt.close()
            return state
        logging.info("Training from step %d to %d (global batch %d)", start, total, config.train.global_batch_size)

        step = start
        t_log, step_log = time.time(), start
        t_start = time.time()
        with _Interrupt() as interrupt:
            while step < total:
                batch = shd.global_batch(next(data_iter), mesh)
                state, metrics = train_step(state, batch)
                step += 1
                progress(step)
                if step % config.train.log_every == 0 or step == total:
                    m = jax.device_get(metrics)
                    now = time.time()
                    rate = (step - step_log) * config.train.global_batch_size / max(now - t_log, 1e-9)
                    t_log, step_log = now, step
                    scalars = {f"train/{k}": float(v) for k, v in m.items()}
                    scalars["train/images_per_sec"] = rate
                    writer.write_scalars(step, scalars)
                    eta = (total - step) * (now - t_start) / max(step - start, 1)
                    logging.info("step %d/%d  loss %.4f  grad_norm %.3f  skipped %d  %.1f img/s  ETA %s", step, total,
                                 float(m["loss"]), float(m["grad_norm"]), int(m["skipped_total"]), rate,
                                 _format_seconds(eta))
                    consecutive = int(jax.device_get(state.consecutive_skipped))
                    if consecutive >= config.train.max_skipped_steps:
                        ckpt.wait()
                        raise TrainingAborted(f"{consecutive} consecutive steps had a non-finite loss or gradient "
                                              f"(limit train.max_skipped_steps = {config.train.max_skipped_steps}); "
                                              "the last good checkpoint is kept.")
                if step % config.train.sample_every == 0 or step == total:
                    write_samples(step)
                if step % config.train.checkpoint_every == 0 or step == total or interrupt.signal is not None:
                    ckpt.save(step, state, force=True)
                if interrupt.signal is not None:
                    ckpt.wait()
                    logging.warning("Stopped by signal %d at step %d; checkpoint saved in %s.", interrupt.signal, step,
                                    ckpt.directory)
                    break
        ckpt.close()
        writer.flush()
        writer.close()
        if interrupt.signal is not None:
            raise SystemExit(128 + interrupt.signal)
        return state


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

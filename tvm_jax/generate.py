"""Sampling from a trained or converted model: ``python -m tvm_jax.main --mode=sample``.

Weights come from either an exported model directory (``--checkpoint=DIR`` holding
``model_config.json``: written by ``tvm_jax.convert`` or ``--mode=export``) or the latest
checkpoint of a training workdir (``--workdir``, with the run's ``--config``; the evaluation EMA
by default). For each requested step count the samples are written as a PNG grid and, with
their labels, to an ``.npz``. Latent models are decoded to pixels through the Stable Diffusion
VAE when ``data.vae_path`` points at a diffusers folder; without it the ``.npz`` holds the latents
and the PNG shows their first three channels, and the log says so.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tvm_jax import images as image_utils
from tvm_jax.weights import model_io
from tvm_jax.checkpointing import Checkpointer, abstract_like, checkpoint_directory
from tvm_jax.networks import build_network, network_fn, split_model
from tvm_jax.paths import writable_directory
from tvm_jax.sampling import make_sampler


@dataclasses.dataclass(frozen=True)
class LatentDecoding:
    """How latent samples become pixels: the VAE (a diffusers folder or ``hf://ORG/NAME``; ""
    for none) and the data pipeline's per-channel normalisation to undo first."""

    vae_path: str
    raw_mean: tuple[float, ...]
    raw_std: tuple[float, ...]
    final_std: float = 1.0

    @classmethod
    def from_config(cls, config) -> "LatentDecoding":
        d = config.data
        return cls(str(d.get("vae_path", "") or ""), tuple(map(float, d.raw_mean)), tuple(map(float, d.raw_std)),
                   float(d.final_std))

    @classmethod
    def from_metadata(cls, metadata: dict) -> "LatentDecoding | None":
        """From an exported model's metadata (``raw_mean``/``raw_std`` [+ ``final_std``, ``vae_path``]),
        or None when it records no latent statistics."""
        if "raw_mean" not in metadata or "raw_std" not in metadata:
            return None
        return cls(str(metadata.get("vae_path", "") or ""), tuple(map(float, metadata["raw_mean"])),
                   tuple(map(float, metadata["raw_std"])), float(metadata.get("final_std", 1.0)))


@dataclasses.dataclass
class LoadedModel:
    apply: Any
    params: Any
    num_classes: int
    sample_shape: tuple[int, ...]
    scaled: bool
    is_latent: bool
    description: str
    default_w: float | None = None
    step: int | None = None  # training step of a workdir checkpoint (None for exported models)
    decoding: LatentDecoding | None = None  # an exported latent model's recorded statistics and VAE


def load_for_sampling(config, *, checkpoint: str | None, workdir: str | None, weights: str = "ema",
                      attention_impl: str | None = None) -> LoadedModel:
    from flax import nnx

    from tvm_jax.dit import DiT, dit_buffers

    if checkpoint:
        if not model_io.is_exported_model(checkpoint):
            raise FileNotFoundError(f"--checkpoint {checkpoint!r} is not an exported tvm-jax model directory "
                                    f"(expected {model_io.CONFIG_FILE} and {model_io.PARAMS_DIR}/ inside)")
        cfg, meta = model_io.read_config(checkpoint)
        cfg, params = model_io.load_model(checkpoint, attention_impl=attention_impl or cfg.attention_impl)
        graphdef, _, _ = split_model(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))))
        if "scaled_param" in meta:
            scaled = bool(meta["scaled_param"])
        else:
            scaled = config.objective.scaled_param if config is not None else True
            logging.warning("%s does not record whether it uses the scaled parameterisation; assuming %s",
                            checkpoint, scaled)
        return LoadedModel(network_fn(graphdef, dit_buffers(cfg)), params, cfg.num_classes,
                           (cfg.input_size, cfg.input_size, cfg.in_channels), scaled,
                           is_latent=cfg.in_channels == 4, description=f"exported model {checkpoint}",
                           default_w=meta.get("w"), decoding=LatentDecoding.from_metadata(meta))

    if not workdir or config is None:
        raise ValueError("sampling needs --checkpoint=DIR (an exported model) or --workdir with the run's --config")
    checkpoint_directory(workdir, must_exist=True)  # before anything is built; never creates it
    from tvm_jax.training import init_train_state, make_optimizer

    if attention_impl:
        config.model.attention_impl = attention_impl
    net = build_network(config)
    optimizer = make_optimizer(config)
    abstract = jax.eval_shape(lambda p: init_train_state(p, optimizer, config.seed), net.params)
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints, config=config, async_save=False,
                        create=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first, or pass --checkpoint")
    # Restore onto this process's first device, whatever mesh the run was trained on (a run of
    # 8 GPUs can be sampled on one); the sampler replicates or shards from there.
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state, step = ckpt.restore(abstract_like(abstract, jax.tree.map(lambda _: one, abstract)))
    ckpt.close()
    params = state.ema_params if weights == "ema" else state.params
    return LoadedModel(net.apply, params, config.data.num_classes, net.sample_shape, config.objective.scaled_param,
                       is_latent=config.data.source == "latents",
                       description=f"{weights} weights of {workdir} at step {step}", step=int(step))


def parse_classes(spec: str, count: int, num_classes: int, seed: int) -> np.ndarray:
    """``"random"``, ``"null"``/``"uncond"``, or a comma list cycled to ``count``."""
    spec = (spec or "random").strip()
    if spec == "random":
        return np.random.default_rng(seed).integers(0, num_classes, count).astype(np.int32)
    if spec in ("null", "uncond"):
        return np.full(count, num_classes, np.int32)
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--classes must be 'random', 'null' or a comma-separated list of ints, got {spec!r}") from None
    bad = [v for v in values if not 0 <= v <= num_classes]
    if not values or bad:
        raise ValueError(f"--classes: labels must be in [0, {num_classes}] ({num_classes} = null), got {values}")
    return np.resize(np.asarray(values, np.int32), count)


def sample(model: LoadedModel, *, steps: Sequence[int], w: float, labels: np.ndarray, seed: int,
           batch_size: int = 64) -> dict[int, np.ndarray]:
    """``{steps: samples}`` for every requested step count; the same noise for all of them."""
    noise = np.asarray(jax.random.normal(jax.random.key(seed), (len(labels), *model.sample_shape)))
    out = {}
    for n in steps:
        sampler = make_sampler(model.apply, steps=int(n), w=w, null_label=model.num_classes, scaled=model.scaled)
        chunks = [np.asarray(sampler(model.params, jnp.asarray(noise[i:i + batch_size]),
                                     jnp.asarray(labels[i:i + batch_size])))
                  for i in range(0, len(labels), batch_size)]
        out[int(n)] = np.concatenate(chunks)
    return out


def denormalize_latents(z: np.ndarray, decoding: LatentDecoding) -> np.ndarray:
    """Inverse of the data pipeline's per-channel normalisation (back to raw VAE latents)."""
    scale = decoding.final_std / np.asarray(decoding.raw_std, np.float32)
    bias = -np.asarray(decoding.raw_mean, np.float32) * scale
    return (np.asarray(z) - bias) / scale


def sample_output_paths(out_dir: str, steps: Sequence[int], *, overwrite: bool) -> dict[int, tuple[str, str]]:
    """``{steps: (png, npz)}`` that :func:`write_outputs` writes; unless ``overwrite``, raises
    ``FileExistsError`` if any of them exists (so callers can check before sampling)."""
    targets = {int(n): (os.path.join(out_dir, f"samples_{n}step.png"), os.path.join(out_dir, f"samples_{n}step.npz"))
               for n in steps}
    existing = [p for pair in targets.values() for p in pair if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace sample outputs in {out_dir}")
    return targets


def prepare_output_dir(out_dir: str) -> None:
    """Makes ``out_dir`` and checks it takes files (call it once the model loaded, before
    sampling): a bad ``--out`` fails before the work, not after it."""
    writable_directory(out_dir, "--out")


def write_outputs(out_dir: str, samples: dict[int, np.ndarray], labels: np.ndarray, *, config, overwrite: bool,
                  decode=None) -> list[str]:
    """PNG grid and ``.npz`` per step count. Refuses to replace existing files unless ``overwrite``."""
    targets = sample_output_paths(out_dir, samples, overwrite=overwrite)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for n, x in samples.items():
        png, npz = targets[n]
        arrays = {"samples": x, "labels": labels}
        pixels = x
        if decode is not None:
            pixels = decode(x)
            arrays["images"] = image_utils.to_uint8(pixels)
        if x.ndim == 2:
            image_utils.scatter_png(png, {f"{n}-step samples": x}, labels={f"{n}-step samples": labels})
        else:
            shown = pixels if (decode is not None or x.shape[-1] in (1, 3)) else image_utils.latents_to_rgb(x)
            image_utils.save_png(png, image_utils.make_grid(image_utils.to_uint8(shown)),
                                 scale=max(1, 128 // shown.shape[1]))
        np.savez(npz, **arrays)
        written += [png, npz]
        logging.info("Wrote %s and %s", png, npz)
    return written


def make_decoder(config):
    """:func:`make_latent_decoder` for a run's config (``data.vae_path`` and latent statistics)."""
    return make_latent_decoder(LatentDecoding.from_config(config) if config is not None else None)


def make_latent_decoder(decoding: LatentDecoding | None):
    """A function latents -> images in [-1, 1] through the VAE, or None (with a log line) when
    no VAE is configured."""
    path = decoding.vae_path if decoding is not None else ""
    if not path:
        logging.warning("No VAE configured (data.vae_path is empty): writing latents, not pixels; the PNG shows "
                        "the first three latent channels. Point data.vae_path at a diffusers AutoencoderKL folder "
                        "to decode.")
        return None
    from tvm_jax.vae import decode_batched, load_vae

    vae = load_vae(path)
    return lambda z: np.asarray(decode_batched(vae, denormalize_latents(z, decoding), batch_size=16))

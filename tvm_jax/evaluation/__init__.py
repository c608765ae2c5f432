r"""``--mode=evaluate``: sample-quality metrics of a trained or exported model.

  python -m tvm_jax.main --mode=evaluate --config=configs/gmm.py --workdir=runs/gmm
  python -m tvm_jax.main --mode=evaluate --config=configs/in256.py --checkpoint=converted/in256_w2 \
      --config.data.vae_path=/weights/sd-vae-ft-ema --config.eval.inception_path=/weights/pt_inception.pth \
      --config.eval.reference_stats=/refs/img256.pkl --config.data.path=/data/in256 --steps=1,2 --w=2

The model (a training run's latest checkpoint, evaluation EMA by default, or an exported model
directory) draws samples at every requested step count with the N-step sampler of
:mod:`tvm_jax.sampling` at CFG weight ``w`` (default ``config.sample.w``). Sample ``i`` starts
from the noise ``normal(fold_in(key(seed), i))``, so the samples depend on the seed only, not on
the batch size or the number of devices, and every step count starts from the same noise.

Protocols (``eval.protocol``)
-----------------------------
``paper`` (default of the ImageNet configs; latents only), the official evaluation: sample
``i``'s class label is the label of a random training item (drawn with replacement, seeded by
``seed``; read from ``data.path``, see :func:`tvm_jax.data.records.draw_training_labels`), so the
labels follow the dataset's label distribution; decoded images become uint8 by truncation,
``floor(clip(x * 0.5 + 0.5, 0, 1) * 255)`` (:func:`truncate_to_uint8`, as the official encoder's
cast). ``balanced`` (the digits and gmm configs; an option for latents): labels
``arange(n) % num_classes`` shuffled with ``seed``; uint8 by rounding, ``round((x + 1) * 127.5)``.

Metrics by ``config.data.source``
---------------------------------
``gmm`` (the ring mixture of :func:`tvm_jax.data.pipeline.gmm_mixture`, exact ground truth from
:mod:`tvm_jax.gmm_truth`). The truth for sample ``i`` is ``psi(eps_i, 1, 0)``, the exact
(CFG-``w``) flow map applied to the very noise and label the model got.

* ``w2``: exact 2-Wasserstein distance between the model's samples and the truth set (optimal
  assignment, :func:`~tvm_jax.gmm_truth.w2_distance`); ``w2_conditional``: the same with a
  label-respecting coupling, ``sqrt(sum_c n_c / n W2_c^2)`` (catches a model that ignores labels).
  Optimal assignment costs O(N^3), so at most ``GMM_MAX_SAMPLES`` (2000) samples are used.
* ``w2_floor`` / ``w2_conditional_floor`` (under ``reference``): the same distances between the
  truth set and an independent exact set of the same size and labels, i.e. what a perfect
  sampler scores with N samples (finite-sample W2 is biased upwards).
* ``displacement_mse``: ``mean_i |x_i - psi(eps_i, 1, 0)|^2``, the per-sample error of the
  learned map against the exact one. References: the identity map (``x = eps``) and the best
  noise-independent map (per-class mean of the truth).

``digits`` (scikit-learn's digits, upsampled like the training data). A judge classifier, an MLP
(flattened image -> 256 -> 64 -> 10, GELU, AdamW, light noise augmentation, seeded and fixed:
it does not depend on ``seed``), trains in seconds on a stratified train split; 400 held-out
images are split into two stratified halves A and B.

* ``accuracy``: fraction of samples (clipped to [-1, 1]) the judge assigns to their label;
  the judge's own held-out accuracy is reported under ``reference.classifier``.
* ``fd``: Fréchet distance between the judge's 64-d penultimate features of the samples and of
  held-out half B. ``reference.fd_floor`` is FD(A, B), two real halves of 200 images: what real
  data scores against B at that size (with N > 200 samples, the sample statistics are less noisy
  than A's, so a very good model can score slightly below the floor).

``latents`` (ImageNet latents). FID: samples are decoded to pixels with the Stable Diffusion VAE
(``data.vae_path``, undoing the data pipeline's per-channel normalisation), converted to uint8,
embedded with the FID Inception-v3 (``eval.inception_path``) and compared with the reference
statistics (``eval.reference_stats``: EDM2's ``img256.pkl``/``img512.pkl`` or an ``.npz`` with
``mu``/``sigma`` such as ADM's, :func:`tvm_jax.evaluation.fid.load_reference_statistics`) by
:func:`tvm_jax.evaluation.fid.frechet_distance` (pytorch-fid's formula). ``eval.num_samples`` (default
50 000) samples per step count, streamed batch by batch (images are never all in memory). The
report names the protocol, the reference statistics and the Inception weights with their sha256.

``synthetic`` has nothing to compare against: a ``ValueError``.

Non-finite samples are counted (``nonfinite_samples``) and listed by index (``nonfinite_indices``,
the first 1000), never hidden: they count as wrong for the accuracy; W2 and FD are then ``null``;
FID leaves them out of the statistics, says so (``fid_samples``, ``note``) and is ``null`` only
when fewer than two samples are finite.

Sharding and output
-------------------
Batches are split over a 1-D mesh of all devices (``NamedSharding`` on the batch axis, parameters
replicated); the batch size ``eval.batch_size`` is rounded up to a multiple of the device count
and a short last batch is padded and trimmed. Progress goes to the absl log (done/total,
images/s, ETA) every 10% or every ``PROGRESS_EVERY_SECS`` seconds.

Results are written (by process 0) to ``WORKDIR/eval/eval_step{STEP}_w{w}.json`` (for an exported
model ``--checkpoint=DIR`` without a workdir: ``DIR/eval/eval_stepexported_w{w}.json``; a seed other
than 0 adds ``_seed{seed}``, ``--weights=params`` adds ``_params``) with the
metrics per step count (keys ``"1"``, ``"2"``, ...), sample count, protocol, ``w``, seed, model,
date and device kinds. Before the first sample the output location is checked: an existing report
is kept unless ``overwrite=True`` (``--overwrite``), and the directory must be writable (or
creatable); nothing is created until the report is written, atomically (temporary file, then
``os.replace``).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import tempfile
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tvm_jax import generate
from tvm_jax.config import EVAL_PROTOCOLS
from tvm_jax.sampling import make_sampler

GMM_MAX_SAMPLES = 2000  # exact W2 by optimal assignment is O(N^3)
DIGITS_HELDOUT = 400  # held-out images for the judge (two halves A, B)
DIGITS_SPLIT_SEED = 0
PROGRESS_EVERY_SECS = 10.0
BATCH_AXIS = "batch"
SOURCES = ("gmm", "digits", "latents")


# ----------------------------------------------------------------------------- sampling


def balanced_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    """``arange(n) % num_classes`` shuffled with ``seed``: class counts differ by at most one."""
    labels = (np.arange(n) % num_classes).astype(np.int32)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def truncate_to_uint8(images):
    """Images in [-1, 1] -> uint8 as the official TVM/EDM2 evaluation does:
    ``floor(clip(x * 0.5 + 0.5, 0, 1) * 255)`` (a cast to uint8 truncates). jax in -> jax out."""
    xp = jnp if isinstance(images, jax.Array) else np
    x = xp.clip(xp.asarray(images, xp.float32) * 0.5 + 0.5, 0.0, 1.0)
    return xp.floor(x * 255.0).astype(xp.uint8)


NONFINITE_INDICES_SHOWN = 1000  # at most this many indices of non-finite samples in the report


def nonfinite_report(finite: np.ndarray) -> dict[str, Any]:
    """``{"nonfinite_samples": count, "nonfinite_indices": [...]}`` (sample indices, the first
    ``NONFINITE_INDICES_SHOWN``) for the finite-row mask of all samples."""
    bad = np.flatnonzero(~np.asarray(finite, bool))
    return {"nonfinite_samples": int(len(bad)), "nonfinite_indices": [int(i) for i in bad[:NONFINITE_INDICES_SHOWN]]}


def per_sample_noise(seed: int, indices, shape: Sequence[int]) -> jax.Array:
    """Noise of samples ``indices``: ``normal(fold_in(key(seed), i), shape)`` for each ``i``
    (independent of how the samples are batched or sharded)."""
    key = jax.random.key(seed)
    shape = tuple(shape)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(
        jnp.asarray(indices, jnp.int32))


def _round_up(n: int, k: int) -> int:
    return int(math.ceil(n / k) * k)


def put_global(tree, sharding: NamedSharding):
    """Places a pytree of (host or device) arrays into ``sharding``, also across processes
    (there every process must hold the same global values)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return jax.device_put(a, sharding)
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    return jax.tree.map(one, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole (global) array as numpy on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class _Progress:
    """absl log lines with done/total, images/s and ETA every 10% or every few seconds."""

    def __init__(self, total: int, what: str):
        self.total, self.what = total, what
        self.t0 = self.last = time.time()
        self.first: tuple[float, int] | None = None  # after the first batch (which includes compilation)
        self.next_fraction = 0.1

    def update(self, done: int) -> None:
        now = time.time()
        if self.first is None:
            self.first = (now, done)
        if done < self.total and done < self.next_fraction * self.total and now - self.last < PROGRESS_EVERY_SECS:
            return
        t_ref, d_ref = self.first if done > self.first[1] else (self.t0, 0)
        rate = (done - d_ref) / max(now - t_ref, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        logging.info("%s: %d/%d (%.0f%%)  %.1f images/s  ETA %s  [%.0fs]", self.what, done, self.total,
                     100.0 * done / self.total, rate, _format_seconds(eta), now - self.t0)
        self.last = now
        while self.next_fraction * self.total <= done and self.next_fraction < 1.0:
            self.next_fraction += 0.1


def _format_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


class ShardedSampler:
    """N-step sampling of a :class:`~tvm_jax.generate.LoadedModel` in fixed-size batches split
    over a 1-D mesh of ``devices`` (default: all devices); parameters are replicated.

    ``batch_size`` is rounded up to a multiple of the device count; a request for fewer samples
    than one batch runs at its own (device-divisible) size. One jitted program per step count.
    """

    def __init__(self, model: generate.LoadedModel, *, w: float, seed: int, batch_size: int,
                 method: str = "flow_map", devices: Sequence[jax.Device] | None = None):
        if batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
        devices = list(jax.devices() if devices is None else devices)
        self.mesh = Mesh(np.asarray(devices), (BATCH_AXIS,))
        self.num_devices = len(devices)
        self.batch_size = _round_up(batch_size, self.num_devices)
        self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXIS))
        self.replicated = NamedSharding(self.mesh, P())
        self.model, self.w, self.seed, self.method = model, float(w), int(seed), method
        self.params = put_global(model.params, self.replicated)
        self._programs: dict[int, Any] = {}

    def _program(self, steps: int):
        if steps not in self._programs:
            sample = make_sampler(self.model.apply, steps=steps, w=self.w, null_label=self.model.num_classes,
                                  method=self.method, scaled=self.model.scaled)
            seed, shape = self.seed, self.model.sample_shape

            def run(params, indices, labels):
                return sample(params, per_sample_noise(seed, indices, shape), labels)

            self._programs[steps] = jax.jit(run, in_shardings=(self.replicated, self.batch_sharding,
                                                               self.batch_sharding),
                                            out_shardings=self.batch_sharding)
        return self._programs[steps]

    def noise(self, n: int) -> np.ndarray:
        """The starting noise of samples ``0 .. n-1`` (host numpy)."""
        return np.asarray(jax.jit(per_sample_noise, static_argnums=(0, 2))(self.seed, np.arange(n),
                                                                             tuple(self.model.sample_shape)))

    def batches(self, steps: int, labels, *, what: str = "sampling") -> Iterator[tuple[int, int, jax.Array]]:
        """Yields ``(start, count, x)`` per batch: ``x`` is the sharded device array of one batch,
        of which the first ``count`` rows are samples ``start .. start+count-1`` (the rest padding)."""
        labels = np.asarray(labels, np.int32)
        n = len(labels)
        if n == 0:
            return
        size = min(self.batch_size, _round_up(n, self.num_devices))
        program = self._program(int(steps))
        progress = _Progress(n, what)
        for start in range(0, n, size):
            count = min(size, n - start)
            batch_labels = np.zeros(size, np.int32)
            batch_labels[:count] = labels[start:start + count]
            indices = np.arange(start, start + size, dtype=np.int32)
            x = program(self.params, put_global(indices, self.batch_sharding),
                        put_global(batch_labels, self.batch_sharding))
            yield start, count, x
            progress.update(start + count)

    def sample(self, steps: int, labels, *, what: str = "sampling") -> np.ndarray:
        """All samples for ``labels`` as one host array (N, *sample_shape)."""
        chunks = [to_host(x)[:count] for _, count, x in self.batches(steps, labels, what=what)]
        return np.concatenate(chunks) if chunks else np.zeros((0, *self.model.sample_shape), np.float32)


def _finite_rows(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x.reshape(len(x), -1)).all(axis=1)


# ----------------------------------------------------------------------------- gmm


def _w2_pair(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(W2, label-respecting W2) between equal-size sets with the same labels."""
    from tvm_jax.gmm_truth import w2_distance

    sq = 0.0
    for c in np.unique(labels):
        m = labels == c
        sq += m.mean() * w2_distance(a[m], b[m]) ** 2
    return w2_distance(a, b), float(np.sqrt(sq))


def evaluate_gmm(config, model: generate.LoadedModel, sampler: ShardedSampler, steps: Sequence[int],
                 num_samples: int, seed: int) -> tuple[dict, dict, int]:
    """``(metrics per step count, reference numbers, samples used)`` on the ring mixture."""
    from tvm_jax import gmm_truth
    from tvm_jax.data.pipeline import gmm_mixture

    mix = gmm_mixture(config)
    if tuple(model.sample_shape) != (mix.dim,) or model.num_classes != mix.num_classes:
        raise ValueError(f"the model makes {model.num_classes}-class samples of shape {tuple(model.sample_shape)} "
                         f"but the mixture of this config (data.gmm_dim, data.num_classes) has {mix.num_classes} "
                         f"classes in {mix.dim} dimensions")
    n = min(num_samples, GMM_MAX_SAMPLES)
    if n < num_samples:
        logging.info("gmm: using %d of eval.num_samples = %d samples (exact W2 by optimal assignment is O(N^3))",
                     n, num_samples)
    w = sampler.w
    labels = balanced_labels(n, mix.num_classes, seed)
    eps = sampler.noise(n).astype(np.float64)
    t0 = time.time()
    truth = gmm_truth.pushforward_samples(mix, eps, labels=labels, w=w)
    rng = np.random.default_rng([seed, 1])
    if w == 1.0:
        independent = mix.sample(rng, n, labels=labels)[0]
    else:
        independent = gmm_truth.pushforward_samples(mix, rng.standard_normal((n, mix.dim)), labels=labels, w=w)
    floor, floor_cond = _w2_pair(independent, truth, labels)
    class_mean = np.zeros_like(truth)
    for c in np.unique(labels):
        class_mean[labels == c] = truth[labels == c].mean(axis=0)
    logging.info("gmm: exact pushforward of %d noise points and the W2 floor in %.1fs", n, time.time() - t0)

    metrics = {}
    for s in steps:
        x = sampler.sample(s, labels, what=f"{s}-step samples").astype(np.float64)
        finite = _finite_rows(x)
        entry: dict[str, Any] = nonfinite_report(finite)
        if finite.all():
            entry["w2"], entry["w2_conditional"] = _w2_pair(x, truth, labels)
            entry["displacement_mse"] = float(np.mean(np.sum((x - truth) ** 2, axis=1)))
        else:
            logging.warning("gmm: %d of %d %d-step samples are not finite", int((~finite).sum()), n, s)
            entry.update(w2=None, w2_conditional=None, displacement_mse=None)
        metrics[str(s)] = entry
        logging.info("gmm %d-step: %s", s, entry)
    reference = {
        "truth": "exact CFG pushforward psi(eps, 1, 0) of the same noise and labels (tvm_jax.gmm_truth, "
                 "float64 DOP853)",
        "mixture": f"ring mixture: {mix.num_classes} classes, {mix.num_components} components, d = {mix.dim}, "
                   f"seed {config.seed}",
        "w2_floor": floor,
        "w2_conditional_floor": floor_cond,
        "displacement_mse_identity": float(np.mean(np.sum((eps - truth) ** 2, axis=1))),
        "displacement_mse_class_mean": float(np.mean(np.sum((class_mean - truth) ** 2, axis=1))),
        "max_samples": GMM_MAX_SAMPLES,
        "note": f"exact W2 by optimal assignment is O(N^3): evaluated on N = min(eval.num_samples, "
                f"{GMM_MAX_SAMPLES}) samples; w2_floor is what a perfect sampler scores at this N",
    }
    return metrics, reference, n


# ----------------------------------------------------------------------------- digits


def _mlp_apply(params, x):
    """``(logits, penultimate features)`` of the judge for images (B, H, W, C) in [-1, 1]."""
    h = x.reshape(x.shape[0], -1)
    for layer in params[:-1]:
        h = jax.nn.gelu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"], h


@dataclasses.dataclass(frozen=True)
class DigitJudge:
    """The digits classifier and its held-out data (see the module docstring)."""

    params: Any
    info: dict
    features_a: np.ndarray
    features_b: np.ndarray

    def __call__(self, images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """``(features float64 (N, 64), predicted classes (N,))``."""
        feats, preds = [], []
        for i in range(0, len(images), chunk):
            logits, f = _mlp_apply_jit(self.params, jnp.asarray(images[i:i + chunk], jnp.float32))
            feats.append(np.asarray(f, np.float64))
            preds.append(np.asarray(jnp.argmax(logits, -1)))
        return np.concatenate(feats), np.concatenate(preds)


_mlp_apply_jit = jax.jit(_mlp_apply)


@functools.lru_cache(maxsize=4)
def digit_judge(upsample: int, *, seed: int = 0, steps: int = 600, batch: int = 128, lr: float = 2e-3,
                noise_std: float = 0.1, hidden: tuple[int, ...] = (256, 64)) -> DigitJudge:
    """Trains the judge on the train split of ``load_digits(upsample)`` (seconds on a CPU)."""
    import optax
    from sklearn.model_selection import train_test_split

    from tvm_jax.data.pipeline import load_digits

    t0 = time.time()
    x, y = load_digits(upsample)
    idx = np.arange(len(y))
    train, held = train_test_split(idx, test_size=DIGITS_HELDOUT, stratify=y, random_state=DIGITS_SPLIT_SEED)
    half_a, half_b = train_test_split(held, test_size=DIGITS_HELDOUT // 2, stratify=y[held],
                                      random_state=DIGITS_SPLIT_SEED + 1)
    sizes = (int(np.prod(x.shape[1:])), *hidden, 10)
    key = jax.random.key(seed)
    params = []
    for k, (din, dout) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        lim = math.sqrt(6.0 / (din + dout))
        params.append({"w": jax.random.uniform(k, (din, dout), jnp.float32, -lim, lim),
                       "b": jnp.zeros((dout,), jnp.float32)})
    optimizer = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    order = np.stack([rng.choice(len(train), batch, replace=False) for _ in range(steps)]).astype(np.int32)

    @jax.jit
    def fit(params, xs, ys, order):
        def step(carry, inputs):
            params, opt_state = carry
            rows, i = inputs
            xb = xs[rows] + noise_std * jax.random.normal(jax.random.fold_in(key, i), (batch, *xs.shape[1:]))

            def loss_fn(p):
                return optax.softmax_cross_entropy_with_integer_labels(_mlp_apply(p, xb)[0], ys[rows]).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), (order, jnp.arange(steps)))
        return params, losses[-1]

    params, final_loss = fit(params, jnp.asarray(x[train]), jnp.asarray(y[train]), jnp.asarray(order))
    judge = DigitJudge(params, {}, np.zeros(0), np.zeros(0))
    _, pred_held = judge(x[held])
    info = {
        "architecture": "MLP " + "-".join(map(str, sizes)) + " GELU (features: the penultimate layer)",
        "steps": steps, "batch": batch, "lr": lr, "schedule": "cosine", "noise_aug_std": noise_std, "seed": seed,
        "n_train": int(len(train)), "n_heldout": int(len(held)), "split_seed": DIGITS_SPLIT_SEED,
        "heldout_accuracy": float(np.mean(pred_held == y[held])), "final_loss": float(final_loss),
        "seconds": time.time() - t0,
    }
    logging.info("digits judge: held-out accuracy %.4f after %d steps (%.1fs)", info["heldout_accuracy"], steps,
                 info["seconds"])
    return DigitJudge(params, info, judge(x[half_a])[0], judge(x[half_b])[0])


def _fd(f1: np.ndarray, f2: np.ndarray) -> float:
    from tvm_jax.evaluation.fid import compute_statistics, frechet_distance

    return frechet_distance(*compute_statistics(f1), *compute_statistics(f2))


def evaluate_digits(config, model: generate.LoadedModel, sampler: ShardedSampler, steps: Sequence[int],
                    num_samples: int, seed: int) -> tuple[dict, dict, int]:
    """``(metrics per step count, reference numbers, samples used)`` with the digits judge."""
    upsample = int(config.data.upsample)
    expected = (8 * upsample, 8 * upsample, 1)
    if tuple(model.sample_shape) != expected or model.num_classes != 10:
        raise ValueError(f"the model makes {model.num_classes}-class samples of shape {tuple(model.sample_shape)}; "
                         f"digits with data.upsample = {upsample} are 10-class {expected}")
    judge = digit_judge(upsample)
    labels = balanced_labels(num_samples, 10, seed)
    metrics = {}
    for s in steps:
        x = sampler.sample(s, labels, what=f"{s}-step samples")
        finite = _finite_rows(x)
        feats, preds = judge(np.clip(np.where(finite[:, None, None, None], x, 0.0), -1.0, 1.0))
        entry: dict[str, Any] = {"accuracy": float(np.mean((preds == labels) & finite)), **nonfinite_report(finite)}
        entry["fd"] = _fd(feats, judge.features_b) if finite.all() else None
        metrics[str(s)] = entry
        logging.info("digits %d-step: %s", s, entry)
    reference = {
        "classifier": dict(judge.info),
        "fd_floor": _fd(judge.features_a, judge.features_b),
        "fd_reference": f"held-out half B ({len(judge.features_b)} real images)",
        "note": "fd: samples vs held-out half B in the judge's penultimate features; fd_floor: held-out half A "
                f"({len(judge.features_a)} real images) vs B",
    }
    return metrics, reference, num_samples


# ----------------------------------------------------------------------------- latents (FID)

_LATENT_FIELDS = {
    "data.vae_path": "a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors) to "
                     "decode latents to pixels",
    "eval.inception_path": "the FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth)",
    "eval.reference_stats": "the reference statistics (EDM2's img256.pkl / img512.pkl, or an .npz with mu and "
                            "sigma such as ADM's VIRTUAL_imagenet256_labeled.npz)",
}


def _field(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            return None
    return node


def check_latent_inputs(config) -> tuple[np.ndarray, np.ndarray]:
    """Checks the three FID inputs before anything is sampled; returns the reference (mu, sigma)."""
    from tvm_jax.evaluation.fid import load_reference_statistics
    from tvm_jax.evaluation.inception import FEATURE_DIM

    for name, what in _LATENT_FIELDS.items():
        value = _field(config, name)
        if not value:
            raise ValueError(f"{name}: FID on latents needs {what}; set --config.{name}=PATH")
        if not os.path.exists(value):
            raise FileNotFoundError(f"{name}: {value!r} does not exist")
    try:
        mu, sigma = load_reference_statistics(config.eval.reference_stats)
    except (KeyError, ValueError) as e:
        raise ValueError(f"eval.reference_stats: {e.args[0] if e.args else e}") from None
    if mu.shape != (FEATURE_DIM,):
        raise ValueError(f"eval.reference_stats: {config.eval.reference_stats} holds {mu.shape[0]}-d statistics, "
                         f"not the {FEATURE_DIM}-d Inception pool3 statistics FID needs")
    return mu, sigma


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class LatentDecoder:
    """Sharded, jitted ``latents -> (uint8 images, finite-row mask)``: the data pipeline's
    normalisation undone (``raw = z * raw_std / final_std + raw_mean``), the VAE decoder, then
    ``to_uint8`` (images in [-1, 1] -> uint8; :func:`truncate_to_uint8` or ``vae.to_uint8``)."""

    def __init__(self, config, sampler: ShardedSampler, to_uint8=None):
        from flax import nnx

        from tvm_jax.vae import load_vae
        from tvm_jax.vae import to_uint8 as round_to_uint8

        to_uint8 = round_to_uint8 if to_uint8 is None else to_uint8
        vae = load_vae(config.data.vae_path)
        channels = sampler.model.sample_shape[-1]
        if vae.config.latent_channels != channels:
            raise ValueError(f"data.vae_path: the VAE takes {vae.config.latent_channels}-channel latents, the model "
                             f"makes {channels}-channel ones")
        raw_mean = np.asarray(config.data.raw_mean, np.float32)
        raw_std = np.asarray(config.data.raw_std, np.float32)
        if raw_mean.shape != (channels,) or raw_std.shape != (channels,):
            raise ValueError(f"data.raw_mean/raw_std: need {channels} values each, got {raw_mean.shape[0]} and "
                             f"{raw_std.shape[0]}")
        scale = raw_std / np.float32(config.data.final_std)
        graphdef, state = nnx.split(vae)
        self.state = put_global(state, sampler.replicated)

        def decode(state, z):
            finite = jnp.isfinite(z.reshape(z.shape[0], -1)).all(axis=1)
            images = nnx.merge(graphdef, state).decode(z * scale + raw_mean)
            return to_uint8(images), finite

        self._decode = jax.jit(decode, in_shardings=(sampler.replicated, sampler.batch_sharding),
                               out_shardings=(sampler.batch_sharding, sampler.batch_sharding))

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self._decode(self.state, z)


def _inception_features(extractor, images: np.ndarray) -> np.ndarray:
    """Features of a batch that every process holds: each process embeds its share (the
    extractor runs on local devices), then the shares are gathered."""
    if jax.process_count() == 1:
        return extractor(images)
    from jax.experimental import multihost_utils

    share = np.array_split(np.arange(len(images)), jax.process_count())[jax.process_index()]
    return np.asarray(multihost_utils.process_allgather(extractor(images[share]), tiled=True))


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How an evaluation draws labels and turns decoded images into uint8 (``eval.protocol``)."""

    name: str
    labels: np.ndarray
    labels_from: str  # how the labels were drawn
    to_uint8: Any  # images in [-1, 1] -> uint8 (jax arrays)
    pixels: str | None  # the uint8 conversion, in words (None: the metric does not use uint8 pixels)

    def describe(self) -> dict[str, str]:
        out = {"name": self.name, "labels": self.labels_from}
        return out if self.pixels is None else {**out, "pixels": self.pixels}


def check_protocol(config) -> str:
    """The protocol name of ``eval.protocol``, with what it needs checked (before any model work)."""
    name = config.eval.get("protocol", "balanced")
    if name not in EVAL_PROTOCOLS:
        raise ValueError(f"eval.protocol: unknown protocol {name!r}; choose one of {EVAL_PROTOCOLS}")
    source = config.data.source
    if name == "paper":
        if source != "latents":
            raise ValueError(f"eval.protocol: 'paper' is the ImageNet FID protocol (data.source = 'latents'); "
                             f"evaluate {source!r} with --config.eval.protocol=balanced")
        if not config.data.path:
            raise ValueError("data.path: eval.protocol = 'paper' draws each sample's label from the training "
                             "labels; set --config.data.path to the prepared latents (or "
                             "--config.eval.protocol=balanced)")
        if not os.path.exists(config.data.path) and not any(ch in config.data.path for ch in "*?["):
            raise FileNotFoundError(f"data.path: {config.data.path!r} does not exist")
    return name


def make_protocol(config, num_samples: int, seed: int, num_classes: int) -> Protocol:
    """``paper``: each sample's label is the label of a random training item (seeded; the
    dataset's label distribution, read from ``data.path``), pixels truncated to uint8;
    ``balanced``: :func:`balanced_labels` over ``num_classes`` (the model's), pixels rounded to
    uint8 (``vae.to_uint8``)."""
    from tvm_jax.vae import to_uint8 as round_to_uint8

    name = check_protocol(config)
    if name == "paper":
        from tvm_jax.data import records

        labels, read_from = records.draw_training_labels(config.data.path, num_samples, seed)
        if int(labels.max()) >= num_classes:
            raise ValueError(f"data.path: the training labels go up to {int(labels.max())} but the model has "
                             f"{num_classes} classes")
        return Protocol(name, labels, f"the labels of {num_samples} random training items (seed {seed}; from "
                        f"{read_from})", truncate_to_uint8, "floor(clip(x * 0.5 + 0.5, 0, 1) * 255)")
    return Protocol(name, balanced_labels(num_samples, num_classes, seed),
                    f"balanced: arange(n) % {num_classes}, shuffled by seed {seed}", round_to_uint8,
                    "clip(round((x + 1) * 127.5), 0, 255)" if config.data.source == "latents" else None)


def evaluate_latents(config, model: generate.LoadedModel, sampler: ShardedSampler, steps: Sequence[int],
                     protocol: Protocol, reference: tuple[np.ndarray, np.ndarray]) -> tuple[dict, dict, int]:
    """``(FID per step count, reference description, samples used)``.

    A sample that is not finite is left out of the statistics and reported by index
    (``nonfinite_samples``/``nonfinite_indices``); ``fid_samples`` is the count the FID used
    (``fid`` is null when fewer than 2 are finite)."""
    from tvm_jax.evaluation.fid import InceptionFeatures, compute_statistics, frechet_distance

    if len(model.sample_shape) != 3:
        raise ValueError(f"FID needs image latents (H, W, C); the model makes samples of shape {model.sample_shape}")
    labels = protocol.labels
    num_samples = len(labels)
    decoder = LatentDecoder(config, sampler, protocol.to_uint8)
    extractor = InceptionFeatures(config.eval.inception_path, batch_size=sampler.batch_size, shard=True)
    metrics = {}
    for s in steps:
        feats, finite_rows = [], []
        for _, count, z in sampler.batches(s, labels, what=f"FID {s}-step"):
            images, finite = decoder(z)
            images, finite = to_host(images)[:count], to_host(finite)[:count]
            finite_rows.append(finite)
            feats.append(_inception_features(extractor, images)[finite])
        finite = np.concatenate(finite_rows)
        entry: dict[str, Any] = {"fid": None, "fid_samples": int(finite.sum()), **nonfinite_report(finite)}
        if entry["nonfinite_samples"]:
            logging.warning("FID %d-step: %d of %d samples are not finite (indices %s%s); they are left out of the "
                            "statistics", s, entry["nonfinite_samples"], num_samples, entry["nonfinite_indices"][:10],
                            " ..." if entry["nonfinite_samples"] > 10 else "")
            entry["note"] = (f"{entry['nonfinite_samples']} non-finite samples left out: FID of "
                             f"{entry['fid_samples']} samples")
        if entry["fid_samples"] >= 2:
            mu, sigma = compute_statistics(np.concatenate(feats))
            entry["fid"] = frechet_distance(mu, sigma, *reference)
        metrics[str(s)] = entry
        logging.info("FID %d-step (%d samples): %s", s, entry["fid_samples"], entry["fid"])
    ref = {"reference_stats": os.path.abspath(config.eval.reference_stats),
           "reference_stats_sha256": file_sha256(config.eval.reference_stats),
           "inception": os.path.abspath(config.eval.inception_path),
           "inception_sha256": file_sha256(config.eval.inception_path),
           "vae": os.path.abspath(config.data.vae_path),
           "note": f"FID: VAE-decoded samples as uint8 ({protocol.pixels}), FID Inception-v3 pool3 features, "
                   "pytorch-fid's Fréchet distance to the reference statistics"}
    return metrics, ref, num_samples


# ----------------------------------------------------------------------------- entry point


def _check_steps(steps) -> list[int]:
    if steps is None or isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
        raise ValueError(f"steps must be a list of positive integers, got {steps!r}")
    out = []
    for s in steps:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or s < 1:
            raise ValueError(f"steps must be positive integers, got {list(steps)!r}")
        if int(s) not in out:
            out.append(int(s))
    if not out:
        raise ValueError("steps: give at least one step count")
    return out


def _check_w(w) -> float:
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise ValueError(f"the CFG weight w must be a number >= 1, got {w!r}") from None
    if not (math.isfinite(w) and w >= 1.0):
        raise ValueError(f"the CFG weight w must be finite and >= 1, got {w}")
    return w


def _positive_int(value, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def output_path(*, workdir: str | None, checkpoint: str | None, step: int | None, w: float, seed: int = 0,
                weights: str = "ema") -> str:
    """``WORKDIR/eval/eval_step{STEP}_w{w}.json`` (``stepexported`` and the model directory for
    exported models evaluated without a workdir); a non-default seed or ``weights="params"``
    add ``_seed{seed}`` / ``_params`` so that such runs do not collide with the default one."""
    root = workdir or checkpoint
    tag = "exported" if checkpoint else str(step)
    name = f"eval_step{tag}_w{w:g}"
    if seed != 0:
        name += f"_seed{seed}"
    if weights == "params" and not checkpoint:
        name += "_params"
    return os.path.join(os.path.abspath(root), "eval", name + ".json")


def _jsonable(obj):
    """Plain JSON types; non-finite floats become ``None``."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _refuse_existing(path: str) -> None:
    raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")


def check_output_directory(directory: str, *, hint: str = "") -> None:
    """Raises ``ValueError`` unless ``directory`` exists and is writable or can be created (the
    nearest existing ancestor is a writable directory). Creates nothing."""
    probe = os.path.abspath(directory)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"cannot write results to {directory}: {probe} is not a directory{hint}")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ValueError(f"cannot write results to {directory}: {probe} is not writable ({e.strerror or e}){hint}") \
            from None


def check_output_file(path: str, *, overwrite: bool) -> None:
    """Before the first sample: ``path`` must not exist (unless ``overwrite``; never a directory)
    and its directory must be writable or creatable."""
    if os.path.isdir(path):
        raise ValueError(f"cannot write results to {path}: it is a directory")
    if os.path.lexists(path) and not overwrite:
        _refuse_existing(path)
    check_output_directory(os.path.dirname(path))


def write_results(path: str, results: dict, *, overwrite: bool) -> None:
    """The report as JSON, atomically (a temporary file in the same directory, then
    ``os.replace``); if writing fails after all, the results go to the log before the error."""
    if os.path.lexists(path) and not overwrite:  # appeared while we were sampling
        _refuse_existing(path)
    text = json.dumps(results, indent=2) + "\n"
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        logging.error("Could not write %s; the results were:\n%s", path, text)
        raise ValueError(f"cannot write results to {path}: {e.strerror or e} (the results are in the log above)") \
            from None


def evaluate(config, *, workdir: str | None = None, checkpoint: str | None = None, steps: Sequence[int] = (1, 2, 4),
             w: float | None = None, seed: int = 0, weights: str = "ema", overwrite: bool = False) -> dict:
    """Evaluates the model at every step count and writes the JSON report; returns its content.

    Raises ``ValueError`` for bad arguments or settings (naming the config field),
    ``FileNotFoundError`` for missing inputs, ``FileExistsError`` when the report exists and
    ``overwrite`` is false. Everything checkable is checked before anything is sampled.
    """
    t_start = time.time()
    if config is None:
        raise ValueError("evaluation needs --config: the data source and the metric settings come from it")
    steps = _check_steps(steps)
    seed = _positive_int(seed, "seed", 0)
    if weights not in ("ema", "params"):
        raise ValueError(f"weights must be 'ema' or 'params', got {weights!r}")
    if w is not None:
        w = _check_w(w)
    if not workdir and not checkpoint:
        raise ValueError("evaluation needs --workdir (a training run) or --checkpoint (an exported model)")
    source = config.data.source
    if source == "synthetic":
        raise ValueError("data.source: 'synthetic' data is random noise, so there is nothing to compare samples "
                         "against; evaluate a gmm, digits or latents model")
    if source not in SOURCES:
        raise ValueError(f"data.source: cannot evaluate source {source!r}; choose one of {SOURCES}")
    num_samples = _positive_int(config.eval.num_samples, "eval.num_samples", 2)
    batch_size = _positive_int(config.eval.batch_size, "eval.batch_size", 1)
    method = config.sample.get("method", "flow_map")
    reference_stats = check_latent_inputs(config) if source == "latents" else None
    root = workdir or checkpoint
    check_output_directory(os.path.join(os.path.abspath(root), "eval"),
                           hint="" if workdir else "; pass --workdir=DIR to write the results under DIR/eval")
    check_protocol(config)

    model = generate.load_for_sampling(config, checkpoint=checkpoint, workdir=workdir, weights=weights)
    if w is None:
        w = _check_w(config.sample.w)
    step = None if checkpoint else model.step
    path = output_path(workdir=workdir, checkpoint=checkpoint, step=step, w=w, seed=seed, weights=weights)
    check_output_file(path, overwrite=overwrite)
    protocol = make_protocol(config, num_samples, seed, model.num_classes)

    sampler = ShardedSampler(model, w=w, seed=seed, batch_size=batch_size, method=method)
    logging.info("Evaluating %s on %s: steps %s, w = %g, seed %d, protocol %s, batches of %d over %d devices",
                 model.description, source, steps, w, seed, protocol.name, sampler.batch_size, sampler.num_devices)
    if source == "gmm":
        metrics, reference, used = evaluate_gmm(config, model, sampler, steps, num_samples, seed)
    elif source == "digits":
        metrics, reference, used = evaluate_digits(config, model, sampler, steps, num_samples, seed)
    else:
        metrics, reference, used = evaluate_latents(config, model, sampler, steps, protocol, reference_stats)

    devices = jax.devices()
    results = _jsonable({
        "source": source,
        "model": model.description,
        "train_step": step if step is not None else "exported" if checkpoint else None,
        "weights": "exported" if checkpoint else weights,
        "w": w,
        "seed": seed,
        "steps": steps,
        "num_samples": used,
        "num_samples_requested": num_samples,
        "protocol": protocol.describe(),
        "sampler": {"method": method, "scaled_param": bool(model.scaled), "batch_size": sampler.batch_size,
                    "noise": "normal(fold_in(key(seed), i)) for sample i"},
        "metrics": metrics,
        "reference": reference,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "devices": {"count": len(devices), "kinds": sorted({d.device_kind for d in devices}),
                    "platform": devices[0].platform, "processes": jax.process_count()},
        "seconds": round(time.time() - t_start, 1),
        "output": path,
    })
    if jax.process_index() == 0:
        write_results(path, results, overwrite=overwrite)
        logging.info("Wrote %s", path)
    return results

"""Tests for tvm_jax.evaluation (``--mode=evaluate``).

Everything is built here, nothing is downloaded: a tiny mixture model trained for 20 steps with
the real trainer (gmm: W2 / displacement against the exact flow map), tiny exported DiTs with
random weights (digits: judge accuracy and FD; latents: FID through a small random VAE and random
FID-Inception weights). Sharded sampling over the 4 virtual CPU devices of conftest.py is checked
against one device and against a plain unsharded sampler call.

FID on 2048-d features: scipy's ``sqrtm`` of a 2048 x 2048 matrix takes 20-50 s on a shared CPU,
so the FID test swaps :func:`tvm_jax.fid.frechet_distance` for an exact low-rank version (the
sample covariance of 4 images has rank 3; the same quantity, checked against the real function
below). Everything else in the FID pipeline is the real code.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvm_jax import evaluation, generate, gmm_truth
from tvm_jax.config import base_config, load_config_file
from tvm_jax.data import pipeline
from tvm_jax.sampling import make_sampler
from weight_fixtures import random_inception_state_dict, write_vae_folder

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
TRAIN_STEPS = 20


# ----------------------------------------------------------------------------- fixtures


def _gmm_config():
    c = load_config_file(os.path.join(CONFIGS, "gmm.py"))
    c.model.mlp_width, c.model.mlp_depth = 32, 2
    c.train.global_batch_size = 16
    c.train.num_steps = TRAIN_STEPS
    c.train.log_every = 10
    c.train.checkpoint_every = TRAIN_STEPS
    c.train.sample_every = 1000
    c.sample.num_images = 8
    c.eval.num_samples = 200
    c.eval.batch_size = 64
    return c


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory):
    from tvm_jax.trainer import train

    workdir = str(tmp_path_factory.mktemp("gmm_run"))
    train(_gmm_config(), workdir)
    return workdir


def _random_mlp_model(seed=0) -> generate.LoadedModel:
    """A FlowMLP with every parameter perturbed (the zero-initialised output layer included)."""
    from tvm_jax.trainer import build_network

    c = _gmm_config()
    net = build_network(c)
    leaves, tree = jax.tree.flatten(net.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return generate.LoadedModel(net.apply, params, c.data.num_classes, tuple(net.sample_shape), True,
                                is_latent=False, description="random FlowMLP")


def _export_dit(directory, *, input_size, in_channels, num_classes, patch, perturb=0.0, w=1.0):
    """A tiny DiT with random weights written by tvm_jax.model_io.save_model."""
    from tvm_jax.dit import DiTConfig
    from tvm_jax.model_io import save_model
    from tvm_jax.networks import build_dit

    cfg = DiTConfig.create(None, lipschitz=True, input_size=input_size, in_channels=in_channels, hidden_size=32,
                           depth=1, num_heads=2, patch_size=patch, num_classes=num_classes, dtype="float32",
                           attention_impl="xla")
    _, params = build_dit(cfg, seed=0)
    if perturb:
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        params = jax.tree.unflatten(tree, [p + perturb * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    save_model(str(directory), cfg, params, metadata={"scaled_param": True, "w": w})
    return str(directory)


def _digits_config():
    c = load_config_file(os.path.join(CONFIGS, "digits.py"))
    c.eval.num_samples = 30
    c.eval.batch_size = 16
    return c


def _latents_config():
    c = base_config()
    c.data.source = "latents"
    c.data.shape = (8, 8, 4)
    c.data.num_classes = 10
    c.model.size = "custom"
    c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 1, 2
    c.model.dtype = "float32"
    c.sample.w = 1.0
    c.eval.num_samples = 4
    c.eval.batch_size = 4
    return c


# ----------------------------------------------------------------------------- sampling helper


def test_balanced_labels():
    labels = evaluation.balanced_labels(103, 10, seed=5)
    counts = np.bincount(labels, minlength=10)
    assert labels.dtype == np.int32 and counts.max() - counts.min() <= 1 and counts.sum() == 103
    np.testing.assert_array_equal(labels, evaluation.balanced_labels(103, 10, seed=5))
    assert not np.array_equal(labels, evaluation.balanced_labels(103, 10, seed=6))


def test_sharded_sampler_matches_unsharded():
    assert len(jax.devices()) >= 4, "conftest.py provides 4 CPU devices"
    model = _random_mlp_model()
    labels = evaluation.balanced_labels(13, model.num_classes, seed=3)
    labels[0] = model.num_classes  # one unconditional sample too
    s4 = evaluation.ShardedSampler(model, w=1.5, seed=7, batch_size=6, devices=jax.devices()[:4])
    assert s4.batch_size == 8  # rounded up to the device count; 13 = 8 + 5 padded to 8
    x4 = s4.sample(2, labels)
    s1 = evaluation.ShardedSampler(model, w=1.5, seed=7, batch_size=64, devices=jax.devices()[:1])
    x1 = s1.sample(2, labels)
    noise = s1.noise(13)
    direct = make_sampler(model.apply, steps=2, w=1.5, null_label=model.num_classes, scaled=True)(
        model.params, jnp.asarray(noise), jnp.asarray(labels))
    assert x4.shape == (13, 2)
    np.testing.assert_allclose(x4, x1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x1, np.asarray(direct), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s4.noise(13), noise)  # noise is per sample index, not per batch
    assert np.abs(x4 - noise).max() > 1e-2  # the network did something
    start, count, xb = next(s4.batches(2, labels))
    assert (start, count) == (0, 8) and len(xb.sharding.device_set) == 4
    assert xb.addressable_shards[0].data.shape == (2, 2)


# ----------------------------------------------------------------------------- gmm


def test_gmm_evaluate_report_and_overwrite(gmm_run):
    c = _gmm_config()
    res = evaluation.evaluate(c, workdir=gmm_run, checkpoint=None, steps=[1, 2], w=None, seed=0, weights="ema",
                              overwrite=False)
    path = os.path.join(gmm_run, "eval", f"eval_step{TRAIN_STEPS}_w1.json")
    assert res["output"] == os.path.abspath(path) and os.path.isfile(path)
    with open(path) as f:
        assert json.load(f) == res
    assert res["source"] == "gmm" and res["train_step"] == TRAIN_STEPS and res["weights"] == "ema"
    assert res["num_samples"] == 200 and res["w"] == 1.0 and res["seed"] == 0 and res["steps"] == [1, 2]
    assert res["devices"]["count"] == 4 and res["devices"]["kinds"] and res["date"]
    assert res["sampler"]["batch_size"] == 64
    assert set(res["metrics"]) == {"1", "2"}
    for m in res["metrics"].values():
        assert m["nonfinite_samples"] == 0
        for key in ("w2", "w2_conditional", "displacement_mse"):
            assert np.isfinite(m[key]) and m[key] > 0, (key, m)
    ref = res["reference"]
    assert ref["w2_floor"] > 0 and ref["displacement_mse_class_mean"] > 0 and ref["displacement_mse_identity"] > 0
    assert "O(N^3)" in ref["note"]

    with pytest.raises(FileExistsError, match=r"eval_step20_w1\.json exists; pass --overwrite"):
        evaluation.evaluate(c, workdir=gmm_run, steps=[1, 2], seed=0)
    again = evaluation.evaluate(c, workdir=gmm_run, steps=[1, 2], seed=0, overwrite=True)
    assert again["metrics"] == res["metrics"]  # deterministic


def test_gmm_sample_cap_seed_and_raw_weights(gmm_run, monkeypatch):
    """At most GMM_MAX_SAMPLES samples; a non-default seed or the raw weights get their own file."""
    monkeypatch.setattr(evaluation, "GMM_MAX_SAMPLES", 40)
    res = evaluation.evaluate(_gmm_config(), workdir=gmm_run, steps=[1], seed=1, weights="params")
    assert res["num_samples"] == 40 and res["num_samples_requested"] == 200
    assert res["output"].endswith(f"eval_step{TRAIN_STEPS}_w1_seed1_params.json") and res["weights"] == "params"
    assert res["reference"]["max_samples"] == 40 and np.isfinite(res["metrics"]["1"]["w2"])


def test_gmm_perfect_sampler_scores_zero(gmm_run, monkeypatch):
    """Samples equal to the exact pushforward of the sampler's own noise and labels: W2 and the
    displacement error vanish (checks that noise, labels and w line up with the truth)."""
    c = _gmm_config()
    c.eval.num_samples = 60
    mix = pipeline.gmm_mixture(c)

    def exact(self, steps, labels, what=""):
        return gmm_truth.pushforward_samples(mix, self.noise(len(labels)).astype(np.float64), labels=labels, w=self.w)

    monkeypatch.setattr(evaluation.ShardedSampler, "sample", exact)
    res = evaluation.evaluate(c, workdir=gmm_run, steps=[1], w=1.5, seed=3)
    m = res["metrics"]["1"]
    assert res["output"].endswith("_w1.5_seed3.json") and res["w"] == 1.5
    assert m["w2"] < 1e-6 and m["w2_conditional"] < 1e-6 and m["displacement_mse"] < 1e-10
    assert res["reference"]["w2_floor"] > 0.01


def test_argument_validation(gmm_run, tmp_path):
    c = _gmm_config()
    for bad in ([0], [], [1.5], [True], "1,2", None):
        with pytest.raises(ValueError, match="steps"):
            evaluation.evaluate(c, workdir=gmm_run, steps=bad)
    with pytest.raises(ValueError, match="w must be"):
        evaluation.evaluate(c, workdir=gmm_run, steps=[1], w=0.5)
    with pytest.raises(ValueError, match="weights"):
        evaluation.evaluate(c, workdir=gmm_run, steps=[1], weights="last")
    with pytest.raises(ValueError, match="--config"):
        evaluation.evaluate(None, workdir=gmm_run, steps=[1])
    with pytest.raises(ValueError, match="--workdir"):
        evaluation.evaluate(c, steps=[1])
    c.eval.num_samples = 1
    with pytest.raises(ValueError, match="eval.num_samples"):
        evaluation.evaluate(c, workdir=gmm_run, steps=[1])
    c.eval.num_samples, c.eval.batch_size = 10, 0
    with pytest.raises(ValueError, match="eval.batch_size"):
        evaluation.evaluate(c, workdir=gmm_run, steps=[1])
    with pytest.raises(FileNotFoundError, match="empty does not exist: train first"):
        evaluation.evaluate(_gmm_config(), workdir=str(tmp_path / "empty"), steps=[1])
    assert not (tmp_path / "empty").exists()  # reading a run creates nothing


def test_synthetic_source_is_refused(gmm_run):
    c = _gmm_config()
    c.data.source = "synthetic"
    with pytest.raises(ValueError, match="data.source: 'synthetic'.*nothing to compare"):
        evaluation.evaluate(c, workdir=gmm_run, steps=[1])


# ----------------------------------------------------------------------------- digits


def test_digits_exported_model(tmp_path, monkeypatch):
    model_dir = _export_dit(tmp_path / "digits_model", input_size=8, in_channels=1, num_classes=10, patch=2, w=1.5)
    c = _digits_config()
    res = evaluation.evaluate(c, checkpoint=model_dir, steps=[1, 2], seed=0)
    assert res["output"] == os.path.join(model_dir, "eval", "eval_stepexported_w1.5.json")
    assert os.path.isfile(res["output"]) and res["train_step"] == "exported" and res["w"] == 1.5
    clf = res["reference"]["classifier"]
    assert clf["heldout_accuracy"] > 0.85, clf
    floor = res["reference"]["fd_floor"]
    for m in res["metrics"].values():
        assert 0.0 <= m["accuracy"] <= 1.0 and m["nonfinite_samples"] == 0
        assert np.isfinite(m["fd"]) and m["fd"] > floor > 0  # random weights: noise, far from real digits

    # Real digits of the requested classes in place of samples: the judge agrees and FD drops.
    x, y = pipeline.load_digits(c.data.upsample)
    rng = np.random.default_rng(0)

    def real(self, steps, labels, what=""):
        return np.stack([x[rng.choice(np.flatnonzero(y == label))] for label in labels])

    monkeypatch.setattr(evaluation.ShardedSampler, "sample", real)
    c.eval.num_samples = 200
    good = evaluation.evaluate(c, checkpoint=model_dir, steps=[1], seed=0, overwrite=True)["metrics"]["1"]
    assert good["accuracy"] > 0.9 and good["fd"] < 0.5 * res["metrics"]["1"]["fd"]


# ----------------------------------------------------------------------------- latents / FID


def test_latents_missing_fid_inputs_fail_before_sampling(tmp_path, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("the model must not be loaded before the FID inputs are checked")

    monkeypatch.setattr(generate, "load_for_sampling", no_loading)
    c = _latents_config()
    with pytest.raises(ValueError, match=r"data\.vae_path: FID on latents needs"):
        evaluation.evaluate(c, checkpoint=str(tmp_path), steps=[1])
    c.data.vae_path = str(tmp_path)
    with pytest.raises(ValueError, match=r"eval\.inception_path"):
        evaluation.evaluate(c, checkpoint=str(tmp_path), steps=[1])
    (tmp_path / "inception.pth").write_bytes(b"x")
    c.eval.inception_path = str(tmp_path / "inception.pth")
    with pytest.raises(ValueError, match=r"eval\.reference_stats"):
        evaluation.evaluate(c, checkpoint=str(tmp_path), steps=[1])
    c.eval.reference_stats = str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match=r"eval\.reference_stats"):
        evaluation.evaluate(c, checkpoint=str(tmp_path), steps=[1])
    np.savez(tmp_path / "small.npz", mu=np.zeros(3), sigma=np.eye(3))
    c.eval.reference_stats = str(tmp_path / "small.npz")
    with pytest.raises(ValueError, match=r"eval\.reference_stats: .*3-d statistics"):
        evaluation.evaluate(c, checkpoint=str(tmp_path), steps=[1])


def _low_rank_frechet_distance(mu1, sigma1, mu2, sigma2, eps=None, rank=32):
    """Exact ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr sqrt(s1 s2)`` when ``sigma1`` has rank
    <= ``rank`` (statistics of a handful of samples), in O(d^2 rank) instead of scipy's O(d^3)
    ``sqrtm``: with ``Q`` an orthonormal basis of range(s1) and ``M = Q^T s1 Q``, the non-zero
    eigenvalues of ``s1 s2`` are those of ``M^1/2 (Q^T s2 Q) M^1/2``."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    q, _ = np.linalg.qr(s1 @ np.random.default_rng(0).standard_normal((s1.shape[0], rank)))
    m = q.T @ s1 @ q
    assert np.abs(q @ m @ q.T - s1).max() <= 1e-9 * np.abs(s1).max(), "sigma1 is not low-rank"
    lam, vec = np.linalg.eigh(m)
    root = (vec * np.sqrt(np.clip(lam, 0, None))) @ vec.T
    ev = np.linalg.eigvalsh(root @ (q.T @ s2 @ q) @ root)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sum(np.sqrt(np.clip(ev, 0, None))))


def test_low_rank_frechet_distance_matches_fid_module():
    from tvm_jax.fid import compute_statistics, frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 40)), 1.5 * rng.standard_normal((300, 40)) + 0.3  # a: rank 5
    s_a, s_b = compute_statistics(a), compute_statistics(b)
    np.testing.assert_allclose(_low_rank_frechet_distance(*s_a, *s_b, rank=8), frechet_distance(*s_a, *s_b),
                               rtol=1e-6)


def _write_random_vae(folder):
    return str(write_vae_folder(folder))


def _write_random_inception(path):
    """Random FID-Inception weights (He-scaled convs, random BatchNorm statistics)."""
    from safetensors.numpy import save_file

    save_file(random_inception_state_dict(), str(path))
    return str(path)


@pytest.mark.slow
def test_latents_fid_end_to_end(tmp_path, monkeypatch):
    """4 one-step samples of a tiny exported latent DiT, decoded by a small random VAE and embedded
    by random FID-Inception weights. The reference statistics are computed here from the same
    samples through the public path (generate.make_decoder, fid.InceptionFeatures), with the mean
    shifted by ``delta``: the FID must come out as ``|delta|^2`` (the covariance terms cancel)."""
    from tvm_jax import fid
    from tvm_jax.images import to_uint8

    monkeypatch.setattr(fid, "frechet_distance", _low_rank_frechet_distance)
    c = _latents_config()
    c.eval.protocol = "balanced"  # balanced labels, uint8 by rounding (as generate's decoder)
    c.data.vae_path = _write_random_vae(tmp_path / "vae")
    c.eval.inception_path = _write_random_inception(tmp_path / "inception.safetensors")
    model_dir = _export_dit(tmp_path / "latent_model", input_size=8, in_channels=4, num_classes=10, patch=2,
                            perturb=0.05)

    model = generate.load_for_sampling(c, checkpoint=model_dir, workdir=None)
    sampler = evaluation.ShardedSampler(model, w=1.0, seed=0, batch_size=4)
    z = sampler.sample(1, evaluation.balanced_labels(4, 10, seed=0))
    images = to_uint8(generate.make_decoder(c)(z))
    assert images.shape == (4, 16, 16, 3)
    ours = evaluation.to_host(evaluation.LatentDecoder(c, sampler)(jnp.asarray(z))[0])
    assert np.abs(ours.astype(int) - images.astype(int)).max() <= 1  # on-device decode == generate's
    extractor = fid.InceptionFeatures(c.eval.inception_path, batch_size=4, shard=True)
    mu, sigma = fid.compute_statistics(extractor(images))
    delta = np.full_like(mu, 0.01)
    c.eval.reference_stats = str(fid.save_statistics(tmp_path / "ref.npz", mu + delta, sigma))

    res = evaluation.evaluate(c, checkpoint=model_dir, steps=[1], seed=0)
    assert res["source"] == "latents" and res["num_samples"] == 4 and res["train_step"] == "exported"
    assert res["output"] == os.path.join(model_dir, "eval", "eval_stepexported_w1.json")
    m = res["metrics"]["1"]
    assert m["nonfinite_samples"] == 0
    np.testing.assert_allclose(m["fid"], float(delta @ delta), rtol=1e-3, atol=1e-4 * float(np.trace(sigma)))
    assert res["reference"]["reference_stats"] == os.path.abspath(c.eval.reference_stats)

"""Tests for tvm_jax.evaluation (``--mode=evaluate``).

Everything is built here, nothing is downloaded: a tiny mixture model trained for 20 steps with
the real trainer (gmm: W2 / displacement against the exact flow map), tiny exported DiTs with
random weights (digits: judge accuracy and FD; latents: FID through a small random VAE and random
FID-Inception weights). Sharded sampling over the 4 virtual CPU devices of conftest.py is checked
against one device and against a plain unsharded sampler call.

FID on 2048-d features: scipy's ``sqrtm`` of a 2048 x 2048 matrix takes 20-50 s on a shared CPU,
so the FID test swaps :func:`tvm_jax.evaluation.fid.frechet_distance` for an exact low-rank version (the
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
    """A tiny DiT with random weights written by tvm_jax.weights.model_io.save_model."""
    from tvm_jax.dit import DiTConfig
    from tvm_jax.weights.model_io import save_model
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
    from tvm_jax.evaluation.fid import compute_statistics, frechet_distance

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


def _latent_dataset(directory, label_counts, shape=(8, 8, 4), with_counts=True):
    """Prepared-latents layout (ArrayRecord shards + dataset.json) with ``label_counts[c]`` records
    of class ``c``, in shuffled order; ``class_counts`` in dataset.json as prepare_imagenet writes."""
    from tvm_jax.data import records

    labels = np.repeat(np.arange(len(label_counts)), label_counts)
    labels = labels[np.random.default_rng(7).permutation(len(labels))]
    recs = [records.encode_record(np.zeros(shape), np.ones(shape), int(y)) for y in labels]
    os.makedirs(directory, exist_ok=True)
    half = len(recs) // 2
    records.write_shard(os.path.join(directory, "latents-00000-of-00002.array_record"), recs[:half])
    records.write_shard(os.path.join(directory, "latents-00001-of-00002.array_record"), recs[half:])
    extra = {"class_counts": [int(c) for c in label_counts]} if with_counts else {}
    records.write_metadata(str(directory), shape=list(shape), num_classes=len(label_counts), num_records=len(recs),
                           resolution=8 * shape[0], raw_mean=[0.0] * shape[-1], raw_std=[1.0] * shape[-1], **extra)
    return str(directory), labels


def _edm2_reference(path, mu, sigma, num_images):
    """Written as EDM2's calculate_metrics.py writes img256.pkl (NVlabs/edm2: calculate_stats_for_iterable
    builds dict(num_images=N, fid=dict(mu, sigma), fd_dinov2=dict(mu, sigma)) of float64 numpy
    arrays; save_stats does pickle.dump(stats, f))."""
    import pickle

    with open(path, "wb") as f:
        pickle.dump(dict(num_images=num_images, fid=dict(mu=mu, sigma=sigma),
                         fd_dinov2=dict(mu=np.zeros(8), sigma=np.eye(8))), f)
    return str(path)


@pytest.mark.slow
def test_latents_fid_end_to_end_paper_protocol(tmp_path, monkeypatch):
    """4 one-step samples of a tiny exported latent DiT, decoded by a small random VAE, truncated to
    uint8 and embedded by random FID-Inception weights, the labels drawn from a (skewed) training
    set, the reference an EDM2-style pickle, sample 2 made non-finite. The reference statistics are
    those of the three finite samples (computed here through the public pieces) with the mean
    shifted by ``delta``: the FID must come out as ``|delta|^2``; the report names everything."""
    import hashlib

    from tvm_jax.evaluation import fid

    monkeypatch.setattr(fid, "frechet_distance", _low_rank_frechet_distance)
    c = _latents_config()
    assert c.eval.protocol == "paper"
    c.data.path, _ = _latent_dataset(tmp_path / "data", [30, 0, 0, 0, 0, 0, 0, 10, 0, 0])
    c.data.vae_path = _write_random_vae(tmp_path / "vae")
    c.eval.inception_path = _write_random_inception(tmp_path / "inception.safetensors")
    model_dir = _export_dit(tmp_path / "latent_model", input_size=8, in_channels=4, num_classes=10, patch=2,
                            perturb=0.05)
    bad = 2

    real_batches = evaluation.ShardedSampler.batches

    def batches_with_a_nan(self, steps, labels, what=""):
        for start, count, x in real_batches(self, steps, labels, what=what):
            if start <= bad < start + count:
                x = jax.device_put(x.at[bad - start].set(jnp.nan), self.batch_sharding)
            yield start, count, x

    monkeypatch.setattr(evaluation.ShardedSampler, "batches", batches_with_a_nan)
    protocol = evaluation.make_protocol(c, 4, seed=0, num_classes=10)
    assert set(protocol.labels.tolist()) <= {0, 7}
    model = generate.load_for_sampling(c, checkpoint=model_dir, workdir=None)
    sampler = evaluation.ShardedSampler(model, w=1.0, seed=0, batch_size=4)
    z = jnp.concatenate([x for _, _, x in sampler.batches(1, protocol.labels)])
    images, finite = (evaluation.to_host(a) for a in evaluation.LatentDecoder(c, sampler, protocol.to_uint8)(z))
    assert images.shape == (4, 16, 16, 3) and finite.tolist() == [True, True, False, True]
    reference_decode = evaluation.truncate_to_uint8(generate.make_decoder(c)(np.asarray(z)[finite]))
    assert np.abs(images[finite].astype(int) - reference_decode.astype(int)).max() <= 1  # == generate's decoder
    extractor = fid.InceptionFeatures(c.eval.inception_path, batch_size=4, shard=True)
    mu, sigma = fid.compute_statistics(extractor(images[finite]))
    delta = np.full_like(mu, 0.01)
    c.eval.reference_stats = _edm2_reference(tmp_path / "img256.pkl", mu + delta, sigma, 3)

    res = evaluation.evaluate(c, checkpoint=model_dir, steps=[1], seed=0)
    assert res["source"] == "latents" and res["num_samples"] == 4 and res["train_step"] == "exported"
    assert res["output"] == os.path.join(model_dir, "eval", "eval_stepexported_w1.json")
    with open(res["output"]) as f:
        assert json.load(f) == res
    m = res["metrics"]["1"]
    assert m["nonfinite_samples"] == 1 and m["nonfinite_indices"] == [bad] and m["fid_samples"] == 3
    assert "left out" in m["note"]
    np.testing.assert_allclose(m["fid"], float(delta @ delta), rtol=1e-3, atol=1e-4 * float(np.trace(sigma)))
    assert res["protocol"]["name"] == "paper"
    assert "random training items" in res["protocol"]["labels"] and "class_counts" in res["protocol"]["labels"]
    assert res["protocol"]["pixels"] == "floor(clip(x * 0.5 + 0.5, 0, 1) * 255)"
    ref = res["reference"]
    for key, path in (("reference_stats", c.eval.reference_stats), ("inception", c.eval.inception_path)):
        assert ref[key] == os.path.abspath(path)
        with open(path, "rb") as f:
            assert ref[key + "_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert ref["vae"] == os.path.abspath(c.data.vae_path)


def test_truncate_to_uint8_is_the_official_cast():
    """``floor(clip(x * 0.5 + 0.5, 0, 1) * 255)``: what ``(x * 0.5 + 0.5).clamp(0, 1) * 255`` cast to
    uint8 gives (the cast truncates); differs from rounding wherever the fraction is >= 0.5."""
    from tvm_jax.vae import to_uint8 as round_to_uint8

    x = np.array([-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0, 2 * (100.7 / 255) - 1], np.float32)
    expected = [0, 0, 0, 127, 191, 254, 255, 255, 100]
    np.testing.assert_array_equal(evaluation.truncate_to_uint8(x), expected)
    np.testing.assert_array_equal(np.asarray(evaluation.truncate_to_uint8(jnp.asarray(x))), expected)
    assert evaluation.truncate_to_uint8(x).dtype == np.uint8
    assert round_to_uint8(np.float32(0.0)) == 128 and round_to_uint8(np.float32(0.999)) == 255  # the old way
    grid = np.linspace(-1, 1, 10001, dtype=np.float32)
    assert (round_to_uint8(grid).astype(int) - evaluation.truncate_to_uint8(grid).astype(int)).max() == 1


@pytest.mark.parametrize("with_counts", [True, False], ids=["dataset.json class_counts", "record headers"])
def test_paper_labels_follow_the_training_labels(tmp_path, with_counts):
    from tvm_jax.data import records

    counts = [50, 0, 30, 0, 15, 0, 0, 0, 0, 5]
    path, labels = _latent_dataset(tmp_path / "d", counts, shape=(2, 2, 4), with_counts=with_counts)
    drawn, how = records.draw_training_labels(path, 4000, seed=3)
    assert ("class_counts" in how) == with_counts
    freq = np.bincount(drawn, minlength=10) / len(drawn)
    np.testing.assert_allclose(freq, np.asarray(counts) / 100, atol=0.03)  # 4000 draws: sd <= 0.008
    assert set(np.unique(drawn)) == {0, 2, 4, 9}
    again, _ = records.draw_training_labels(path, 4000, seed=3)
    np.testing.assert_array_equal(drawn, again)
    assert not np.array_equal(drawn, records.draw_training_labels(path, 4000, seed=4)[0])
    if not with_counts:  # each sample's label is that of a uniformly drawn record (stored order)
        stored = np.concatenate([[records.decode_record(r)["label"] for r in shard] for shard in _read_shards(path)])
        np.testing.assert_array_equal(stored, labels)
        np.testing.assert_array_equal(drawn, stored[np.random.default_rng(3).integers(0, len(stored), 4000)])


def _read_shards(path):
    from array_record.python.array_record_module import ArrayRecordReader

    from tvm_jax.data import records

    out = []
    for file in records.shard_paths(path):
        reader = ArrayRecordReader(file)
        out.append(reader.read_all())
        reader.close()
    return out


def test_protocol_settings_are_checked_before_anything_runs(gmm_run, tmp_path, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(generate, "load_for_sampling", no_loading)
    c = _latents_config()
    c.data.vae_path, c.eval.inception_path = str(tmp_path), str(tmp_path)
    from tvm_jax.evaluation.inception import FEATURE_DIM

    np.savez(tmp_path / "ref.npz", mu=np.zeros(FEATURE_DIM), sigma=np.eye(FEATURE_DIM))
    c.eval.reference_stats = str(tmp_path / "ref.npz")
    with pytest.raises(ValueError, match=r"^data\.path: eval\.protocol = 'paper' draws each sample's label"):
        evaluation.evaluate(c, checkpoint=str(tmp_path), steps=[1])
    c.data.path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"^data\.path: .*nowhere"):
        evaluation.evaluate(c, checkpoint=str(tmp_path), steps=[1])
    c.eval.protocol = "fancy"
    with pytest.raises(ValueError, match=r"^eval\.protocol: unknown protocol 'fancy'"):
        evaluation.evaluate(c, checkpoint=str(tmp_path), steps=[1])
    g = _gmm_config()
    g.eval.protocol = "paper"
    with pytest.raises(ValueError, match=r"^eval\.protocol: 'paper' is the ImageNet FID protocol"):
        evaluation.evaluate(g, workdir=gmm_run, steps=[1])


# ----------------------------------------------------------------------------- output location


def test_unwritable_output_fails_before_the_first_sample(tmp_path, monkeypatch):
    """The report's directory cannot be made (a file stands where WORKDIR/eval or DIR/eval would
    go): the error comes before the model is sampled, nothing is changed; an existing report
    without --overwrite likewise."""
    model_dir = _export_dit(tmp_path / "digits_model", input_size=8, in_channels=1, num_classes=10, patch=2)

    def no_sampling(*a, **k):
        raise AssertionError("sampling started before the output location was checked")

    monkeypatch.setattr(evaluation.ShardedSampler, "batches", no_sampling)
    monkeypatch.setattr(evaluation.ShardedSampler, "sample", no_sampling)
    blocker = os.path.join(model_dir, "eval")
    with open(blocker, "w") as f:
        f.write("not a directory")
    with pytest.raises(ValueError, match=rf"cannot write results to {blocker}: {blocker} is not a directory; "
                                         r"pass --workdir=DIR"):
        evaluation.evaluate(_digits_config(), checkpoint=model_dir, steps=[1])
    with open(blocker) as f:
        assert f.read() == "not a directory"
    c = _digits_config()
    report = evaluation.output_path(workdir=str(tmp_path / "results"), checkpoint=model_dir, step=None, w=c.sample.w)
    os.makedirs(os.path.dirname(report))
    with open(report, "w") as f:
        f.write("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluation.evaluate(c, workdir=str(tmp_path / "results"), checkpoint=model_dir, steps=[1])
    with open(report) as f:
        assert f.read() == "{}"


def test_results_are_written_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / "eval" / "r.json")
    evaluation.write_results(path, {"fid": 1.0}, overwrite=False)
    with pytest.raises(FileExistsError):
        evaluation.write_results(path, {"fid": 2.0}, overwrite=False)

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(ValueError, match=r"cannot write results to .*r\.json: No space left on device"):
        evaluation.write_results(path, {"fid": 2.0}, overwrite=True)
    assert os.listdir(tmp_path / "eval") == ["r.json"]  # no temporary file left behind
    with open(path) as f:
        assert json.load(f) == {"fid": 1.0}  # the previous report is intact


def test_evaluate_cli_unwritable_output(tmp_path):
    """``python -m tvm_jax.main --mode=evaluate`` with an output directory that cannot be created:
    exit 2 and one line naming it, before any sampling."""
    import subprocess
    import sys

    model_dir = _export_dit(tmp_path / "m", input_size=8, in_channels=1, num_classes=10, patch=2)
    (tmp_path / "m" / "eval").write_text("x")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "tvm_jax.main", "--mode=evaluate", "--config=configs/digits.py",
                          f"--checkpoint={model_dir}", "--steps=1"], cwd=repo, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{model_dir}/eval is not a directory" in errors[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "images/s" not in res.stderr

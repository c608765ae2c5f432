"""Tests for tvm_jax.evaluation.inception (FID Inception-v3) and tvm_jax.evaluation.fid (statistics, distance, files).

Parity reference. pytorch-fid's ``InceptionV3`` subclasses torchvision's Inception blocks, and
torchvision only imports next to a heavy CUDA torch build here (torch 2.14.1 + torchvision
0.29.1, ~5.7 GB). So the parity test that runs in CI (``torch`` marker, needs only the CPU
``torch==2.13.0``) compares against ``_torch_reference()`` below: a compact re-implementation
of pytorch-fid's network (torchvision's ``Inception3`` trunk with pytorch-fid's
``FIDInceptionA/C/E_1/E_2`` patches and its ``F.interpolate`` + ``2x - 1`` input path) written
with ``torch.nn`` / ``torch.nn.functional`` only, with torchvision's state-dict key names.
When ``pytorch_fid`` and ``torchvision`` are importable, the same parity test also runs against
the real ``pytorch_fid.inception.InceptionV3`` (its weight download replaced by our random
state dict), which pins the compact reference to pytorch-fid itself.

All Inception forwards share one random state dict, and most share one input (2 x 64 x 64
uint8) so that the jitted program compiles few times per session (the full network at 299x299
costs ~6 GFLOP per image on CPU).
"""

from __future__ import annotations

import codecs
import os
import pickle
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import save_file

from tvm_jax.evaluation import inception as inc
from weight_fixtures import inception_shapes, random_inception_state_dict
from tvm_jax.evaluation.fid import (
    InceptionFeatures,
    compute_statistics,
    features_from_folder,
    frechet_distance,
    load_reference_statistics,
    save_statistics,
    statistics_from_folder,
)

# --------------------------------------------------------------------------------------
# Shared random FID-Inception weights and inputs
# --------------------------------------------------------------------------------------


_expected_shapes = inception_shapes


def _random_inception_state_dict(seed=0) -> dict[str, np.ndarray]:
    """Random weights plus the extra entries of the real pytorch-fid file (fc,
    num_batches_tracked) that must be ignored."""
    return random_inception_state_dict(seed, torch_extras=True)


@pytest.fixture(scope="module")
def state_dict():
    return _random_inception_state_dict()


@pytest.fixture(scope="module")
def model(state_dict):
    return inc.inception_from_state_dict(state_dict)


@pytest.fixture(scope="module")
def extractor(model):
    return InceptionFeatures(model, batch_size=2)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def jax_features(extractor, images):
    return extractor(images)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# --------------------------------------------------------------------------------------
# Compact torch.nn reference of pytorch-fid's FID Inception-v3
# --------------------------------------------------------------------------------------


def _torch_reference():
    """pytorch-fid ``InceptionV3([3])`` rebuilt from torch.nn only (torchvision key names)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class BasicConv2d(nn.Module):
        def __init__(self, cin, cout, **kw):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg3(x):  # pytorch-fid's patch: TF's average pool ignores the zero padding
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class A(nn.Module):
        def __init__(self, cin, pool_features):
            super().__init__()
            self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
            self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
            self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

        def forward(self, x):
            return torch.cat([
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(avg3(x)),
            ], 1)

    class B(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            return torch.cat([
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ], 1)

    class C(nn.Module):
        def __init__(self, cin, c7):
            super().__init__()
            self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
            self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
            self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

        def forward(self, x):
            d = self.branch7x7dbl_1(x)
            for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
                d = m(d)
            return torch.cat([
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                d,
                self.branch_pool(avg3(x)),
            ], 1)

    class D(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            b7 = self.branch7x7x3_1(x)
            for m in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
                b7 = m(b7)
            return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class E(nn.Module):
        def __init__(self, cin, max_pool):
            super().__init__()
            self.max_pool = max_pool  # FIDInceptionE_2 (Mixed_7c) max-pools its pool branch
            self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
            self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
            self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg3(x)
            return torch.cat([
                self.branch1x1(x),
                torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
                torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1),
                self.branch_pool(pooled),
            ], 1)

    class FIDInception(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
            self.Mixed_6a = B(288)
            self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = C(768, 128), C(768, 160), C(768, 160), C(768, 192)
            self.Mixed_7a = D(768)
            self.Mixed_7b, self.Mixed_7c = E(1280, max_pool=False), E(2048, max_pool=True)
            self.fc = nn.Linear(2048, 1008)  # unused by the features; present in the weights file

        def forward(self, x):  # x: NCHW in [0, 1], like pytorch-fid's InceptionV3
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, "Mixed_" + name)(x)
            return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)

    return FIDInception()


def _torch_state_dict(state_dict):
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}


def _pytorch_fid_model(state_dict, monkeypatch):
    """The real pytorch_fid.inception.InceptionV3([3]) with our weights instead of the download."""
    try:  # torchvision can be installed yet broken next to a mismatched torch: skip then too
        import torchvision  # noqa: F401
        import pytorch_fid.inception as pfi
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"pytorch_fid + torchvision not usable here: {e!r}")
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: _torch_state_dict(state_dict))

    class Wrapped(pfi.InceptionV3):
        def forward(self, x):
            return super().forward(x)[0].flatten(1)

    return Wrapped([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])


# --------------------------------------------------------------------------------------
# Inception parity (torch)
# --------------------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("reference", ["compact", "pytorch_fid"])
def test_features_match_pytorch_fid_network(reference, state_dict, images, jax_features, monkeypatch):
    torch = pytest.importorskip("torch")
    if reference == "compact":
        ref = _torch_reference()
        ref.load_state_dict(_torch_state_dict(state_dict), strict=True)  # all keys used, incl. fc/num_batches
    else:
        ref = _pytorch_fid_model(state_dict, monkeypatch)
    ref.eval()
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid's ToTensor
        expected = ref(x).numpy()
    assert expected.shape == jax_features.shape == (2, inc.FEATURE_DIM)
    assert np.std(expected) > 1e-3  # a non-degenerate reference (random BN stats keep activations alive)
    err = _rel_err(jax_features, expected)
    assert err < 2e-5, err  # measured ~5e-7 on CPU


@pytest.mark.torch
@pytest.mark.parametrize("hw", [(32, 32), (64, 64), (299, 299), (300, 310), (512, 512), (40, 97)])
def test_resize_matches_torch_bilinear(hw):
    """jax.image.resize(bilinear, antialias=False) == F.interpolate(bilinear, align_corners=False),
    for up- and downsampling and non-square inputs."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    x = np.random.default_rng(hw[0] * 1000 + hw[1]).uniform(0, 1, (2, *hw, 3)).astype(np.float32)
    got = np.asarray(inc.resize_bilinear(jnp.asarray(x)))
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), atol=2e-6, rtol=0)


@pytest.mark.torch
def test_load_pth_written_by_torch(tmp_path, state_dict, model):
    torch = pytest.importorskip("torch")
    pytest.importorskip("tvm_jax.weights.torch_io")
    path = tmp_path / inc.FID_WEIGHTS_FILENAME
    torch.save(_torch_state_dict(state_dict), path)
    loaded = inc.load_inception(path)
    _assert_same_variables(loaded, model)


# --------------------------------------------------------------------------------------
# Inception: pieces, loading, errors (no torch)
# --------------------------------------------------------------------------------------


def _assert_same_variables(a, b):
    fa = dict(nnx.to_flat_state(nnx.state(a, nnx.Variable)))
    fb = dict(nnx.to_flat_state(nnx.state(b, nnx.Variable)))
    assert set(fa) == set(fb) and len(fa) == 470
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k][...]), np.asarray(fb[k][...]), err_msg=str(k))


def test_architecture_matches_pytorch_fid_key_table():
    """Key names and shapes equal those of pytorch-fid's ``fid_inception_v3()`` state dict (less
    ``fc.*`` and ``num_batches_tracked``): the digest and counts below were computed from
    pytorch-fid 0.3.0 + torchvision 0.29.1 (566 entries = 470 + 94 num_batches_tracked + fc)."""
    import hashlib
    import json

    shapes = _expected_shapes()
    assert len(shapes) == 470
    assert sum(int(np.prod(s)) for s in shapes.values()) == 21_820_000
    assert sum(int(np.prod(s)) for k, s in shapes.items() if "running" not in k) == 21_785_568
    digest = hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()
    assert digest == "53dfbd0c1bd592f43bd9a5c50b8fb183575be4d885e6f9835ec99912ac69d1f7"


def test_pools_match_brute_force():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 6, 2)).astype(np.float32))
    xn = np.asarray(x)
    avg = np.asarray(inc.avg_pool_exclude_pad(x))
    mx = np.asarray(inc.max_pool(x, 3, 1, 1))
    for i in range(5):
        for j in range(6):
            win = xn[0, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]  # in-image part only
            np.testing.assert_allclose(avg[0, i, j], win.mean(axis=(0, 1)), rtol=1e-6)
            np.testing.assert_allclose(mx[0, i, j], win.max(axis=(0, 1)), rtol=0)
    # Corner: 4 of 9 window cells lie inside the image -> divide by 4, not 9.
    np.testing.assert_allclose(avg[0, 0, 0], xn[0, :2, :2].mean(axis=(0, 1)), rtol=1e-6)
    # Stride-2 valid max pool (stem / grid reductions): 5x6 -> 2x2.
    assert inc.max_pool(x, 3, 2).shape == (1, 2, 2, 2)
    # Negative inputs: max-pool padding must not act like zeros.
    neg = -jnp.ones((1, 3, 3, 1))
    assert float(inc.max_pool(neg, 3, 1, 1).max()) == -1.0


def test_resize_is_identity_at_299():
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 299, 299, 3)).astype(np.float32))
    assert inc.resize_bilinear(x) is x


def test_load_safetensors_and_npz(tmp_path, state_dict, model):
    save_file(state_dict, str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "w.npz", **state_dict)
    for name in ("w.safetensors", "w.npz"):
        _assert_same_variables(inc.load_inception(tmp_path / name), model)


def test_export_round_trip(state_dict, model):
    exported = inc.export_torch_state_dict(model)
    assert set(exported) == set(_expected_shapes())
    for k, v in exported.items():
        np.testing.assert_array_equal(v, state_dict[k], err_msg=k)


def test_weight_errors(tmp_path, state_dict):
    sd = {k: v for k, v in state_dict.items() if k != "Mixed_7c.branch_pool.bn.running_var"}
    sd["AuxLogits.conv0.conv.weight"] = np.zeros((128, 768, 1, 1), np.float32)
    save_file(sd, str(tmp_path / "a.safetensors"))
    with pytest.raises(KeyError) as e:
        inc.load_inception(tmp_path / "a.safetensors")
    msg = str(e.value)
    assert "missing keys (1): Mixed_7c.branch_pool.bn.running_var" in msg
    assert "unexpected keys (1): AuxLogits.conv0.conv.weight" in msg

    sd = dict(state_dict)
    sd["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)  # transposed kernel
    save_file(sd, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match=r"Mixed_6b\.branch7x7_2\.conv\.weight: expected \(128, 128, 1, 7\), got \(128, 128, 7, 1\)"):
        inc.load_inception(tmp_path / "b.safetensors")

    with pytest.raises(FileNotFoundError, match="not found"):
        inc.load_inception(tmp_path / "missing.pth")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported suffix"):
        inc.load_inception(tmp_path / "w.bin")


def test_input_validation(model, extractor):
    with pytest.raises(ValueError, match="RGB"):
        model(jnp.zeros((1, 64, 64, 1)))
    with pytest.raises(ValueError, match="RGB"):
        extractor(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(TypeError, match="uint8 or float"):
        extractor(np.zeros((1, 64, 64, 3), np.int32))
    assert extractor(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, 2048)


# --------------------------------------------------------------------------------------
# InceptionFeatures: batching, float input, sharding (reuse the compiled 2 x 64 x 64 program)
# --------------------------------------------------------------------------------------


def test_float_input_and_batching(extractor, images, jax_features):
    # float [0, 255] input gives the same features as uint8
    np.testing.assert_allclose(extractor(images.astype(np.float32)), jax_features, rtol=1e-5, atol=1e-6)
    # 5 images in batches of 2 (last one padded) == per-pair results
    five = np.concatenate([images, images[::-1], images[:1]])
    feats = extractor(five)
    assert feats.shape == (5, 2048) and feats.dtype == np.float32
    np.testing.assert_allclose(feats[:2], jax_features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats[2:4], jax_features[::-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats[4], jax_features[0], rtol=1e-5, atol=1e-6)


def test_sharded_matches_unsharded(model, images, jax_features):
    n_dev = len(jax.local_devices())
    assert n_dev >= 2, "conftest.py should give the CPU backend several devices"
    ex = InceptionFeatures(model, batch_size=3, shard=True)
    assert ex.batch_size == n_dev * int(np.ceil(3 / n_dev))  # rounded up to the device count
    x = np.concatenate([images] * 3)[:5]  # 5 images -> one padded batch over all devices
    feats = ex(x)
    assert feats.shape == (5, 2048)
    np.testing.assert_allclose(feats[:2], jax_features, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats[2:4], jax_features, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Statistics and Fréchet distance (numpy / scipy only)
# --------------------------------------------------------------------------------------


def _features(n=600, d=32, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ a + rng.standard_normal(d)


def test_compute_statistics():
    f = _features()
    mu, sigma = compute_statistics(f.astype(np.float32))
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (32, 32)
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-6)
    centred = f - f.mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(f) - 1), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="at least 2"):
        compute_statistics(f[:1])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        compute_statistics(f[0])
    with pytest.raises(ValueError, match="NaN"):
        compute_statistics(np.full((3, 2), np.nan))


def test_fid_self_is_zero():
    mu, sigma = compute_statistics(_features())
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_mean_shift_closed_form():
    f = _features()
    delta = np.random.default_rng(5).standard_normal(f.shape[1])
    mu1, s1 = compute_statistics(f)
    mu2, s2 = compute_statistics(f + delta)  # same covariance
    np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), delta @ delta, rtol=1e-6, atol=1e-6)


def test_fid_symmetric_and_positive():
    mu1, s1 = compute_statistics(_features(seed=1))
    mu2, s2 = compute_statistics(_features(seed=2))
    d12, d21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert d12 > 0.1
    np.testing.assert_allclose(d12, d21, rtol=1e-8)


def test_fid_diagonal_closed_form():
    rng = np.random.default_rng(3)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected, rtol=1e-10)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for N(m, s^2)
    np.testing.assert_allclose(frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]), 4.0 + 1.0, rtol=1e-12)


def test_fid_singular_fallback(monkeypatch):
    """A non-finite sqrtm triggers the eps-offset retry on both diagonals (pytorch-fid behaviour)."""
    import scipy.linalg

    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def fake_sqrtm(m):
        calls.append(np.array(m))
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(scipy.linalg, "sqrtm", fake_sqrtm)
    s1 = np.diag([1.0, 0.0])  # singular covariances
    s2 = np.diag([0.0, 4.0])
    eps = 1e-3
    got = frechet_distance([0.0, 0.0], s1, [0.0, 0.0], s2, eps=eps)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + eps * np.eye(2)) @ (s2 + eps * np.eye(2)))
    expected = 1.0 + 4.0 - 2.0 * (np.sqrt((1 + eps) * eps) + np.sqrt(eps * (4 + eps)))
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_fid_imaginary_component(monkeypatch):
    import scipy.linalg

    s = np.eye(2)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: np.eye(2) + 1e-5j * np.eye(2))
    assert frechet_distance([0, 0], s, [0, 0], s) == pytest.approx(0.0, abs=1e-9)  # tiny imag: real part used
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: np.eye(2) + 0.1j * np.eye(2))
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance([0, 0], s, [0, 0], s)


def test_fid_bad_shapes():
    with pytest.raises(ValueError, match="sigma must be"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------------------
# Reference statistics files
# --------------------------------------------------------------------------------------


def test_reference_npz_round_trip(tmp_path):
    mu, sigma = compute_statistics(_features())
    path = save_statistics(tmp_path / "ref", mu, sigma)
    assert path.name == "ref.npz" and path.is_file()
    mu2, sigma2 = load_reference_statistics(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_statistics(path, mu, sigma)
    save_statistics(path, mu + 1, sigma, overwrite=True)
    np.testing.assert_array_equal(load_reference_statistics(path)[0], mu + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]  # no temp files left behind
    with pytest.raises(ValueError, match="sigma must be"):
        save_statistics(tmp_path / "bad.npz", mu, sigma[:3])


def test_reference_adm_style_npz(tmp_path):
    """ADM reference batches also hold the images (arr_0) and spatial stats; only mu/sigma are read."""
    mu, sigma = np.arange(3.0), np.eye(3)
    np.savez(tmp_path / "VIRTUAL_x.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu.astype(np.float32),
             sigma=sigma, mu_s=np.zeros(2), sigma_s=np.eye(2))
    mu2, sigma2 = load_reference_statistics(tmp_path / "VIRTUAL_x.npz")
    assert mu2.dtype == np.float64
    np.testing.assert_array_equal(mu2, mu)
    np.savez(tmp_path / "nomu.npz", arr_0=np.zeros(3))
    with pytest.raises(KeyError, match=r"'mu' and 'sigma'.*arr_0"):
        load_reference_statistics(tmp_path / "nomu.npz")
    with pytest.raises(FileNotFoundError):
        load_reference_statistics(tmp_path / "none.npz")
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(ValueError, match="unsupported suffix"):
        load_reference_statistics(tmp_path / "x.txt")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reference_edm_style_pkl(tmp_path, protocol):
    mu, sigma = np.linspace(0, 1, 4), np.diag(np.arange(1.0, 5.0))
    with open(tmp_path / "ref.pkl", "wb") as f:
        pickle.dump({"mu": mu, "sigma": sigma}, f, protocol=protocol)
    mu2, sigma2 = load_reference_statistics(tmp_path / "ref.pkl")
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_reference_pkl_refuses_code(tmp_path):
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"mu": _Evil(), "sigma": np.eye(2)}, f)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle global (posix|os|nt)\.system"):
        load_reference_statistics(tmp_path / "evil.pkl")
    with open(tmp_path / "list.pkl", "wb") as f:
        pickle.dump([np.zeros(2)], f)
    with pytest.raises(KeyError, match="expected a dict"):
        load_reference_statistics(tmp_path / "list.pkl")
    with open(tmp_path / "obj.pkl", "wb") as f:
        pickle.dump({"mu": "abc", "sigma": np.eye(2)}, f)
    with pytest.raises(ValueError, match="numeric numpy array"):
        load_reference_statistics(tmp_path / "obj.pkl")


def _edm2_reference_pickle(path, mu, sigma, num_images=50000):
    """A reference file written as EDM2 writes ``img256.pkl``/``img512.pkl`` (NVlabs/edm2,
    calculate_metrics.py: ``calculate_stats_for_iterable`` builds
    ``dict(num_images=N, fid=dict(mu=..., sigma=...), fd_dinov2=dict(mu=..., sigma=...))`` from
    float64 tensors via ``.cpu().numpy()`` and ``save_stats`` calls ``pickle.dump(stats, f)``)."""
    stats = dict(num_images=num_images, fid=dict(mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64)),
                 fd_dinov2=dict(mu=np.zeros(16), sigma=np.eye(16)))
    with open(path, "wb") as f:
        pickle.dump(stats, f)
    return path


def test_reference_edm2_pickle(tmp_path):
    mu, sigma = compute_statistics(_features())
    mu2, sigma2 = load_reference_statistics(_edm2_reference_pickle(tmp_path / "img256.pkl", mu, sigma))
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)


@pytest.mark.torch
def test_reference_edm2_pickle_from_torch_statistics(tmp_path):
    """The statistics computed as EDM2's calculate_stats_for_iterable does, in torch float64."""
    torch = pytest.importorskip("torch")
    features = torch.as_tensor(_features(), dtype=torch.float64)
    n = features.shape[0]
    mu = features.sum(0) / n
    sigma = (features.T @ features - mu.ger(mu) * n) / (n - 1)
    stats = dict(num_images=n, fid=dict(mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy()))
    with open(tmp_path / "img512.pkl", "wb") as f:
        pickle.dump(stats, f)
    mu2, sigma2 = load_reference_statistics(tmp_path / "img512.pkl")
    np.testing.assert_allclose(mu2, compute_statistics(_features())[0], rtol=1e-12)
    np.testing.assert_allclose(sigma2, compute_statistics(_features())[1], rtol=1e-9, atol=1e-12)


def _as_numpy1(data: bytes, protocol: int) -> bytes:
    """The same pickle as numpy 1.x writes it: module ``numpy.core.multiarray`` instead of numpy
    2's ``numpy._core.multiarray`` (protocol 2: GLOBAL text lines; protocol 4: a length-prefixed
    SHORT_BINUNICODE inside one FRAME whose length shrinks accordingly)."""
    if protocol == 2:
        return data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    old, new = b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray"
    count = data.count(old)
    assert count and data[2:3] == b"\x95"  # FRAME opcode right after PROTO
    (frame,) = struct.unpack("<Q", data[3:11])
    return data[:3] + struct.pack("<Q", frame - count) + data[11:].replace(old, new)


@pytest.mark.parametrize("protocol", [2, 4])
def test_reference_pickle_written_by_numpy1(tmp_path, protocol):
    mu, sigma = np.linspace(0, 1, 4), np.diag(np.arange(1.0, 5.0))
    data = pickle.dumps(dict(num_images=7, fid=dict(mu=mu, sigma=sigma)), protocol=protocol)
    numpy1 = _as_numpy1(data, protocol)
    assert b"numpy.core.multiarray" in numpy1 and b"numpy._core" not in numpy1
    (tmp_path / "np1.pkl").write_bytes(numpy1)
    mu2, sigma2 = load_reference_statistics(tmp_path / "np1.pkl")
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)


class _Reduce:
    def __init__(self, *reduced):
        self.reduced = reduced

    def __reduce__(self):
        return self.reduced


def test_malicious_reference_pickles_execute_and_allocate_nothing(tmp_path):
    from tvm_jax.evaluation.fid import UnsafePickleError, _numpy_core

    marker = tmp_path / "pwned"
    cases = {
        "system call inside EDM2's fd_dinov2": dict(num_images=1, fid=dict(mu=np.zeros(2), sigma=np.eye(2)),
                                                    fd_dinov2=_Reduce(os.system, (f"touch {marker}",))),
        "eval": dict(mu=_Reduce(eval, (f"open({str(marker)!r}, 'w')",)), sigma=np.eye(2)),
        "ndarray of 2^40 elements": dict(mu=_Reduce(np.ndarray, ((1 << 40,),)), sigma=np.eye(2)),
        "_reconstruct of 2^40 elements": dict(mu=_Reduce(_numpy_core().multiarray._reconstruct,
                                                         (np.ndarray, (1 << 40,), b"b")), sigma=np.eye(2)),
        "_codecs.encode with another codec": dict(mu=_Reduce(codecs.encode, (b"x", "zlib_codec")), sigma=np.eye(2)),
    }
    for name, obj in cases.items():
        path = tmp_path / "evil.pkl"
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
        with pytest.raises(UnsafePickleError, match=rf"^{path}: refusing"):
            load_reference_statistics(path)
        assert not marker.exists(), name
    path.write_bytes(b"\x80\x04garbage that is not a pickle")
    with pytest.raises(ValueError, match=rf"^{path}: not a readable statistics pickle"):
        load_reference_statistics(path)


# --------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------


def _write_images(folder, arrays, names):
    folder.mkdir(parents=True, exist_ok=True)
    for a, name in zip(arrays, names):
        Image.fromarray(a).save(folder / name)


def _mean_colour(imgs):
    """A cheap stand-in extractor: per-image mean colour and a few raw pixels."""
    assert imgs.dtype == np.uint8 and imgs.ndim == 4
    return np.concatenate([imgs.mean(axis=(1, 2)), imgs[:, 0, 0].astype(np.float64)], axis=1)


def test_features_from_folder_reads_sorted_images(tmp_path):
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    names = ["b.png", "a.PNG", "e.png", "c.png", "d.png"]
    _write_images(tmp_path / "imgs", arrays, names)
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    Image.fromarray(arrays[0][..., 0]).save(tmp_path / "imgs" / "f_gray.png")  # grayscale -> RGB
    order = np.argsort(names)
    feats = features_from_folder(tmp_path / "imgs", _mean_colour, batch_size=2, log_every=1)
    gray = np.repeat(arrays[0][..., :1], 3, axis=-1)
    np.testing.assert_allclose(feats, _mean_colour(np.concatenate([arrays[order], gray[None]])))
    mu, sigma = statistics_from_folder(tmp_path / "imgs", _mean_colour, batch_size=4)
    mu2, sigma2 = compute_statistics(feats)
    np.testing.assert_allclose(mu, mu2)
    np.testing.assert_allclose(sigma, sigma2)
    assert features_from_folder(tmp_path / "imgs", _mean_colour, max_images=3).shape == (3, 6)


def test_folder_jpeg_and_recursive(tmp_path):
    arr = np.full((8, 8, 3), 200, np.uint8)
    _write_images(tmp_path / "f", [arr], ["x.jpg"])
    _write_images(tmp_path / "f" / "sub", [arr, arr], ["y.jpeg", "z.png"])
    assert features_from_folder(tmp_path / "f", _mean_colour).shape == (1, 6)
    feats = features_from_folder(tmp_path / "f", _mean_colour, recursive=True)
    assert feats.shape == (3, 6)
    np.testing.assert_allclose(feats[:, :3], 200, atol=2)  # JPEG is lossy


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        statistics_from_folder(tmp_path / "missing", _mean_colour)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="no PNG/JPG/JPEG images"):
        statistics_from_folder(tmp_path / "empty", _mean_colour)
    _write_images(tmp_path / "bad", [np.zeros((8, 8, 3), np.uint8)], ["a.png"])
    (tmp_path / "bad" / "b.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"cannot read image .*b\.png"):
        statistics_from_folder(tmp_path / "bad", _mean_colour)
    _write_images(tmp_path / "sizes", [np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], ["a.png", "b.png"])
    with pytest.raises(ValueError, match=r"b\.png has size \(9, 8\)"):
        statistics_from_folder(tmp_path / "sizes", _mean_colour)


def test_folder_with_inception_extractor(tmp_path, extractor, images, jax_features):
    """End to end through the real extractor (2 x 64 x 64 uint8 batches: no recompilation)."""
    _write_images(tmp_path / "imgs", list(images) * 2, ["0.png", "1.png", "2.png", "3.png"])
    feats = features_from_folder(tmp_path / "imgs", extractor, batch_size=2)
    np.testing.assert_allclose(feats, np.concatenate([jax_features, jax_features]), rtol=1e-5, atol=1e-6)
    mu, sigma = statistics_from_folder(tmp_path / "imgs", extractor, batch_size=2)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    mu2, sigma2 = compute_statistics(feats)
    np.testing.assert_allclose(mu, mu2, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, sigma2, rtol=1e-6, atol=1e-9)

"""Tests for tvm_jax.vae (Flax NNX port of diffusers' AutoencoderKL).

The parity test (marked ``torch``) builds a small diffusers ``AutoencoderKL`` with random
weights, saves it with ``save_pretrained(safe_serialization=True)`` and checks that
``load_vae`` reproduces ``encode`` (posterior mean/std) and ``decode``. It needs
``torch`` and ``diffusers``; everything else runs on numpy-written safetensors files.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tvm_jax import vae as vae_lib
from weight_fixtures import random_vae_state_dict, vae_keys_shapes, write_vae_folder
from tvm_jax.vae import (
    AutoencoderKL,
    VAEConfig,
    decode_batched,
    encode_batched,
    export_diffusers_state_dict,
    load_vae,
    to_uint8,
)

SMALL_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}


def _expected_keys_shapes(config=SMALL_CONFIG) -> dict[str, tuple]:
    return vae_keys_shapes(config)


def _write_folder(path, state_dict, config=SMALL_CONFIG):
    return write_vae_folder(path, state_dict, config)


@pytest.fixture(scope="module")
def small_state_dict():
    return random_vae_state_dict(_expected_keys_shapes(), seed=0)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, small_state_dict):
    return _write_folder(tmp_path_factory.mktemp("vae") / "small", small_state_dict)


@pytest.fixture(scope="module")
def small_vae(small_folder):
    return load_vae(small_folder)


def _images(n=2, size=32, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# ------------------------------------------------------------------------------------------
# Parity with diffusers (needs torch + diffusers)
# ------------------------------------------------------------------------------------------


@pytest.mark.torch
def test_parity_with_diffusers(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")

    torch.manual_seed(0)
    kwargs = {k: v for k, v in SMALL_CONFIG.items() if not k.startswith("_")}
    ref = diffusers.AutoencoderKL(**kwargs).eval()
    # Randomise every parameter, norms' affine included (default init has scale 1 / bias 0).
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    saved = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert set(saved) == set(_expected_keys_shapes(json.loads((tmp_path / "config.json").read_text())))

    vae = load_vae(tmp_path)
    assert vae.config.block_out_channels == (32, 64)

    x = _images(2, 32)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
        ref_mean = post.mean.permute(0, 2, 3, 1).numpy()
        ref_std = post.std.permute(0, 2, 3, 1).numpy()
        z = np.random.default_rng(2).standard_normal((2, 16, 16, 4)).astype(np.float32)
        ref_dec = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()

    mean, std = vae.encode(jnp.asarray(x))
    dec = vae.decode(jnp.asarray(z))
    assert mean.shape == std.shape == (2, 16, 16, 4)
    assert dec.shape == (2, 32, 32, 3)
    assert _rel_err(mean, ref_mean) < 2e-5, _rel_err(mean, ref_mean)
    assert _rel_err(std, ref_std) < 2e-5, _rel_err(std, ref_std)
    assert _rel_err(dec, ref_dec) < 2e-5, _rel_err(dec, ref_dec)
    # The clamp/exp really ran: std is not trivially 1 and differs across positions.
    assert np.std(np.asarray(std)) > 1e-3


# ------------------------------------------------------------------------------------------
# Loading (numpy-written safetensors; no torch)
# ------------------------------------------------------------------------------------------


def test_export_load_round_trip(tmp_path, small_state_dict, small_vae):
    exported = export_diffusers_state_dict(small_vae)
    assert set(exported) == set(small_state_dict)
    for k, v in small_state_dict.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    # Every parameter is float32 and concrete after loading from an abstract model.
    for _, leaf in nnx.to_flat_state(nnx.state(small_vae, nnx.Param)):
        assert isinstance(leaf[...], jax.Array) and leaf[...].dtype == jnp.float32


def test_random_init_matches_reloaded(tmp_path):
    model = AutoencoderKL.from_config(SMALL_CONFIG, nnx.Rngs(3))
    folder = _write_folder(tmp_path / "m", export_diffusers_state_dict(model))
    loaded = load_vae(folder)
    x = jnp.asarray(_images(1, 16))
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(loaded(x)))


def test_legacy_attention_keys_and_conv_shapes(tmp_path, small_state_dict, small_vae):
    legacy = {}
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    n_renamed = 0
    for k, v in small_state_dict.items():
        nk = k
        for new, old in names.items():
            if f".attentions.0.{new}." in k:
                nk = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
                if v.ndim == 2:  # old checkpoints store the projections as 1x1 convs
                    v = v[:, :, None, None]
                n_renamed += 1
        legacy[nk] = v
    assert n_renamed == 16  # 4 projections x (weight, bias) x (encoder, decoder)
    folder = _write_folder(tmp_path / "legacy", legacy)
    vae = load_vae(folder)
    x = jnp.asarray(_images(1, 32))
    np.testing.assert_array_equal(np.asarray(vae.encode(x)[0]), np.asarray(small_vae.encode(x)[0]))


def test_missing_key_is_named(tmp_path, small_state_dict):
    sd = dict(small_state_dict)
    del sd["decoder.mid_block.attentions.0.to_k.bias"]
    del sd["encoder.conv_in.weight"]
    with pytest.raises(KeyError) as e:
        load_vae(_write_folder(tmp_path / "m", sd))
    msg = str(e.value)
    assert "missing keys (2)" in msg
    assert "decoder.mid_block.attentions.0.to_k.bias" in msg and "encoder.conv_in.weight" in msg


def test_unexpected_key_is_named(tmp_path, small_state_dict):
    sd = dict(small_state_dict)
    sd["encoder.extra_block.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(KeyError, match=r"unexpected keys \(1\): encoder\.extra_block\.weight"):
        load_vae(_write_folder(tmp_path / "m", sd))


def test_shape_mismatch_is_named(tmp_path, small_state_dict):
    sd = dict(small_state_dict)
    sd["decoder.conv_out.weight"] = np.zeros((3, 32, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"decoder\.conv_out\.weight: expected \(3, 32, 3, 3\), got \(3, 32, 5, 5\)"):
        load_vae(_write_folder(tmp_path / "m", sd))


def test_config_weight_mismatch(tmp_path, small_state_dict):
    cfg = dict(SMALL_CONFIG, layers_per_block=2)  # the weights only have one resnet per block
    with pytest.raises(KeyError, match=r"encoder\.down_blocks\.0\.resnets\.1\.conv1\.weight"):
        load_vae(_write_folder(tmp_path / "m", small_state_dict, cfg))


def test_missing_files(tmp_path, small_state_dict):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_vae(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps(SMALL_CONFIG))
    save_file(small_state_dict, str(tmp_path / "a" / "diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors.*found: diffusion_pytorch_model\.fp16"):
        load_vae(tmp_path / "a")


@pytest.mark.parametrize(
    "override, match",
    [
        ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types"),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"_class_name": "AutoencoderTiny"}, "AutoencoderKL"),
        ({"norm_num_groups": 24}, "not divisible"),
    ],
)
def test_bad_config(override, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig.from_dict(dict(SMALL_CONFIG, **override))


def test_sd_config_shapes():
    """The real SD VAE config (sd-vae-ft-ema/mse) builds the expected tree (abstractly, no init cost)."""
    sd_cfg = {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 256,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    model = nnx.eval_shape(lambda: AutoencoderKL.from_config(sd_cfg, nnx.Rngs(0)))
    table = vae_lib._module_param_table(model)
    assert sum(int(np.prod(s)) for _, s, _ in table.values()) == 83_653_863  # diffusers' parameter count
    assert table["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"][1] == (128, 256, 1, 1)
    assert table["encoder.conv_out.weight"][1] == (8, 512, 3, 3)
    assert "encoder.down_blocks.3.downsamplers.0.conv.weight" not in table
    assert "decoder.up_blocks.3.upsamplers.0.conv.weight" not in table
    assert "decoder.up_blocks.2.resnets.2.conv2.weight" in table  # layers_per_block + 1 resnets
    mean, std = jax.eval_shape(lambda m, x: m.encode(x), model, jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
    assert mean.shape == std.shape == (1, 32, 32, 4)


# ------------------------------------------------------------------------------------------
# Forward behaviour
# ------------------------------------------------------------------------------------------


def test_input_validation(small_vae):
    with pytest.raises(ValueError, match="3 channels"):
        small_vae.encode(jnp.zeros((1, 32, 32, 4)))
    with pytest.raises(ValueError, match="multiples of 2"):
        small_vae.encode(jnp.zeros((1, 31, 32, 3)))
    with pytest.raises(ValueError, match="4 channels"):
        small_vae.decode(jnp.zeros((1, 8, 8, 3)))


def test_posterior_logvar_clamp(small_folder, small_state_dict):
    """Huge quant_conv bias on the logvar half -> std = exp(0.5 * 20) exactly (upper clamp)."""
    sd = dict(small_state_dict)
    b = sd["quant_conv.bias"].copy()
    b[4:] = 1e4
    sd["quant_conv.bias"] = b
    vae = load_vae(_write_folder(small_folder.parent / "clamped", sd))
    _, std = vae.encode(jnp.asarray(_images(1, 32)))
    np.testing.assert_allclose(np.asarray(std), np.exp(10.0), rtol=1e-6)


def test_batched_helpers_match_direct(small_vae):
    x = _images(5, 32, seed=4)
    mean, std = small_vae.encode(jnp.asarray(x))
    bmean, bstd = encode_batched(small_vae, x, batch_size=2)  # 2 + 2 + padded 1
    assert isinstance(bmean, np.ndarray) and bmean.shape == (5, 16, 16, 4)
    np.testing.assert_allclose(bmean, np.asarray(mean), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bstd, np.asarray(std), rtol=1e-5, atol=1e-5)
    dec = decode_batched(small_vae, bmean, batch_size=3)
    np.testing.assert_allclose(dec, np.asarray(small_vae.decode(mean)), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="batch_size"):
        encode_batched(small_vae, x, batch_size=0)
    with pytest.raises(TypeError, match="floats"):
        encode_batched(small_vae, (x * 100).astype(np.uint8), batch_size=2)


def test_bf16_compute_close(small_folder, small_vae):
    vae16 = load_vae(small_folder, dtype=jnp.bfloat16)
    for _, leaf in nnx.to_flat_state(nnx.state(vae16, nnx.Param)):
        assert leaf[...].dtype == jnp.float32  # params stay fp32
    x = jnp.asarray(_images(2, 32, seed=5))
    m32, s32 = small_vae.encode(x)
    m16, s16 = vae16.encode(x)
    assert m16.dtype == jnp.float32 and s16.dtype == jnp.float32
    assert 0 < _rel_err(m16, m32) < 5e-2, _rel_err(m16, m32)  # > 0: bf16 compute really happened
    assert _rel_err(s16, s32) < 5e-2
    d32, d16 = small_vae.decode(m32), vae16.decode(m32)
    assert d16.dtype == jnp.float32 and d16.shape == d32.shape
    assert 0 < _rel_err(d16, d32) < 5e-2, _rel_err(d16, d32)
    bm16, _ = encode_batched(vae16, np.asarray(x), batch_size=2)
    assert _rel_err(bm16, m32) < 5e-2  # jitted bf16 path (XLA may fuse/round differently from eager)


def test_to_uint8():
    x = np.array([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0], np.float32)
    expected = np.array([0, 0, 0, 128, 191, 255, 255], np.uint8)  # round((x+1)*127.5): 127.5 -> 128
    out = to_uint8(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    jout = to_uint8(jnp.asarray(x))
    assert isinstance(jout, jax.Array) and jout.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(jout), expected)

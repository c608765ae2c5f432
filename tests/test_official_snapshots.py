"""Official checkpoints written by the official code's own mechanisms (tests/official_fixtures.py)
convert with no flags, carry their recipe into the export, and sample without a --config; the
Hugging Face paths work offline against a cache laid out in huggingface_hub's own layout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("omegaconf")

import official_fixtures as of  # noqa: E402
from test_convert import _apply, _cli, _cli_error, _inputs, _pure, torch_reference_forward  # noqa: E402

from tvm_jax import generate  # noqa: E402
from tvm_jax.weights import torch_io  # noqa: E402
from tvm_jax.dit import DiTConfig  # noqa: E402
from tvm_jax.weights.model_io import load_model, read_config  # noqa: E402

pytestmark = pytest.mark.torch
REPO = Path(__file__).resolve().parents[1]
CFG = DiTConfig.create(None, **of.DIMS, dtype="float32", attention_impl="xla")
BLOCKED = ("torch", "timm", "torch_utils", "training", "dnnlib", "omegaconf")


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """{name: (path, DiT state dict)}: a plain snapshot, a torch.compile'd one with
    do_scale_param=False, and a training state."""
    base = tmp_path_factory.mktemp("official")
    out = {}
    out["snapshot"] = base / "network-snapshot-000500.pkl"
    sd = of.write_snapshot(out["snapshot"], base / "src1", seed=1)
    out["unscaled"] = base / "network-snapshot-unscaled.pkl"
    sd_unscaled = of.write_snapshot(out["unscaled"], base / "src2", seed=2, do_scale_param=False, compile=True)
    out["state"] = base / "training-state-000500.pt"
    states = of.write_training_state(out["state"], base / "src3", seed=3, compile=True)
    return {"snapshot": (out["snapshot"], sd), "unscaled": (out["unscaled"], sd_unscaled),
            "state": (out["state"], states)}


def _reference(sd, config=CFG):
    x, t, gap, label, beta = _inputs(config)
    onehot = np.zeros((len(label), config.num_classes), np.float32)
    for row, lab in enumerate(label):
        if lab < config.num_classes:
            onehot[row, lab] = 1.0
    ref = torch_reference_forward(sd, x_nchw=np.ascontiguousarray(x.transpose(0, 3, 1, 2)), t=t, gap=gap,
                                  onehot=onehot, beta=beta, num_heads=config.num_heads)
    return ref.transpose(0, 2, 3, 1)


def _ours(out):
    import jax.numpy as jnp

    config, params = load_model(str(out), dtype="float32", attention_impl="xla")
    assert config == CFG
    return np.asarray(_apply(config)(_pure(params), *map(jnp.asarray, _inputs(config))))


def test_snapshot_converts_without_flags_and_matches_torch(snapshots, tmp_path, monkeypatch, capsys):
    path, sd = snapshots["snapshot"]
    raw = path.read_bytes()
    # What the official mechanisms wrote: persistent objects, the non-persistent Attention and timm
    # layers by reference, the OmegaConf model_kwargs; the blocks' source travels as text.
    for name in (b"_reconstruct_persistent_obj", b"training.dit", b"Attention", b"timm.layers.mlp",
                 b"timm.layers.patch_embed", b"omegaconf.dictconfig", b"do_scale_param", b"class DiTBlock"):
        assert name in raw, name
    marker = tmp_path / "module_src_ran"
    monkeypatch.setenv("TVM_FIXTURE_MARKER", str(marker))
    for blocked in BLOCKED:
        monkeypatch.setitem(sys.modules, blocked, None)  # any import of these would fail
    assert _cli(path, tmp_path / "out") == 0
    monkeypatch.undo()
    printed = capsys.readouterr()
    assert "warning" not in printed.err
    assert not marker.exists()
    _, meta = read_config(str(tmp_path / "out"))
    assert meta["source_format"] == "official-pickle" and meta["weights"] == "net"
    assert meta["scaled_param"] is True and meta["assumed"] == {} and meta["overridden"] == {}
    recipe = meta["recipe"]
    assert (recipe["do_scale_param"], recipe["do_mod_norm"], recipe["qk_norm"], recipe["norm"]) == (True, True, True,
                                                                                                    "rms")
    assert (recipe["model_type"], recipe["img_resolution"], recipe["label_dim"]) == ("DiT_T_2", 32, 10)
    assert recipe["model_kwargs"]["learn_guidance"] is True
    assert meta["dataset_kwargs"]["path"] == "imagenet-latents.zip"
    # 32x32x4 latents: the official 256px latent statistics and VAE are recorded for sampling.
    assert meta["raw_std"][0] == pytest.approx(4.85503674) and meta["vae_path"] == "hf://stabilityai/sd-vae-ft-ema"
    ref = _reference(sd)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(_ours(tmp_path / "out"), ref, rtol=0, atol=1e-5)


def test_unscaled_compiled_snapshot_samples_with_k_1(snapshots, tmp_path):
    import jax
    import jax.numpy as jnp

    from tvm_jax.sampling import make_sampler

    path, sd = snapshots["unscaled"]
    assert b"torch._dynamo.eval_frame" in path.read_bytes()  # torch.compile'd, as configs/im*.yaml train
    assert _cli(path, tmp_path / "out") == 0
    _, meta = read_config(str(tmp_path / "out"))
    assert meta["scaled_param"] is False and meta["recipe"]["do_scale_param"] is False
    np.testing.assert_allclose(_ours(tmp_path / "out"), _reference(sd), rtol=0, atol=1e-5)
    model = generate.load_for_sampling(None, checkpoint=str(tmp_path / "out"), workdir=None, attention_impl="xla")
    assert model.scaled is False
    labels = np.array([1, 10], np.int32)
    got = generate.sample(model, steps=[1], w=2.0, labels=labels, seed=0)[1]
    noise = np.asarray(jax.random.normal(jax.random.key(0), (2, *model.sample_shape)))
    unscaled, scaled = (np.asarray(make_sampler(model.apply, steps=1, w=2.0, null_label=10, scaled=k)(
        model.params, jnp.asarray(noise), jnp.asarray(labels))) for k in (False, True))
    np.testing.assert_allclose(got, unscaled, rtol=1e-6, atol=1e-6)
    assert np.abs(got - scaled).max() > 1e-3  # k = w would give another result


def test_contradicting_flag_is_reported_with_the_files_value(snapshots, tmp_path, capsys):
    path, _ = snapshots["snapshot"]
    assert _cli(path, tmp_path / "out", "--noscaled_param", "--num_heads=4") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: --scaled_param=False contradicts the checkpoint (TVMWrapper.do_scale_param = True); "
                   "using the flag"]
    _, meta = read_config(str(tmp_path / "out"))
    assert meta["scaled_param"] is False and meta["overridden"] == {"scaled_param": {"flag": False, "file": True}}


def test_training_state_picks_ema(snapshots, tmp_path):
    path, states = snapshots["state"]
    assert _cli(path, tmp_path / "ema") == 0
    _, meta = read_config(str(tmp_path / "ema"))
    assert meta["weights"] == "ema" and meta["source_format"] == "official-torch-zip"
    assert meta["networks"] == ["ema", "ema_target", "net"] and meta["scaled_param"] is True
    np.testing.assert_allclose(_ours(tmp_path / "ema"), _reference(states["ema"]), rtol=0, atol=1e-5)
    assert _cli(path, tmp_path / "net", "--weights=net") == 0
    np.testing.assert_allclose(_ours(tmp_path / "net"), _reference(states["net"]), rtol=0, atol=1e-5)
    assert not np.allclose(states["net"]["blocks.0.attn.qkv.weight"], states["ema"]["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod.model."])
def test_prefixed_state_dicts(snapshots, tmp_path, prefix):
    import torch

    _, sd = snapshots["snapshot"]
    src = tmp_path / "sd.pt"
    # torch.compile's state_dict() keys carry _orig_mod., DDP's module.
    torch.save({"ema": {prefix + k: torch.from_numpy(v) for k, v in sd.items()}}, src)
    assert _cli(src, tmp_path / "out", "--scaled_param") == 0
    _, meta = read_config(str(tmp_path / "out"))
    assert meta["prefix"] == "ema." + prefix
    np.testing.assert_allclose(_ours(tmp_path / "out"), _reference(sd), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- malicious variants


def _stream(*ops: bytes) -> bytes:
    return b"\x80\x02" + b"".join(ops) + b"."


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _text(s: str) -> bytes:
    return b"X" + len(s).to_bytes(4, "little") + s.encode()


@pytest.mark.parametrize("payload,message", [
    # allow-listed module classes cannot be called with arguments
    (_stream(_global("training.dit", "Attention"), _text("x"), b"\x85R"), "training.dit.Attention: refusing"),
    (_stream(_global("timm.layers.mlp", "Mlp"), _text("x"), b"\x85R"), "timm.layers.mlp.Mlp: refusing"),
    # OptimizedModule wraps module stand-ins only
    (_stream(_global("torch._dynamo.eval_frame", "OptimizedModule"), _text("x"), b"N\x86R"),
     "OptimizedModule expects a module stand-in"),
    # getattr only on compiler-context stand-ins
    (_stream(_global("builtins", "getattr"), _global("training.dit", "Attention"), _text("__init__"), b"\x86R"),
     "refusing to call builtins.getattr"),
    # a BUILD aimed at an allow-listed class or object
    (_stream(_global("training.dit", "Attention"), b"}", b"b"), "refusing a pickle BUILD on an allow-listed class"),
    (_stream(_global("torch", "FloatStorage"), b"}", _text("dtype"), _text("x"), b"sb"),
     "refusing a pickle BUILD on the allow-listed object torch.FloatStorage"),
    # anything else
    (_stream(_global("os", "system"), _text("touch pwned"), b"\x85R"), "refusing to load global 'os.system'"),
    (_stream(_global("training.dit", "os"), b"."), "refusing to load global 'training.dit.os'"),
    (_stream(_global("omegaconf", "OmegaConf"), b"."), None),  # opaque: inert, holds no network
])
def test_malicious_variants_refused(tmp_path, capsys, payload, message):
    src = tmp_path / "evil.pkl"
    src.write_bytes(payload)
    line = _cli_error(capsys, src, tmp_path / "out")
    assert message is None or message in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


def test_allow_listed_objects_survive_a_malicious_file(snapshots, tmp_path):
    path, sd = snapshots["snapshot"]
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(_stream(_global("torch", "FloatStorage"), b"}", _text("dtype"), _text("x"), b"sb"))
    with pytest.raises(torch_io.UnsafePickleError):
        torch_io.read_official_pickle(str(evil))
    evil.write_bytes(_stream(_global("torch._utils", "_rebuild_tensor_v2"), b"N}", _text("__defaults__"), b")",
                             b"s\x86b"))
    with pytest.raises(torch_io.UnsafePickleError, match="refusing"):
        torch_io.read_official_pickle(str(evil))
    got = torch_io.load_official_pickle(str(path))
    assert all(np.array_equal(got[k], sd[k]) for k in sd)


# ----------------------------------------------------------------------------- Hugging Face Hub, offline


@pytest.fixture(scope="module")
def hub_cache(snapshots, tmp_path_factory):
    """A Hugging Face cache holding lumaai/tvm's im256_w2.pkl (our tiny snapshot) and a tiny
    stabilityai/sd-vae-ft-ema (config.json + diffusion_pytorch_model.safetensors)."""
    from weight_fixtures import write_vae_folder

    from tvm_jax.vae import CONFIG_NAME, WEIGHTS_NAME

    cache = tmp_path_factory.mktemp("hf") / "hub"
    of.hub_cache_file(cache, "lumaai/tvm", "im256_w2.pkl", snapshots["snapshot"][0].read_bytes())
    vae = write_vae_folder(tmp_path_factory.mktemp("vae") / "vae")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        of.hub_cache_file(cache, "stabilityai/sd-vae-ft-ema", name, (vae / name).read_bytes(), commit="b" * 40)
    return cache


def _offline_env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(cache.parent), HF_HUB_CACHE=str(cache), JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    return env


def test_convert_from_hub_offline_and_sample_without_config(hub_cache, snapshots, tmp_path):
    env = _offline_env(hub_cache)
    out = tmp_path / "im256_w2"
    run = subprocess.run([sys.executable, "-m", "tvm_jax.convert", "hf://lumaai/tvm/im256_w2.pkl", str(out)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    _, meta = read_config(str(out))
    assert meta["source"] == "hf://lumaai/tvm/im256_w2.pkl" and meta["source_file"].startswith(str(hub_cache))
    assert meta["w"] == 2.0 and meta["w_from"] == "the released file's name" and meta["scaled_param"] is True

    # An offline miss: one clear line, exit 2, nothing written.
    miss = subprocess.run([sys.executable, "-m", "tvm_jax.convert", "hf://lumaai/tvm/im512_w2p5.pkl",
                           str(tmp_path / "miss")], capture_output=True, text=True, env=env, timeout=300)
    assert miss.returncode == 2
    lines = miss.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf://lumaai/tvm/im512_w2p5.pkl: not in the local Hugging Face cache" in lines[0]
    assert "HF_HUB_OFFLINE=1" in lines[0] and not (tmp_path / "miss").exists()

    # --mode=sample needs no --config: resolution, latent statistics, w and the VAE (hf://, from the
    # cache) come from the export's metadata.
    sampled = tmp_path / "sampled"
    run = subprocess.run([sys.executable, "-m", "tvm_jax.main", "--mode=sample", f"--checkpoint={out}",
                          f"--out={sampled}", "--steps=1", "--num=2", "--classes=3"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    written = np.load(sampled / "samples_1step.npz")
    assert written["samples"].shape == (2, 32, 32, 4) and written["images"].shape == (2, 64, 64, 3)
    assert "w = 2" in run.stderr


def test_vae_from_hub_offline(hub_cache, monkeypatch):
    import huggingface_hub.constants

    from tvm_jax.weights import hub
    from tvm_jax.vae import vae_files

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    cfg, weights = vae_files("hf://stabilityai/sd-vae-ft-ema")
    assert str(cfg).startswith(str(hub_cache)) and json.loads(cfg.read_text())["latent_channels"] == 4
    with pytest.raises(hub.HubError, match="sd-vae-ft-mse: not in the local Hugging Face cache"):
        vae_files("hf://stabilityai/sd-vae-ft-mse")
    with pytest.raises(hub.HubError, match="not a Hugging Face path"):
        hub.parse_hub_path("hf://onlyorg")


def test_hub_without_huggingface_hub(monkeypatch):
    from tvm_jax.weights import hub

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(hub.HubError, match=r"need the huggingface_hub package: pip install -e \"\.\[hub\]\""):
        hub.download_file("hf://lumaai/tvm/im256_w2.pkl")


def test_fixture_cache_is_huggingface_hubs_layout(hub_cache):
    # The fixture cache is huggingface_hub's: its own scanner reads it.
    import huggingface_hub

    info = huggingface_hub.scan_cache_dir(hub_cache)
    repos = {r.repo_id: {f.file_name for rev in r.revisions for f in rev.files} for r in info.repos}
    assert repos["lumaai/tvm"] == {"im256_w2.pkl"}
    assert repos["stabilityai/sd-vae-ft-ema"] == {"config.json", "diffusion_pytorch_model.safetensors"}

"""tvm_jax.convert: official names -> our parameters, the CLI, and a numeric check against an
independent PyTorch implementation of the official forward pass (written from the spec in
tvm_jax/dit.py's docstring, not from our converter)."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tvm_jax import convert
from tvm_jax.weights import official as mapping
from tvm_jax.weights.official import ConversionError
from tvm_jax.dit import DiTConfig, abstract_dit, sincos_table_2d
from tvm_jax.weights.model_io import load_model, read_config
from tvm_jax.networks import network_fn, split_model

DIMS = dict(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
CFG = DiTConfig.create(None, **DIMS, dtype="float32", attention_impl="xla")
NAIVE = DiTConfig.create(None, lipschitz=False, **DIMS, dtype="float32", attention_impl="xla")
REPO = Path(__file__).resolve().parents[1]


def _pure(tree):
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def random_params(config: DiTConfig, seed: int) -> dict:
    """Every parameter random (the zero-initialised adaLN/final layers too), float32."""
    rng = np.random.default_rng(seed)
    abstract = _pure(split_model(abstract_dit(config))[1])
    return jax.tree.map(lambda x: (0.15 * rng.standard_normal(x.shape)).astype(np.float32), abstract)


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: np.asarray(tree)}


def _trees_equal(a, b) -> bool:
    fa, fb = _flat(_pure(a)), _flat(_pure(b))
    return sorted(fa) == sorted(fb) and all(np.array_equal(fa[k], fb[k]) for k in fa)


_APPLY: dict = {}


def _apply(config: DiTConfig):
    """One jitted forward per config: the abstract model's graphdef and the fixed position table
    (building a concrete DiT eagerly would take seconds on CPU)."""
    if config not in _APPLY:
        graphdef, _, abstract_buffers = split_model(abstract_dit(config))
        grid = config.input_size // config.patch_size
        buffers = {"pos_embed": jnp.asarray(sincos_table_2d(config.hidden_size, grid), jnp.float32)}
        assert jax.tree.structure(_pure(abstract_buffers)) == jax.tree.structure(buffers)
        _APPLY[config] = jax.jit(network_fn(graphdef, buffers))
    return _APPLY[config]


def _inputs(config: DiTConfig, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, config.input_size, config.input_size, config.in_channels)).astype(np.float32)
    t = np.array([0.9, 0.5, 0.25], np.float32)
    gap = np.array([0.4, 0.0, 0.25], np.float32)
    label = np.array([3, config.num_classes, 7], np.int32)  # the middle sample is the null label
    beta = np.array([0.5, 1.0, 0.8], np.float32)
    return x, t, gap, label, beta


def _run(params, config):
    return np.asarray(_apply(config)(params, *map(jnp.asarray, _inputs(config))))


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, 0)


@pytest.fixture(scope="module")
def official(params):
    return mapping.params_to_official(params, CFG)


def _save_safetensors(sd, path):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
    return str(path)


def _save_pt(obj, path):
    torch = pytest.importorskip("torch")

    def to_torch(x):
        if isinstance(x, dict):
            return {k: to_torch(v) for k, v in x.items()}
        return torch.from_numpy(np.array(x))

    torch.save(to_torch(obj), str(path))
    return str(path)


def _official_builder():
    spec = importlib.util.spec_from_file_location("_tvm_official_builder", Path(__file__).with_name("test_torch_io.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_official_pickle


def _builder_dims(config: DiTConfig) -> dict:
    return dict(hidden=config.hidden_size, depth=config.depth, heads=config.num_heads, classes=config.num_classes,
                channels=config.in_channels, input_size=config.input_size, patch=config.patch_size,
                mlp_ratio=config.mlp_ratio)


def _cli(*args) -> int:
    return convert.main(["tvm_jax.convert", *map(str, args)])


# ----------------------------------------------------------------------------- the mapping


def test_mapping_layouts_and_round_trip(params, official):
    assert set(official) == set(mapping.official_shapes(CFG))
    for k, shape in mapping.official_shapes(CFG).items():
        assert official[k].shape == shape, k
    # Layouts, checked element-wise against the documented conventions.
    kernel = params["blocks"]["attn"]["qkv"]["kernel"][1]  # (in, out)
    np.testing.assert_array_equal(official["blocks.1.attn.qkv.weight"], kernel.T)
    conv = params["x_embedder"]["proj"]["kernel"]  # HWIO
    w = official["x_embedder.proj.weight"]  # OIHW
    assert w[5, 3, 1, 0] == conv[1, 0, 3, 5] and w[17, 0, 0, 1] == conv[0, 1, 0, 17]
    np.testing.assert_array_equal(official["s_embedder.mlp.2.weight"], params["gap_embedder"]["linear2"]["kernel"].T)
    np.testing.assert_array_equal(official["guidance_embedder.mlp.0.bias"], params["beta_embedder"]["linear1"]["bias"])
    np.testing.assert_array_equal(official["y_embedder.embedding_table.weight"], params["label_embedder"]["embedding"])
    np.testing.assert_array_equal(official["blocks.0.attn.k_norm.weight"],
                                  params["blocks"]["attn"]["k_norm"]["weight"][0])
    np.testing.assert_array_equal(official["pos_embed"][0], sincos_table_2d(64, 4).astype(np.float32))

    back = mapping.official_to_params(official, CFG)
    assert _trees_equal(back, params)
    # Known prefixes are stripped (all keys carry them), also stacked ones.
    prefixed = {f"module.net.model._orig_mod.{k}": v for k, v in official.items()}
    assert _trees_equal(mapping.official_to_params(prefixed, CFG), params)


def test_infer_config(official):
    assert mapping.infer_config(official, dtype="float32") == CFG
    assert mapping.infer_config({f"_orig_mod.{k}": v for k, v in official.items()}, dtype="float32") == CFG

    no_pos = {k: v for k, v in official.items() if k != "pos_embed"}
    with pytest.raises(ConversionError, match="no pos_embed; pass --input_size"):
        mapping.infer_config(no_pos)
    assert mapping.infer_config(no_pos, input_size=8, dtype="float32") == CFG
    with pytest.raises(ConversionError, match="--input_size 16 contradicts pos_embed"):
        mapping.infer_config(official, input_size=16)
    with pytest.raises(ConversionError, match="--num_heads 8 contradicts blocks.0.attn.q_norm.weight"):
        mapping.infer_config(official, num_heads=8)

    naive_sd = mapping.params_to_official(random_params(NAIVE, 3), NAIVE)
    assert "blocks.0.attn.q_norm.weight" not in naive_sd
    with pytest.raises(ConversionError, match="no attn.q_norm weights .*pass --num_heads"):
        mapping.infer_config(naive_sd, naive=True)
    assert mapping.infer_config(naive_sd, naive=True, num_heads=4, dtype="float32") == NAIVE
    lip = mapping.infer_config(naive_sd, num_heads=4)
    assert (lip.mod_norm, lip.norm, lip.qk_norm) == (True, "rms", False)

    no_guidance = {k: v for k, v in official.items() if not k.startswith("guidance_embedder.")}
    assert mapping.infer_config(no_guidance).learn_guidance is False


def test_official_to_params_names_every_problem(official):
    sd = dict(official)
    del sd["blocks.1.mlp.fc2.bias"], sd["t_embedder.mlp.0.weight"]
    sd["blocks.0.attn.proj.weight"] = np.zeros((64, 63), np.float32)
    sd["blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as err:
        mapping.official_to_params(sd, CFG)
    msg = str(err.value)
    assert "missing 2 key(s): blocks.1.mlp.fc2.bias, t_embedder.mlp.0.weight" in msg
    assert "unexpected 1 key(s): blocks.0.attn.extra.weight" in msg
    assert "blocks.0.attn.proj.weight expected (64, 64) got (64, 63)" in msg

    bad = dict(official)
    bad["pos_embed"] = bad["pos_embed"] + 1e-3
    with pytest.raises(ConversionError, match="pos_embed differs from the fixed 2-D sin-cos table"):
        mapping.official_to_params(bad, CFG)
    bad = dict(official)
    bad["final_layer.linear.bias"] = np.full(16, np.nan, np.float32)
    with pytest.raises(ConversionError, match="non-finite values in: final_layer.linear.bias"):
        mapping.official_to_params(bad, CFG)
    bad = dict(official)
    bad["final_layer.linear.bias"] = np.zeros(16, np.int64)
    with pytest.raises(ConversionError, match=r"not floating point: final_layer.linear.bias \(int64\)"):
        mapping.official_to_params(bad, CFG)
    with pytest.raises(ConversionError, match="parameters do not match"):
        mapping.params_to_official({"blocks": {}}, CFG)


# ----------------------------------------------------------------------------- CLI: formats and outputs


def _check_export(out, params, *, weights=None, fmt=None):
    config, loaded = load_model(str(out), dtype="float32", attention_impl="xla")
    assert config == CFG
    assert _trees_equal(loaded, params)
    np.testing.assert_allclose(_run(_pure(loaded), CFG), _run(params, CFG), rtol=0, atol=1e-5)
    _, meta = read_config(str(out))
    assert meta["weights"] == weights and meta["source_format"] == fmt
    return meta


def test_cli_safetensors(tmp_path, params, official, capsys):
    src = _save_safetensors(official, tmp_path / "w.safetensors")
    out = tmp_path / "out"
    # A bare state dict does not say whether the model uses the scaled parameterisation.
    assert "pass --scaled_param" in _cli_error(capsys, src, out) and not out.exists()
    assert _cli(src, out, "--noscaled_param") == 0
    printed = capsys.readouterr().out
    n = sum(x.size for x in _flat(params).values())
    assert f"parameters: {n:,}" in printed and "hidden_size=64" in printed and "depth=2" in printed
    meta = _check_export(out, params, fmt="safetensors")
    assert meta["scaled_param"] is False and meta["assumed"] == {"mod_norm": True, "norm": "rms"}
    import hashlib

    assert meta["source_sha256"] == hashlib.sha256(Path(src).read_bytes()).hexdigest()
    assert meta["source"] == os.path.abspath(src)


@pytest.mark.torch
def test_cli_torch_save_with_several_networks(tmp_path, params, official):
    pytest.importorskip("torch")
    ema = random_params(CFG, 5)
    obj = {"net": {f"model.{k}": v for k, v in official.items()},
           "ema": {f"model.{k}": v for k, v in mapping.params_to_official(ema, CFG).items()},
           "optimizer": {"state": {"0": {"exp_avg": np.ones(3, np.float32)}}}}
    src = _save_pt(obj, tmp_path / "ckpt.pt")
    assert _cli(src, tmp_path / "ema", "--scaled_param") == 0
    meta = _check_export(tmp_path / "ema", ema, weights="ema", fmt="torch-zip")
    assert meta["ignored_keys"] == len(official) + 1 and meta["prefix"] == "ema.model."
    assert _cli(src, tmp_path / "net", "--weights=net", "--scaled_param") == 0
    config, loaded = load_model(str(tmp_path / "net"))
    assert _trees_equal(loaded, params)


@pytest.mark.torch
def test_cli_official_pickle(tmp_path, params, official):
    pytest.importorskip("torch")
    ema = random_params(CFG, 6)
    src = tmp_path / "tvm-snapshot.pkl"
    marker = tmp_path / "module_src_ran"
    _official_builder()(src, state_dicts={"net": official, "ema": mapping.params_to_official(ema, CFG)},
                        dims=_builder_dims(CFG), marker=marker)
    assert _cli(src, tmp_path / "out") == 0
    _check_export(tmp_path / "out", ema, weights="ema", fmt="official-pickle")
    assert _cli(src, tmp_path / "out_net", "--weights", "net") == 0
    _, loaded = load_model(str(tmp_path / "out_net"))
    assert _trees_equal(loaded, params)
    assert not marker.exists()


def test_cli_subprocess(tmp_path, official):
    src = _save_safetensors(official, tmp_path / "w.safetensors")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tvm_jax.convert", src, str(out), "--num-heads=4", "--input-size", "8",
               "--scaled-param"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "parameters: " in result.stdout and "num_heads=4" in result.stdout
    config, _ = read_config(str(out))
    assert (config.hidden_size, config.depth, config.num_heads, config.num_classes) == (64, 2, 4, 10)


# ----------------------------------------------------------------------------- CLI: bad input


def _cli_error(capsys, *args) -> str:
    code = _cli(*args)
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_cli_errors(tmp_path, official, capsys):
    def src_with(name, sd):
        return _save_safetensors(sd, tmp_path / f"{name}.safetensors")

    sd = {k: v for k, v in official.items() if k not in ("blocks.0.mlp.fc1.bias", "final_layer.linear.weight")}
    msg = _cli_error(capsys, src_with("missing", sd), tmp_path / "o1")
    assert "missing 2 key(s): blocks.0.mlp.fc1.bias, final_layer.linear.weight" in msg

    sd = dict(official, **{"blocks.1.attn.qkv.bias": np.zeros(190, np.float32)})
    msg = _cli_error(capsys, src_with("shape", sd), tmp_path / "o2")
    assert "wrong shape: blocks.1.attn.qkv.bias expected (192,) got (190,)" in msg

    sd = dict(official, **{"label_head.weight": np.zeros((2, 2), np.float32)})
    assert "unexpected 1 key(s): label_head.weight" in _cli_error(capsys, src_with("extra", sd), tmp_path / "o3")

    sd = {k.replace("blocks.1.", "blocks.2."): v for k, v in official.items()}  # blocks 0 and 2, no 1
    msg = _cli_error(capsys, src_with("depth", sd), tmp_path / "o4")
    assert "inconsistent depth: blocks.1.* missing" in msg

    good = src_with("good", official)
    assert "--weights=ema requested, but the file holds a single network" in _cli_error(
        capsys, good, tmp_path / "o5", "--weights=ema")
    assert "no such file" in _cli_error(capsys, tmp_path / "absent.pt", tmp_path / "o6")
    assert "not a regular file" in _cli_error(capsys, tmp_path, tmp_path / "o7")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    assert "unrecognised format" in _cli_error(capsys, junk, tmp_path / "o8")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 9))

    # Refuses to overwrite a non-empty OUT (before reading SRC); --overwrite replaces it.
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert "exists and is not empty; pass --overwrite" in _cli_error(capsys, good, out)
    assert (out / "keep.txt").read_text() == "precious"
    assert _cli(good, out, "--overwrite", "--scaled_param") == 0
    assert not (out / "keep.txt").exists() and read_config(str(out))[0].depth == 2

    # Usage errors exit with 2.
    assert _cli(good) == 2 and "expected SRC and OUT" in capsys.readouterr().err
    assert _cli(good, tmp_path / "o9", "--weights=target") == 2
    capsys.readouterr()


def test_cli_refuses_malicious_pickle(tmp_path, capsys):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    src = tmp_path / "evil.pkl"
    src.write_bytes(pickle.dumps({"net": Evil()}))
    msg = _cli_error(capsys, src, tmp_path / "out")
    assert "refusing to load global" in msg and "system" in msg
    assert not marker.exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- independent PyTorch reference


def torch_reference_forward(sd: dict, *, x_nchw, t, gap, onehot, beta, num_heads, mod_norm=True, norm="rms",
                            patch=2):
    """The official DiT forward pass, re-implemented in PyTorch from the spec (fp32)."""
    import torch
    import torch.nn.functional as F

    w = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()}
    hidden = w["x_embedder.proj.weight"].shape[0]
    channels = w["x_embedder.proj.weight"].shape[1]
    eps = 1e-6

    def linear(h, name):
        return F.linear(h, w[f"{name}.weight"], w[f"{name}.bias"])

    def rms(h, weight=None):
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return h if weight is None else h * weight

    def prenorm(h):
        return rms(h) if norm == "rms" else F.layer_norm(h, (h.shape[-1],), eps=eps)

    def timestep(s, name):
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = s[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return linear(F.silu(linear(emb, f"{name}.mlp.0")), f"{name}.mlp.2")

    def modulation(c, name, chunks):
        m = linear(F.silu(c), name).reshape(c.shape[0], chunks, hidden)
        if mod_norm:
            m = rms(m)
        return m.unbind(1)

    x = torch.from_numpy(x_nchw)
    b = x.shape[0]
    tokens = F.conv2d(x, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"], stride=patch)
    grid = tokens.shape[-1]
    tokens = tokens.flatten(2).transpose(1, 2) + w["pos_embed"]
    y = torch.from_numpy(onehot)
    num_classes = y.shape[1]
    idx = torch.where(y.sum(1) > 0, y.argmax(1), torch.full((b,), num_classes))
    c = (timestep(torch.from_numpy(t), "t_embedder") + timestep(torch.from_numpy(gap), "s_embedder")
         + timestep(torch.from_numpy(beta), "guidance_embedder") + w["y_embedder.embedding_table.weight"][idx])
    head_dim = hidden // num_heads
    depth = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    for i in range(depth):
        pre = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation(c, pre + "adaLN_modulation.1", 6)
        h = prenorm(tokens) * (1 + scale1[:, None]) + shift1[:, None]
        qkv = linear(h, pre + "attn.qkv").reshape(b, -1, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if pre + "attn.q_norm.weight" in w:
            q, k = rms(q, w[pre + "attn.q_norm.weight"]), rms(k, w[pre + "attn.k_norm.weight"])
        att = torch.softmax((q @ k.transpose(-1, -2)) * head_dim ** -0.5, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, -1, hidden)
        tokens = tokens + gate1[:, None] * linear(o, pre + "attn.proj")
        h = prenorm(tokens) * (1 + scale2[:, None]) + shift2[:, None]
        mlp = linear(F.gelu(linear(h, pre + "mlp.fc1"), approximate="tanh"), pre + "mlp.fc2")
        tokens = tokens + gate2[:, None] * mlp
    shift, scale = modulation(c, "final_layer.adaLN_modulation.1", 2)
    out = linear(prenorm(tokens) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    out = out.reshape(b, grid, grid, patch, patch, channels)
    out = torch.einsum("nhwpqc->nchpwq", out).reshape(b, channels, grid * patch, grid * patch)
    return out.numpy()


@pytest.mark.torch
@pytest.mark.parametrize("naive", [False, True], ids=["lipschitz", "naive"])
def test_matches_independent_pytorch_reference(tmp_path, naive):
    pytest.importorskip("torch")
    config = NAIVE if naive else CFG
    sd = mapping.params_to_official(random_params(config, 11), config)
    src = _save_pt({"model": sd}, tmp_path / "w.pth")
    flags = ["--scaled_param"] + (["--naive", "--num_heads=4"] if naive else [])
    assert _cli(src, tmp_path / "out", *flags) == 0
    loaded_config, loaded = load_model(str(tmp_path / "out"), dtype="float32", attention_impl="xla")
    assert loaded_config == config
    ours = _run(_pure(loaded), config)

    x, t, gap, label, beta = _inputs(config)
    onehot = np.zeros((len(label), config.num_classes), np.float32)
    for row, lab in enumerate(label):
        if lab < config.num_classes:
            onehot[row, lab] = 1.0  # the null label is the all-zero row
    ref = torch_reference_forward(sd, x_nchw=np.ascontiguousarray(x.transpose(0, 3, 1, 2)), t=t, gap=gap,
                                  onehot=onehot, beta=beta, num_heads=config.num_heads,
                                  mod_norm=config.mod_norm, norm=config.norm)
    ref = ref.transpose(0, 2, 3, 1)
    assert np.abs(ref).max() > 0.1  # a non-trivial output
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- OUT as a symbolic link


def _debris(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.name.endswith((".tmp-export", ".old-export")))


def test_out_symlink_writes_into_its_target(tmp_path, official, capsys):
    src = _save_safetensors(official, tmp_path / "w.safetensors")
    target = tmp_path / "models" / "real"
    target.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(target)
    assert _cli(src, link, "--scaled_param") == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert read_config(str(target))[0].depth == 2 and read_config(str(link))[0].depth == 2
    # Non-empty target: refused without --overwrite, replaced with it; the link stays.
    assert "exists and is not empty" in _cli_error(capsys, src, link, "--scaled_param")
    assert _cli(src, link, "--scaled_param", "--overwrite", "--noscaled_param") == 0
    assert link.is_symlink() and read_config(str(link))[1]["scaled_param"] is False
    assert _debris(tmp_path) == []


def test_out_dangling_symlink_is_refused(tmp_path, official, capsys):
    src = _save_safetensors(official, tmp_path / "w.safetensors")
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    line = _cli_error(capsys, src, link, "--scaled_param")
    assert f"{link} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist" in line
    assert "Errno" not in line and _cli(src, link, "--scaled_param") == 2
    capsys.readouterr()
    assert link.is_symlink() and not (tmp_path / "nowhere").exists() and _debris(tmp_path) == []


def test_unwritable_out_leaves_no_debris(tmp_path, official, capsys):
    src = _save_safetensors(official, tmp_path / "w.safetensors")
    blocker = tmp_path / "file.txt"  # OUT's parent is a regular file: nothing can be created there
    blocker.write_text("keep")
    line = _cli_error(capsys, src, blocker / "out", "--scaled_param")
    assert "cannot write the model to" in line and "Not a directory" in line and "Errno" not in line
    assert blocker.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "w.safetensors"]

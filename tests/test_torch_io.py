"""tvm_jax.weights.torch_io: torch-free, code-execution-free readers of PyTorch checkpoints.

The official-checkpoint fixture is built here without the official code: small fake classes
whose ``__reduce__`` emits ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` exactly
as EDM's persistence does, with a fake ``torch_utils.persistence`` (and fake timm modules) present
in ``sys.modules`` only while dumping. ``build_official_pickle`` is reused by test_convert.py.
"""
from __future__ import annotations

import contextlib
import enum
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest

from tvm_jax.weights import torch_io
from tvm_jax.weights.torch_io import CheckpointFormatError, UnsafePickleError

TINY = dict(hidden=64, depth=2, heads=4, classes=10, channels=4, input_size=8, patch=2, mlp_ratio=4)


# ----------------------------------------------------------------------------- helpers


def _global_call(module: str, name: str, arg: str, protocol: int = 2) -> bytes:
    """Raw pickle that calls ``module.name(arg)``."""
    data = arg.encode()
    return (b"\x80" + bytes([protocol]) + f"c{module}\n{name}\n".encode()
            + b"X" + struct.pack("<I", len(data)) + data + b"\x85R.")


def _torch_zip(pkl: bytes, storages: dict[str, bytes] | None = None, byteorder: str = "little") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", byteorder)
        zf.writestr("archive/version", "3\n")
        for key, raw in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", raw)
    return buf.getvalue()


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _digest(sd: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(f"{k}|{sd[k].dtype}|{sd[k].shape}|".encode())
        h.update(np.ascontiguousarray(sd[k]).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- official-structure builder


@contextlib.contextmanager
def _fake_modules(modules: dict[str, dict[str, object]]):
    """Registers fake modules (and their parent packages) in sys.modules; removes them after."""
    added = []
    try:
        for full, attrs in modules.items():
            parts = full.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in sys.modules:
                    sys.modules[name] = types.ModuleType(name)
                    added.append(name)
                elif name not in added:
                    raise RuntimeError(f"{name} is a real module here; the fake would shadow it")
            for k, v in attrs.items():
                setattr(sys.modules[full], k, v)
        yield
    finally:
        for name in reversed(added):
            del sys.modules[name]


def _named(obj, module: str, qualname: str):
    obj.__module__ = module
    obj.__qualname__ = qualname
    obj.__name__ = qualname
    return obj


def build_official_pickle(path, *, state_dicts: dict | None = None, dims: dict = TINY, protocol: int = 4,
                          marker=None, qk_norm: bool = True, learn_guidance: bool = True,
                          persistent_blocks: bool = True, block_module: str = "training.dit", seed: int = 0) -> dict:
    """Writes an official-structure checkpoint ``{"net", "ema", "loss_fn", ...}`` to ``path``.

    ``state_dicts`` (name -> official numpy state dict) fills the DiTs; without it they are
    random. ``marker``: a path that the pickled ``module_src`` would create if it were executed.
    ``persistent_blocks=False`` pickles DiTBlock by reference as ``<block_module>.DiTBlock``. Returns the torch DiTs' state dicts (numpy) by name."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    h, depth, heads = dims["hidden"], dims["depth"], dims["heads"]
    c, p, size, classes = dims["channels"], dims["patch"], dims["input_size"], dims["classes"]
    module_src = (
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('module_src was executed')\n"
        "class DiT:\n    pass\n"
    )

    def reconstruct(meta):
        raise AssertionError("the fake _reconstruct_persistent_obj is for dumping only")

    _named(reconstruct, "torch_utils.persistence", "_reconstruct_persistent_obj")

    def persistent_reduce(self):
        # EDM: fields = super().__reduce__(); meta = dict(..., state=fields[2]); (reconstruct, (meta,))
        meta = dict(type="class", version=6, module_src=module_src, class_name=type(self).__name__,
                    state=dict(self.__dict__))
        return reconstruct, (meta,)

    class Persistent(nn.Module):
        __reduce__ = persistent_reduce

    class Format(str, enum.Enum):
        NCHW = "NCHW"
        NHWC = "NHWC"

    _named(Format, "timm.layers.format", "Format")

    class PatchEmbed(nn.Module):  # timm's, pickled by reference
        def __init__(self):
            super().__init__()
            self.img_size, self.patch_size = (size, size), (p, p)
            self.grid_size = (size // p, size // p)
            self.num_patches = (size // p) ** 2
            self.flatten, self.output_fmt = True, Format.NCHW
            self.strict_img_size, self.dynamic_img_pad = True, False
            self.proj = nn.Conv2d(c, h, kernel_size=p, stride=p, bias=True)
            self.norm = nn.Identity()

    class Mlp(nn.Module):  # timm's, pickled by reference
        def __init__(self):
            super().__init__()
            hidden = int(h * dims["mlp_ratio"])
            self.fc1, self.act, self.drop1 = nn.Linear(h, hidden), nn.GELU(approximate="tanh"), nn.Dropout(0.0)
            self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, h), nn.Dropout(0.0)

    _named(PatchEmbed, "timm.layers.patch_embed", "PatchEmbed")
    _named(Mlp, "timm.layers.mlp", "Mlp")

    class TimestepEmbedder(Persistent):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(256, h), nn.SiLU(), nn.Linear(h, h))
            self.frequency_embedding_size = 256

    class LabelEmbedder(Persistent):
        def __init__(self):
            super().__init__()
            self.embedding_table = nn.Embedding(classes + 1, h)
            self.num_classes = classes

    class Attention(Persistent):
        def __init__(self):
            super().__init__()
            self.num_heads, self.head_dim = heads, h // heads
            self.qkv = nn.Linear(h, 3 * h)
            self.q_norm = nn.RMSNorm(h // heads, eps=1e-6) if qk_norm else nn.Identity()
            self.k_norm = nn.RMSNorm(h // heads, eps=1e-6) if qk_norm else nn.Identity()
            self.attn_drop = nn.Dropout(0.0)
            self.proj = nn.Linear(h, h)

    class DiTBlock(Persistent if persistent_blocks else nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = Attention(), Mlp()
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))

    if not persistent_blocks:
        _named(DiTBlock, block_module, "DiTBlock")

    class FinalLayer(Persistent):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(h, p * p * c)
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))

    class DiT(Persistent):
        def __init__(self):
            super().__init__()
            self.in_channels, self.out_channels, self.patch_size, self.num_heads = c, c, p, heads
            self.x_embedder = PatchEmbed()
            self.t_embedder, self.s_embedder = TimestepEmbedder(), TimestepEmbedder()
            if learn_guidance:
                self.guidance_embedder = TimestepEmbedder()
            self.y_embedder = LabelEmbedder()
            self.pos_embed = nn.Parameter(torch.randn(1, (size // p) ** 2, h), requires_grad=False)
            self.blocks = nn.ModuleList([DiTBlock() for _ in range(depth)])
            self.final_layer = FinalLayer()
            self.register_buffer("scratch", torch.zeros(3), persistent=False)  # not in state_dict()

    class TVMWrapper(Persistent):
        def __init__(self):
            super().__init__()
            self.img_resolution, self.img_channels, self.label_dim = size, c, classes
            self.dtype = torch.bfloat16
            self.model_kwargs = {"mod_norm": True, "qk_norm": qk_norm}
            self.model = DiT()
            self.do_scale_param, self.detach_jvp = True, False

    class LossFn:  # persistent, but not a module
        __reduce__ = persistent_reduce

        def __init__(self):
            self.P_mean, self.P_std, self.tvm_weight = -0.4, 1.0, 1.0

    wrappers, truth = {}, {}
    for name in ("net", "ema"):
        wrapper = TVMWrapper()
        if state_dicts is not None and name in state_dicts:
            sd = {k: torch.from_numpy(np.array(v)) for k, v in state_dicts[name].items()}
            wrapper.model.load_state_dict(sd, strict=True)
        wrappers[name] = wrapper
        truth[name] = {k: _torch_to_numpy(v) for k, v in wrapper.model.state_dict().items()}
    top = {
        "net": wrappers["net"], "ema": wrappers["ema"], "loss_fn": LossFn(), "augment_pipe": None,
        "dataset_kwargs": {"path": "imagenet-256.zip", "resolution": size, "use_labels": True},
        "progress": {"kimg": 1234.5, "step": 77},
    }
    fakes = {"torch_utils.persistence": {"_reconstruct_persistent_obj": reconstruct},
             "timm.layers.format": {"Format": Format}, "timm.layers.patch_embed": {"PatchEmbed": PatchEmbed},
             "timm.layers.mlp": {"Mlp": Mlp}}
    if not persistent_blocks:
        fakes[block_module] = {"DiTBlock": DiTBlock}
    with _fake_modules(fakes):
        data = pickle.dumps(top, protocol=protocol)
    with open(path, "wb") as f:
        f.write(data)
    return truth


# ----------------------------------------------------------------------------- safetensors (no torch)


def test_safetensors_round_trip(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    sd = {
        "model.w32": rng.normal(size=(3, 5)).astype(np.float32),
        "model.wbf16": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16),
        "model.w16": rng.normal(size=(2, 2)).astype(np.float16),
        "model.idx": np.arange(7, dtype=np.int64),
        "model.mask": np.array([True, False]),
        "step": np.array(3, dtype=np.int64),
    }
    path = str(tmp_path / "w.safetensors")
    save_file(sd, path)
    assert torch_io.detect_format(path) == "safetensors"
    got = torch_io.load_state_dict(path)
    assert sorted(got) == sorted(sd)
    for k in sd:
        assert _same_bits(got[k], sd[k]), k
    sub = torch_io.load_state_dict(path, key="model")
    assert sorted(sub) == ["idx", "mask", "w16", "w32", "wbf16"]
    assert _same_bits(sub["wbf16"], sd["model.wbf16"])
    with pytest.raises(KeyError, match="no entries under 'ema'"):
        torch_io.load_state_dict(path, key="ema")


def test_unknown_and_missing_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointFormatError, match="unrecognised format"):
        torch_io.load_state_dict(str(junk))
    with pytest.raises(FileNotFoundError, match="no such file"):
        torch_io.load_state_dict(str(tmp_path / "absent.pt"))
    with pytest.raises(CheckpointFormatError, match="not a regular file"):
        torch_io.load_state_dict(str(tmp_path))
    notorch = tmp_path / "x.zip"
    with zipfile.ZipFile(notorch, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(CheckpointFormatError, match="not a torch.save archive"):
        torch_io.load_state_dict(str(notorch))
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(CheckpointFormatError, match="plain Python pickle"):
        torch_io.load_state_dict(str(plain))


# ----------------------------------------------------------------------------- malicious input (no torch)


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_torch_zip_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    pkl = pickle.dumps({"weight": _Evil(f"touch {marker}")}, protocol=2)
    path = tmp_path / "evil.pt"
    path.write_bytes(_torch_zip(pkl))
    with pytest.raises(UnsafePickleError, match=r"'(os|posix)\.system'"):
        torch_io.load_state_dict(str(path))
    assert not marker.exists()


def test_malicious_plain_pickle_is_refused_by_official_reader(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"net": _Evil(f"touch {marker}"), "ema": None}))
    with pytest.raises(UnsafePickleError, match=r"'(os|posix)\.system'"):
        torch_io.load_official_pickle(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [
    ("builtins", "eval"),
    ("__builtin__", "eval"),
    ("builtins", "exec"),
    ("subprocess", "Popen"),
    ("posix", "system"),
    ("torch_utils.persistence", "_src_to_module"),
    ("torch_utils.persistence", "persistent_class"),
    ("torch.nn.modules.rnn", "LSTM"),
    ("torch", "load"),
    ("numpy.core.multiarray", "_reconstruct"),
])
def test_official_reader_refuses_globals(tmp_path, module, name):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(_global_call(module, name, f"open({str(marker)!r}, 'w')"))
    shown = "builtins" if module == "__builtin__" else module
    with pytest.raises(UnsafePickleError, match=f"refusing to load global '{shown}.{name}'"):
        torch_io.read_official_pickle(str(path))
    assert not marker.exists()


def test_getattr_only_on_compile_context_standins(tmp_path):
    """``builtins.getattr`` is admitted for torch.compile's pickled context (a bound method pickles
    as getattr(obj, name)); on anything else it is refused before it runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(_global_call("builtins", "getattr", f"open({str(marker)!r}, 'w')"))
    with pytest.raises(UnsafePickleError, match="refusing to call builtins.getattr"):
        torch_io.read_official_pickle(str(path))
    # getattr(<torch.nn.Linear stand-in>, "forward") is refused too: modules are not opaque objects.
    path.write_bytes(b"\x80\x02c__builtin__\ngetattr\nctorch.nn.modules.linear\nLinear\n)\x81}bX\x07\x00\x00\x00forward"
                     b"\x86R.")
    with pytest.raises(UnsafePickleError, match="refusing to call builtins.getattr"):
        torch_io.read_official_pickle(str(path))
    with pytest.raises(UnsafePickleError, match="refusing to load global 'builtins.getattr'"):
        torch_io.load_state_dict(str(_write(tmp_path / "w.pt", _torch_zip(_global_call("builtins", "getattr", "x")))))
    assert not marker.exists()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_load_from_bytes_payload_is_weights_only(tmp_path):
    """``torch.storage._load_from_bytes`` is a torch.load in the original: its payload must be read
    with the weights-only allow-list (no module classes, no persistence, no os.system)."""
    marker = tmp_path / "pwned"

    def wrapped(payload: bytes) -> bytes:
        return (b"\x80\x03ctorch.storage\n_load_from_bytes\nB" + struct.pack("<I", len(payload)) + payload
                + b"\x85R.")

    evil = pickle.dumps(_Evil(f"touch {marker}"), protocol=2)
    path = tmp_path / "a.pkl"
    path.write_bytes(wrapped(evil))
    refused = r"_load_from_bytes payload: refusing to load global '(os|posix)\.system'"
    with pytest.raises(UnsafePickleError, match=refused):
        torch_io.read_official_pickle(str(path))

    # A legacy torch.save stream whose object is a torch.nn.Linear: fine in the outer official
    # stream, refused inside a storage payload.
    legacy = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    legacy += b"\x80\x02ctorch.nn.modules.linear\nLinear\n)\x81}b." + pickle.dumps([], protocol=2)
    path.write_bytes(wrapped(legacy))
    with pytest.raises(UnsafePickleError, match="payload: refusing to load global 'torch.nn.modules.linear.Linear'"):
        torch_io.read_official_pickle(str(path))

    path.write_bytes(wrapped(_torch_zip(evil)))
    with pytest.raises(UnsafePickleError, match=r"'(os|posix)\.system'"):
        torch_io.read_official_pickle(str(path))
    assert not marker.exists()


def test_module_standins_cannot_be_called_with_arguments(tmp_path):
    # REDUCE torch.nn.modules.linear.Linear("x"): the stand-in refuses construction from arguments.
    path = tmp_path / "a.pkl"
    path.write_bytes(_global_call("torch.nn.modules.linear", "Linear", "x"))
    with pytest.raises(UnsafePickleError, match="torch.nn.modules.linear.Linear: refusing to construct"):
        torch_io.read_official_pickle(str(path))
    # _codecs.encode only as the protocol-2 bytes idiom.
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX" + struct.pack("<I", 5) + b"rot13\x86R.")
    with pytest.raises(UnsafePickleError, match="_codecs.encode is only allowed"):
        torch_io.read_official_pickle(str(path))


# ----------------------------------------------------------------------------- torch.save files


def _sample_tensors():
    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).half(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.arange(-3, 9),
        "i32": torch.arange(4, dtype=torch.int32),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "base": base,
        "view_t": base[1:5, 2:7].t(),  # transposed slice: offset + non-contiguous strides
        "view_offset": base.view(-1)[13:29].view(4, 4),  # offset into a shared storage
        "bf16_view": torch.randn(4, 6, generator=g).to(torch.bfloat16)[:, 1::2],
    }


@pytest.mark.torch
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_save_round_trip(tmp_path, legacy):
    torch = pytest.importorskip("torch")
    tensors = _sample_tensors()
    assert not tensors["view_t"].is_contiguous() and tensors["view_t"].storage_offset() > 0
    obj = {"model": tensors, "ema": {"w": tensors["f32"] * 2}, "step": 5, "note": "hello", "opt": [tensors["i32"]]}
    path = str(tmp_path / "w.pt")
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert torch_io.detect_format(path) == ("torch-legacy" if legacy else "torch-zip")
    flat = torch_io.load_state_dict(path)
    assert sorted(flat) == sorted([f"model.{k}" for k in tensors] + ["ema.w", "opt.0"])
    for k, t in tensors.items():
        got, want = flat[f"model.{k}"], _torch_to_numpy(t)
        assert _same_bits(got, want), k
        assert got.flags.c_contiguous and got.flags.writeable
    assert _same_bits(flat["ema.w"], _torch_to_numpy(tensors["f32"] * 2))
    sub = torch_io.load_state_dict(path, key="model")
    assert sorted(sub) == sorted(tensors)
    assert flat["model.bf16"].dtype == ml_dtypes.bfloat16 and flat["model.i64"].dtype == np.int64


@pytest.mark.torch
def test_torch_state_dict_with_metadata_and_big_endian(tmp_path):
    torch = pytest.importorskip("torch")
    lin = torch.nn.Linear(3, 2)
    path = tmp_path / "lin.pt"
    torch.save(lin.state_dict(), path)  # an OrderedDict carrying a _metadata attribute
    got = torch_io.load_state_dict(str(path))
    assert sorted(got) == ["bias", "weight"]
    assert _same_bits(got["weight"], lin.weight.detach().numpy())

    # The same archive as a big-endian machine would have written it.
    with zipfile.ZipFile(path) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    prefix = next(n for n in entries if n.endswith("/data.pkl"))[: -len("data.pkl")]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, raw in entries.items():
            if name == prefix + "byteorder":
                raw = b"big"
            elif name.startswith(prefix + "data/"):
                raw = np.frombuffer(raw, "<f4").astype(">f4").tobytes()
            zf.writestr(name, raw)
    big = tmp_path / "big.pt"
    big.write_bytes(buf.getvalue())
    got_big = torch_io.load_state_dict(str(big))
    assert _same_bits(got_big["weight"], lin.weight.detach().numpy())
    assert _same_bits(got_big["bias"], lin.bias.detach().numpy())


@pytest.mark.torch
def test_full_module_pickle_in_torch_zip_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UnsafePickleError, match="'torch.nn.modules.linear.Linear'"):
        torch_io.load_state_dict(str(path))


# ----------------------------------------------------------------------------- official checkpoints


@pytest.mark.torch
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_official_structure(tmp_path, monkeypatch, protocol):
    pytest.importorskip("torch")
    marker = tmp_path / "module_src_ran"
    path = tmp_path / "network-snapshot.pkl"
    truth = build_official_pickle(path, marker=marker, protocol=protocol)
    raw = path.read_bytes()
    # What torch 2.13 + pickle actually wrote: persistence calls, parameters, and storages as
    # torch.storage._load_from_bytes(<legacy torch.save bytes>).
    for name in (b"torch_utils.persistence", b"_reconstruct_persistent_obj", b"torch.storage",
                 b"_load_from_bytes", b"_rebuild_parameter", b"_rebuild_tensor_v2", b"collections",
                 b"torch.nn.modules.linear", b"timm.layers.patch_embed"):
        assert name in raw, name
    if protocol >= 3:  # protocol 2 stores the bytes as _codecs.encode(<latin-1 text>, "latin1")
        assert torch_io._LEGACY_PREFIX in raw
    assert (b"_codecs" in raw) == (protocol == 2)
    assert "torch_utils" not in sys.modules and "timm" not in sys.modules

    for blocked in ("torch", "timm", "torch_utils", "dnnlib", "training"):
        monkeypatch.setitem(sys.modules, blocked, None)  # any import of these would now fail
    ckpt = torch_io.read_official_pickle(str(path))
    monkeypatch.undo()

    assert not marker.exists(), "module_src was executed"
    assert sorted(ckpt.networks) == ["ema", "net"]
    assert ckpt.default_weights == "ema"
    assert ckpt.other_entries == ["loss_fn"]
    assert ckpt.metadata == {"augment_pipe": None,
                             "dataset_kwargs": {"path": "imagenet-256.zip", "resolution": 8, "use_labels": True},
                             "progress": {"kimg": 1234.5, "step": 77}}
    for name in ("net", "ema"):
        got = ckpt.networks[name]
        assert list(got) == list(truth[name])  # state_dict() order and names
        for k in truth[name]:
            assert _same_bits(got[k], truth[name][k]), (name, k)
    assert "scratch" not in ckpt.networks["net"]  # non-persistent buffer
    assert "blocks.1.attn.q_norm.weight" in ckpt.networks["net"]
    assert "x_embedder.proj.weight" in ckpt.networks["net"]
    qkv = "blocks.0.attn.qkv.weight"
    assert not _same_bits(ckpt.networks["net"][qkv], ckpt.networks["ema"][qkv])

    default = torch_io.load_official_pickle(str(path))
    assert _digest(default) == _digest(truth["ema"])
    assert _digest(torch_io.load_official_pickle(str(path), weights="net")) == _digest(truth["net"])
    with pytest.raises(KeyError, match="no network 'target'"):
        torch_io.load_official_pickle(str(path), weights="target")
    assert not marker.exists()


@pytest.mark.torch
def test_official_reader_runs_without_torch_installed(tmp_path):
    """In a fresh interpreter where torch/timm/torch_utils cannot be imported at all."""
    pytest.importorskip("torch")
    path = tmp_path / "ckpt.pkl"
    marker = tmp_path / "module_src_ran"
    truth = build_official_pickle(path, marker=marker, protocol=4)
    script = (
        "import sys\n"
        "for m in ('torch', 'timm', 'torch_utils', 'dnnlib', 'training'): sys.modules[m] = None\n"
        "from tvm_jax.weights import torch_io\n"
        "from test_torch_io import _digest\n"
        f"sd = torch_io.load_official_pickle({str(path)!r})\n"
        "print(_digest(sd))\n"
        "assert 'jax' not in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == _digest(truth["ema"])
    assert not marker.exists()


@pytest.mark.torch
def test_official_unknown_class_needs_allow_classes(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "ckpt.pkl"
    # The official code's own classes are known, persistent or not ...
    truth = build_official_pickle(path, persistent_blocks=False, protocol=4)
    assert _digest(torch_io.load_official_pickle(str(path), weights="net")) == _digest(truth["net"])
    # ... a class of another module is not, unless allowed explicitly.
    truth = build_official_pickle(path, persistent_blocks=False, block_module="mylab.blocks", protocol=4)
    with pytest.raises(UnsafePickleError, match="refusing to load global 'mylab.blocks.DiTBlock'"):
        torch_io.read_official_pickle(str(path))
    got = torch_io.load_official_pickle(str(path), weights="net", allow_classes=["mylab.blocks.*"])
    assert _digest(got) == _digest(truth["net"])

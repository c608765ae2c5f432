"""Official TVM checkpoints written the way the official code writes them (torch needed).

The producer is https://github.com/lumalabs/tvm (read for this fixture, not copied):

* ``training/dit.py``: ``TimestepEmbedder``, ``LabelEmbedder``, ``DiTBlock``, ``FinalLayer``, ``DiT``
  and the size classes (``DiT_XL_2_18h``, ...) are ``@persistence.persistent_class``; ``Attention`` is
  a plain ``nn.Module`` (so every snapshot names ``training.dit.Attention`` by reference); the
  blocks use timm's ``Mlp`` and ``PatchEmbed`` (``from timm.models.vision_transformer import
  PatchEmbed, Mlp``; the classes live in ``timm.layers.mlp`` / ``timm.layers.patch_embed``) and
  ``nn.RMSNorm``; ``DiTBlock``/``FinalLayer`` keep ``do_mod_norm``.
* ``training/wrapper.py``: the persistent ``TVMWrapper`` keeps ``img_resolution``, ``img_channels``,
  ``label_dim``, ``dtype``, ``model_kwargs``, ``model``, ``do_scale_param``, ``detach_jvp``.
* ``torch_utils/persistence.py`` (EDM's): a persistent object pickles as
  ``_reconstruct_persistent_obj(meta)``, ``meta = dict(type='class', version, module_src,
  class_name, state)``, the decorator keeping deep copies of the constructor arguments in
  ``_init_args``/``_init_kwargs``.
* ``training/training_loop.py``: the network is built with
  ``construct_class_by_name(**config.network, **interface_kwargs)`` from the OmegaConf config
  (``configs/im256_w2.yaml``: ``compile: true`` -> ``torch.compile(net)``),
  ``ema = copy.deepcopy(net).eval().requires_grad_(False)``; snapshots are
  ``pickle.dump(dict(net=ema, dataset_kwargs=dict(dataset_kwargs)), f)`` into
  ``network-snapshot-*.pkl``; training states ``torch.save(dict(net=net, ema=ema,
  ema_target=ema_target, optimizer_state=optimizer.state_dict(), scaler_state=scaler.state_dict()),
  "training-state-*.pt")``.

Here the same module layout is written as real source files into a temporary directory and
imported under the real module names (``torch_utils.persistence``, ``training.dit``,
``training.wrapper``, ``timm.layers.*``: timm itself is not installed here), then the checkpoint is
written with real torch and pickle. The DiT source is this fixture's own, written from the
structure above; its ``module_src`` would create ``$TVM_FIXTURE_MARKER`` if the reader ever ran it.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import os
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np

PERSISTENCE_SRC = '''
"""EDM-style persistence (the behaviour of EDM's torch_utils/persistence.py): a persistent
object pickles (and deep-copies) as _reconstruct_persistent_obj(meta), which rebuilds its class
by executing the recorded module source."""
import copy
import inspect
import sys
import types
import uuid

_version = 6
_decorators = set()
_module_to_src_dict = dict()
_src_to_module_dict = dict()


def persistent_class(orig_class):
    if orig_class in _decorators:
        return orig_class
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type="class", version=_version, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    _decorators.add(Decorator)
    return Decorator


def _reconstruct_persistent_obj(meta):
    assert meta["version"] == _version and meta["type"] == "class"
    module = _src_to_module(meta["module_src"])
    decorator_class = persistent_class(module.__dict__[meta["class_name"]])
    obj = decorator_class.__new__(decorator_class)
    setstate = getattr(obj, "__setstate__", None)
    if callable(setstate):
        setstate(meta["state"])
    else:
        obj.__dict__.update(meta["state"])
    return obj


def _module_to_src(module):
    src = _module_to_src_dict.get(module, None)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src


def _src_to_module(src):
    module = _src_to_module_dict.get(src, None)
    if module is None:
        module = types.ModuleType("_imported_module_" + uuid.uuid4().hex)
        sys.modules[module.__name__] = module
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        exec(src, module.__dict__)
    return module
'''

TIMM_FORMAT_SRC = '''
from enum import Enum


class Format(str, Enum):
    NCHW = "NCHW"
    NHWC = "NHWC"
    NCL = "NCL"
    NLC = "NLC"
'''

TIMM_MLP_SRC = '''
from torch import nn


class Mlp(nn.Module):
    """timm's MLP block layout: fc1, act, drop1, norm, fc2, drop2."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, norm_layer=None,
                 bias=True, drop=0.0, use_conv=False):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)
'''

TIMM_PATCH_EMBED_SRC = '''
from torch import nn

from timm.layers.format import Format


class PatchEmbed(nn.Module):
    """timm's patch embedding layout: a strided conv ``proj`` and a ``norm``."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True,
                 output_fmt=None, bias=True, strict_img_size=True, dynamic_img_pad=False):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.img_size = (img_size, img_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.output_fmt = Format.NCHW if output_fmt is None else Format(output_fmt)
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
'''

VISION_TRANSFORMER_SRC = '''
from timm.layers.mlp import Mlp
from timm.layers.patch_embed import PatchEmbed
'''

DIT_SRC = '''
"""A small DiT with the official module structure (this fixture's own code)."""
import os

import numpy as np
import torch
from torch import nn

from timm.models.vision_transformer import Mlp, PatchEmbed
from torch_utils import persistence

if os.environ.get("TVM_FIXTURE_MARKER"):  # runs only if someone executes this source
    open(os.environ["TVM_FIXTURE_MARKER"], "w").write("module_src was executed")


def sincos_2d(dim, grid):
    """MAE's 2-D sin-cos table: the first half of the channels encodes grid[0] (the x index)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    xs, ys = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return np.concatenate([one_d(dim // 2, xs), one_d(dim // 2, ys)], axis=1)


class Attention(nn.Module):  # not persistent, as in the official code
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)


@persistence.persistent_class
class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.hidden_size = hidden_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size


@persistence.persistent_class
class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob


@persistence.persistent_class
class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, temb_size, mlp_ratio=4.0, dropout=0, do_mod_norm=True, **block_kwargs):
        super().__init__()
        self.norm1 = nn.RMSNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.RMSNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, **block_kwargs)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"), drop=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(temb_size, 6 * hidden_size))
        self.do_mod_norm = do_mod_norm


@persistence.persistent_class
class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels, do_mod_norm=True):
        super().__init__()
        self.norm_final = nn.RMSNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.do_mod_norm = do_mod_norm


@persistence.persistent_class
class DiT(nn.Module):
    def __init__(self, img_resolution, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, dropout=0, qk_norm=True, learn_guidance=True, do_mod_norm=True,
                 init_type="spectral", time_specinit=False, **kwargs):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.learn_guidance = learn_guidance
        self.s_embedder = TimestepEmbedder(hidden_size)
        self.guidance_embedder = TimestepEmbedder(hidden_size) if learn_guidance else None
        self.x_embedder = PatchEmbed(img_resolution, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes + 1, hidden_size, 0.0)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, hidden_size, mlp_ratio=mlp_ratio,
                                              dropout=dropout, qk_norm=qk_norm, do_mod_norm=do_mod_norm)
                                     for _ in range(depth)])
        self.init_type = init_type
        self.time_specinit = time_specinit
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, do_mod_norm=do_mod_norm)
        with torch.no_grad():  # random everywhere (the zero-initialised layers too), fixed position table
            for name, p in self.named_parameters():
                p.normal_(0.0, 0.15)
            grid = img_resolution // patch_size
            self.pos_embed.copy_(torch.from_numpy(sincos_2d(hidden_size, grid)).float()[None])


@persistence.persistent_class
class DiT_T_2(DiT):  # a tiny size class, like DiT_S_2 & co.
    def __init__(self, **kwargs):
        super().__init__(patch_size=2, hidden_size=64, depth=2, num_heads=4, **kwargs)
'''

WRAPPER_SRC = '''
import torch
from torch_utils import persistence
from training.dit import *  # noqa: F401,F403  (as the official wrapper does)
from training import dit


@persistence.persistent_class
class TVMWrapper(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, mixed_precision=None, model_type="DiT_T_2",
                 data_type="bf16", detach_jvp=False, do_scale_param=False, model_kwargs=None, **kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(data_type, torch.float32)
        self.model_kwargs = model_kwargs
        self.model = getattr(dit, model_type)(img_resolution=img_resolution, in_channels=img_channels,
                                              num_classes=label_dim, **(model_kwargs or {}))
        self.do_scale_param = do_scale_param
        self.detach_jvp = detach_jvp
'''

SOURCES = {
    "torch_utils/__init__.py": "",
    "torch_utils/persistence.py": PERSISTENCE_SRC,
    "timm/__init__.py": "",
    "timm/layers/__init__.py": "",
    "timm/layers/format.py": TIMM_FORMAT_SRC,
    "timm/layers/mlp.py": TIMM_MLP_SRC,
    "timm/layers/patch_embed.py": TIMM_PATCH_EMBED_SRC,
    "timm/models/__init__.py": "",
    "timm/models/vision_transformer.py": VISION_TRANSFORMER_SRC,
    "training/__init__.py": "",
    "training/dit.py": DIT_SRC,
    "training/wrapper.py": WRAPPER_SRC,
}
TOP_LEVEL = ("torch_utils", "timm", "training")

# The tiny model: DiT_T_2 on 32x32x4 latents (the latent side of the 256px recipes) with 10 classes.
DIMS = dict(input_size=32, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


@contextlib.contextmanager
def official_code(root):
    """The official-layout modules importable under their real names while inside."""
    for top in TOP_LEVEL:
        if top in sys.modules or importlib.util.find_spec(top) is not None:
            raise RuntimeError(f"a real '{top}' package is importable here; the fixture would shadow it")
    root = Path(root)
    for rel, src in SOURCES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(src))
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        yield {name: importlib.import_module(name) for name in ("training.dit", "training.wrapper")}
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.split(".")[0] in TOP_LEVEL or m.startswith("_imported_module_")]:
            del sys.modules[name]


def network_config(*, do_scale_param: bool = True, do_mod_norm: bool = True, compile: bool = False):
    """The ``network``/``dataset`` part of an official YAML config (configs/im256_w2.yaml), as the
    training script holds it: an OmegaConf DictConfig."""
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "dataset": {"class_name": "training.dataset.ImageFolderDataset", "path": "imagenet-latents.zip",
                    "use_labels": True, "xflip": False, "cache": True, "resolution": DIMS["input_size"]},
        "network": {"class_name": "training.wrapper.TVMWrapper", "model_type": "DiT_T_2",
                    "model_kwargs": {"do_mod_norm": do_mod_norm, "learn_guidance": True, "dropout": 0.0,
                                     "init_type": "spectral", "time_specinit": True, "qk_norm": True},
                    "data_type": "bf16", "detach_jvp": False, "do_scale_param": do_scale_param,
                    "compile": compile},
    })


def _build(modules, config, seed: int):
    import torch

    torch.manual_seed(seed)
    network_kwargs = {k: v for k, v in config.network.items() if k != "class_name"}
    interface_kwargs = dict(img_resolution=DIMS["input_size"], img_channels=DIMS["in_channels"],
                            label_dim=DIMS["num_classes"])
    net = modules["training.wrapper"].TVMWrapper(**network_kwargs, **interface_kwargs)
    if config.network.compile:
        net = torch.compile(net, mode="reduce-overhead")  # lazy: nothing is compiled until called
    return net


def _state_dict(module) -> dict[str, np.ndarray]:
    inner = getattr(module, "_orig_mod", module)
    return {k: v.detach().float().numpy().copy() for k, v in inner.model.state_dict().items()}


def write_snapshot(path, src_root, *, seed: int = 0, **config_kwargs) -> dict[str, np.ndarray]:
    """``network-snapshot-*.pkl`` as training_loop.py writes it; returns the DiT's state dict."""
    with official_code(src_root) as modules:
        config = network_config(**config_kwargs)
        net = _build(modules, config, seed)
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        data = dict(net=ema, dataset_kwargs=dict(config.dataset))
        with open(path, "wb") as f:
            pickle.dump(data, f)
        return _state_dict(ema)


def write_training_state(path, src_root, *, seed: int = 0, **config_kwargs) -> dict[str, dict[str, np.ndarray]]:
    """``training-state-*.pt`` as training_loop.py writes it (after one optimiser step, so that net,
    ema and ema_target differ); returns their DiT state dicts by name."""
    import torch

    with official_code(src_root) as modules:
        config = network_config(**config_kwargs)
        net = _build(modules, config, seed)
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        ema_target = copy.deepcopy(net).eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.9, 0.95))
        loss = sum((p.float() ** 2).sum() for p in net.parameters() if p.requires_grad)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, 0.5))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        torch.save(dict(net=net, ema=ema, ema_target=ema_target, optimizer_state=optimizer.state_dict(),
                        scaler_state=scaler.state_dict()), path)
        return {"net": _state_dict(net), "ema": _state_dict(ema), "ema_target": _state_dict(ema_target)}


def hub_cache_file(cache_dir, repo_id: str, filename: str, data: bytes, *, commit: str = "a" * 40) -> Path:
    """Places ``data`` in a Hugging Face cache directory in huggingface_hub's own layout ("Manage the
    cache", https://huggingface.co/docs/huggingface_hub/guides/manage-cache, and file_download.py):
    ``models--ORG--NAME/blobs/<sha256>``, ``snapshots/<commit>/<file>`` a relative symlink to
    ``../../blobs/<sha256>``, ``refs/main`` holding the commit hash."""
    import hashlib

    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    digest = hashlib.sha256(data).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs" / digest).write_bytes(data)
    link = repo / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.relpath(repo / "blobs" / digest, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return link

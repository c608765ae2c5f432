"""Experiment configuration: the shared defaults, validation, and builders.

Config files in ``configs/`` start from :func:`base_config` and override what their experiment
changes. Every field can be overridden on the command line as ``--config.a.b=value``.
:func:`validate_config` checks the whole tree and raises ``ValueError`` naming the offending
field; the builders turn the validated tree into the library's frozen dataclasses.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from tvm_jax.dit import MODEL_SIZES, DiTConfig
from tvm_jax.objectives import GuidanceConfig, ObjectiveConfig
from tvm_jax.time_sampling import TimeSamplerConfig
from tvm_jax.training import TrainStepConfig

# Official latent normalisation statistics (Stable Diffusion VAE), DESIGN section 5.
RAW_MEAN_256 = (0.86488, -0.27787343, 0.21616915, 0.3738409)
RAW_STD_256 = (4.85503674, 5.31922414, 3.93725398, 3.9870003)
RAW_MEAN_512 = (1.56, -0.695, 0.483, 0.729)
RAW_STD_512 = (5.27, 5.91, 4.21, 4.31)

DATA_SOURCES = ("latents", "digits", "gmm", "synthetic")
MODEL_TYPES = ("dit", "mlp")
# FID protocols of --mode=evaluate (tvm_jax.evaluation): "paper" as the official evaluation (labels of
# random training items, uint8 by truncation); "balanced" (balanced shuffled labels, uint8 by rounding).
EVAL_PROTOCOLS = ("paper", "balanced")


def base_config() -> ml_collections.ConfigDict:
    """Defaults: the official ImageNet-256 TVM recipe (in256_w2) minus the data path."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = m = ml_collections.ConfigDict()
    m.type = "dit"
    m.size = "XL/2-18h"
    m.hidden_size = config_dict.placeholder(int)  # only for size="custom"
    m.depth = config_dict.placeholder(int)
    m.num_heads = config_dict.placeholder(int)
    m.patch_size = 2
    m.mlp_ratio = 4.0
    m.lipschitz = True  # False: the naive DiT (each switch below can still override)
    m.mod_norm = config_dict.placeholder(bool)
    m.qk_norm = config_dict.placeholder(bool)
    m.norm = config_dict.placeholder(str)
    m.init = config_dict.placeholder(str)
    m.time_specinit = True
    m.learn_guidance = True
    m.dtype = "bfloat16"
    m.attention_impl = "auto"
    m.remat = "none"
    m.save_attention = True  # under remat, keep the attention kernels' outputs (no re-run in the backward)
    m.layer_loop = "scan"  # or "unroll": one traced copy per block (longer compile, no stacked residuals)
    m.mlp_width = 256  # model.type == "mlp" only
    m.mlp_depth = 4

    c.objective = o = ml_collections.ConfigDict()
    o.name = "tvm"
    o.time_sampler = "gap*"
    o.s_mean = -0.4
    o.s_std = 1.0
    o.gap_mean = -0.8
    o.gap_std = 1.0
    o.p_equal = 0.0
    o.cfg_mode = "constant"
    o.w = 2.0
    o.w_min = 1.0
    o.w_max = 1.0
    o.label_dropout = 0.1
    o.scaled_param = True
    o.detach_jvp = False
    o.meanflow_adaptive_p = 1.0
    o.meanflow_adaptive_c = 1e-3

    c.optimizer = opt = ml_collections.ConfigDict()
    opt.lr = 1e-4
    opt.b1 = 0.9
    opt.b2 = 0.95
    opt.eps = 1e-8
    opt.weight_decay = 0.0
    opt.max_grad_norm = config_dict.placeholder(float)  # None: no clipping

    c.ema = e = ml_collections.ConfigDict()
    e.decay = 0.9999  # evaluation EMA
    e.target_decay = 0.99  # the EMA-target ("proxy") network used by the objective; 0.0 = no EMA

    c.data = d = ml_collections.ConfigDict()
    d.source = "latents"
    d.path = ""  # ArrayRecord files (a directory or a glob) for source="latents"
    d.resolution = 256  # pixel resolution the latents came from
    d.shape = (32, 32, 4)  # (H, W, C) of one training example as the model sees it; (D,) for vectors
    d.num_classes = 1000
    d.raw_mean = RAW_MEAN_256
    d.raw_std = RAW_STD_256
    d.final_std = 1.0
    d.upsample = 1  # digits: nearest-neighbour upsampling factor of the 8x8 images
    d.gmm_dim = 2
    d.gmm_components_per_class = 2
    d.worker_count = 0  # grain worker processes (0: in the main process)
    d.vae_path = ""  # diffusers AutoencoderKL folder: decode latent samples to pixels

    c.train = t = ml_collections.ConfigDict()
    t.global_batch_size = 2048
    # examples per device per micro-step (gradient accumulation); 0: the largest that fits the
    # device's memory (the whole per-device batch on the CPU); see tvm_jax.microbatching
    t.microbatch_size = 0
    t.num_steps = 300_000  # paper, Table 7
    t.log_every = 100
    t.checkpoint_every = 5000
    t.keep_checkpoints = 3
    t.sample_every = 10_000
    t.max_skipped_steps = 100  # abort after this many consecutive non-finite steps
    t.init_from = ""  # an exported model directory (tvm_jax.convert / --mode=export) to fine-tune from

    c.sample = s = ml_collections.ConfigDict()
    s.steps = (1, 2, 4)
    s.w = 2.0
    s.num_images = 16  # per grid
    s.method = "flow_map"  # "euler" for velocity models (FM)
    s.euler_steps = (8, 32)  # used when method == "euler"

    c.eval = ev = ml_collections.ConfigDict()
    ev.num_samples = 50_000
    ev.batch_size = 256
    ev.steps = (1, 2, 4)
    ev.inception_path = ""
    ev.reference_stats = ""  # ADM .npz or EDM2 .pkl (img256.pkl / img512.pkl)
    ev.protocol = "paper"  # one of EVAL_PROTOCOLS; the toy configs (digits, gmm) use "balanced"

    c.mesh = mm = ml_collections.ConfigDict()
    mm.fsdp = 1  # size of the parameter-sharding axis; the data axis takes the rest of the devices
    return c


def check_fields(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the first field of :func:`base_config` that ``config`` lacks
    (a config file that does not start from ``base_config()``)."""

    def walk(expected, given, prefix):
        for key, value in expected.items():
            name = prefix + key
            if not hasattr(given, "keys") or key not in given.keys():
                raise ValueError(f"{name}: the config has no such field (config files start from "
                                 "tvm_jax.config.base_config(), as those in configs/ do)")
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, given[key], name + ".")

    walk(base_config(), config, "")


def _need(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{field}: {msg}")


def dit_config(config: ml_collections.ConfigDict) -> DiTConfig:
    """The :class:`DiTConfig` of a validated experiment config."""
    m, d = config.model, config.data
    h, w, ch = d.shape
    _need(h == w, "data.shape", f"the DiT takes square inputs, got {tuple(d.shape)}")
    overrides = dict(
        input_size=int(h),
        in_channels=int(ch), patch_size=m.patch_size, mlp_ratio=m.mlp_ratio, num_classes=d.num_classes,
        time_specinit=m.time_specinit, learn_guidance=m.learn_guidance, dtype=m.dtype,
        attention_impl=m.attention_impl, remat=m.remat, save_attention=m.save_attention,
        layer_loop=m.layer_loop,
    )
    for name in ("mod_norm", "qk_norm", "norm", "init", "hidden_size", "depth", "num_heads"):
        if m.get(name) is not None:
            overrides[name] = m.get(name)
    if m.size == "custom":
        for name in ("hidden_size", "depth", "num_heads"):
            _need(m.get(name) is not None, f"model.{name}", "required when model.size is 'custom'")
    try:
        return DiTConfig.create(m.size, lipschitz=m.lipschitz, **overrides)
    except ValueError as e:
        raise ValueError(str(e)) from None


def objective_config(config: ml_collections.ConfigDict) -> ObjectiveConfig:
    o = config.objective
    return ObjectiveConfig(
        name=o.name,
        times=TimeSamplerConfig(name=o.time_sampler, s_mean=o.s_mean, s_std=o.s_std, gap_mean=o.gap_mean,
                                gap_std=o.gap_std, p_equal=o.p_equal),
        guidance=GuidanceConfig(num_classes=config.data.num_classes, mode=o.cfg_mode, w=o.w, w_min=o.w_min,
                                w_max=o.w_max, label_dropout=o.label_dropout),
        scaled_param=o.scaled_param, detach_jvp=o.detach_jvp,
        meanflow_adaptive_p=o.meanflow_adaptive_p, meanflow_adaptive_c=o.meanflow_adaptive_c,
    )


def train_step_config(config: ml_collections.ConfigDict) -> TrainStepConfig:
    """The :class:`TrainStepConfig` of a validated experiment config (``microbatch_size`` 0 is
    still "auto" here: :func:`tvm_jax.microbatching.compile_train_step` resolves it)."""
    return TrainStepConfig(ema_decay=config.ema.decay, target_decay=config.ema.target_decay,
                           microbatch_size=config.train.microbatch_size)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the first bad field. Cheap: builds nothing on a device."""
    m, d, t, s, opt, e = config.model, config.data, config.train, config.sample, config.optimizer, config.ema
    _need(m.type in MODEL_TYPES, "model.type", f"unknown model type {m.type!r}; choose one of {MODEL_TYPES}")
    if m.type == "dit":
        _need(m.size in (*MODEL_SIZES, "custom"), "model.size",
              f"unknown model size {m.size!r}; choose one of {sorted(MODEL_SIZES)} or 'custom'")
    _need(d.source in DATA_SOURCES, "data.source", f"unknown data source {d.source!r}; choose one of {DATA_SOURCES}")
    _need(isinstance(d.num_classes, int) and d.num_classes >= 1, "data.num_classes",
          f"must be a positive integer, got {d.num_classes!r}")
    _need(len(d.shape) in (1, 3) and all(int(x) > 0 for x in d.shape), "data.shape",
          f"must be (H, W, C) for images or (D,) for vectors, with positive sizes; got {tuple(d.shape)}")
    if m.type == "dit":
        _need(len(d.shape) == 3, "data.shape", f"the DiT needs (H, W, C) data, got {tuple(d.shape)}")
        dit_config(config)  # validates sizes, patch grid, switches
    else:
        _need(len(d.shape) == 1, "data.shape", f"the MLP model needs vector data (D,), got {tuple(d.shape)}")
        _need(m.mlp_width > 0 and m.mlp_depth > 0, "model.mlp_width", "width and depth must be positive")
    if d.source == "latents":
        _need(len(d.raw_mean) == d.shape[-1], "data.raw_mean", f"needs {d.shape[-1]} values, got {len(d.raw_mean)}")
        _need(len(d.raw_std) == d.shape[-1] and all(x > 0 for x in d.raw_std), "data.raw_std",
              f"needs {d.shape[-1]} positive values, got {tuple(d.raw_std)}")
        _need(d.final_std > 0, "data.final_std", f"must be positive, got {d.final_std}")
    _need(int(d.upsample) >= 1, "data.upsample", f"must be >= 1, got {d.upsample}")

    objective_config(config).validate()
    _need(isinstance(t.global_batch_size, int) and t.global_batch_size > 0, "train.global_batch_size",
          f"must be a positive integer, got {t.global_batch_size!r}")
    _need(t.num_steps >= 0, "train.num_steps", f"must be >= 0, got {t.num_steps}")
    _need(isinstance(t.microbatch_size, int) and t.microbatch_size >= 0, "train.microbatch_size",
          f"must be a non-negative integer (0: automatic), got {t.microbatch_size!r}")
    _need(isinstance(t.init_from, str), "train.init_from", f"must be a directory path, got {t.init_from!r}")
    for name in ("log_every", "checkpoint_every", "sample_every", "keep_checkpoints", "max_skipped_steps"):
        _need(t.get(name) > 0, f"train.{name}", f"must be positive, got {t.get(name)}")
    _need(opt.lr > 0, "optimizer.lr", f"must be positive, got {opt.lr}")
    _need(0 <= opt.b1 < 1 and 0 <= opt.b2 < 1, "optimizer.b1/b2", f"must be in [0, 1), got {opt.b1}, {opt.b2}")
    _need(opt.eps > 0, "optimizer.eps", f"must be positive, got {opt.eps}")
    _need(opt.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {opt.weight_decay}")
    _need(opt.max_grad_norm is None or opt.max_grad_norm > 0, "optimizer.max_grad_norm",
          f"must be positive or None, got {opt.max_grad_norm}")
    _need(0 <= e.decay < 1, "ema.decay", f"must be in [0, 1), got {e.decay}")
    _need(0 <= e.target_decay < 1, "ema.target_decay", f"must be in [0, 1), got {e.target_decay}")
    _need(s.w >= 1.0, "sample.w", f"the CFG weight must be >= 1, got {s.w}")
    _need(len(s.steps) > 0 and all(int(n) >= 1 for n in s.steps), "sample.steps",
          f"must be positive step counts, got {tuple(s.steps)}")
    _need(s.method in ("flow_map", "euler"), "sample.method", f"unknown method {s.method!r}")
    _need(s.num_images > 0, "sample.num_images", f"must be positive, got {s.num_images}")
    _need(config.eval.get("protocol") in EVAL_PROTOCOLS, "eval.protocol",
          f"unknown protocol {config.eval.get('protocol')!r}; choose one of {EVAL_PROTOCOLS}")
    _need(isinstance(config.mesh.fsdp, int) and config.mesh.fsdp >= 1, "mesh.fsdp",
          f"must be a positive integer, got {config.mesh.fsdp!r}")


def load_config_file(path: str, *args) -> ml_collections.ConfigDict:
    """Runs ``get_config(*args)`` of a config file (as ``--config=path`` would)."""
    import importlib.util
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    name = "config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)

"""Configs: the official recipes carry DESIGN section 5's values; bad values name their field."""
import glob
import os

import pytest

from tvm_jax.config import (
    RAW_MEAN_256, RAW_MEAN_512, RAW_STD_256, RAW_STD_512, dit_config, load_config_file, objective_config,
    validate_config,
)

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")


def _load(name):
    return load_config_file(os.path.join(ROOT, name + ".py"))


@pytest.mark.parametrize("name,w,scaled,specinit,clip,shape,mean,std", [
    ("in256_w2", 2.0, True, True, None, (32, 32, 4), RAW_MEAN_256, RAW_STD_256),
    ("in256_w1p75", 1.75, True, False, None, (32, 32, 4), RAW_MEAN_256, RAW_STD_256),
    ("in512_w2p25", 2.25, True, True, 1.0, (64, 64, 4), RAW_MEAN_512, RAW_STD_512),
    ("in512_w2p5", 2.5, False, False, 1.0, (64, 64, 4), RAW_MEAN_512, RAW_STD_512),
])
def test_official_recipes(name, w, scaled, specinit, clip, shape, mean, std):
    c = _load(name)
    validate_config(c)
    assert c.objective.w == w and c.objective.cfg_mode == "constant" and c.objective.scaled_param is scaled
    assert c.model.time_specinit is specinit and c.optimizer.max_grad_norm == clip
    assert tuple(c.data.shape) == shape and tuple(c.data.raw_mean) == mean and tuple(c.data.raw_std) == std
    assert c.data.final_std == 1.0
    assert (c.optimizer.lr, c.optimizer.b1, c.optimizer.b2, c.optimizer.eps, c.optimizer.weight_decay) == (
        1e-4, 0.9, 0.95, 1e-8, 0.0)
    assert c.train.global_batch_size == 2048 and c.model.dtype == "bfloat16"
    assert c.train.num_steps == 300_000 and c.train.microbatch_size == 0 and c.train.init_from == ""
    with open(os.path.join(ROOT, name + ".py")) as f:  # the docstring names the VAE all four recipes use
        text = f.read()
    assert "sd-vae-ft-ema" in text and "ft-mse" not in text
    assert (c.ema.decay, c.ema.target_decay) == (0.9999, 0.99)
    assert c.objective.label_dropout == 0.1
    o = objective_config(c)
    assert (o.times.name, o.times.s_mean, o.times.s_std, o.times.gap_mean, o.times.gap_std) == ("gap*", -0.4, 1.0,
                                                                                              -0.8, 1.0)
    m = dit_config(c)
    assert (m.hidden_size, m.depth, m.num_heads, m.patch_size, m.head_dim) == (1152, 28, 18, 2, 64)
    assert m.input_size == shape[0] and m.in_channels == 4 and m.num_classes == 1000
    assert m.mod_norm and m.qk_norm and m.norm == "rms" and m.init == "spectral"


def test_default_entry_points_are_the_headline_recipes():
    assert _load("in256").to_dict() == _load("in256_w2").to_dict()
    assert _load("in512").to_dict() == _load("in512_w2p5").to_dict()


def test_every_config_file_validates_and_has_a_docstring():
    files = sorted(glob.glob(os.path.join(ROOT, "*.py")))
    assert len(files) >= 6
    for path in files:
        text = open(path).read()
        assert text.lstrip().startswith(('"""', 'r"""')), path
        doc = text.split('"""')[1]
        assert "python -m tvm_jax.main" in doc and "xpected" in doc, path
        validate_config(load_config_file(path))


@pytest.mark.parametrize("field,value,match", [
    ("model.size", "XXL/2", "model.size"),
    ("objective.w", 0.9, "objective.w"),
    ("sample.w", 0.5, "sample.w"),
    ("eval.protocol", "edm", "eval.protocol: unknown protocol 'edm'"),
    ("train.global_batch_size", -8, "train.global_batch_size"),
    ("data.shape", (33, 33, 4), "model.input_size"),
    ("data.source", "lsun", "data.source"),
    ("optimizer.lr", 0.0, "optimizer.lr"),
    ("ema.target_decay", 1.0, "ema.target_decay"),
    ("mesh.fsdp", 0, "mesh.fsdp"),
    ("objective.cfg_mode", "random", "objective.cfg_mode"),
    ("model.attention_impl", "cuda", "model.attention_impl"),
    ("train.microbatch_size", -4, "train.microbatch_size"),
])
def test_bad_values_name_the_field(field, value, match):
    c = _load("in256_w2")
    section, key = field.split(".")
    c[section][key] = value
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        validate_config(c)


def test_custom_size_requires_its_dimensions():
    c = _load("in256_w2")
    c.model.size = "custom"
    with pytest.raises(ValueError, match="model.hidden_size"):
        validate_config(c)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError):
        load_config_file(os.path.join(ROOT, "nope.py"))


def test_eval_protocol_defaults():
    """The ImageNet recipes evaluate FID the paper's way; the toy configs with balanced labels."""
    for name in ("in256", "in256_w2", "in256_w1p75", "in512", "in512_w2p25", "in512_w2p5"):
        assert _load(name).eval.protocol == "paper", name
    for name in ("digits", "gmm"):
        assert _load(name).eval.protocol == "balanced", name

"""Random weight files for the tests (nothing is downloaded): tiny diffusers-format VAE folders
and FID-Inception state dicts, with the layouts and key names of the real files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from tvm_jax.evaluation import inception as inc
from tvm_jax import vae as vae_lib

TINY_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],  # latents at 1/2 the pixels
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 16,
    "scaling_factor": 0.18215,
}


def vae_keys_shapes(config) -> dict[str, tuple]:
    """diffusers key -> PyTorch-layout shape of every weight of a VAE with this config."""
    model = nnx.eval_shape(lambda: vae_lib.AutoencoderKL.from_config(config, nnx.Rngs(0)))
    return {k: shape for k, (_, shape, _) in vae_lib._module_param_table(model).items()}


def random_vae_state_dict(keys_shapes: dict[str, tuple], seed: int = 0) -> dict[str, np.ndarray]:
    """Random diffusers-layout weights: fan-in scaled convs/linears, perturbed norm affines."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in keys_shapes.items():
        if len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            out[k] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        elif k.endswith("weight"):  # group norm scale
            out[k] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[k] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


def write_vae_folder(path, state_dict=None, config=TINY_VAE_CONFIG, *, seed: int = 0) -> Path:
    """A diffusers ``AutoencoderKL`` folder (config.json + safetensors) at ``path``; random
    weights for ``config`` (from ``seed``) unless ``state_dict`` is given."""
    path = Path(path)
    if state_dict is None:
        state_dict = random_vae_state_dict(vae_keys_shapes(config), seed)
    path.mkdir(parents=True, exist_ok=True)
    (path / vae_lib.CONFIG_NAME).write_text(json.dumps(config))
    save_file(state_dict, str(path / vae_lib.WEIGHTS_NAME))
    return path


def inception_shapes() -> dict[str, tuple]:
    model = nnx.eval_shape(lambda: inc.FIDInceptionV3(rngs=nnx.Rngs(0)))
    return {k: shape for k, (_, shape, _) in inc._variable_table(model).items()}


def random_inception_state_dict(seed: int = 0, *, torch_extras: bool = False) -> dict[str, np.ndarray]:
    """He-scaled conv weights, random BatchNorm affine and running statistics. ``torch_extras``
    adds the entries of the real pytorch-fid file that loading must ignore (fc, num_batches_tracked)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for k, shape in inception_shapes().items():
        if k.endswith("conv.weight"):
            v = rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[1:])))
        elif k.endswith("bn.weight"):
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif k.endswith("bn.bias"):
            v = 0.1 * rng.standard_normal(shape)
        elif k.endswith("running_mean"):
            v = 0.2 * rng.standard_normal(shape)
        elif k.endswith("running_var"):
            v = rng.uniform(0.5, 2.0, shape)
        else:
            raise AssertionError(f"unexpected Inception variable {k}")
        sd[k] = v.astype(np.float32)
        if torch_extras and k.endswith("running_var"):
            sd[k.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
    if torch_extras:
        sd["fc.weight"] = (0.01 * rng.standard_normal((1008, 2048))).astype(np.float32)
        sd["fc.bias"] = np.zeros((1008,), np.float32)
    return sd

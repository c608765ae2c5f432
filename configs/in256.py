r"""ImageNet 256x256, the default entry point: the paper's 1-NFE recipe (same as in256_w2.py).

Reproduces the official ``im256_w2`` configuration of Terminal Velocity Matching: DiT-XL/2-18h
on 32x32x4 sd-vae-ft-ema latents, w = 2 with the scaled parameterisation, global batch 2048 split
over all visible GPUs and, with gradient accumulation, into micro-batches that fit them; 300k
steps (see ``configs/in256_w2.py`` for every value).

Expected result (paper): FID 3.29 at 1 NFE on ImageNet 256x256.

Command:
  python -m tvm_jax.main --config=configs/in256.py \
      --config.data.path=/data/imagenet256_latents --workdir=runs/in256
"""
import os

from tvm_jax.config import load_config_file


def get_config():
    return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "in256_w2.py"))

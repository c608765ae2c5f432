r"""ImageNet 512x512, the default 512px entry point: the paper's headline 512 recipe (in512_w2p5).

Reproduces the official ``im512_w2p5`` configuration: DiT-XL/2-18h on 64x64x4 sd-vae-ft-ema
latents, w = 2.5 without the scaled parameterisation, gradient clipping 1.0, global batch 2048
for 300k steps (see ``configs/in512_w2p5.py``).

Expected result (paper, Table 2): FID 4.32 at 1 NFE and 3.50 at 2 NFE on ImageNet 512x512.

Command:
  python -m tvm_jax.main --config=configs/in512.py \
      --config.data.path=/data/imagenet512_latents --workdir=runs/in512
"""
import os

from tvm_jax.config import load_config_file


def get_config():
    return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "in512_w2p5.py"))

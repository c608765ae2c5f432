r"""ImageNet 256x256 with TVM: DiT-XL/2-18h, constant CFG w = 2 (the paper's 1-NFE recipe).

Reproduces the official ``im256_w2`` configuration of Terminal Velocity Matching
(Zhou, Parger, Haque, Song; arXiv 2511.19797): DiT-XL/2-18h on Stable-Diffusion VAE (sd-vae-ft-ema)
latents of 32x32x4, gap* time sampler (s ~ LN(-0.4, 1), gap ~ LN(-0.8, 1)), constant w = 2 with the
scaled parameterisation, 10% label dropout, time_specinit, AdamW (lr 1e-4, b1 0.9, b2 0.95,
eps 1e-8, no weight decay, no schedule), global batch 2048 for 300k steps (paper, Table 7), bf16
compute with fp32 parameters, evaluation EMA 0.9999, EMA target 0.99, no gradient clipping. The
batch is split into micro-batches that fit the GPUs (gradient accumulation,
``train.microbatch_size``; by default the largest that fits, chosen before training).

Expected result (paper): FID 3.29 at 1 NFE on ImageNet 256x256 (50k samples, w = 2).

Command (latents prepared with ``python -m tvm_jax.data.prepare_imagenet``):
  python -m tvm_jax.main --config=configs/in256_w2.py \
      --config.data.path=/data/imagenet256_latents --workdir=runs/in256_w2
"""
from tvm_jax.config import RAW_MEAN_256, RAW_STD_256, base_config


def get_config():
    c = base_config()
    c.model.size = "XL/2-18h"
    # Measured on an H200 (bench/NOTES.md, items 23-24): one traced copy per block and no remat runs
    # this recipe at 155.8 img/s (the trainer picks micro-batches of 64, 86.5 GiB), against 138.0
    # img/s for the layer scan with remat "dots" (also micro-batch 64) on the same machine (157.5
    # with the gradient barrier of item 24, another machine); a step of 32 takes 225.6 ms (49 GiB).
    # The price: about 100 s of compilation per micro-batch size tried, against 20. With less memory
    # the trainer picks smaller micro-batches; on 80 GB GPUs the scan with "dots" may be the faster:
    # not measured.
    c.model.layer_loop = "unroll"
    c.model.remat = "none"
    c.model.time_specinit = True
    c.objective.w = 2.0
    c.objective.scaled_param = True
    c.optimizer.max_grad_norm = None
    c.data.resolution = 256
    c.data.shape = (32, 32, 4)
    c.data.raw_mean = RAW_MEAN_256
    c.data.raw_std = RAW_STD_256
    c.sample.w = 2.0
    return c

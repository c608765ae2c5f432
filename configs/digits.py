r"""Bundled handwritten digits (scikit-learn, 8x8 upsampled to 16x16): a small TVM DiT on the CPU.

Reproduces: nothing from the paper; this is the embedded default that shows the whole pipeline
(grain data, sharded jitted TVM step with both EMAs, Orbax checkpoints, TensorBoard metrics and
sample grids) working in minutes on a laptop-class CPU. DiT with hidden 96, depth 4, 4 heads,
patch 2 on 16x16x1 images (64 tokens), TVM with the gap* sampler and scaled parameterisation,
constant CFG w = 1.5 with 10% label dropout, AdamW lr 1e-3 (b2 0.95), batch 128, 3000 steps.

Expected result: after 3000 steps (under 10 minutes on 2 CPU cores) the 1- and 2-step sample
grids in WORKDIR/samples show recognisable digits of the requested classes (one class per
column position, cycling 0-9).

Command:
  python -m tvm_jax.main --config=configs/digits.py --workdir=runs/digits
"""
from tvm_jax.config import base_config


def get_config():
    c = base_config()
    c.model.size = "custom"
    c.model.hidden_size = 64
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.patch_size = 4
    c.model.time_specinit = False
    c.model.dtype = "float32"
    c.data.source = "digits"
    c.data.upsample = 2
    c.data.shape = (16, 16, 1)
    c.data.num_classes = 10
    c.objective.w = 1.5
    c.optimizer.lr = 1e-3
    c.ema.decay = 0.999
    c.ema.target_decay = 0.99
    c.train.global_batch_size = 128
    c.train.num_steps = 3000
    c.train.log_every = 100
    c.train.checkpoint_every = 1000
    c.train.sample_every = 1000
    c.sample.steps = (1, 2, 4)
    c.sample.w = 1.5
    c.sample.num_images = 40
    return c

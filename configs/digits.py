r"""Bundled handwritten digits (scikit-learn, 8x8, 10 classes): a small TVM DiT on the CPU.

Reproduces: nothing from the paper; this is the embedded default that shows the whole pipeline
(grain data, sharded jitted TVM step with both EMAs, Orbax checkpoints, TensorBoard metrics and
sample grids) working in minutes on a laptop-class CPU. DiT with hidden 64, depth 4, 4 heads,
patch 2 on 8x8x1 images (16 tokens, 370k parameters), TVM with the gap* sampler and scaled
parameterisation, constant CFG w = 1.5 with 10% label dropout, AdamW lr 1e-3 (b2 0.95),
batch 64, 2000 steps, evaluation EMA 0.995.

Expected result: 6.5 minutes on 2 CPU cores (measured: 0.18 s per step, 350 img/s); the 1- and
2-step grids in WORKDIR/samples/ (classes 0, 1, ..., 9 in reading order, repeating) show
recognisable digits of the requested classes. The same model trained 4000 steps at batch 128 on a GPU reaches 98.8 % class accuracy
at 1 step (bench/QUALITY.md).

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
    c.model.patch_size = 2
    c.model.time_specinit = False
    c.model.dtype = "float32"
    c.data.source = "digits"
    c.eval.protocol = "balanced"  # "paper" is the ImageNet FID protocol (latents only)
    c.data.upsample = 1
    c.data.shape = (8, 8, 1)
    c.data.num_classes = 10
    c.objective.w = 1.5
    c.optimizer.lr = 1e-3
    c.ema.decay = 0.995
    c.ema.target_decay = 0.99
    c.train.global_batch_size = 64
    c.train.num_steps = 2000
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.sample_every = 500
    c.sample.steps = (1, 2, 4)
    c.sample.w = 1.5
    c.sample.num_images = 40
    return c

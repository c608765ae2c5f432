r"""Class-conditional 2-D Gaussian mixture (8 anisotropic components on a ring, 4 classes).

Reproduces: nothing from the paper; the mixture has an exact flow map (tvm_jax.gmm_truth), so
``--mode=evaluate`` measures the learned flow map against ground truth (displacement error and
the exact 2-Wasserstein distance of 1/2/4-step samples to the true pushforward). Residual MLP
flow-map model (width 128, depth 4), TVM with the gap* sampler, w = 1 (no guidance),
AdamW lr 1e-3, batch 256, 3000 steps.

Expected result: in about two minutes on 2 CPU cores, 1-step samples whose W2 distance to the
true distribution is within a small multiple of the data-vs-data W2 floor (see
bench/results/quality_gmm.json for the measured numbers).

Command:
  python -m tvm_jax.main --config=configs/gmm.py --workdir=runs/gmm
  python -m tvm_jax.main --config=configs/gmm.py --workdir=runs/gmm --mode=evaluate
"""
from tvm_jax.config import base_config


def get_config():
    c = base_config()
    c.model.type = "mlp"
    c.model.mlp_width = 128
    c.model.mlp_depth = 4
    c.model.dtype = "float32"
    c.data.source = "gmm"
    c.eval.protocol = "balanced"  # "paper" is the ImageNet FID protocol (latents only)
    c.data.shape = (2,)
    c.data.num_classes = 4
    c.data.gmm_dim = 2
    c.data.gmm_components_per_class = 2
    c.objective.w = 1.0
    c.objective.label_dropout = 0.1
    c.optimizer.lr = 1e-3
    c.ema.decay = 0.999
    c.train.global_batch_size = 256
    c.train.num_steps = 3000
    c.train.log_every = 200
    c.train.checkpoint_every = 1000
    c.train.sample_every = 1000
    c.sample.steps = (1, 2, 4)
    c.sample.w = 1.0
    c.sample.num_images = 2000
    return c

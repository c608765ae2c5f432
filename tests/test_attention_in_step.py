"""The training objective's loss and gradients do not depend on the attention implementation (nor on
the rematerialisation policy that keeps its kernels' outputs):
the fused Pallas kernels (forward + tangent, both backwards) and, on a GPU, whatever ``auto``
picks (Pallas or cuDNN per shape) against XLA's plain attention, in float32.

On the CPU the Pallas kernels run in the interpreter (tiny DiT); the GPU variant runs the native
kernels at DiT-XL/2's head dim 64 and 256 tokens (skipped without a GPU)."""
import os

import jax
import numpy as np
import pytest

from tvm_jax.config import load_config_file, objective_config
from tvm_jax.networks import build_network
from tvm_jax.objectives import make_objective
from tvm_jax.randomness import example_keys

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _config(impl: str, *, hidden: int, heads: int, depth: int, size: int, remat: str = "none",
            layer_loop: str = "scan"):
    c = load_config_file(os.path.join(CONFIGS, "in256.py"))
    c.data.source, c.data.shape, c.data.num_classes = "synthetic", (size, size, 4), 10
    c.model.size = "custom"
    c.model.hidden_size, c.model.num_heads, c.model.depth = hidden, heads, depth
    c.model.dtype, c.model.attention_impl, c.model.remat = "float32", impl, remat
    c.model.layer_loop = layer_loop
    return c


def _loss_grad_fn(config, batch: int):
    """(value_and_grad of the objective's loss, the parameters it is evaluated at)."""
    net = build_network(config)
    loss_fn = make_objective(objective_config(config))
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((batch, *config.data.shape)).astype(np.float32)
    labels = rng.integers(0, config.data.num_classes, batch).astype(np.int32)
    keys = example_keys(jax.random.key(3), np.arange(batch))
    # a trained-looking network: the zero-initialised output layers would hide the attention
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size % 97), p.shape, p.dtype),
                          net.params)
    target = jax.tree.map(lambda p: 0.9 * p, params)

    def loss(p):
        return loss_fn(net.apply, p, target, x0, labels, keys)[0]

    return jax.value_and_grad(loss), params


def _loss_and_grads(config, batch: int):
    fn, params = _loss_grad_fn(config, batch)
    return jax.device_get(jax.jit(fn)(params))


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _compare(impl: str, tolerance: float, remat: str = "none", layer_loop: str = "scan", **shape):
    # the reference: XLA attention without rematerialisation, layers in a scan
    (loss, grads), (loss_ref, grads_ref) = (_loss_and_grads(_config(i, remat=r, layer_loop=l, **shape), batch=4)
                                            for i, r, l in ((impl, remat, layer_loop), ("xla", "none", "scan")))
    assert np.isfinite(loss) and abs(loss - loss_ref) <= tolerance * abs(loss_ref), (loss, loss_ref)
    worst = max((_relative(g, r), jax.tree_util.keystr(path)) for (path, g), r in
                zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads_ref)))
    assert worst[0] <= tolerance, worst


def test_pallas_step_matches_xla_on_cpu():
    _compare("pallas", 1e-4, hidden=32, heads=2, depth=1, size=8)  # head dim 16, 16 tokens (interpreter)


@pytest.mark.parametrize("remat,layer_loop", [("none", "scan"), ("block", "unroll")])
def test_pallas_step_with_the_memory_pass_kernels_matches_xla_on_cpu(monkeypatch, remat, layer_loop):
    """``auto`` standing as on a GPU (kernels in the interpreter): the JVP call's pre-norms run
    kernels.norm_modulate_tangent, whose Pallas backward the gradient uses, and the other calls
    the MLP and second-norm kernels; the loss and gradients are still the XLA step's, in a layer
    scan and under rematerialisation."""
    import kernels.api

    monkeypatch.setattr(kernels.api, "_on_gpu", lambda: True)
    shape = dict(hidden=32, heads=2, depth=2, size=8)
    fn, params = _loss_grad_fn(_config("pallas", remat=remat, layer_loop=layer_loop, **shape), batch=4)
    text = str(jax.make_jaxpr(fn)(params))
    for name in ("tvm_norm_modulate_tangent_bwd", "tvm_bias_gelu", "tvm_residual_norm_modulate"):
        assert name in text, name
    _compare("pallas", 1e-4, remat=remat, layer_loop=layer_loop, **shape)


@pytest.mark.gpu
@pytest.mark.parametrize("impl,remat,layer_loop", [("pallas", "none", "scan"), ("auto", "none", "scan"),
                                                   ("pallas", "dots", "scan"), ("auto", "block", "scan"),
                                                   ("auto", "dots", "unroll"), ("auto", "none", "unroll")])
def test_step_matches_xla_on_gpu(impl, remat, layer_loop):
    # Triton's float32 dots round like tf32 (about 3e-4 relative): a few times that over a step.
    # remat "dots"/"block" keep the attention kernels' outputs (model.save_attention, the default).
    _compare(impl, 3e-3, remat=remat, layer_loop=layer_loop, hidden=128, heads=2, depth=2, size=32)  # head dim 64, 256 tokens

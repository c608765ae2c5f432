"""The pure training step: EMAs, non-finite skipping, clipping, sharded == single-device."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels.api as kernels_api
from hlo_text import layer_concatenates
from tvm_jax import sharding as shd
from tvm_jax.config import load_config_file, objective_config, train_step_config
from tvm_jax.networks import LayeredParams, build_network, layered_params
from tvm_jax.objectives import make_objective
from tvm_jax.training import init_train_state, make_optimizer, make_train_step

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _gmm_config(**train):
    c = load_config_file(os.path.join(CONFIGS, "gmm.py"))
    c.model.mlp_width, c.model.mlp_depth = 32, 2
    c.train.global_batch_size = 16
    for k, v in train.items():
        c.train[k] = v
    return c


def _dit_config():
    c = load_config_file(os.path.join(CONFIGS, "digits.py"))
    c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.patch_size = 32, 2, 2, 4
    c.model.attention_impl = "xla"
    c.train.global_batch_size = 8
    return c


def _setup(config, mesh=None):
    net = build_network(config, mesh)
    opt = make_optimizer(config)
    step = make_train_step(net.apply, make_objective(objective_config(config)), opt, train_step_config(config),
                           prepare_params=net.prepare)
    return net, opt, step


def _batch(config, n, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, *config.data.shape)).astype(np.float32),
            "label": rng.integers(0, config.data.num_classes, n).astype(np.int32)}


def test_ema_updates_and_step_counter():
    c = _gmm_config()
    c.ema.decay, c.ema.target_decay = 0.9, 0.5
    net, opt, step = _setup(c)
    state = init_train_state(net.params, opt, seed=0)
    new, metrics = jax.jit(step)(state, _batch(c, 16))
    assert int(new.step) == 1 and int(metrics["skipped"]) == 0
    for old_p, new_p, ema, tgt in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params),
                                      jax.tree.leaves(new.ema_params), jax.tree.leaves(new.target_params)):
        np.testing.assert_allclose(ema, 0.9 * old_p + 0.1 * new_p, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(tgt, 0.5 * old_p + 0.5 * new_p, rtol=1e-6, atol=1e-7)
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)))


def test_target_decay_zero_means_no_ema_target():
    c = _gmm_config()
    c.ema.target_decay = 0.0
    net, opt, step = _setup(c)
    new, _ = jax.jit(step)(init_train_state(net.params, opt, 0), _batch(c, 16))
    for p, t in zip(jax.tree.leaves(new.params), jax.tree.leaves(new.target_params)):
        np.testing.assert_array_equal(p, t)


def test_non_finite_step_is_skipped_counted_and_recovered():
    c = _gmm_config()
    net, opt, step = _setup(c)
    step = jax.jit(step)
    state = init_train_state(net.params, opt, 0)
    state, _ = step(state, _batch(c, 16, 1))
    bad = _batch(c, 16, 2)
    bad["x"][3, 0] = np.nan
    after, metrics = step(state, bad)
    assert int(metrics["skipped"]) == 1 and int(after.skipped) == 1 and int(after.consecutive_skipped) == 1
    assert int(after.step) == int(state.step) + 1
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state, state.ema_params, state.target_params)),
                    jax.tree.leaves((after.params, after.opt_state, after.ema_params, after.target_params))):
        np.testing.assert_array_equal(a, b)
    recovered, metrics = step(after, _batch(c, 16, 3))
    assert int(metrics["skipped"]) == 0 and int(recovered.consecutive_skipped) == 0 and int(recovered.skipped) == 1


def test_unrolled_dit_splits_its_layers_once_for_both_student_calls():
    """TVM calls the student twice (the JVP and the flow-matching term). With the layers
    unrolled, each call used to split the stacked block parameters itself, so the backward
    assembled every stacked gradient twice (two concatenates, then an add: 6.4 ms of the 256px
    step on an H200, bench/NOTES.md item 24). ``Network.prepare`` splits once inside the
    differentiated loss: one concatenate per stacked parameter, and the same update."""
    c = _dit_config()
    c.model.depth, c.model.layer_loop = 3, "unroll"
    net = build_network(c)
    assert net.prepare is not None
    prepared = net.prepare(net.params)
    assert isinstance(prepared, LayeredParams) and len(prepared.layers) == 3
    opt = make_optimizer(c)
    objective = make_objective(objective_config(c))
    # random weights: at initialisation the zero adaLN and output layers leave most gradients zero
    leaves, treedef = jax.tree.flatten(net.params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = treedef.unflatten([0.2 * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])
    state = init_train_state(params, opt, seed=0)
    batch = _batch(c, 8)
    results = {}
    for name, prepare in (("shared", net.prepare), ("per_call", None)):
        step = jax.jit(make_train_step(net.apply, objective, opt, train_step_config(c), prepare_params=prepare))
        text = step.lower(state, batch).as_text()
        new, metrics = step(state, batch)
        results[name] = len(layer_concatenates(text, 3)), new, metrics
    n_stacked = len(jax.tree.leaves(net.params["blocks"]))
    assert results["shared"][0] == n_stacked, (results["shared"][0], n_stacked)
    assert results["per_call"][0] == 2 * n_stacked, (results["per_call"][0], n_stacked)
    (_, shared, m_shared), (_, per_call, m_per_call) = results["shared"], results["per_call"]
    np.testing.assert_allclose(m_shared["loss"], m_per_call["loss"], rtol=1e-6)
    moved = 0
    for a, b, old in zip(jax.tree.leaves(shared.params), jax.tree.leaves(per_call.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        moved += bool(np.any(np.asarray(a) != np.asarray(old)))
    assert moved > len(jax.tree.leaves(state.params)) // 2


def test_layered_params_refuses_what_it_cannot_split():
    c = _dit_config()
    net = build_network(c)  # layer_loop="scan": nothing to share
    assert net.prepare is None
    with pytest.raises(ValueError, match="leading axis of the depth 5"):
        layered_params(net.params, depth=5)
    with pytest.raises(ValueError, match="expected a DiT's parameters"):
        layered_params({"w": jnp.ones(3)}, depth=1)
    prepared = layered_params(net.params, depth=c.model.depth)
    x = jnp.zeros((2, *c.data.shape))
    with pytest.raises(ValueError, match="need layer_loop='unroll'"):
        net.apply(prepared, x, 0.5, 0.1, jnp.array([1, 2]), 1.0)


def test_gradient_clipping_is_applied():
    c = _gmm_config()
    c.optimizer.max_grad_norm = 1e-3
    c.optimizer.lr = 1.0
    c.optimizer.eps = 1.0  # makes Adam's first step proportional to the (clipped) gradient
    clipped = make_optimizer(c)
    grads = {"w": jnp.full((4,), 3.0)}
    updates, _ = clipped.update(grads, clipped.init({"w": jnp.zeros(4)}), {"w": jnp.zeros(4)})
    c.optimizer.max_grad_norm = None
    plain = make_optimizer(c)
    updates_plain, _ = plain.update(grads, plain.init({"w": jnp.zeros(4)}), {"w": jnp.zeros(4)})
    # first Adam step = g / (|g| + eps): ~1e-3/2 per element when clipped to global norm 1e-3, 3/4 unclipped
    np.testing.assert_allclose(updates["w"], -(5e-4 / (5e-4 + 1.0)), rtol=1e-3)
    np.testing.assert_allclose(updates_plain["w"], -0.75, rtol=1e-3)


_SINGLE_DEVICE_RUNS = {}  # kernels -> (state, metrics) of the 1-device reference step below


@pytest.mark.parametrize("fsdp,kernels", [(1, False), (2, False), (1, True)], ids=["data", "fsdp", "data-pallas"])
def test_sharded_step_equals_single_device_step(fsdp, kernels, monkeypatch):
    """A DiT step over a (data, fsdp) mesh of 4 CPU devices equals the 1-device step. With
    ``kernels`` the model runs the Pallas kernels (interpreted) as on a GPU, layers unrolled as
    the recipes run them, at 16 tokens of head dim 16, where every kernel of the JVP call applies
    (the qkv prologue's backward and the pre-norms' backward with its in-place pass-through
    included) and ``auto`` picks the memory-pass kernels: each runs on its device's batch shard."""
    assert len(jax.devices()) >= 4, "conftest.py provides 4 CPU devices"
    monkeypatch.setattr(shd, "MIN_SHARD_SIZE", 1024)  # so that the tiny test DiT gets sharded
    c = _dit_config()
    c.mesh.fsdp = fsdp
    if kernels:
        c.model.attention_impl, c.model.patch_size, c.model.layer_loop = "pallas", 2, "unroll"
        monkeypatch.setattr(kernels_api, "_on_gpu", lambda: True)  # auto: the memory-pass kernels too
    batch = _batch(c, 8, 5)

    def run(mesh):
        with jax.set_mesh(mesh):
            net, opt, step = _setup(c, mesh)
            init = lambda p: init_train_state(p, opt, 0)  # noqa: E731
            state_sh = shd.state_shardings(jax.eval_shape(init, net.params), mesh)
            state = jax.jit(init, out_shardings=state_sh)(net.params)
            jstep = jax.jit(step, in_shardings=(state_sh, shd.batch_sharding(mesh)), out_shardings=(state_sh, None))
            if kernels:
                traced = str(jax.make_jaxpr(step)(state, shd.global_batch(batch, mesh)))
                for name in ("tvm_flash_jvp_fwd", "tvm_qkv_tangent_bwd", "tvm_norm_modulate_tangent_bwd",
                             "tvm_bias_gelu", "tvm_residual_norm_modulate"):
                    assert name in traced, name
            for _ in range(2):
                state, metrics = jstep(state, shd.global_batch(batch, mesh))
            return state, metrics

    mesh4 = shd.make_mesh(fsdp, jax.devices()[:4])
    state4, m4 = run(mesh4)
    if kernels not in _SINGLE_DEVICE_RUNS:  # the same on one device whatever mesh.fsdp says: run it once
        _SINGLE_DEVICE_RUNS[kernels] = jax.device_get(run(shd.make_mesh(1, jax.devices()[:1])))
    state1, m1 = _SINGLE_DEVICE_RUNS[kernels]
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=2e-5)
    # Adam divides each gradient by its own running RMS, so an element whose gradient is ~0 moves by
    # up to ~lr whatever its size: summation-order noise of the sharded reduction can show there at
    # a few percent of lr (1e-3). atol = 5e-5 allows that and still catches any real divergence.
    for a, b in zip(jax.tree.leaves(state4.params), jax.tree.leaves(state1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)
    if fsdp > 1:
        big = [a for a in jax.tree.leaves(state4.params) if a.size >= shd.MIN_SHARD_SIZE]
        assert big, "the test model must have parameters large enough to shard"
        for a in big:
            assert "fsdp" in str(a.sharding.spec), a.shape
            assert a.addressable_shards[0].data.size == a.size // fsdp


def test_param_spec_rules():
    assert shd.param_spec((1152, 4608), 4) == jax.sharding.PartitionSpec(None, "fsdp")
    assert shd.param_spec((28, 1152, 4608), 4, stacked=True) == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert shd.param_spec((64,), 4) == jax.sharding.PartitionSpec()  # small: replicated
    assert shd.param_spec((1001, 1153), 4) == jax.sharding.PartitionSpec()  # indivisible: replicated
    assert shd.param_spec((1152, 4608), 1) == jax.sharding.PartitionSpec()
    with pytest.raises(ValueError, match="mesh.fsdp"):
        shd.make_mesh(3, jax.devices()[:4])

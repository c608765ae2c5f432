"""Gradient accumulation: an accumulated step is the one-big-batch step, on any mesh.

Each case runs two steps of the jitted step twice on the same batches, once over the whole
per-device batch and once in micro-batches, and compares everything the step produces:
parameters, optimiser state, both EMAs, counters and metrics (float32, differences only from
the order of the sums). Per-example randomness is keyed by the example's index in the global
batch, so the split cannot change what a sample draws. Also here: the micro-batch layout is
device-local (no collective moves batch data), a micro-batch size that does not divide the
per-device batch is refused before compiling, and the automatic choice against a memory limit.
"""
import dataclasses
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvm_jax import microbatching
from tvm_jax import sharding as shd
from tvm_jax.config import load_config_file, objective_config, train_step_config
from tvm_jax.networks import build_network
from tvm_jax.objectives import make_objective
from tvm_jax.training import TrainStepConfig, init_train_state, make_optimizer, make_train_step

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
GLOBAL_BATCH = 16


def _config(model: str, objective: str, fsdp: int):
    if model == "mlp":
        c = load_config_file(os.path.join(CONFIGS, "gmm.py"))
        c.model.mlp_width, c.model.mlp_depth = 32, 2
    else:
        c = load_config_file(os.path.join(CONFIGS, "digits.py"))
        c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.patch_size = 32, 2, 2, 4
        c.model.attention_impl = "xla"
    c.train.global_batch_size = GLOBAL_BATCH
    c.mesh.fsdp = fsdp
    c.objective.name = objective
    # Per-sample guidance and label dropout, so that per-example randomness matters everywhere.
    c.objective.cfg_mode, c.objective.w_min, c.objective.w_max, c.objective.label_dropout = "uniform_w", 1.0, 3.0, 0.3
    if objective == "meanflow":
        c.objective.time_sampler, c.objective.p_equal = "clamp", 0.25
    c.ema.decay, c.ema.target_decay = 0.9, 0.5
    # Adam's first steps divide each gradient by its own magnitude, which turns summation-order
    # noise in a ~0 gradient into an update of up to lr; eps = lr keeps that map 1-Lipschitz so
    # the comparison can be tight. (The optimiser state compares the raw gradients anyway.)
    c.optimizer.lr, c.optimizer.eps = 1e-3, 1e-3
    return c


def _batches(config, n=2):
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((GLOBAL_BATCH, *config.data.shape)).astype(np.float32),
             "label": rng.integers(0, config.data.num_classes, GLOBAL_BATCH).astype(np.int32)} for _ in range(n)]


def _jitted_step(config, mesh, microbatch_size: int):
    net = build_network(config, mesh)
    opt = make_optimizer(config)
    init = lambda p: init_train_state(p, opt, config.seed)  # noqa: E731
    state_sh = shd.state_shardings(jax.eval_shape(init, net.params), mesh)
    state = jax.jit(init, out_shardings=state_sh)(net.params)
    cfg = dataclasses.replace(train_step_config(config), microbatch_size=microbatch_size)
    batch_sh = shd.batch_sharding(mesh)
    step = make_train_step(net.apply, make_objective(objective_config(config)), opt, cfg, batch_sharding=batch_sh,
                           param_shardings=state_sh.params)
    return state, jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, shd.replicated(mesh)))


def _run(config, mesh, microbatch_size: int, batches):
    with jax.set_mesh(mesh):
        state, step = _jitted_step(config, mesh, microbatch_size)
        for b in batches:
            state, metrics = step(state, shd.global_batch(b, mesh))
        return jax.device_get(state), jax.device_get(metrics), step


def _assert_close(a, b, rtol=2e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


CASES = [  # (model, objective, devices, fsdp, micro-batch size per device)
    ("mlp", "tvm", 1, 1, 4),
    ("mlp", "fm", 1, 1, 2),
    ("mlp", "meanflow", 1, 1, 8),
    ("mlp", "tvm", 4, 1, 1),
    ("mlp", "fm", 4, 2, 2),
    ("mlp", "meanflow", 4, 2, 1),
    ("dit", "tvm", 4, 2, 2),
]


@pytest.mark.parametrize("model,objective,devices,fsdp,microbatch", CASES,
                         ids=[f"{m}-{o}-{d}dev-fsdp{f}-mb{b}" for m, o, d, f, b in CASES])
def test_accumulated_step_equals_one_big_batch(model, objective, devices, fsdp, microbatch, monkeypatch):
    assert len(jax.devices()) >= 4, "conftest.py provides 4 CPU devices"
    monkeypatch.setattr(shd, "MIN_SHARD_SIZE", 256)  # so that the tiny test models get sharded
    config = _config(model, objective, fsdp)
    mesh = shd.make_mesh(fsdp, jax.devices()[:devices])
    batches = _batches(config)
    whole_state, whole_metrics, _ = _run(config, mesh, 0, batches)
    acc_state, acc_metrics, step = _run(config, mesh, microbatch, batches)

    assert int(acc_state.step) == 2 and int(acc_state.skipped) == 0
    _assert_close(acc_state, whole_state)  # params, opt state, both EMAs, step, rng, skip counters
    assert sorted(acc_metrics) == sorted(whole_metrics)
    for k in whole_metrics:
        np.testing.assert_allclose(acc_metrics[k], whole_metrics[k], rtol=2e-5, atol=1e-6, err_msg=k)
    # the two EMAs really moved (a comparison of untouched copies would prove nothing)
    for p, e in zip(jax.tree.leaves(acc_state.params), jax.tree.leaves(acc_state.ema_params)):
        if np.abs(np.asarray(p) - np.asarray(e)).max() > 0:
            break
    else:
        raise AssertionError("the EMA never differed from the parameters")

    with jax.set_mesh(mesh):
        lowered = step.lower(*_abstract_args(config, mesh, microbatch))
    assert "stablehlo.while" in lowered.as_text(), "the accumulated step must loop over micro-batches"
    if devices > 1 and fsdp == 1:
        # pure data parallelism: only the gradient all-reduce crosses devices; regrouping the
        # batch into micro-batches moves no data between them
        hlo = lowered.compile().as_text()
        assert "all-reduce" in hlo
        for collective in ("all-to-all", "collective-permute", "all-gather"):
            assert collective not in hlo, collective


def test_microbatches_hold_every_devices_local_slices():
    x = jnp.arange(16)
    micro = microbatching.split_microbatches(x, micro_batches=2, num_devices=4)
    # device d holds rows 4d..4d+3; micro-batch j takes rows 4d+2j, 4d+2j+1 of every device
    np.testing.assert_array_equal(micro, [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]])


def test_microbatch_size_must_divide_the_per_device_batch():
    """Refused while tracing, before XLA compiles anything (the trainer checks it even earlier,
    in its pre-flight: tests/test_trainer.py)."""
    config = _config("mlp", "tvm", 1)
    mesh = shd.make_mesh(1, jax.devices()[:4])
    with jax.set_mesh(mesh):
        _, step = _jitted_step(config, mesh, 3)
        with pytest.raises(ValueError, match=r"train\.microbatch_size: 3 does not divide the per-device batch 4 "
                                             r"\(train\.global_batch_size 16 over 4 devices\); use one of \[1, 2, 4\]"):
            step.lower(*_abstract_args(config, mesh, 3))
    with pytest.raises(ValueError, match=r"train\.microbatch_size: must be a non-negative integer"):
        TrainStepConfig(0.9, 0.5, -1)


def _abstract_args(config, mesh, microbatch):
    state, _ = _jitted_step(config, mesh, microbatch)
    batch = {"x": jax.ShapeDtypeStruct((GLOBAL_BATCH, *config.data.shape), jnp.float32,
                                       sharding=shd.batch_sharding(mesh)),
             "label": jax.ShapeDtypeStruct((GLOBAL_BATCH,), jnp.int32, sharding=shd.batch_sharding(mesh))}
    return state, batch


def test_each_compilation_of_the_step_is_logged_with_its_time(caplog):
    """Sizing compiles the step once per size tried (about 100 s each for DiT-XL with unrolled
    layers): each compilation says which size it is for before it starts, and how long it took."""
    class Lowered:
        def __init__(self, size):
            self.size = size

        def compile(self):
            return self

        def memory_analysis(self):
            raise NotImplementedError

    caplog.set_level(logging.INFO, logger="absl")  # microbatching logs through absl's logger
    microbatching.compile_train_step(Lowered, 8, 2)
    microbatching.compile_train_step(Lowered, 8, 0, memory_limit=10**9)
    lines = [r.getMessage() for r in caplog.records]
    for size in (2, 8):
        start = lines.index(f"Compiling the training step for micro-batches of {size} per device ...")
        assert re.fullmatch(rf"Compiled the step for micro-batches of {size} in \d+\.\d s", lines[start + 1]), lines


def test_automatic_microbatch_size_is_the_largest_that_fits():
    """Against a memory limit between the compiled sizes, the largest fitting divisor wins and its
    executable is the one returned; no limit (the CPU) takes the whole per-device batch."""
    config = _config("mlp", "tvm", 1)
    config.train.global_batch_size = n = 256  # large enough for activations to dominate the parameters
    mesh = shd.make_mesh(1, jax.devices()[:1])
    lowered = []
    with jax.set_mesh(mesh):
        net = build_network(config, mesh)
        opt = make_optimizer(config)
        state = init_train_state(net.params, opt, 0)
        batch = {"x": jax.ShapeDtypeStruct((n, *config.data.shape), jnp.float32),
                 "label": jax.ShapeDtypeStruct((n,), jnp.int32)}
        objective = make_objective(objective_config(config))
        base = train_step_config(config)

        compiled = {}

        class Lowered:  # the real lowering and compilation, each size compiled once in this test
            def __init__(self, size):
                self.size = size

            def compile(self):
                if self.size not in compiled:
                    cfg = dataclasses.replace(base, microbatch_size=self.size)
                    step = make_train_step(net.apply, objective, opt, cfg, batch_sharding=shd.batch_sharding(mesh))
                    compiled[self.size] = jax.jit(step).lower(state, batch).compile()
                return compiled[self.size]

        def lower(size):
            lowered.append(size)
            return Lowered(size)

        whole = microbatching.compile_train_step(lower, n, 0)
        assert whole.microbatch_size == n and lowered == [n] and whole.limit_bytes is None
        assert whole.compiled is compiled[n]
        sizes = {s: microbatching.compiled_memory_bytes(Lowered(s).compile()) for s in (n, n // 2, n // 4)}
        assert sizes[n] > sizes[n // 2] > sizes[n // 4], sizes  # activations shrink with the micro-batch
        lowered.clear()
        limit = int((sizes[n // 2] + sizes[n // 4]) / 2 / (1 - microbatching.SAFETY_MARGIN))
        chosen = microbatching.compile_train_step(lower, n, 0, memory_limit=limit)
        # largest first; sizes in between may be skipped when they provably cannot fit
        assert chosen.microbatch_size == n // 4 and lowered[0] == n and lowered[-1] == n // 4, lowered
        assert chosen.estimated_bytes == sizes[n // 4] and chosen.limit_bytes == limit
        assert chosen.compiled is compiled[n // 4]  # the executable that training runs, not a recompilation
        # nothing fits: one line naming the settings to change (the divisors 4, 2, 1 stand for the
        # sizes compiled above)
        with pytest.raises(ValueError, match=r"train\.microbatch_size: not even 1 example per device fits.*mesh\.fsdp"
                                             r".*model\.remat"):
            microbatching.compile_train_step(lambda size: Lowered(size * n // 4), 4, 0, memory_limit=1000)

"""The training state and the pure, jitted training step.

:class:`TrainState` holds everything a step changes: the parameters, the optax state, the
evaluation EMA, the EMA target (the "proxy" network the TVM objective uses as its teacher), the
step counter, the base RNG key and the counters of skipped (non-finite) steps.

A step (:func:`make_train_step`) is a pure function ``(state, batch) -> (state, metrics)``:

1. step key = ``fold_in(state.rng, state.step)`` (so a resumed run draws the same randomness);
   example ``i`` of the global batch draws from ``fold_in(step key, i)``
   (:mod:`tvm_jax.randomness`), whatever the split below;
2. loss and gradients of the objective w.r.t. ``params``, with ``target_params`` as the teacher.
   With gradient accumulation (:class:`TrainStepConfig.microbatch_size` smaller than the
   per-device batch) the batch is split into micro-batches that each hold every device's next
   local slice (:func:`tvm_jax.microbatching.split_microbatches`; no data moves between
   devices); a ``lax.scan`` adds their gradients in float32 in the parameters' sharding and the
   objective's ``[sum, count]`` statistics, then the gradients are divided by the number of
   micro-batches. Only one micro-batch's activations are alive at a time;
3. exactly one optax AdamW update (optional global-norm clipping first) and one update of each
   EMA, ``ema = b * ema + (1 - b) * params`` via ``optax.incremental_update``;
4. if the loss of the whole batch or the gradient norm is not finite, the new parameters,
   optimiser state and EMAs are all discarded (the state keeps the old ones), ``skipped`` and
   ``consecutive_skipped`` count it, and ``metrics["skipped"]`` reports it.

The step reports no parameter norm: reducing the new parameters inside the step kept XLA from
fusing the AdamW update with the two EMA updates (one more read and write of every parameter
array per step, bench/NOTES.md item 28); :func:`parameter_norm` computes it where it is logged.

The metrics are those of the whole global batch (statistics summed over micro-batches, then
divided), so they, like the update, do not depend on the micro-batch size.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from tvm_jax.microbatching import micro_batch_count, split_microbatches
from tvm_jax.objectives import stat_means
from tvm_jax.randomness import example_keys
from tvm_jax.sharding import replicated


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    target_params: Any
    rng: jax.Array  # raw uint32 key data (jax.random.key_data), checkpoint-friendly
    skipped: jax.Array
    consecutive_skipped: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainStepConfig:
    """What the step needs besides the model, objective and optimiser.

    ``microbatch_size``: examples per device per micro-step (it must divide the per-device
    batch); 0 = the whole per-device batch in one pass (no accumulation)."""

    ema_decay: float
    target_decay: float
    microbatch_size: int = 0

    def __post_init__(self):
        if not (isinstance(self.microbatch_size, int) and self.microbatch_size >= 0):
            raise ValueError(f"train.microbatch_size: must be a non-negative integer, got {self.microbatch_size!r}")


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW from ``config.optimizer`` (DESIGN section 5), with optional global-norm clipping."""
    o = config.optimizer
    adamw = optax.adamw(learning_rate=o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if o.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(o.max_grad_norm), adamw)


def init_train_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """Both EMAs start as copies of the weights."""
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731  (distinct buffers, donation-safe)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=copy(params),
        target_params=copy(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped=jnp.zeros((), jnp.int32),
        consecutive_skipped=jnp.zeros((), jnp.int32),
    )


def jit_train_step(step_fn: Callable, state_shardings, batch_sharding: jax.sharding.NamedSharding):
    """``step_fn`` of :func:`make_train_step` jitted as the trainer and the benchmarks run it: the
    state donated (updated in place), the batch in ``batch_sharding``, the metrics replicated on
    its mesh."""
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated(batch_sharding.mesh)), donate_argnums=(0,))


@jax.jit
def parameter_norm(params) -> jax.Array:
    """The global L2 norm of ``params`` (logged by the trainer at its log steps, outside the step)."""
    return optax.global_norm(params)


def make_train_step(apply, loss_fn: Callable, optimizer: optax.GradientTransformation, config: TrainStepConfig, *,
                    batch_sharding: jax.sharding.NamedSharding | None = None, param_shardings=None,
                    prepare_params: Callable | None = None,
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``loss_fn(apply, params, target_params, x0, labels, keys) -> (loss, stats)`` (see
    :mod:`tvm_jax.objectives`). ``batch_sharding``: the batch's sharding over the mesh (its
    device count sets the per-device batch; None: one device); ``param_shardings``: the
    parameters' shardings, which the accumulated gradients keep (None: unconstrained);
    ``prepare_params``: applied to the parameters once inside the differentiated loss, before
    the objective hands them to ``apply`` (``Network.prepare``: the unrolled DiT's per-layer
    split, shared by the objective's calls)."""
    num_devices = 1 if batch_sharding is None else batch_sharding.mesh.devices.size
    prepare = (lambda p: p) if prepare_params is None else prepare_params

    def grads_and_stats(params, target_params, x, labels, keys):
        def loss_of(p):
            return loss_fn(apply, prepare(p), target_params, x, labels, keys)

        (_, stats), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        return grads, stats

    def accumulate(state: TrainState, batch, step_key, n_micro: int):
        """Gradients (float32, averaged) and summed statistics over ``n_micro`` micro-batches."""
        micro = split_microbatches({"x": batch["x"], "label": batch["label"],
                                    "index": jnp.arange(batch["x"].shape[0], dtype=jnp.int32)},
                                   n_micro, num_devices, batch_sharding)

        def constrain(grads):
            return grads if param_shardings is None else jax.lax.with_sharding_constraint(grads, param_shardings)

        def body(carry, mb):
            acc, stats_acc = carry
            grads, stats = grads_and_stats(state.params, state.target_params, mb["x"], mb["label"],
                                           example_keys(step_key, mb["index"]))
            acc = constrain(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads))
            return (acc, jax.tree.map(jnp.add, stats_acc, stats)), None

        first = jax.tree.map(lambda a: a[0], micro)
        stats_shape = jax.eval_shape(lambda: grads_and_stats(state.params, state.target_params, first["x"],
                                                             first["label"], example_keys(step_key, first["index"]))[1])
        zeros = (constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape))
        (grads, stats), _ = jax.lax.scan(body, zeros, micro)
        grads = jax.tree.map(lambda g, p: (g / n_micro).astype(p.dtype), grads, state.params)
        return grads, stats

    def step_fn(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        n_micro = micro_batch_count(batch["x"].shape[0], num_devices, config.microbatch_size)
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if n_micro == 1:
            keys = example_keys(step_key, jnp.arange(batch["x"].shape[0]))
            grads, stats = grads_and_stats(state.params, state.target_params, batch["x"], batch["label"], keys)
        else:
            grads, stats = accumulate(state, batch, step_key, n_micro)
        metrics = stat_means(stats)
        loss = metrics["loss"]
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        # Named scopes label the update's ops in profiles (tvm_jax.profiling groups by them).
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        with jax.named_scope("optimizer"):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            new_params, new_opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        with jax.named_scope("ema"):
            ema = optax.incremental_update(params, state.ema_params, 1.0 - config.ema_decay)
            target = optax.incremental_update(params, state.target_params, 1.0 - config.target_decay)
            new_ema, new_target = keep(ema, state.ema_params), keep(target, state.target_params)
        skipped = jnp.logical_not(finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt_state,
            ema_params=new_ema,
            target_params=new_target,
            skipped=state.skipped + skipped,
            consecutive_skipped=jnp.where(finite, 0, state.consecutive_skipped + 1),
        )
        metrics = dict(metrics, grad_norm=grad_norm, skipped=skipped, skipped_total=new_state.skipped,
                       consecutive_skipped=new_state.consecutive_skipped)
        return new_state, metrics

    return step_fn

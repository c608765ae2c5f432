"""The training state and the pure, jitted training step.

:class:`TrainState` holds everything a step changes: the parameters, the optax state, the
evaluation EMA, the EMA target (the "proxy" network the TVM objective uses as its teacher), the
step counter, the base RNG key and the counters of skipped (non-finite) steps.

A step (:func:`make_train_step`) is a pure function ``(state, batch) -> (state, metrics)``:

1. key = ``fold_in(state.rng, state.step)`` (so a resumed run draws the same randomness);
2. loss and gradients of the objective w.r.t. ``params``, with ``target_params`` as the teacher;
3. optax AdamW (optional global-norm clipping first) and both EMA updates
   ``ema = b * ema + (1 - b) * params`` via ``optax.incremental_update`` after every step;
4. if the loss or the gradient norm is not finite, the new parameters, optimiser state and
   EMAs are all discarded (the state keeps the old ones), ``skipped`` and
   ``consecutive_skipped`` count it, and ``metrics["skipped"]`` reports it.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    target_params: Any
    rng: jax.Array  # raw uint32 key data (jax.random.key_data), checkpoint-friendly
    skipped: jax.Array
    consecutive_skipped: jax.Array


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


def make_train_step(apply, loss_fn: Callable, optimizer: optax.GradientTransformation, *, ema_decay: float,
                    target_decay: float) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``loss_fn(apply, params, target_params, x0, labels, key) -> (loss, metrics)``."""

    def step_fn(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_of(params):
            return loss_fn(apply, params, state.target_params, batch["x"], batch["label"], key)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
        target = optax.incremental_update(params, state.target_params, 1.0 - target_decay)

        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        skipped = jnp.logical_not(finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            ema_params=keep(ema, state.ema_params),
            target_params=keep(target, state.target_params),
            skipped=state.skipped + skipped,
            consecutive_skipped=jnp.where(finite, 0, state.consecutive_skipped + 1),
        )
        metrics = dict(metrics, grad_norm=grad_norm, skipped=skipped, skipped_total=new_state.skipped,
                       param_norm=optax.global_norm(new_state.params))
        return new_state, metrics

    return step_fn

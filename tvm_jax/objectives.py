"""Training objectives as pure functions: TVM, Flow Matching and MeanFlow.

Every objective has the signature ``loss_fn(apply, params, target_params, x0, labels, key)``
(bound to its config with :func:`make_objective`) and returns ``(loss, stats)``: the batch mean
of the per-sample losses and a dict of additive statistics, each a ``[sum, count]`` pair
(:func:`stat`), so the statistics of several micro-batches add up to those of the whole batch
(:func:`stat_means` turns them into means). ``apply`` is any network function
``F(params, x, t, gap, label, beta, jvp=False)`` (see :mod:`tvm_jax.flow_map`); ``target_params``
are the EMA-target ("proxy") weights, always used under ``stop_gradient``; the caller decides
where they come from (pass ``params`` itself for "no EMA target"). ``key`` is one key (sample
``i`` draws from ``fold_in(key, i)``) or a ``(B,)`` array of per-sample keys (the training step
passes keys of the samples' indices in the global batch, :mod:`tvm_jax.randomness`): every
sample's times, noise, label dropout and guidance come from its own key alone.

Besides the whole-batch means, TVM and FM report their terms per quarter of time (bins
``[0, .25), [.25, .5), [.5, .75), [.75, 1]``, named e.g. ``terminal_t0.25-0.50``). In TVM both
terms are binned by the sample's ``t``, as the official training loop does (its wrapper logs
``ts = t`` next to both losses and ``training_stats`` bins them in 4 bins of ``t``); the FM
baseline has no ``t`` and bins its term by its own time ``s'``.

TVM, per sample (DESIGN section 3), with ``w = 1 / beta`` and ``k = w`` (scaled) or 1:

* ``F_ts, dF_ds = jvp(F, s)`` at ``(x_t, t, t - s)``; ``f = x_t + (s - t) k F_ts``;
  ``df_ds = k (F_ts + (s - t) dF_ds)``
* teacher, one batched call of ``F(target_params)`` on ``[f, x_s']`` at times ``[s, s']``,
  gap 0, labels ``[label, null]``, beta ``[beta, 1]`` -> ``u_f, u_uncond``; scaled: ``u_f *= w``
* ``terminal = mean(((df_ds - u_f) beta)^2)``, zero where ``s == t``
* ``target = w (eps - x0) + (1 - w) u_uncond``; ``F_ss = k F(x_s', s', 0, label, beta)``;
  ``fm = mean(((F_ss - target) beta)^2)``; ``loss = terminal + fm``.

Flow Matching is TVM's ``fm`` term alone (with ``w = 1`` it is plain conditional FM and needs no
teacher call). MeanFlow regresses the average velocity ``u = k F(z_t, t, t - r)`` onto
``sg(v - (t - r) du/dt)`` with ``du/dt`` the JVP along ``(z: v, r: 0, t: 1)``, optionally with
MeanFlow's adaptive weighting ``sg(1 / (err + c)^p)``; under CFG ``v`` is replaced by
``w v + (1 - w) u_uncond(z_t, t)`` from the target network.

Label dropout: a fraction of samples get the null label (``num_classes``) and ``beta = 1``.
Non-finite values are not hidden here: they reach the loss, and the training step counts them
and skips the update.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from tvm_jax.flow_map import NetworkFn, output_scale, per_sample, terminal_velocity
from tvm_jax.randomness import per_example_keys
from tvm_jax.time_sampling import TimeSamplerConfig, Times, sample_times

GUIDANCE_MODES = ("constant", "uniform_w", "uniform_beta")
OBJECTIVES = ("tvm", "fm", "meanflow")
TIME_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)
BIN_SUFFIXES = tuple(f"_t{lo:.2f}-{hi:.2f}" for lo, hi in zip(TIME_BINS[:-1], TIME_BINS[1:]))


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
    """Per-sample CFG weight during training.

    ``constant``: w fixed; ``uniform_w``: w ~ U[w_min, w_max]; ``uniform_beta``: beta ~ U(0, 1).
    ``label_dropout`` of the samples get the null label and beta = 1 (w = 1).
    """

    num_classes: int
    mode: str = "constant"
    w: float = 1.0
    w_min: float = 1.0
    w_max: float = 1.0
    label_dropout: float = 0.1

    def validate(self) -> None:
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"objective.cfg_mode: unknown mode {self.mode!r}; choose one of {GUIDANCE_MODES}")
        if self.mode == "constant" and not self.w >= 1.0:
            raise ValueError(f"objective.w: the CFG weight must be >= 1, got {self.w}")
        if self.mode == "uniform_w" and not 1.0 <= self.w_min <= self.w_max:
            raise ValueError(f"objective.w_min/w_max: need 1 <= w_min <= w_max, got {self.w_min}, {self.w_max}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"objective.label_dropout: must be in [0, 1], got {self.label_dropout}")
        if self.num_classes < 1:
            raise ValueError(f"objective.num_classes: must be >= 1, got {self.num_classes}")

    @property
    def null_label(self) -> int:
        return self.num_classes


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "tvm"
    times: TimeSamplerConfig = TimeSamplerConfig()
    guidance: GuidanceConfig = GuidanceConfig(num_classes=1000)
    scaled_param: bool = True
    detach_jvp: bool = False
    meanflow_adaptive_p: float = 1.0
    meanflow_adaptive_c: float = 1e-3

    def validate(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective.name: unknown objective {self.name!r}; choose one of {OBJECTIVES}")
        self.times.validate()
        self.guidance.validate()
        if self.meanflow_adaptive_p < 0:
            raise ValueError(f"objective.meanflow_adaptive_p: must be >= 0, got {self.meanflow_adaptive_p}")
        if not self.meanflow_adaptive_c > 0:
            raise ValueError(f"objective.meanflow_adaptive_c: must be > 0, got {self.meanflow_adaptive_c}")


def sample_guidance(key: jax.Array, labels: jax.Array, config: GuidanceConfig) -> tuple[jax.Array, jax.Array]:
    """Returns ``(labels, beta)`` after label dropout; dropped samples get the null label, beta 1.
    ``key``: one key or per-sample keys (each sample draws from its own)."""

    def one(k, label):
        k_w, k_drop = jax.random.split(k)
        if config.mode == "constant":
            beta = jnp.float32(1.0 / config.w)
        elif config.mode == "uniform_w":
            beta = 1.0 / jax.random.uniform(k_w, (), jnp.float32, config.w_min, config.w_max)
        else:
            # U(0, 1) without the endpoint 0 (w = inf).
            beta = 1.0 - jax.random.uniform(k_w, (), jnp.float32)
        if config.label_dropout > 0:
            drop = jax.random.uniform(k_drop, ()) < config.label_dropout
            label = jnp.where(drop, config.null_label, label)
            beta = jnp.where(drop, 1.0, beta)
        return label.astype(jnp.int32), beta

    return jax.vmap(one)(per_example_keys(key, labels.shape[0]), labels)


# ----------------------------------------------------------------------------- statistics


def stat(values: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """``[sum, count]`` (float32) of the per-sample ``values``, over the samples where ``where``."""
    values = values.astype(jnp.float32)
    if where is None:
        return jnp.stack([jnp.sum(values), jnp.float32(values.size)])
    return jnp.stack([jnp.sum(jnp.where(where, values, 0.0)), jnp.sum(where.astype(jnp.float32))])


def binned_stats(name: str, values: jax.Array, times: jax.Array) -> dict[str, jax.Array]:
    """``{name + suffix: stat}`` of ``values`` per quarter of ``times`` (:data:`BIN_SUFFIXES`)."""
    index = jnp.clip(jnp.floor(times * (len(TIME_BINS) - 1)).astype(jnp.int32), 0, len(TIME_BINS) - 2)
    return {name + suffix: stat(values, index == i) for i, suffix in enumerate(BIN_SUFFIXES)}


def stat_means(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """``sum / count`` of every statistic (0 for an empty one), and ``NAME_count`` for the
    per-time-bin statistics (whose count varies, so a reader can leave empty bins out)."""
    out = {k: v[0] / jnp.maximum(v[1], 1.0) for k, v in stats.items()}
    out.update({k + "_count": v[1] for k, v in stats.items() if k.endswith(BIN_SUFFIXES)})
    return out


def _sample_mean(a: jax.Array) -> jax.Array:
    """Per-sample mean over all non-batch axes."""
    return jnp.mean(a.reshape(a.shape[0], -1), axis=1)


@dataclasses.dataclass
class _Draw:
    times: Times
    eps: jax.Array
    labels: jax.Array
    beta: jax.Array


def _draw(key, x0, labels, config: ObjectiveConfig) -> _Draw:
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(per_example_keys(key, x0.shape[0]))
    times = sample_times(keys[:, 0], x0.shape[0], config.times)
    eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(keys[:, 1])
    labels, beta = sample_guidance(keys[:, 2], labels, config.guidance)
    return _Draw(times, eps, labels, beta)


def _pair(a: jax.Array, b: jax.Array) -> jax.Array:
    """``(B, ...)`` twice -> ``(2B, ...)`` with rows ``2i, 2i + 1 = a[i], b[i]``: one batched call
    for both, and (unlike a concatenation) every row stays on the device that holds sample ``i``
    when the batch is sharded."""
    return jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])


def _unpair(ab: jax.Array) -> tuple[jax.Array, jax.Array]:
    ab = ab.reshape(ab.shape[0] // 2, 2, *ab.shape[1:])
    return ab[:, 0], ab[:, 1]


def _interpolate(x0, eps, t):
    t = per_sample(t, x0)
    return (1.0 - t) * x0 + t * eps


def tvm_terms(apply: NetworkFn, params, target_params, x0, labels, key, config: ObjectiveConfig) -> dict[str, jax.Array]:
    """All intermediate quantities of the TVM objective (the loss is built from these)."""
    x0 = x0.astype(jnp.float32)
    d = _draw(key, x0, labels, config)
    t, s, s_fm = d.times
    beta, labels = d.beta, d.labels
    w = 1.0 / beta
    x_t = _interpolate(x0, d.eps, t)
    x_fm = _interpolate(x0, d.eps, s_fm)

    f, df_ds, _ = terminal_velocity(apply, params, x_t, t, s, labels, beta,
                                    scaled=config.scaled_param, detach_jvp=config.detach_jvp)

    null = jnp.full_like(labels, config.guidance.null_label)
    teacher = apply(
        target_params,
        _pair(jax.lax.stop_gradient(f), x_fm),
        _pair(s, s_fm),
        jnp.zeros((2 * x0.shape[0],), jnp.float32),
        _pair(labels, null),
        _pair(beta, jnp.ones_like(beta)),
    )
    u_f, u_uncond = _unpair(jax.lax.stop_gradient(teacher))
    if config.scaled_param:
        u_f = per_sample(w, u_f) * u_f

    b = per_sample(beta, x0)
    terminal = _sample_mean(jnp.square((df_ds - u_f) * b))
    equal = jnp.isclose(s, t, rtol=1e-5, atol=1e-8)
    terminal = jnp.where(equal, 0.0, terminal)

    fm = _fm_term(apply, params, x0, d, x_fm, u_uncond, config)
    return dict(t=t, s=s, s_fm=s_fm, eps=d.eps, labels=labels, beta=beta, x_t=x_t, x_fm=x_fm, f=f,
                df_ds=df_ds, u_f=u_f, u_uncond=u_uncond, terminal=terminal, equal=equal, **fm)


def _fm_term(apply, params, x0, d: _Draw, x_fm, u_uncond, config: ObjectiveConfig) -> dict[str, jax.Array]:
    s_fm, beta = d.times.s_fm, d.beta
    w = per_sample(1.0 / beta, x0)
    v = d.eps - x0
    target = v if u_uncond is None else w * v + (1.0 - w) * u_uncond
    k = per_sample(output_scale(beta, config.scaled_param), x0)
    F_ss = k * apply(params, x_fm, s_fm, jnp.zeros_like(s_fm), d.labels, beta)
    fm = _sample_mean(jnp.square((F_ss - target) * per_sample(beta, x0)))
    return dict(target=target, F_ss=F_ss, fm=fm)


def tvm_loss(apply: NetworkFn, params, target_params, x0, labels, key, config: ObjectiveConfig):
    terms = tvm_terms(apply, params, target_params, x0, labels, key, config)
    per_sample_loss = terms["terminal"] + terms["fm"]
    stats = {
        "loss": stat(per_sample_loss),
        "terminal": stat(terms["terminal"]),
        "fm": stat(terms["fm"]),
        "frac_t_eq_s": stat(terms["equal"]),
        "mean_gap": stat(terms["t"] - terms["s"]),
        **binned_stats("terminal", terms["terminal"], terms["t"]),
        **binned_stats("fm", terms["fm"], terms["t"]),
    }
    return jnp.mean(per_sample_loss), stats


def fm_loss(apply: NetworkFn, params, target_params, x0, labels, key, config: ObjectiveConfig):
    """Flow matching with TVM's draws (same key -> same s', noise, labels and beta as TVM's fm
    term). With a constant w = 1 and no label-dependent teacher the target is plain ``eps - x0``."""
    x0 = x0.astype(jnp.float32)
    d = _draw(key, x0, labels, config)
    x_fm = _interpolate(x0, d.eps, d.times.s_fm)
    needs_teacher = not (config.guidance.mode == "constant" and config.guidance.w == 1.0)
    u_uncond = None
    if needs_teacher:
        null = jnp.full_like(d.labels, config.guidance.null_label)
        u_uncond = jax.lax.stop_gradient(apply(target_params, x_fm, d.times.s_fm, jnp.zeros_like(d.times.s_fm),
                                               null, jnp.ones_like(d.beta)))
    fm = _fm_term(apply, params, x0, d, x_fm, u_uncond, config)["fm"]
    return jnp.mean(fm), {"loss": stat(fm), "fm": stat(fm), **binned_stats("fm", fm, d.times.s_fm)}


def meanflow_loss(apply: NetworkFn, params, target_params, x0, labels, key, config: ObjectiveConfig):
    """MeanFlow's average-velocity objective. Times: ``config.times`` gives ``(t, s=r)`` (use the
    ``clamp`` sampler with ``p_equal=0.75`` for MeanFlow's own recipe)."""
    x0 = x0.astype(jnp.float32)
    d = _draw(key, x0, labels, config)
    t, r = d.times.t, d.times.s
    beta, lab = d.beta, d.labels
    z = _interpolate(x0, d.eps, t)
    v = d.eps - x0
    w = per_sample(1.0 / beta, x0)
    null = jnp.full_like(lab, config.guidance.null_label)
    u_uncond = jax.lax.stop_gradient(apply(target_params, z, t, jnp.zeros_like(t), null, jnp.ones_like(beta)))
    v_guided = w * v + (1.0 - w) * u_uncond
    k = per_sample(output_scale(beta, config.scaled_param), x0)

    def u_fn(z_, t_, r_):
        return k * apply(params, z_, t_, t_ - r_, lab, beta, jvp=True)

    u, du_dt = jax.jvp(u_fn, (z, t, r), (v_guided, jnp.ones_like(t), jnp.zeros_like(r)))
    u_target = jax.lax.stop_gradient(v_guided - per_sample(t - r, x0) * du_dt)
    err = _sample_mean(jnp.square(u - u_target))
    if config.meanflow_adaptive_p > 0:
        weight = jax.lax.stop_gradient(1.0 / (err + config.meanflow_adaptive_c) ** config.meanflow_adaptive_p)
        per_sample_loss = weight * err
    else:
        per_sample_loss = err
    return jnp.mean(per_sample_loss), {"loss": stat(per_sample_loss), "mse": stat(err)}


_LOSSES: dict[str, Callable] = {"tvm": tvm_loss, "fm": fm_loss, "meanflow": meanflow_loss}


def make_objective(config: ObjectiveConfig) -> Callable[..., tuple[jax.Array, dict[str, Any]]]:
    """``loss_fn(apply, params, target_params, x0, labels, key) -> (loss, stats)``."""
    config.validate()
    return functools.partial(_LOSSES[config.name], config=config)

"""Time samplers: ordering, truncation and the configured logit-normal statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from tvm_jax.time_sampling import TimeSamplerConfig, sample_times, truncated_logit_normal

N = 200_000


def _logit(p):
    p = np.asarray(p, np.float64)
    return np.log(p) - np.log1p(-p)


@pytest.mark.parametrize("name", ["gap*", "trunc", "clamp"])
def test_order_and_range(name):
    cfg = TimeSamplerConfig(name=name, s_mean=0.3, s_std=1.7, gap_mean=0.5, gap_std=1.5)
    t, s, s_fm = (np.asarray(a) for a in sample_times(jax.random.key(0), N, cfg))
    assert np.all(s >= 0) and np.all(s <= t) and np.all(t <= 1)
    assert np.all((s_fm >= 0) & (s_fm <= 1))
    assert np.all(np.isfinite(t)) and np.all(np.isfinite(s))


def test_gap_star_statistics_match_the_config():
    cfg = TimeSamplerConfig(name="gap*", s_mean=-0.4, s_std=1.0, gap_mean=-0.8, gap_std=1.0)
    t, s, s_fm = (np.asarray(a, np.float64) for a in sample_times(jax.random.key(1), N, cfg))
    gap = t - s
    # the gap is never clamped (s is truncated instead): logit(gap) ~ N(gap_mean, gap_std)
    lg = _logit(gap[(gap > 1e-6) & (gap < 1 - 1e-6)])
    assert abs(lg.mean() - cfg.gap_mean) < 0.02 and abs(lg.std() - cfg.gap_std) < 0.02
    # s' is an untruncated logit-normal(s_mean, s_std)
    ls = _logit(s_fm)
    assert abs(ls.mean() - cfg.s_mean) < 0.02 and abs(ls.std() - cfg.s_std) < 0.02
    # s given the gap is N(s_mean, s_std) truncated at logit(1 - gap): the conditional CDF is U(0, 1)
    keep = (s > 1e-6) & (gap < 1 - 1e-4)
    z = (_logit(s[keep]) - cfg.s_mean) / cfg.s_std
    z_max = (_logit(1 - gap[keep]) - cfg.s_mean) / cfg.s_std
    u = stats.norm.cdf(z) / stats.norm.cdf(z_max)
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # truncation holds: s <= 1 - gap, so t = s + gap never needed the clamp at 1
    assert np.all(s <= 1 - gap + 1e-6)


def test_trunc_and_clamp_statistics():
    cfg = TimeSamplerConfig(name="trunc", s_mean=0.2, s_std=0.8)
    t, s, _ = (np.asarray(a, np.float64) for a in sample_times(jax.random.key(2), N, cfg))
    lt = _logit(t)
    assert abs(lt.mean() - 0.2) < 0.02 and abs(lt.std() - 0.8) < 0.02
    keep = s > 1e-6
    u = stats.norm.cdf((_logit(s[keep]) - 0.2) / 0.8) / stats.norm.cdf((lt[keep] - 0.2) / 0.8)
    assert stats.kstest(u, "uniform").pvalue > 1e-3

    cfg = TimeSamplerConfig(name="clamp", s_mean=-0.4, s_std=1.0)
    t, s, _ = (np.asarray(a, np.float64) for a in sample_times(jax.random.key(3), N, cfg))
    pooled = np.concatenate([_logit(t), _logit(s)])  # order statistics of two iid draws
    assert abs(pooled.mean() + 0.4) < 0.02 and abs(pooled.std() - 1.0) < 0.02
    assert stats.kstest((_logit(t) + 0.4), lambda x: stats.norm.cdf(x) ** 2).pvalue > 1e-3


def test_p_equal_fraction():
    cfg = TimeSamplerConfig(p_equal=0.25)
    t, s, _ = (np.asarray(a) for a in sample_times(jax.random.key(4), N, cfg))
    assert abs(np.mean(t == s) - 0.25) < 0.01


def test_truncated_logit_normal_respects_extreme_bounds():
    upper = jnp.array([0.0, 1e-7, 0.5, 1.0] * 1000, jnp.float32)
    x = np.asarray(truncated_logit_normal(jax.random.key(5), upper, -0.4, 1.0))
    assert np.all(np.isfinite(x)) and np.all(x >= 0) and np.all(x <= np.asarray(upper))


def test_bad_sampler_config():
    for kw, field in [(dict(name="beta"), "time_sampler"), (dict(s_std=0.0), "s_std"), (dict(gap_std=-1.0), "gap_std"),
                      (dict(p_equal=2.0), "p_equal")]:
        with pytest.raises(ValueError, match=field):
            TimeSamplerConfig(**kw).validate()

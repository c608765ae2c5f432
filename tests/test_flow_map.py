"""Flow map and terminal velocity: JVP against finite differences, scaled parameterisation."""
import jax
import jax.numpy as jnp
import numpy as np

from tvm_jax.dit import DiTConfig
from tvm_jax.flow_map import flow_map, terminal_velocity
from tvm_jax.networks import build_dit

TINY = dict(input_size=8, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=5)


def _build(config):
    """``build_dit`` with the network compiled: the flow-map code runs eagerly around it (speed only)."""
    apply, params = build_dit(config)
    return jax.jit(apply, static_argnames="jvp"), params


def _perturbed(params, key, scale=0.3):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def test_df_ds_matches_central_finite_difference_in_float64():
    with jax.enable_x64(True):
        apply, params = _build(DiTConfig.create(None, **TINY, dtype="float64", attention_impl="xla"))
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        params = _perturbed(params, jax.random.key(0))
        apply64 = lambda p, x, t, g, lab, b, jvp=False: apply(p, x, t, g, lab, b, jvp=jvp)  # noqa: E731
        x = jax.random.normal(jax.random.key(1), (3, 8, 8, 2), jnp.float64)
        t = jnp.array([0.9, 0.6, 1.0], jnp.float64)
        s = jnp.array([0.2, 0.35, 0.5], jnp.float64)
        labels = jnp.array([0, 3, 5])
        beta = jnp.array([0.5, 0.8, 1.0], jnp.float64)
        for scaled in (True, False):
            f, df_ds, _ = terminal_velocity(apply64, params, x, t, s, labels, beta, scaled=scaled)
            assert f.dtype == jnp.float64
            h = 1e-5
            fd = (flow_map(apply64, params, x, t, s + h, labels, beta, scaled=scaled)
                  - flow_map(apply64, params, x, t, s - h, labels, beta, scaled=scaled)) / (2 * h)
            err = float(jnp.linalg.norm(df_ds - fd) / jnp.linalg.norm(fd))
            assert err < 1e-7, (scaled, err)
            assert float(jnp.linalg.norm(fd)) > 1e-3


def test_at_s_equal_t_the_terminal_velocity_is_the_scaled_output():
    apply, params = _build(DiTConfig.create(None, **TINY, dtype="float32"))
    params = _perturbed(params, jax.random.key(2), 0.1)
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 2))
    t = jnp.array([0.7, 0.4])
    beta = jnp.array([0.5, 0.25])
    f, df_ds, F = terminal_velocity(apply, params, x, t, t, jnp.array([1, 2]), beta, scaled=True)
    np.testing.assert_allclose(f, x)
    np.testing.assert_allclose(df_ds, (1 / beta)[:, None, None, None] * F, rtol=1e-6)


def test_scaled_parameterisation_is_unscaled_with_the_output_times_w():
    apply, params = _build(DiTConfig.create(None, **TINY, dtype="float32"))
    params = _perturbed(params, jax.random.key(4), 0.1)

    def times_w(p, x, t, gap, label, beta, jvp=False):
        return apply(p, x, t, gap, label, beta, jvp=jvp) / beta[:, None, None, None]

    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 2))
    t, s = jnp.array([0.9, 0.8]), jnp.array([0.3, 0.1])
    labels, beta = jnp.array([1, 5]), jnp.array([0.4, 1.0])
    f_s, d_s, _ = terminal_velocity(apply, params, x, t, s, labels, beta, scaled=True)
    f_u, d_u, _ = terminal_velocity(times_w, params, x, t, s, labels, beta, scaled=False)
    np.testing.assert_allclose(f_s, f_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_s, d_u, rtol=1e-5, atol=1e-6)
    # and the scaled map really differs from the unscaled one where w != 1
    f_plain = flow_map(apply, params, x, t, s, labels, beta, scaled=False)
    assert float(jnp.abs(f_plain[0] - f_s[0]).max()) > 1e-4
    # beta = 1: the same map, up to float32 rounding on the output's scale (the JVP program and
    # the plain one fuse, and so round, differently: 2.4e-7 apart with conftest.py's loop emitter)
    np.testing.assert_allclose(f_plain[1], f_s[1], rtol=1e-6, atol=1e-6 * float(jnp.abs(f_s[1]).max()))


def test_detach_jvp_stops_only_the_jvp_gradient():
    apply, params = _build(DiTConfig.create(None, **TINY, dtype="float32"))
    params = _perturbed(params, jax.random.key(6), 0.1)
    x = jax.random.normal(jax.random.key(7), (2, 8, 8, 2))
    t, s = jnp.array([0.9, 0.8]), jnp.array([0.3, 0.1])
    args = (x, t, s, jnp.array([1, 2]), jnp.array([0.5, 0.5]))

    def loss(p, detach):
        f, df, F = terminal_velocity(apply, p, *args, scaled=True, detach_jvp=detach)
        return jnp.sum(df ** 2)

    g_full = jax.grad(loss)(params, False)
    g_det = jax.grad(loss)(params, True)
    v_full, v_det = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(g)]) for g in (g_full, g_det))
    assert float(jnp.linalg.norm(v_full - v_det)) > 1e-6 * float(jnp.linalg.norm(v_full))
    assert float(jnp.linalg.norm(v_det)) > 0

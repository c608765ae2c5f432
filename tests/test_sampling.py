"""Samplers: N-step flow-map sampler against an explicit loop, Euler with CFG."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvm_jax.dit import DiTConfig
from tvm_jax.networks import build_dit
from tvm_jax.sampling import euler_sample, flow_map_sample, make_sampler

NULL = 5


@pytest.fixture(scope="module")
def net():
    apply, params = build_dit(DiTConfig.create(None, input_size=8, in_channels=2, hidden_size=32, depth=1,
                                               num_heads=2, num_classes=NULL, dtype="float32"))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    noise = jax.random.normal(jax.random.key(1), (4, 8, 8, 2))
    labels = jnp.array([0, 3, NULL, 4])
    return apply, params, noise, labels


@pytest.mark.parametrize("steps", [1, 2, 4, 3])
@pytest.mark.parametrize("scaled", [True, False])
def test_flow_map_sampler_equals_explicit_loop(net, steps, scaled):
    apply, params, noise, labels = net
    w = 1.5
    out = make_sampler(apply, steps=steps, w=w, null_label=NULL, scaled=scaled)(params, noise, labels)
    beta = jnp.where(labels == NULL, 1.0, 1.0 / w)
    k = (1.0 / beta if scaled else jnp.ones(4))[:, None, None, None]
    x = noise
    ts = np.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t, s = float(ts[i]), float(ts[i + 1])
        x = x + (s - t) * k * apply(params, x, jnp.full(4, t), jnp.full(4, t - s), labels, beta)
    np.testing.assert_allclose(out, x, rtol=2e-5, atol=2e-5)


def test_one_step_is_x_minus_k_F(net):
    apply, params, noise, labels = net
    w = 2.0
    out = flow_map_sample(apply, params, noise, labels, steps=1, w=w, scaled=True, null_label=NULL)
    beta = jnp.where(labels == NULL, 1.0, 0.5)
    F = apply(params, noise, jnp.ones(4), jnp.ones(4), labels, beta)
    np.testing.assert_allclose(out, noise + (0.0 - 1.0) * (1 / beta)[:, None, None, None] * F, rtol=1e-5, atol=1e-6)


def test_euler_cfg_combines_conditional_and_unconditional(net):
    apply, params, noise, labels = net
    w = 3.0
    out = euler_sample(apply, params, noise, labels, steps=2, w=w, null_label=NULL)
    x = noise
    ones, zeros = jnp.ones(4), jnp.zeros(4)
    for t, s in [(1.0, 0.5), (0.5, 0.0)]:
        u_c = apply(params, x, t * ones, zeros, labels, ones)
        u_u = apply(params, x, t * ones, zeros, jnp.full(4, NULL), ones)
        u = w * u_c + (1 - w) * u_u
        u = jnp.where((labels == NULL)[:, None, None, None], u_u, u)
        x = x + (s - t) * u
    np.testing.assert_allclose(out, x, rtol=2e-5, atol=2e-5)


def test_bad_sampler_arguments(net):
    apply, *_ = net
    with pytest.raises(ValueError, match="steps"):
        make_sampler(apply, steps=0, w=1.0, null_label=NULL)
    with pytest.raises(ValueError, match="CFG weight"):
        make_sampler(apply, steps=1, w=0.5, null_label=NULL)
    with pytest.raises(ValueError, match="method"):
        make_sampler(apply, steps=1, w=1.0, null_label=NULL, method="heun")

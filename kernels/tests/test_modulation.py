"""kernels.residual_norm_modulate: the block's second pre-norm in one Pallas pass (interpreter on
the CPU), against float64 arithmetic on the same inputs and the XLA path it replaces."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kernels import residual_norm_modulate
from kernels.modulation import reference

KW = dict(impl="pallas", interpret=True)


def _inputs(b, n, c, ydtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (b, n, c), jnp.float32) * 2
    y = jax.random.normal(k[1], (b, n, c), jnp.float32).astype(ydtype)
    bias = (jax.random.normal(k[2], (c,), jnp.float32) * 0.1).astype(ydtype)
    gate, shift, scale = (jax.random.normal(kk, (b, c), jnp.float32) for kk in k[3:])
    return x, y, bias, gate, shift, scale


def _exact(x, y, bias, gate, shift, scale, eps=1e-6):
    """float64 of the function, the projection's bias add rounded to y's dtype as the Linear
    layer rounds it."""
    r = np.asarray((y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype), np.float64)
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x1 = f(x) + f(gate)[:, None] * r
    n = x1 / np.sqrt(np.mean(x1 * x1, axis=-1, keepdims=True) + eps)
    return n * (1 + f(scale)[:, None]) + f(shift)[:, None]


@pytest.mark.parametrize("shape", [(2, 16, 1152), (3, 15, 96), (1, 8, 64)])
@pytest.mark.parametrize("ydtype,out", [(jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.float32),
                                        (jnp.float16, jnp.bfloat16)])
def test_values(shape, ydtype, out):
    """Every element written, within one rounding of out_dtype of the exact value (float32 out:
    float32 arithmetic, 1e-5), and the same as the XLA path to that rounding. Widths: the model's
    1,152 (9 chunks of 128), 96 (chunks of 32), 64 (one chunk); 15 tokens (one row per program)."""
    args = _inputs(*shape, ydtype)
    got = jax.jit(lambda *a: residual_norm_modulate(*a, out_dtype=out, **KW))(*args)
    assert got.shape == shape and got.dtype == out
    got = np.asarray(got, np.float64)
    exact = _exact(*args)
    tol = 1e-5 if out == jnp.float32 else float(jnp.finfo(out).eps)
    scale = np.abs(exact) + (1.0 if out == jnp.float32 else 1e-2)  # float32: errors of the O(1) row norm
    assert np.all(np.isfinite(got)) and np.max(np.abs(got - exact) / scale) <= tol
    xla = np.asarray(reference(*args, eps=1e-6, out_dtype=out), np.float64)
    assert np.max(np.abs(got - xla) / scale) <= 2 * tol


def test_derivatives_are_those_of_the_xla_path_bit_for_bit():
    args = _inputs(2, 8, 64, jnp.bfloat16)
    tans = _inputs(2, 8, 64, jnp.bfloat16, seed=1)
    f = lambda *a: residual_norm_modulate(*a, **KW)  # noqa: E731
    ref = lambda *a: reference(*a, eps=1e-6, out_dtype=jnp.bfloat16)  # noqa: E731
    for got, want in zip(jax.jvp(f, args, tans), jax.jvp(ref, args, tans)):
        assert bool(jnp.all(got == want))
    loss = lambda g: lambda *a: jnp.sum(g(*a).astype(jnp.float32) ** 2)  # noqa: E731
    for got, want in zip(jax.grad(loss(f), range(6))(*args), jax.grad(loss(ref), range(6))(*args)):
        assert bool(jnp.all(got == want))
    gjvp = lambda g: jax.grad(  # noqa: E731
        lambda *a: jnp.sum(jax.jvp(g, a, tans)[1].astype(jnp.float32) ** 2), range(6))
    for got, want in zip(gjvp(f)(*args), gjvp(ref)(*args)):
        assert bool(jnp.all(got == want))
    assert "pallas_call" in str(jax.make_jaxpr(f)(*args))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda *a: jax.jvp(f, a, tans))(*args))


def test_auto_is_xla_off_the_gpu():
    args = _inputs(2, 4, 32, jnp.bfloat16)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda *a: residual_norm_modulate(*a))(*args))


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_over_the_batch(axis_type):
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    args = _inputs(8, 4, 64, jnp.bfloat16)
    f = jax.jit(lambda *a: residual_norm_modulate(*a, **KW))
    want = np.asarray(f(*args), np.float64)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    with jax.set_mesh(mesh):
        batch = NamedSharding(mesh, P("data"))
        sargs = tuple(jax.device_put(a, batch) if i != 2 else a for i, a in enumerate(args))
        out = f(*sargs)
        assert out.sharding.is_equivalent_to(batch, out.ndim), out.sharding
        assert "all-gather" not in f.lower(*sargs).compile().as_text()
    assert np.array_equal(np.asarray(out, np.float64), want)


X, Y, B, G = jnp.zeros((2, 4, 8)), jnp.zeros((2, 4, 8), jnp.bfloat16), jnp.zeros((8,)), jnp.zeros((2, 8))


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((X, Y[:, :2], B, G, G, G), {}, "same shape"),
        ((X, Y, B[:4], G, G, G), {}, "bias must have shape"),
        ((X, Y, B, G[:1], G, G), {}, "gate must have shape"),
        ((X, Y.astype(jnp.int32), B, G, G, G), {}, "floating-point"),
        ((X, Y, B, G, G, G), {"impl": "cuda"}, "impl must be one of"),
        ((X.astype(jnp.bfloat16), Y, B, G, G, G), KW, "float32 x"),
    ],
)
def test_bad_input_names_the_problem(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        residual_norm_modulate(*args, **kwargs)

"""kernels.bias_gelu: the MLP's bias add and tanh GELU in one Pallas pass (interpreter on the CPU).

The references: float64 arithmetic on the same inputs (the exact value), and the XLA path it
replaces (``gelu_tanh(y + bias)`` with the bias rounded to y's dtype, as a Linear layer adds it).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kernels import bias_gelu, gelu_tanh
from kernels.gelu import reference
from kernels.tools.tile_sweep import max_ulps

KW = dict(impl="pallas", interpret=True)


def _inputs(shape, dtype, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    y = (jax.random.normal(k1, shape, jnp.float32) * 3).astype(dtype)
    b = (jax.random.normal(k2, shape[-1:], jnp.float32)).astype(dtype)
    return y, b


def _exact(y, b):
    """float64 value of the function on the inputs as given (the bias add rounded to y's dtype,
    as the Linear layer rounds it)."""
    h = np.asarray((y.astype(jnp.float32) + b.astype(jnp.float32)).astype(y.dtype), np.float64)
    return h * 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))


@pytest.mark.parametrize("shape", [(2, 16, 96), (3, 5, 40), (64, 1024), (7,)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_values_match_exact_and_the_xla_path(shape, dtype):
    """Every element written; within one rounding of the exact value (float32: gelu_tanh's own
    error, a few units in the last place); the same numbers as the XLA path evaluated operation
    by operation, to one unit in the last place in bf16/f16 (the float32 arithmetic inside may
    round the other way). (Under jit XLA may keep y + bias in float32, its excess-precision
    rule, so the jitted XLA path is a few units away from both.) Shapes: a
    width with fewer than 512 columns and a power-of-two factor (96), row and column counts
    with no factor of two (15 rows, 5 x 8 columns), several column blocks (1024), a 1-D input."""
    y, b = _inputs(shape, dtype)
    out = jax.jit(lambda y, b: bias_gelu(y, b, **KW))(y, b)
    assert out.shape == y.shape and out.dtype == y.dtype
    got = np.asarray(out, np.float64)
    assert np.all(np.isfinite(got))
    exact = _exact(y, b)
    assert max_ulps(got, exact, dtype) <= (0.5 if dtype != jnp.float32 else 16)  # f32: gelu_tanh's own error
    assert max_ulps(got, reference(y, b), dtype) <= (1 if dtype != jnp.float32 else 16)


def test_derivatives_are_those_of_the_xla_path_bit_for_bit():
    """The derivative rule is XLA's jax.jvp of the reference: jvp, grad and the grad of a jvp (the
    training step's) compute what the XLA path computes, and only the undifferentiated call runs
    the kernel."""
    y, b = _inputs((4, 8, 64), jnp.bfloat16)
    ty, tb = _inputs((4, 8, 64), jnp.bfloat16, seed=1)
    f = lambda y, b: bias_gelu(y, b, **KW)  # noqa: E731
    for got, want in zip(jax.jvp(f, (y, b), (ty, tb)), jax.jvp(reference, (y, b), (ty, tb))):
        assert bool(jnp.all(got == want))
    loss = lambda g: lambda y, b: jnp.sum(g(y, b).astype(jnp.float32) ** 2)  # noqa: E731
    for got, want in zip(jax.grad(loss(f), (0, 1))(y, b), jax.grad(loss(reference), (0, 1))(y, b)):
        assert bool(jnp.all(got == want))
    gjvp = lambda g: jax.grad(  # noqa: E731
        lambda y, b: jnp.sum(jax.jvp(g, (y, b), (ty, tb))[1].astype(jnp.float32) ** 2), (0, 1))
    for got, want in zip(gjvp(f)(y, b), gjvp(reference)(y, b)):
        assert bool(jnp.all(got == want))
    assert "pallas_call" in str(jax.make_jaxpr(f)(y, b))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda y, b: jax.jvp(f, (y, b), (ty, tb)))(y, b))
    # an input without a tangent (the EMA teacher inside jax.grad): the kernel runs
    teacher = jax.make_jaxpr(jax.grad(lambda s: jnp.sum(f(y * s, b).astype(jnp.float32)) * 0
                                      + jnp.sum(f(y, b).astype(jnp.float32))))(jnp.float32(1))
    assert str(teacher).count("pallas_call") == 1


def test_auto_is_xla_off_the_gpu_and_the_kernel_path_is_chosen_explicitly():
    y, b = _inputs((2, 4, 32), jnp.float32)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda y, b: bias_gelu(y, b))(y, b))
    assert "pallas_call" in str(jax.make_jaxpr(lambda y, b: bias_gelu(y, b, **KW))(y, b))
    assert bool(jnp.all(bias_gelu(y, b, impl="xla") == reference(y, b)))
    assert bool(jnp.all(reference(y, b) == gelu_tanh(y + b)))


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_over_the_batch_with_the_bias_replicated(axis_type):
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    y, b = _inputs((8, 4, 64), jnp.bfloat16)
    f = jax.jit(lambda y, b: bias_gelu(y, b, **KW))
    want = np.asarray(f(y, b), np.float64)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    with jax.set_mesh(mesh):
        batch = NamedSharding(mesh, P("data"))
        ys = jax.device_put(y, batch)
        out = f(ys, b)
        assert out.sharding.is_equivalent_to(batch, out.ndim), out.sharding
        assert "all-gather" not in f.lower(ys, b).compile().as_text()
    assert np.array_equal(np.asarray(out, np.float64), want)


def test_vmap():
    y, b = _inputs((3, 4, 64), jnp.float32)
    out = jax.vmap(lambda y: bias_gelu(y, b, **KW))(y)
    np.testing.assert_allclose(out, reference(y, b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((jnp.zeros((2, 8)), jnp.zeros((4,))), {}, "bias must have shape"),
        ((jnp.zeros((2, 8), jnp.int32), jnp.zeros((8,))), {}, "floating-point"),
        ((jnp.zeros((2, 8)), jnp.zeros((8,))), {"impl": "triton"}, "impl must be one of"),
    ],
)
def test_bad_input_names_the_problem(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bias_gelu(*args, **kwargs)


def test_float64_has_no_kernel_path():
    with jax.enable_x64(True):
        y = jnp.zeros((2, 8), jnp.float64)
        with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
            bias_gelu(y, jnp.zeros((8,), jnp.float64), **KW)
        assert bias_gelu(y, jnp.zeros((8,), jnp.float64)).dtype == jnp.float64  # auto: XLA

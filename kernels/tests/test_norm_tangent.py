"""``kernels.norm_tangent``: a pre-norm and its adaLN modulation in a JVP call, whose reverse mode
is one Pallas pass (interpret mode on the CPU).

The reference is JAX autodiff of :func:`kernels.norm_tangent.reference`: the reverse mode of its
JVP, in float64 (x64) for the error bounds; the forward pair is XLA's JVP of the same function,
so it must be those numbers exactly.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kernels import norm_modulate_tangent
from kernels.norm_tangent import kernel_applies, reference, reverse_of_jvp
from kernels.tests.helpers import _f64, assert_close, randn, rel_err, x64

EPS = 1e-6
NAMES = ("dx", "dtx", "dshift", "dtshift", "dscale", "dtscale")


def _inputs(seed, shape, out_dtype):
    b, n, c = shape
    x, tx, g, k = randn(seed, [shape] * 4, jnp.float32)
    shift, tshift, scale, tscale = randn(seed + 1, [(b, c)] * 4, jnp.float32)
    return (x, tx, shift, tshift, 0.3 * scale, tscale), (g.astype(out_dtype), k.astype(out_dtype))


def _ours(out_dtype, tiles=None):
    return lambda x, shift, scale: norm_modulate_tangent(x, shift, scale, eps=EPS, out_dtype=out_dtype,
                                                         impl="pallas", interpret=True, tiles=tiles)


def _kernel_in(fn, *args) -> bool:
    return "tvm_norm_modulate_tangent_bwd" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,tiles", [((2, 48, 96), (32, 4, 0)),  # 16 rows per program, chunks of 32
                                         ((1, 7, 1152), (32, 4, 1)),  # one row per program, 9 chunks of 128
                                         ((3, 64, 64), (16, 2, 1)), ((2, 40, 256), (4, 2, 0))])
def test_reverse_mode_of_the_jvp_matches_float64_autodiff(out_dtype, shape, tiles):
    """All six cotangents (x, the modulation, and their tangents) against float64 autodiff of the
    reference, at widths that are and are not a multiple of the column chunk and token counts
    with fewer factors of two than the row tile; the forward pair is XLA's, bit for bit."""
    args, cts = _inputs(3, shape, out_dtype)
    assert kernel_applies(args[0], args[2], args[4], out_dtype)
    ours = _ours(out_dtype, tiles)
    assert _kernel_in(functools.partial(reverse_of_jvp, ours), *args, cts)
    got = jax.jit(functools.partial(reverse_of_jvp, ours))(*args, cts)
    with x64():
        ref64 = functools.partial(reference, eps=EPS, out_dtype=jnp.float64)
        want = reverse_of_jvp(ref64, *(jnp.asarray(_f64(a)) for a in args), tuple(jnp.asarray(_f64(c)) for c in cts))
    for name, g, r in zip(NAMES, got, want):
        assert g.dtype == jnp.float32, name
        assert_close(name, g, np.asarray(r), 1e-5)  # the cotangents are float32 sums either way
    pair = lambda fn: jax.jit(lambda x, tx, sh, tsh, sc, tsc: jax.jvp(fn, (x, sh, sc), (tx, tsh, tsc)))  # noqa: E731
    xla = functools.partial(reference, eps=EPS, out_dtype=out_dtype)
    for o, r in zip(pair(ours)(*args), pair(xla)(*args)):
        assert o.dtype == out_dtype
        np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(r, np.float32))


def test_a_jvp_that_leaves_x_still_and_the_tvm_pattern():
    """The first block of the JVP call: x carries no tangent (a symbolic zero), only the
    modulation does; and grad of a loss of the JVP's outputs through two chained norms (the
    block's pattern), against the XLA function."""
    (x, _, shift, tshift, scale, tscale), (g, k) = _inputs(5, (2, 32, 64), jnp.float32)
    xla = functools.partial(reference, eps=EPS, out_dtype=jnp.float32)

    def loss(fn, x, shift, scale):
        def block(s):  # the tangent enters through the modulation only
            h1 = fn(x, shift * s, scale * s)
            return fn(x + 0.5 * h1, shift, scale + s)

        h, th = jax.jvp(block, (jnp.float32(1.0),), (jnp.float32(1.0),))
        return jnp.sum(h * g) + jnp.sum(th * k) + jnp.sum(th * th)

    grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2)))  # noqa: E731
    assert _kernel_in(jax.grad(functools.partial(loss, _ours(jnp.float32)), argnums=(0, 1, 2)), x, shift, scale)
    for name, a, r in zip(("dx", "dshift", "dscale"), grad(_ours(jnp.float32))(x, shift, scale),
                          grad(xla)(x, shift, scale)):
        assert_close(name, a, np.asarray(r, np.float64), 1e-5)


def _residual_block_grad(impl):
    """Gradient in (x, tx, shift, scale) of a loss of the JVP of ``x + tanh(h) / 2``, h the
    pre-norm's output, x passed through the op (``impl``; None: the reference, no pass-through)."""
    def block(x, shift, scale):
        if impl is None:
            return x + 0.5 * jnp.tanh(reference(x, shift, scale, eps=EPS, out_dtype=x.dtype))
        x2, h = norm_modulate_tangent(x, shift, scale, eps=EPS, impl=impl, interpret=True, passthrough=True)
        return x2 + 0.5 * jnp.tanh(h)

    def loss(x, tx, shift, tshift, scale, tscale, cts):
        y, ty = jax.jvp(block, (x, shift, scale), (tx, tshift, tscale))
        return jnp.sum(y * cts[0]) + jnp.sum(ty * cts[1])

    return jax.grad(loss, argnums=(0, 1, 2, 4))


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_passthrough_adds_the_residual_cotangent(impl):
    """``passthrough=True`` returns x itself beside h; the residual's cotangent that reaches that
    x is added to the norm's by the kernel (in place): grad of a residual block's JVP loss equals
    the XLA function's."""
    (x, tx, shift, tshift, scale, tscale), cts = _inputs(6, (2, 32, 64), jnp.float32)
    grad = _residual_block_grad(impl)
    assert _kernel_in(grad, x, tx, shift, tshift, scale, tscale, cts) == (impl == "pallas")
    for name, a, r in zip(("dx", "dtx", "dshift", "dscale"), jax.jit(grad)(x, tx, shift, tshift, scale, tscale, cts),
                          jax.jit(_residual_block_grad(None))(x, tx, shift, tshift, scale, tscale, cts)):
        assert_close(name, a, np.asarray(r, np.float64), 1e-5)
    x2, _ = norm_modulate_tangent(x, shift, scale, impl=impl, interpret=True, passthrough=True)
    np.testing.assert_array_equal(x2, x)


def test_xla_and_auto_on_the_cpu_are_the_plain_function_and_bad_input_is_refused():
    """``impl="xla"`` (and ``auto`` off a GPU) is the reference, differentiable in every mode;
    inputs the kernel cannot take raise with the reason under ``impl="pallas"``."""
    (x, _, shift, _, scale, _), _ = _inputs(7, (2, 16, 32), jnp.float32)
    want = reference(x, shift, scale, eps=EPS, out_dtype=jnp.bfloat16)
    for impl in ("xla", "auto"):
        got = norm_modulate_tangent(x, shift, scale, out_dtype=jnp.bfloat16, impl=impl)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    plain = jax.grad(lambda a: jnp.sum(norm_modulate_tangent(a, shift, scale, impl="xla") ** 2))(x)
    assert plain.shape == x.shape and bool(jnp.all(jnp.isfinite(plain)))
    with pytest.raises(ValueError, match="impl must be one of"):
        norm_modulate_tangent(x, shift, scale, impl="triton")
    with pytest.raises(ValueError, match="shift must have shape"):
        norm_modulate_tangent(x, shift[:1], scale)
    with pytest.raises(ValueError, match=r"batch, tokens, width"):
        norm_modulate_tangent(x[0], shift, scale)
    with pytest.raises(ValueError, match="float32 x"):
        norm_modulate_tangent(x[..., :24], shift[:, :24], scale[:, :24], impl="pallas")  # width 24: chunks of 8
    with pytest.raises(ValueError, match="float32 x"):
        norm_modulate_tangent(x.astype(jnp.bfloat16), shift, scale, impl="pallas")
    with pytest.raises(ValueError, match="passthrough must be a bool"):
        norm_modulate_tangent(x, shift, scale, passthrough="yes")
    for tiles in ((24, 4, 0), (4, 2, 2), (4, 2)):
        with pytest.raises(ValueError, match="tiles must be"):
            norm_modulate_tangent(x, shift, scale, impl="pallas", tiles=tiles)
    with pytest.raises(ValueError, match="eps must be a static"):
        jax.jit(lambda e: norm_modulate_tangent(x, shift, scale, eps=e))(1e-6)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_over_the_batch(axis_type):
    """Under a mesh the kernel runs on batch shards (the column sums are per sample, so nothing
    crosses devices), with and without the pass-through: the same cotangents as on one device."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    args, cts = _inputs(9, (4, 16, 32), jnp.bfloat16)
    fns = (jax.jit(functools.partial(reverse_of_jvp, _ours(jnp.bfloat16))), jax.jit(_residual_block_grad("pallas")))
    cts32 = tuple(c.astype(jnp.float32) for c in cts)
    wants = (fns[0](*args, cts), fns[1](*args, cts32))
    mesh = jax.make_mesh((4,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    with jax.set_mesh(mesh):
        put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
        gots = (fns[0](*(put(a) for a in args), tuple(put(c) for c in cts)),
                fns[1](*(put(a) for a in args), tuple(put(c) for c in cts32)))  # the pass-through, in place
    for names, got, want in zip((NAMES, ("dx", "dtx", "dshift", "dscale")), gots, wants):
        assert len(got) == len(names)
        for name, g, r in zip(names, got, want):
            assert rel_err(g, np.asarray(r)) <= 1e-6, name

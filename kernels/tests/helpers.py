"""Shared helpers of the kernel tests: random inputs, float64 references, error metric."""
from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from kernels.reference import attention_xla


@contextlib.contextmanager
def x64():
    """Enables float64 inside the block only (never globally)."""
    state = getattr(jax, "enable_x64", None)
    if state is not None:
        with state(True):
            yield
    else:  # older spelling
        from jax.experimental import enable_x64

        with enable_x64():
            yield


def rel_err(out, ref) -> float:
    """||out - ref||_F / ||ref||_F in float64 (every element counts; NaN gives NaN)."""
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def assert_close(name, out, ref, tol):
    out32 = np.asarray(jnp.asarray(out, jnp.float32))
    assert np.all(np.isfinite(out32)), f"{name}: non-finite values"
    err = rel_err(out, ref)
    if os.environ.get("KERNELS_PRINT_ERRORS"):
        print(f"  {name}: rel err {err:.2e} (tol {tol:.0e})")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def randn(seed: int, shapes, dtype):
    """Fresh N(0, 1) arrays (one per shape), deterministic per seed."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s).astype(np.float32), dtype) for s in shapes]


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@functools.partial(jax.jit, static_argnames="scale")
def _plain_vjp(q, k, v, do, *, scale):
    o, vjp = jax.vjp(lambda a, b, c: attention_xla(a, b, c, scale=scale), q, k, v)
    return o, vjp(do)


@functools.partial(jax.jit, static_argnames="scale")
def _tangent_vjp(q, k, v, tq, tk, tv, do, dto, *, scale):
    def f(q, k, v, tq, tk, tv):
        return jax.jvp(lambda a, b, c: attention_xla(a, b, c, scale=scale), (q, k, v), (tq, tk, tv))

    out, vjp = jax.vjp(f, q, k, v, tq, tk, tv)
    return out, vjp((do, dto))


def ref_plain(q, k, v, do, scale):
    """float64 (o, (dq, dk, dv)) of the jnp reference by JAX autodiff (as numpy)."""
    with x64():
        o, grads = _plain_vjp(*(jnp.asarray(_f64(a)) for a in (q, k, v, do)), scale=scale)
        assert o.dtype == jnp.float64
        return np.asarray(o), tuple(np.asarray(g) for g in grads)


def ref_tangent(q, k, v, tq, tk, tv, cts, scale):
    """float64 (o, t_o, [grads of 6 inputs for each (do, dto) in cts]) by JAX autodiff."""
    with x64():
        args = [jnp.asarray(_f64(a)) for a in (q, k, v, tq, tk, tv)]
        grads = []
        for do, dto in cts:
            (o, to), g = _tangent_vjp(*args, jnp.asarray(_f64(do)), jnp.asarray(_f64(dto)), scale=scale)
            assert o.dtype == jnp.float64
            grads.append(tuple(np.asarray(x) for x in g))
        return np.asarray(o), np.asarray(to), grads

"""The Lipschitz DiT: sizes, parameter counts, init, embeddings, switches, forward/JVP/grad."""
import collections
import contextlib
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tvm_jax.dit import (
    MODEL_SIZES, Buffer, DiT, DiTConfig, abstract_dit, count_params, frequency_features, rms_norm,
    sincos_table_2d, unpatchify,
)
from hlo_text import barrier_operands, layer_concatenates
from kernels import gelu_tanh
from tvm_jax.networks import build_dit

TINY = dict(input_size=8, in_channels=3, hidden_size=64, depth=2, num_heads=4, num_classes=10, dtype="float32")


def _expected_count(hidden, depth, heads, latent=32, channels=4, patch=2, classes=1000, qk_norm=True):
    """Parameter count of the official model, written out from DESIGN section 4."""
    lin = lambda i, o: i * o + o  # noqa: E731
    block = lin(hidden, 3 * hidden) + lin(hidden, hidden) + lin(hidden, 4 * hidden) + lin(4 * hidden, hidden)
    block += lin(hidden, 6 * hidden) + (2 * hidden // heads if qk_norm else 0)
    embedders = 3 * (lin(256, hidden) + lin(hidden, hidden))
    table = (classes + 1) * hidden
    patch_embed = channels * patch * patch * hidden + hidden
    final = lin(hidden, 2 * hidden) + lin(hidden, patch * patch * channels)
    return depth * block + embedders + table + patch_embed + final


def test_xl2_18h_has_the_official_parameter_count():
    model = abstract_dit(DiTConfig.create("XL/2-18h", input_size=32, in_channels=4))
    assert count_params(model) == 678_068_496
    table = nnx.state(model, Buffer)
    assert [x.shape for x in jax.tree.leaves(table)] == [(256, 1152)]


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_every_size_matches_the_formula(size):
    hidden, depth, heads = MODEL_SIZES[size]
    model = abstract_dit(DiTConfig.create(size, input_size=32, in_channels=4))
    assert count_params(model) == _expected_count(hidden, depth, heads)
    assert model.config.head_dim == hidden // heads


def test_naive_dit_drops_qk_norm_weights_and_uses_layernorm():
    cfg = DiTConfig.create("S/2", lipschitz=False, input_size=32, in_channels=4)
    assert (cfg.mod_norm, cfg.qk_norm, cfg.norm, cfg.init) == (False, False, "layer", "xavier_uniform")
    assert count_params(abstract_dit(cfg)) == _expected_count(384, 12, 6, qk_norm=False)
    # each switch can be turned back on by itself
    assert DiTConfig.create("S/2", lipschitz=False, qk_norm=True).qk_norm


def test_position_table_layout():
    dim, grid = 16, 4
    table = sincos_table_2d(dim, grid)
    assert table.shape == (grid * grid, dim)
    w = 10000.0 ** (-np.arange(dim // 4) / (dim / 4))
    for token in (0, 5, 11, 15):
        row, col = divmod(token, grid)  # row-major tokens
        expect = np.concatenate([np.sin(col * w), np.cos(col * w), np.sin(row * w), np.cos(row * w)])
        np.testing.assert_allclose(table[token], expect, atol=1e-12)


def test_frequency_features():
    x = jnp.array([0.0, 0.3, 1.0])
    feats = frequency_features(x, 256)
    f = np.exp(-math.log(10000.0) * np.arange(128) / 128)
    expect = np.concatenate([np.cos(np.outer(np.asarray(x), f)), np.sin(np.outer(np.asarray(x), f))], axis=1)
    np.testing.assert_allclose(feats, expect, atol=1e-6)


def test_unpatchify_order_is_row_column_channel():
    b, g, p, c = 2, 3, 2, 4
    tokens = jnp.arange(b * g * g * p * p * c, dtype=jnp.float32).reshape(b, g * g, p * p * c)
    img = unpatchify(tokens, p, c)
    for (i, j, di, dj, ch) in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 3), (2, 1, 0, 1, 2)]:
        assert img[1, i * p + di, j * p + dj, ch] == tokens[1, i * g + j, (di * p + dj) * c + ch]


def _linear_kernels(model):
    return {"/".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Param) and path[-1] == "kernel"}


def test_spectral_init_and_zero_layers():
    cfg = DiTConfig.create(None, input_size=8, in_channels=3, hidden_size=64, depth=3, num_heads=4,
                           num_classes=10, time_specinit=True)
    model = DiT(cfg, rngs=nnx.Rngs(7))
    kernels = _linear_kernels(model)
    zero = [k for k in kernels if "adaLN" in k or k.startswith("final_layer/linear")]
    assert len(zero) == 3  # stacked block adaLN, final adaLN, final linear
    for name, w in kernels.items():
        if "adaLN" in name or name.startswith("final_layer/linear"):
            assert np.all(w == 0), name
            continue
        mats = w.reshape(-1, w.shape[-2], w.shape[-1]) if name.startswith("blocks") else w.reshape(1, -1, w.shape[-1])
        for m in mats:
            assert abs(np.linalg.norm(m, 2) - 1.0) < 1e-3, name
    assert np.all(np.asarray(model.final_layer.linear.kernel[...]) == 0)
    for layer in (model.final_layer.adaLN, model.final_layer.linear, model.blocks.adaLN):
        assert np.all(np.asarray(layer.bias[...]) == 0)
    # label table ~ N(0, 0.02); QK-norm weights start at 1
    table = np.asarray(model.label_embedder.embedding[...])
    assert table.shape == (11, 64) and abs(table.std() - 0.02) < 0.004
    assert np.all(np.asarray(model.blocks.attn.q_norm.weight[...]) == 1)


def test_embedders_without_time_specinit_are_normal_002():
    cfg = DiTConfig.create(None, input_size=8, in_channels=3, hidden_size=128, depth=1, num_heads=4,
                           num_classes=10, time_specinit=False)
    model = DiT(cfg, rngs=nnx.Rngs(0))
    for emb in (model.t_embedder, model.gap_embedder, model.beta_embedder):
        for lin in (emb.linear1, emb.linear2):
            w = np.asarray(lin.kernel[...])
            assert abs(w.std() - 0.02) < 0.002 and abs(np.linalg.norm(w, 2) - 1.0) > 0.1


def test_rms_norm_has_unit_rms():
    x = 3.0 * jax.random.normal(jax.random.key(0), (5, 7, 96)) + 1.0
    y = rms_norm(x)
    np.testing.assert_allclose(np.sqrt(np.mean(np.square(np.asarray(y)), -1)), 1.0, atol=1e-4)


def _random_params(params, key, scale=0.05):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def test_tiny_dit_forward_jvp_and_grad():
    apply, params = build_dit(DiTConfig.create(None, **TINY))
    params = _random_params(params, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (3, 8, 8, 3))
    t, s = jnp.array([0.9, 0.5, 1.0]), jnp.array([0.1, 0.5, 0.0])
    labels, beta = jnp.array([0, 9, 10]), jnp.array([0.5, 1.0, 1.0])

    out = apply(params, x, t, t - s, labels, beta)
    assert out.shape == x.shape and out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    F, dF = jax.jvp(lambda s_: apply(params, x, t, t - s_, labels, beta, jvp=True), (s,), (jnp.ones_like(s),))
    np.testing.assert_allclose(F, out, rtol=1e-5, atol=1e-6)
    assert bool(jnp.all(jnp.isfinite(dF))) and float(jnp.abs(dF).max()) > 0

    def loss(p):
        F, dF = jax.jvp(lambda s_: apply(p, x, t, t - s_, labels, beta, jvp=True), (s,), (jnp.ones_like(s),))
        return jnp.mean(F ** 2) + jnp.mean(dF ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > len(norms) // 2


def test_bfloat16_compute_keeps_float32_params_and_output():
    apply, params = build_dit(DiTConfig.create(None, **{**TINY, "dtype": "bfloat16"}))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    apply32, _ = build_dit(DiTConfig.create(None, **TINY))
    params = _random_params(params, jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (2, 8, 8, 3))
    out16 = apply(params, x, 0.7, 0.3, jnp.array([1, 2]), 0.5)
    out32 = apply32(params, x, 0.7, 0.3, jnp.array([1, 2]), 0.5)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert 0 < rel < 5e-2


def test_conditioning_inputs_all_matter():
    apply, params = build_dit(DiTConfig.create(None, **TINY))
    params = _random_params(params, jax.random.key(5), scale=0.2)
    x = jax.random.normal(jax.random.key(6), (1, 8, 8, 3))
    base = apply(params, x, 0.5, 0.2, 3, 0.5)
    for changed in (apply(params, x, 0.6, 0.2, 3, 0.5), apply(params, x, 0.5, 0.3, 3, 0.5),
                    apply(params, x, 0.5, 0.2, 4, 0.5), apply(params, x, 0.5, 0.2, 3, 0.7)):
        assert float(jnp.abs(changed - base).max()) > 1e-4


def test_wrong_input_shape_is_a_clear_error():
    apply, params = build_dit(DiTConfig.create(None, **TINY))
    with pytest.raises(ValueError, match=r"DiT input must be"):
        apply(params, jnp.zeros((2, 8, 8, 4)), 0.5, 0.1, 0, 1.0)


@pytest.mark.parametrize("field,kwargs,match", [
    ("size", dict(size="XXL/2"), "model.size"),
    ("input_size", dict(size="S/2", input_size=33), "model.input_size"),
    ("num_heads", dict(size=None, hidden_size=64, depth=1, num_heads=5), "model.num_heads"),
    ("norm", dict(size="S/2", norm="batch"), "model.norm"),
    ("remat", dict(size="S/2", remat="everything"), "model.remat"),
    ("save_attention", dict(size="S/2", save_attention="yes"), "model.save_attention: must be a bool"),
    ("layer_loop", dict(size="S/2", layer_loop="while"), "model.layer_loop: unknown layer loop 'while'"),
    ("depth", dict(size=None, hidden_size=64, depth=0, num_heads=4), "model.depth"),
])
def test_bad_model_config_names_the_field(field, kwargs, match):
    size = kwargs.pop("size")
    with pytest.raises(ValueError, match=match):
        DiTConfig.create(size, **kwargs)


def _jvp_loss(config, x):
    """A loss of the network's output and its JVP along s (the shape of the TVM objective)."""
    apply, _ = build_dit(config)
    t, s = jnp.array([0.9, 0.4]), jnp.array([0.2, 0.1])

    def loss(p):
        F, dF = jax.jvp(lambda s_: apply(p, x, t, t - s_, jnp.array([1, 3]), 0.5, jvp=True), (s,), (jnp.ones_like(s),))
        return jnp.mean(F ** 2) + jnp.mean(dF ** 2)

    return loss


def _jvp_loss_and_grads(config, params, x):
    loss = _jvp_loss(config, x)
    return jax.jit(jax.value_and_grad(loss))(params), loss


PALLAS_TINY = {**TINY, "attention_impl": "pallas"}


@pytest.fixture(scope="module")
def scan_reference():
    """Parameters, an input, and the JVP loss and gradients of the layer scan without remat (Pallas
    kernels in the interpreter): the reference of the remat and unrolled-loop tests, computed once."""
    _, params = build_dit(DiTConfig.create(None, **PALLAS_TINY))
    params = _random_params(params, jax.random.key(7), scale=0.2)
    x = jax.random.normal(jax.random.key(8), (2, 8, 8, 3))
    (loss, grads), _ = _jvp_loss_and_grads(DiTConfig.create(None, **PALLAS_TINY), params, x)
    return params, x, loss, grads


@pytest.mark.parametrize("remat,save_attention", [("dots", True), ("dots", False), ("block", True)])
def test_remat_policies_leave_the_jvp_loss_and_gradients_unchanged(remat, save_attention, scan_reference):
    params, x, ref_loss, ref_grads = scan_reference
    config = DiTConfig.create(None, **PALLAS_TINY, remat=remat, save_attention=save_attention)
    (loss, grads), _ = _jvp_loss_and_grads(config, params, x)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-7)
    assert sum(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads)) > len(jax.tree.leaves(grads)) // 2


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_unrolled_layers_give_the_scans_forward_jvp_loss_and_gradients(remat, scan_reference):
    """``layer_loop="unroll"`` runs the same blocks with the same parameters one traced copy at a
    time: the forward, the JVP loss and every gradient equal the scan's (float32, Pallas kernels in
    the interpreter; the scan without remat, which the remat test above equates with the scan under
    remat), and under remat nothing is saved stacked per layer."""
    params, x, l_scan, g_scan = scan_reference
    forwards = {}
    for loop in ("scan", "unroll"):
        apply, _ = build_dit(DiTConfig.create(None, **PALLAS_TINY, remat=remat, layer_loop=loop))
        forwards[loop] = jax.jit(apply)(params, x, jnp.array([0.7, 0.3]), 0.2, jnp.array([2, 5]), 0.5)
    config = DiTConfig.create(None, **PALLAS_TINY, remat=remat, layer_loop="unroll")
    (l_unroll, g_unroll), loss = _jvp_loss_and_grads(config, params, x)
    f_scan, f_unroll = forwards["scan"], forwards["unroll"]
    # Equal up to float32 rounding on the output's scale: the two programs fuse differently, so
    # they can round differently (with conftest.py's loop emitter up to 2.6e-6 where |f| reaches
    # 6.7, about 5 ulps; a wrong layer or parameter would differ by orders of magnitude more).
    np.testing.assert_allclose(f_unroll, f_scan, rtol=1e-6, atol=1e-6 * float(jnp.abs(f_scan).max()))
    np.testing.assert_allclose(l_unroll, l_scan, rtol=1e-6)
    assert jax.tree.structure(g_unroll) == jax.tree.structure(g_scan)
    for g, r in zip(jax.tree.leaves(g_unroll), jax.tree.leaves(g_scan)):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-7)
    assert sum(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_unroll)) > len(jax.tree.leaves(g_unroll)) // 2
    if remat == "dots":
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            jax.ad_checkpoint.print_saved_residuals(loss, params)
        shapes = [line.split(" ", 1)[0] for line in out.getvalue().splitlines() if line]
        assert shapes and not any(f"[{TINY['depth']},2,16," in s for s in shapes), shapes


def test_unrolled_backward_writes_each_stacked_gradient_once():
    """Unrolled, the gradient of a stacked parameter is the concatenate of its per-layer
    gradients. Each such concatenate must feed an optimization barrier (the transpose of the one
    in the forward), so XLA writes the stacked gradient as one buffer instead of fusing the
    concatenate into its consumers (on an H200 the optimiser and EMA updates took 28.9 ms of the
    256px step that way, 15.7 with the barrier, concatenates included: bench/NOTES.md item 24).
    Checked on the lowered StableHLO of the JVP loss's gradient; fails without the barrier."""
    depth = 3
    config = DiTConfig.create(None, **{**PALLAS_TINY, "depth": depth}, layer_loop="unroll")
    _, params = build_dit(config)
    x = jax.random.normal(jax.random.key(13), (2, 8, 8, 3))
    text = jax.jit(jax.grad(_jvp_loss(config, x))).lower(params).as_text()
    stacked_grads = set(layer_concatenates(text, depth))
    n_stacked = len(jax.tree.leaves(params["blocks"]))
    assert len(stacked_grads) == n_stacked, (len(stacked_grads), n_stacked)
    barriers = barrier_operands(text)
    assert stacked_grads <= barriers, sorted(stacked_grads - barriers)


@pytest.mark.parametrize("remat", ["dots", "block"])
def test_save_attention_keeps_the_kernel_outputs_instead_of_recomputing_them(remat):
    """Under remat the backward needs o, t_o and the row statistics of the fused kernel: with
    ``save_attention`` (outputs named ``kernels.RESIDUALS_NAME``) they are saved residuals, four
    more per layer (stacked by the layer scan); without it they are not saved, so the backward
    would have to re-run the forward kernel."""
    _, params = build_dit(DiTConfig.create(None, **PALLAS_TINY))
    x = jax.random.normal(jax.random.key(9), (2, 8, 8, 3))
    saved = {}
    for save in (True, False):
        config = DiTConfig.create(None, **PALLAS_TINY, remat=remat, save_attention=save)
        _, loss = _jvp_loss_and_grads(config, params, x)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # the public API prints "f32[2,16] output of ... from ..."
            jax.ad_checkpoint.print_saved_residuals(loss, params)
        saved[save] = collections.Counter(line.split(" ", 1)[0] for line in out.getvalue().splitlines() if line)
    b, heads, tokens, depth = 2, TINY["num_heads"], 16, TINY["depth"]
    o = f"f32[{depth},{b},{tokens},{heads},{TINY['hidden_size'] // heads}]"
    stats = f"f32[{depth},{b},{heads},{tokens}]"
    assert saved[True] - saved[False] == collections.Counter({o: 2, stats: 2})
    assert not saved[False] - saved[True]


def test_gelu_tanh_is_the_tanh_gelu_with_its_derivatives():
    """gelu_tanh computes x (1 + tanh(u)) / 2 as x sigmoid(2u): the same function, first and second
    derivatives (the training step differentiates the JVP), in float64 to rounding. (The absolute
    tolerances cover the negative tail, where 1 + tanh(u) cancels and the tanh form is the one
    that rounds: about |x| * 2e-16.)"""
    with jax.enable_x64(True):
        x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 2001), jnp.array([-40.0, 40.0, 0.0])]).astype(jnp.float64)
        ref = lambda v: jax.nn.gelu(v, approximate=True)  # noqa: E731
        np.testing.assert_allclose(gelu_tanh(x), ref(x), rtol=1e-13, atol=1e-14)
        for f in (gelu_tanh, ref):
            assert f(x).dtype == jnp.float64
        d1 = lambda f: jax.vmap(jax.grad(f))  # noqa: E731
        np.testing.assert_allclose(d1(gelu_tanh)(x), d1(ref)(x), rtol=1e-12, atol=1e-13)
        d2 = lambda f: jax.vmap(jax.grad(jax.grad(f)))  # noqa: E731
        np.testing.assert_allclose(d2(gelu_tanh)(x), d2(ref)(x), rtol=1e-10, atol=1e-12)
    x32 = jax.random.normal(jax.random.key(0), (4096,)) * 4
    with jax.enable_x64(True):
        exact64 = np.asarray(jax.nn.gelu(jnp.asarray(np.asarray(x32), jnp.float64), approximate=True))
    np.testing.assert_allclose(gelu_tanh(x32), exact64, rtol=1e-6, atol=1e-7)  # float32 rounding
    xb = x32.astype(jnp.bfloat16)
    assert gelu_tanh(xb).dtype == jnp.bfloat16
    # bf16 in and out, float32 inside: within one bf16 rounding of the exact value
    exact = jax.nn.gelu(xb.astype(jnp.float32), approximate=True)
    assert float(jnp.max(jnp.abs(gelu_tanh(xb).astype(jnp.float32) - exact) / (jnp.abs(exact) + 1e-3))) <= 2 ** -8


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_the_mlp_and_second_norm_kernels_inside_the_model(monkeypatch, dtype, tol):
    """With ``auto`` standing as on a GPU (the kernels then run in the Pallas interpreter), the
    model's undifferentiated forward runs kernels.bias_gelu and kernels.residual_norm_modulate in
    every block and gives the XLA path's output to the compute dtype's rounding; a JVP call runs
    neither and gives the XLA path's numbers exactly (their derivative rules are XLA's)."""
    import kernels.api

    apply, params = build_dit(DiTConfig.create(None, **{**TINY, "dtype": dtype}))
    params = _random_params(params, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (3, 8, 8, 3))
    t, s = jnp.array([0.9, 0.5, 1.0]), jnp.array([0.1, 0.5, 0.0])
    labels, beta = jnp.array([0, 9, 10]), jnp.array([0.5, 1.0, 1.0])
    fwd = jax.jit(lambda p: apply(p, x, t, t - s, labels, beta))
    jvp = jax.jit(lambda p: jax.jvp(lambda s_: apply(p, x, t, t - s_, labels, beta, jvp=True), (s,), (jnp.ones_like(s),)))
    want, want_jvp = fwd(params), jvp(params)
    monkeypatch.setattr(kernels.api, "_on_gpu", lambda: True)
    text = str(jax.make_jaxpr(lambda p: apply(p, x, t, t - s, labels, beta))(params))
    assert "tvm_bias_gelu" in text and "tvm_residual_norm_modulate" in text
    fwd_k = jax.jit(lambda p: apply(p, x, t, t - s, labels, beta))
    got = fwd_k(params)
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert err <= tol, err
    jvp_text = str(jax.make_jaxpr(lambda p: jax.jvp(lambda s_: apply(p, x, t, t - s_, labels, beta, jvp=True),
                                                    (s,), (jnp.ones_like(s),)))(params))
    assert "tvm_bias_gelu" not in jvp_text and "tvm_residual_norm_modulate" not in jvp_text
    got_jvp = jax.jit(lambda p: jax.jvp(lambda s_: apply(p, x, t, t - s_, labels, beta, jvp=True),
                                        (s,), (jnp.ones_like(s),)))(params)
    for a, b in zip(got_jvp, want_jvp):
        assert bool(jnp.all(a == b))

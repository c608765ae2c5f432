"""Bad inputs raise ValueError naming the problem; unusual head dims are handled."""
import jax
import jax.numpy as jnp
import pytest

from kernels import AttentionConfig, KernelConfig, attention, attention_xla, flash_with_tangent
from kernels.tests.helpers import assert_close, randn, x64

F32 = jnp.float32
X = jnp.zeros((1, 16, 2, 32), F32)


@pytest.mark.parametrize("impl", ["xla", "pallas", "auto", "cudnn"])
@pytest.mark.parametrize(
    "args,match",
    [
        ((jnp.zeros((16, 2, 32)), X, X), "rank 4"),
        ((X, jnp.zeros((1, 16, 2, 32), jnp.bfloat16), X), "dtype"),
        ((X, jnp.zeros((1, 16, 3, 32)), jnp.zeros((1, 16, 3, 32))), "heads"),
        ((X, jnp.zeros((2, 16, 2, 32)), jnp.zeros((2, 16, 2, 32))), "batch"),
        ((X, X, jnp.zeros((1, 17, 2, 32))), "v shape"),
        ((jnp.zeros((1, 16, 2, 32), jnp.int32),) * 3, "floating dtype"),
    ],
)
def test_bad_arrays(impl, args, match):
    with pytest.raises(ValueError, match=match):
        attention(*args, impl=impl, interpret=True)


def test_pallas_only_limits():
    with pytest.raises(ValueError, match="head_dim <= 256"):
        big = jnp.zeros((1, 16, 1, 320), F32)
        attention(big, big, big, impl="pallas")
    attention(jnp.zeros((1, 4, 1, 320)), jnp.zeros((1, 4, 1, 320)), jnp.zeros((1, 4, 1, 320)), impl="xla")
    with x64(), pytest.raises(ValueError, match="dtypes bfloat16, float16, float32"):
        x = jnp.zeros((1, 16, 1, 32), jnp.float64)
        attention(x, x, x, impl="pallas")
    with pytest.raises(ValueError, match="non-empty"):
        e = jnp.zeros((1, 0, 1, 32), F32)
        attention(e, e, e, impl="pallas")


def test_bad_options():
    with pytest.raises(ValueError, match="impl must be one of"):
        attention(X, X, X, impl="triton")
    with pytest.raises(ValueError, match="jvp must be a bool"):
        attention(X, X, X, impl="pallas", jvp="yes")
    with pytest.raises(ValueError, match="interpret must be"):
        attention(X, X, X, impl="pallas", interpret="cpu")
    with pytest.raises(ValueError, match="block_sizes must be"):
        attention(X, X, X, impl="pallas", block_sizes=(64, 64))
    with pytest.raises(ValueError, match="static Python number"):
        jax.jit(lambda s: attention(X, X, X, impl="pallas", scale=s))(0.5)
    with pytest.raises(ValueError, match="finite"):
        attention(X, X, X, impl="xla", scale=float("nan"))


def test_bad_block_sizes():
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig(24, 16)
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig(8, 16)  # Triton dots need >= 16
    with pytest.raises(ValueError, match="num_warps"):
        KernelConfig(16, 16, num_warps=3)
    with pytest.raises(ValueError, match="num_stages"):
        KernelConfig(16, 16, num_stages=0)
    with pytest.raises(ValueError, match="KernelConfig or None"):
        AttentionConfig(fwd=(16, 16))
    with pytest.raises(ValueError, match="unknown AttentionConfig fields"):
        AttentionConfig.from_dict({"forward": None})
    cfg = AttentionConfig(fwd=KernelConfig(32, 16, 8, 3))
    assert AttentionConfig.from_dict(cfg.to_dict()) == cfg
    resolved = cfg.resolve(128)
    assert resolved.fwd == KernelConfig(32, 16, 8, 3) and resolved.jvp_fwd is not None
    with pytest.raises(ValueError, match="jvp_bwd_impl must be one of"):
        AttentionConfig(jvp_bwd_impl="cublas")
    mm = AttentionConfig(jvp_bwd_impl="matmul", jvp_bwd_v=KernelConfig(16, 64))
    assert AttentionConfig.from_dict(mm.to_dict()) == mm and mm.resolve(64).jvp_bwd_impl == "matmul"
    assert cfg.resolve(64).jvp_bwd_impl == "kernels" and cfg.resolve(128).jvp_bwd_impl == "auto"
    assert cfg.resolve(128, jnp.float32).jvp_bwd_impl == "kernels"


def test_jvp_bwd_auto_choice():
    """"auto" takes the dS matmuls only from 2,048 tokens and while dS and dtS fit in 2 GiB."""
    from kernels.config import jvp_bwd_impl_choice as choice

    assert choice("auto", 1, 24, 4096, 4096, 2) == "matmul"  # 1.5 GiB
    assert choice("auto", 1, 24, 8192, 8192, 2) == "kernels"  # 6 GiB
    assert choice("auto", 8, 24, 1024, 1024, 2) == "kernels"  # short
    assert choice("auto", 1, 24, 2048, 4096, 2) == "matmul"
    assert choice("kernels", 1, 1, 8192, 8192, 2) == "kernels"
    assert choice("matmul", 1, 1, 16, 16, 4) == "matmul"
    with pytest.raises(ValueError, match="jvp_bwd_impl must be one of"):
        choice(None, 1, 1, 16, 16, 2)


def test_bad_tangents():
    with pytest.raises(ValueError, match="tq shape"):
        flash_with_tangent(X, X, X, jnp.zeros((1, 8, 2, 32)), X, X)
    with pytest.raises(ValueError, match="tv dtype"):
        flash_with_tangent(X, X, X, X, X, X.astype(jnp.bfloat16))


@pytest.mark.parametrize("dim", [8, 200])
def test_head_dims_zero_padded_to_pow2(dim):
    """D=8 runs at 16, D=200 at 256 (zero columns change neither logits nor kept outputs)."""
    q, k, v, tq, tk, tv = randn(30 + dim, [(1, 20, 1, dim)] * 6, F32)
    cfg = AttentionConfig.uniform(16, 16)
    o = attention(q, k, v, impl="pallas", interpret=True, block_sizes=cfg)
    assert o.shape == q.shape
    assert_close("o", o, attention_xla(q, k, v, scale=dim**-0.5), 1e-5)
    o2, to = flash_with_tangent(q, k, v, tq, tk, tv, interpret=True, block_sizes=cfg)
    ref_o, ref_to = jax.jvp(lambda a, b, c: attention_xla(a, b, c, scale=dim**-0.5), (q, k, v), (tq, tk, tv))
    assert_close("o", o2, ref_o, 1e-5)
    assert_close("t_o", to, ref_to, 1e-5)


class _FakeClient:
    def __init__(self, platform_version):
        self.platform_version = platform_version


class _FakeDevice:
    """Stands for a jax Device: ``platform``, ``device_kind``, ``client.platform_version``
    ("cuda <version>" on CUDA, see jax's ``check_compute_capability`` in
    jax/_src/cudnn/fused_attention_stablehlo.py) and, on CUDA GPUs, ``compute_capability``
    ("major.minor", as ``jax.devices()[0].compute_capability`` reports it)."""

    def __init__(self, platform="gpu", version="cuda 12080", cc="9.0", kind="NVIDIA H200"):
        self.platform, self.device_kind, self.compute_capability = platform, kind, cc
        self.client = _FakeClient(version)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(head_dim=64, dtype=jnp.bfloat16), None),
        (dict(head_dim=256, dtype=jnp.float16), None),
        (dict(head_dim=64, dtype=jnp.float32), "bfloat16 and float16"),
        (dict(head_dim=60, dtype=jnp.bfloat16), "multiple of 8"),
        (dict(head_dim=264, dtype=jnp.bfloat16), "multiple of 8 and <= 256"),
        (dict(head_dim=64, dtype=jnp.bfloat16, jvp=True), "forward-mode"),
        (dict(head_dim=64, dtype=jnp.bfloat16, q_len=333, kv_len=334), "even sequence lengths"),
        (dict(head_dim=64, dtype=jnp.bfloat16, q_len=256, kv_len=77), "even sequence lengths"),
        (dict(head_dim=256, dtype=jnp.bfloat16, device=_FakeDevice(cc="8.0")), "<= 128"),
        (dict(head_dim=64, dtype=jnp.bfloat16, device=_FakeDevice(cc="7.5")), "compute capability"),
        (dict(head_dim=64, dtype=jnp.bfloat16, device=_FakeDevice(version="rocm 60300")), "CUDA GPU"),
        (dict(head_dim=64, dtype=jnp.bfloat16, device=_FakeDevice("cpu", "cpu", None, "cpu")), "CUDA GPU"),
    ],
)
def test_cudnn_support_check(kw, match):
    from kernels import cudnn

    kw.setdefault("device", _FakeDevice())
    lens = (kw.pop("q_len", 256), kw.pop("kv_len", 256))
    reason = cudnn.unsupported_reason(*lens, kw.pop("head_dim"), kw.pop("dtype"), **kw)
    if match is None:
        assert reason is None
    else:
        assert match in reason


def test_cudnn_on_cpu_is_a_clear_error_not_a_fallback():
    """Documented in attention(): impl="cudnn" never falls back; on this CPU it names the reason."""
    x = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="impl='cudnn' needs a CUDA GPU, but the device is cpu"):
        attention(x, x, x, impl="cudnn")
    with pytest.raises(ValueError, match="impl='cudnn' has no forward-mode"):
        attention(x, x, x, impl="cudnn", jvp=True)
    # auto on the CPU stays the exact XLA path
    assert jnp.array_equal(attention(x, x, x, impl="auto"), attention_xla(x, x, x, scale=64**-0.5))

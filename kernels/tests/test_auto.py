"""impl="auto": the chooser (pallas / cudnn / xla) on synthetic tables, the table file, and the CPU default."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import api, attention, attention_xla
from kernels import auto
from kernels.tests.helpers import randn

H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"


def _entry(device, mode="jvp", dtype="bfloat16", head_dim=128, seq=4096, pallas=8.0, xla=13.0):
    return dict(
        device_kind=device, mode=mode, dtype=dtype, head_dim=head_dim, seq_bucket=seq,
        shape=[1, 24, seq, head_dim], pallas_ms=pallas, xla_ms=xla, date="2025-01-01",
    )  # fmt: skip


def _choose(table, mode="jvp", seq=4096, dim=128, dtype=jnp.bfloat16, device=H100, backend="gpu", cudnn=False):
    return auto.choose_impl(mode, seq, dim, dtype, device_kind=device, backend=backend, table=table, cudnn=cudnn)


def test_not_on_gpu_is_xla():
    table = {"format": 1, "entries": [_entry(H100)]}
    assert _choose(table, backend="cpu") == "xla"
    assert _choose(table, backend="cpu", cudnn=True) == "xla"
    assert _choose(table) == "pallas"


def test_same_gpu_decides_by_measurement():
    table = {"entries": [_entry(H100), _entry(H100, mode="plain", pallas=5.0, xla=4.0)]}
    assert _choose(table, mode="jvp") == "pallas"
    assert _choose(table, mode="plain") == "xla"
    # Buckets: seq 3000 -> 4096; head dim 100 runs padded at 128.
    assert _choose(table, seq=3000, dim=100) == "pallas"
    # Unmeasured shape, dtype or head dim on a measured GPU: xla.
    assert _choose(table, seq=1024) == "xla"
    assert _choose(table, dtype=jnp.float32) == "xla"
    assert _choose(table, dim=64) == "xla"


def test_several_entries_in_a_bucket_are_summed():
    table = {"entries": [_entry(H100, pallas=8.0, xla=9.0), _entry(H100, pallas=8.0, xla=6.0)]}
    table["entries"][1]["shape"] = [2, 24, 4096, 128]
    assert _choose(table) == "xla"  # 16 ms vs 15 ms


def test_failed_pallas_measurement_is_xla():
    assert _choose({"entries": [_entry(H100, pallas=None)]}) == "xla"


def test_measured_gpu_does_not_borrow_other_gpus():
    table = {"entries": [_entry(H200), _entry(H100, seq=1024)]}
    assert _choose(table, device=H100) == "xla"


def test_unmeasured_gpu_borrows_when_all_other_gpus_agree():
    table = {"entries": [_entry(H100), _entry(H200, pallas=9.0, xla=12.0)]}
    assert _choose(table, device="NVIDIA B200") == "pallas"
    table["entries"][1]["pallas_ms"] = 13.0
    assert _choose(table, device="NVIDIA B200") == "xla"
    assert _choose({"entries": []}, device="NVIDIA B200") == "xla"


def test_bad_tables_raise():
    with pytest.raises(ValueError, match="entries"):
        _choose({"rows": []})
    with pytest.raises(ValueError, match="lacks"):
        _choose({"entries": [{"device_kind": H100}]})
    with pytest.raises(ValueError, match="mode"):
        _choose({"entries": [_entry(H100, mode="fast")]})
    with pytest.raises(ValueError, match="plain only"):
        _choose({"entries": [dict(_entry(H100), cudnn_ms=1.0)]})
    with pytest.raises(ValueError, match="mode must be"):
        auto.choose_impl("both", 16, 64, jnp.float32, backend="gpu", table={"entries": []})


def test_table_file_roundtrip(tmp_path):
    path = tmp_path / "table.json"
    assert auto.load_table(path)["entries"] == []  # missing file = empty
    auto.update_table([_entry(H100, pallas=9.0)], path)
    auto.update_table([_entry(H100, pallas=7.0), _entry(H200)], path)  # replaces the H100 entry
    table = json.loads(path.read_text())
    assert len(table["entries"]) == 2
    assert {e["device_kind"]: e["pallas_ms"] for e in table["entries"]}[H100] == 7.0
    assert _choose(str(path)) == "pallas"


def test_shipped_table_is_valid():
    table = auto.load_table()
    assert table["format"] == auto.TABLE_FORMAT
    assert isinstance(table["entries"], list)


def test_auto_on_cpu_is_exactly_xla():
    assert jax.default_backend() == "cpu"
    q, k, v = randn(40, [(1, 20, 2, 32)] * 3, jnp.float32)
    o = attention(q, k, v, impl="auto")
    np.testing.assert_array_equal(np.asarray(o), np.asarray(attention_xla(q, k, v, scale=32**-0.5)))


def test_auto_routes_to_pallas_when_chosen(monkeypatch):
    calls = []

    def fake_choose(mode, seq_len, head_dim, dtype, **kw):
        calls.append((mode, seq_len, head_dim, jnp.dtype(dtype).name))
        return "pallas"

    monkeypatch.setattr(auto, "choose_impl", fake_choose)
    q, k, v = randn(41, [(1, 20, 1, 16)] * 3, jnp.float32)
    o = attention(q, k, v, impl="auto", jvp=True, interpret=True)
    ref = attention(q, k, v, impl="pallas", jvp=True, interpret=True)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(ref))
    assert calls == [("jvp", 20, 16, "float32")]
    assert api._auto.choose_impl is fake_choose


def _plain(device, seq=256, pallas=0.25, xla=0.9, cudnn=0.27, **kw):
    e = _entry(device, mode="plain", head_dim=64, seq=seq, pallas=pallas, xla=xla, **kw)
    if cudnn != "absent":
        e["cudnn_ms"] = cudnn
    return e


def test_cudnn_is_chosen_only_when_fastest_and_allowed():
    table = {"entries": [_plain(H200, cudnn=0.20), _plain(H200, seq=1024, pallas=2.8, xla=8.4, cudnn=2.1)]}
    pick = lambda seq, cudnn: _choose(table, mode="plain", seq=seq, dim=64, device=H200, cudnn=cudnn)
    assert pick(256, True) == "cudnn" and pick(1024, True) == "cudnn"
    # The caller says cuDNN cannot take the call (fp32, jvp, head dim, GPU): never cudnn.
    assert pick(256, False) == "pallas" and pick(1024, False) == "pallas"
    table["entries"][0]["cudnn_ms"] = 0.30  # slower than pallas
    assert pick(256, True) == "pallas"
    table["entries"][0]["cudnn_ms"] = None  # cuDNN refused the shape when measured
    assert pick(256, True) == "pallas"
    table["entries"][0]["pallas_ms"] = None
    assert pick(256, True) == "xla"


def test_cudnn_needs_a_measurement_in_every_entry_of_the_bucket():
    second = _plain(H200, cudnn="absent")
    second["shape"] = [8, 18, 256, 64]
    table = {"entries": [_plain(H200, cudnn=0.1), second]}
    assert _choose(table, mode="plain", seq=256, dim=64, device=H200, cudnn=True) == "pallas"


def test_unmeasured_gpu_borrows_cudnn_only_when_all_agree():
    table = {"entries": [_plain(H200, cudnn=0.2), _plain(H100, cudnn=0.2)]}
    kw = dict(mode="plain", seq=256, dim=64, device="NVIDIA B200")
    assert _choose(table, cudnn=True, **kw) == "cudnn"
    assert _choose(table, cudnn=False, **kw) == "pallas"
    table["entries"][1]["cudnn_ms"] = 0.3
    assert _choose(table, cudnn=True, **kw) == "xla"  # H200 says cudnn, H100 pallas


def test_auto_asks_cudnn_support_of_the_actual_call(monkeypatch):
    """api passes cudnn=True to the chooser exactly when kernels.cudnn accepts the call."""
    seen = []
    monkeypatch.setattr(auto, "choose_impl", lambda *a, **kw: seen.append(kw["cudnn"]) or "xla")
    monkeypatch.setattr(api._cudnn, "unsupported_reason", lambda sq, sk, d, dt, jvp=False: None if d == 64 else "no")
    x64_, x60 = (jnp.zeros((1, 16, 1, d), jnp.bfloat16) for d in (64, 60))
    attention(x64_, x64_, x64_, impl="auto")
    attention(x60, x60, x60, impl="auto")
    assert seen == [True, False]

"""kernels.tools.tile_sweep and the sweep scripts and probes built on it (CPU: the Pallas interpreter)."""
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.tools.tile_sweep import best_tiles, max_ulps, parse_tiles, sweep_tiles

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench(script: str):
    """The module ``bench/<script>.py`` (bench is not a package on the path)."""
    sys.path.insert(0, ROOT)
    try:
        return __import__(f"bench.{script}", fromlist=["main"])
    finally:
        sys.path.remove(ROOT)


def test_ulps_best_tiles_and_parsing():
    exact = np.array([1.0, 3.0, 1e-5])
    assert max_ulps(exact + np.array([2 ** -7, 0, 1.0]), exact) == 1.0  # the tiny element is ignored
    assert max_ulps(exact + np.array([2 ** -23, 0, 1.0]), exact, jnp.float32) == 1.0
    pair = (exact + np.array([2 ** -7, 0, 1.0]), exact + np.array([0, 3 * 2 ** -7, 0]))  # 1 and 1.5 ulps
    assert max_ulps(pair, (exact, exact)) == 1.5  # tuples: the largest over their arrays
    with pytest.raises(ValueError, match="same length"):
        max_ulps(pair, (exact,))
    assert parse_tiles("2,512,1;8,4") == [(2, 512, 1), (8, 4)]
    shapes = [{"pallas": [{"tiles": [1], "ms": 1.0}, {"tiles": [2], "ms": 0.5}]},
              {"pallas": [{"tiles": [1], "ms": 1.0}, {"tiles": [2], "ms": None}]}]
    assert best_tiles(shapes) == [1]  # a tile that failed anywhere is out
    with pytest.raises(SystemExit, match="every tile failed"):
        best_tiles([{"pallas": [{"tiles": [1], "ms": None}]}])


def test_a_candidate_with_wrong_values_counts_as_failed():
    x = jnp.linspace(-3, 3, 64, dtype=jnp.float32)
    rows = sweep_tiles(lambda t: (lambda a: a * t[0]), (x,), np.asarray(x), [(1,), (2,)], iters=1, nbytes=256)
    assert rows[0]["ms"] is not None and rows[0]["max_ulps"] == 0
    assert rows[1]["ms"] is None and "bf16 ulps" in rows[1]["error"]


@pytest.mark.parametrize("script,argv", [
    ("bias_gelu", ["--rows", "32", "--width", "96", "--tiles", "8,32,4;1,64,1"]),
    ("residual_norm_modulate", ["--shapes", "2,8", "--width", "96", "--tiles", "4,4;1,1"]),
    ("norm_tangent", ["--shapes", "2,8", "--width", "96", "--tiles", "4,4,0;8,2,1"]),
])
def test_sweep_scripts_run_in_the_interpreter(tmp_path, script, argv):
    module = _bench(script)
    out = tmp_path / "r.json"
    report = module.main(argv + ["--interpret", "--iters", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["best_tiles"] == report["best_tiles"] and len(saved["shapes"][0]["pallas"]) == 2
    assert all(r["ms"] is not None and r["max_ulps"] <= 1 for r in saved["shapes"][0]["pallas"])


def test_matmul_probe_refuses_bad_shapes_and_a_cpu():
    """bench/matmul_probe.py times Mosaic GPU kernels (no interpreter): on this CPU it must stop
    with a message, not a traceback; a malformed --shape is named."""
    module = _bench("matmul_probe")
    with pytest.raises(SystemExit, match="--shape: expected M,K,N"):
        module.main(["--shape", "256,64"])
    with pytest.raises(SystemExit, match="no GPU"):
        module.main(["--shape", "256,64,128"])


def test_jvp_matmul_pairs_probe_checks_and_records_every_role(tmp_path):
    """bench/jvp_matmul_pairs.py: on the CPU at a few tokens, each linear's forward, input-gradient
    and weight-gradient matmuls as a pair and stacked, each stacked result checked against the
    pair's; a token count that is not positive is refused."""
    module = _bench("jvp_matmul_pairs")
    out = tmp_path / "pairs.json"
    module.main(["--tokens", "16", "--iters", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["tokens"] == 16 and len(saved["rows"]) == 12
    assert {(r["linear"], r["kind"]) for r in saved["rows"]} == {
        (n, k) for n in ("qkv", "proj", "fc1", "fc2") for k in ("forward", "input_grad", "weight_grad")}
    assert all(r["rel_err"] <= 1e-2 and r["pair_ms"] > 0 and r["prestacked_ms"] > 0 for r in saved["rows"])
    assert saved["total_pair_ms"] == pytest.approx(sum(r["pair_ms"] for r in saved["rows"]))
    with pytest.raises(SystemExit, match="--tokens must be positive"):
        module.main(["--tokens", "0"])


def test_qkv_prologue_probe_checks_every_tile_against_float32(tmp_path):
    """bench/qkv_prologue.py in the interpreter at two small shapes: the split path and each tile
    of the fused forward checked against float32 attention before timing (a tile that fails to
    run is recorded as failed, not dropped), the best tile over the shapes; malformed shapes and
    tiles are refused with a message."""
    module = _bench("qkv_prologue")
    out = tmp_path / "qkv.json"
    report = module.main(["--interpret", "--iters", "1", "--shapes", "2,32,2,64;1,64,1,64",
                          "--tiles", "16,16,4,3;32,16,4,3;8,16,4,3", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["best_tiles"] == report["best_tiles"] and len(saved["shapes"]) == 2
    for entry in saved["shapes"]:
        assert entry["split_then_forward"]["rel_err"] < 1e-2 and entry["split_then_forward"]["ms"] > 0
        ok, bad = entry["pallas"][:2], entry["pallas"][2]
        assert all(r["ms"] > 0 and r["rel_err"] <= 1.5 * entry["split_then_forward"]["rel_err"] + 1e-4 for r in ok)
        assert bad["ms"] is None and "power of two >= 16" in bad["error"]  # block_q 8 is not a valid tile
    assert saved["best_tiles"] in ([16, 16, 4, 3], [32, 16, 4, 3])
    with pytest.raises(SystemExit, match="batch,tokens,heads,head_dim"):
        module.main(["--interpret", "--shapes", "2,32,2"])


def test_attention_sweep_runs_each_backward_kernel_under_its_impl(monkeypatch):
    """Sweeping jvp_bwd_v times it under jvp_bwd_impl="matmul" (the only impl that runs it), and
    jvp_bwd_kv / jvp_bwd_q under "kernels", whatever the base config's impl (its "auto" may
    resolve either way at the swept shape)."""
    from kernels import AttentionConfig

    attention = _bench("attention")
    seen = []

    def fake_fns(impl, scale, cfg, interpret):
        seen.append(cfg)
        return {"jvp_fwd_bwd": None}

    monkeypatch.setattr(attention, "make_fns", fake_fns)
    monkeypatch.setattr(attention, "compile_fn", lambda fn, args: fn)
    monkeypatch.setattr(attention, "time_ms", lambda fn, arg_sets, iters: float(len(seen)))
    base = AttentionConfig(jvp_bwd_impl="auto").resolve(128)
    out = attention.sweep_shape((1, 1, 4096, 128), base, [None], 1, True, ["jvp_bwd_v", "jvp_bwd_kv"])
    n_v = len(attention.SWEEP[128]["jvp_bwd_v"])
    assert [c.jvp_bwd_impl for c in seen] == ["matmul"] * n_v + ["kernels"] * (len(seen) - n_v)
    assert all(c.jvp_bwd_kv == base.jvp_bwd_kv for c in seen[:n_v])
    assert out["best"]["jvp_bwd_v"]["ms"] == 1.0 and out["best_config"]["jvp_bwd_impl"] == "auto"


def test_attention_bench_profile_records_where_a_call_spends_its_time(tmp_path):
    """bench/attention.py --profile (interpreter, one tiny shape): each timed Pallas kind gets its
    device time per op family and per kernel, written to the JSON with the timings."""
    attention = _bench("attention")
    out = tmp_path / "a.json"
    attention.main(["--interpret", "--no-cudnn", "--no-xla", "--shapes", "1,2,64,32", "--iters", "1",
                    "--kinds", "jvp_fwd_bwd,plain_fwd", "--profile", "--out", str(out)])
    entry = json.loads(out.read_text())["shapes"][0]
    assert set(entry["profile"]) == {"jvp_fwd_bwd", "plain_fwd"}
    for kind, prof in entry["profile"].items():
        by_kernel = prof["by_kernel"]
        assert by_kernel and all(ms > 0 for ms in by_kernel.values()), kind
        assert list(by_kernel.values()) == sorted(by_kernel.values(), reverse=True)
        families = prof["ms_per_call_by_family"]
        assert abs(sum(f["ms_per_call"] for f in families.values()) - sum(by_kernel.values())) < 1e-6


def test_attention_bench_min_sample_sets_the_calls_per_sample():
    """time_ms puts back-to-back calls in each sample until it lasts --min-sample-ms, between 1 and
    50 calls: a tiny minimum times each call alone, a huge one takes the 50 (both independent of
    how fast this machine is), after one compile call, one warm-up per input set and one probe."""
    attention = _bench("attention")
    calls = []

    def fn(x):
        calls.append(x)
        return x

    arg_sets = [(jnp.zeros(2),)] * 3
    for min_sample_s, per_sample in ((1e-12, 1), (1e3, 50)):
        calls.clear()
        assert attention.time_ms(fn, arg_sets, 4, min_sample_s) >= 0
        assert len(calls) == 1 + len(arg_sets) + 1 + 4 * per_sample
    with pytest.raises(SystemExit, match="min-sample-ms must be > 0"):
        attention.main(["--interpret", "--min-sample-ms", "0"])

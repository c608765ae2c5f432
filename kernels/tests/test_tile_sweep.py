"""kernels.tools.tile_sweep and the two sweep scripts built on it (CPU: the Pallas interpreter)."""
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.tools.tile_sweep import best_tiles, max_ulps, parse_tiles, sweep_tiles

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    sys.path.insert(0, ROOT)
    try:
        module = __import__(f"bench.{script}", fromlist=["main"])
    finally:
        sys.path.remove(ROOT)
    out = tmp_path / "r.json"
    report = module.main(argv + ["--interpret", "--iters", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["best_tiles"] == report["best_tiles"] and len(saved["shapes"][0]["pallas"]) == 2
    assert all(r["ms"] is not None and r["max_ulps"] <= 1 for r in saved["shapes"][0]["pallas"])


def test_matmul_probe_refuses_bad_shapes_and_a_cpu():
    """bench/matmul_probe.py times Mosaic GPU kernels (no interpreter): on this CPU it must stop
    with a message, not a traceback; a malformed --shape is named."""
    sys.path.insert(0, ROOT)
    try:
        module = __import__("bench.matmul_probe", fromlist=["main"])
    finally:
        sys.path.remove(ROOT)
    with pytest.raises(SystemExit, match="--shape: expected M,K,N"):
        module.main(["--shape", "256,64"])
    with pytest.raises(SystemExit, match="no GPU"):
        module.main(["--shape", "256,64,128"])

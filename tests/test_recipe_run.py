"""The recipe benchmark's log follower (``bench/recipe_run.py``): its own deadline holds while the
run prints nothing, so what was measured is always written before an outer time limit (a step of
2048 at 512px is silent for about 80 s on an H200; an outer ``timeout`` once killed the benchmark
before it wrote its JSON), and the trainer's log lines are parsed as the trainer writes them."""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import recipe_run  # noqa: E402

# Lines as tvm_jax.trainer and tvm_jax.microbatching log them (absl's prefix included).
_STEP = ("I1129 17:43:12.443783 140585271492928 trainer.py:344] step {i}/3  loss {loss}  grad_norm 0.842  "
         "skipped 0  {rate} img/s  ETA 0m12s  terminal by t quarter 0/0/0/0  fm by s' quarter 2/2/2/2")
_MICRO = ("I1129 17:42:41.506557 140585271492928 microbatching.py:160] Micro-batch size 128 per device (chosen "
          "automatically: 8 micro-batches of the per-device batch 1024); estimated memory 89.41 GiB of 104.85 GiB "
          "per device (10% kept free); too large: 1024: 564.56 GiB")


def _script(body: str) -> list[str]:
    return [sys.executable, "-u", "-c", body]


def test_deadline_holds_while_the_run_is_silent():
    # One step line, then silence far beyond the deadline: follow_run must return at the deadline
    # with what it has, and stop the process.
    body = f"import time; print({_STEP.format(i=1, loss=2.0, rate=115.3)!r}, flush=True); time.sleep(60)"
    t = time.monotonic()
    lines, outcome, returncode = recipe_run.follow_run(_script(body), dict(os.environ), last_step=3, timeout=3)
    assert time.monotonic() - t < 20
    assert outcome == "timeout" and returncode != 0
    assert recipe_run.parse_log("".join(lines))["images_per_s_by_step"] == {1: 115.3}


def test_measured_at_the_last_step_and_parsed():
    steps = "\n".join(_STEP.format(i=i, loss=f"{l:.4f}", rate=r)
                      for i, l, r in ((1, 2.0, 115.3), (2, 1.9875, 275.9), (3, 1.9702, 245.5)))
    body = f"print({_MICRO!r}); print({steps!r}, flush=True); import time; time.sleep(60)"
    lines, outcome, _ = recipe_run.follow_run(_script(body), dict(os.environ), last_step=3, timeout=30)
    assert outcome == "measured"
    parsed = recipe_run.parse_log("".join(lines))
    assert parsed["images_per_s_by_step"] == {1: 115.3, 2: 275.9, 3: 245.5}
    assert parsed["loss_by_step"] == {1: 2.0, 2: 1.9875, 3: 1.9702}
    assert parsed["grad_norm_by_step"] == {1: 0.842, 2: 0.842, 3: 0.842}
    assert parsed["microbatch_size"] == 128 and parsed["estimated_memory_per_device"] == "89.41 GiB"
    assert parsed["microbatch_reason"].startswith("chosen automatically: 8 micro-batches")


def test_a_run_that_exits_early_is_reported_as_exited():
    body = "import sys; print('error: out of memory'); sys.exit(2)"
    lines, outcome, returncode = recipe_run.follow_run(_script(body), dict(os.environ), last_step=3, timeout=30)
    assert outcome == "exited" and returncode == 2 and lines == ["error: out of memory\n"]

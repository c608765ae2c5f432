"""One training run across launch modes: one process for all devices, or one process per device
share joined by ``jax.distributed`` (``NUM_PROCESSES=N bash launch/local.sh``).

On the CPU each process gets 2 virtual devices and the processes exchange data through gloo
(:func:`tvm_jax.sharding.initialize_distributed`), so this exercises the same multi-process paths
as a GPU node with one process per GPU: the per-process share of each global batch
(:func:`tvm_jax.data.pipeline.make_loader`), arrays assembled from process-local data, Orbax
writing one checkpoint from all processes, and restoring it under another process count.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from cpu_env import cpu_xla_flags
from tvm_jax import generate
from tvm_jax.config import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"train.global_batch_size": 32, "train.log_every": 3, "train.checkpoint_every": 3,
             "train.sample_every": 1000, "sample.num_images": 16, "model.mlp_width": 32, "model.mlp_depth": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, num_steps: int, processes: int, devices_per_process: int):
    cache = os.path.join(os.path.dirname(workdir), "jax_cache")  # the four launches compile the same programs
    env = dict(os.environ, NUM_PROCESSES=str(processes), COORDINATOR_PORT=str(_free_port()),
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_FLAGS=cpu_xla_flags(devices_per_process),
               JAX_PLATFORMS="cpu")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "train.num_steps": num_steps}.items()]
    proc = subprocess.run(["bash", "launch/local.sh", "configs/gmm.py", str(workdir), *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    logs = proc.stdout + proc.stderr
    for name in sorted(os.listdir(os.path.join(workdir, "logs"))) if os.path.isdir(os.path.join(workdir, "logs")) else []:
        with open(os.path.join(workdir, "logs", name)) as f:
            logs += f"\n--- {name}\n" + f.read()
    assert proc.returncode == 0, logs[-6000:]
    return logs


def _params(workdir, step: int):
    config = load_config_file(os.path.join(REPO, "configs", "gmm.py"))
    for k, v in OVERRIDES.items():
        section, name = k.split(".")
        config[section][name] = v
    config.train.num_steps = step
    model = generate.load_for_sampling(config, checkpoint=None, workdir=str(workdir), weights="params")
    assert model.step == step
    return jax.device_get(model.params)


def _checkpoints(workdir) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


@pytest.mark.slow
def test_one_run_across_process_counts(tmp_path):
    one_then_two, two_then_one = tmp_path / "one_then_two", tmp_path / "two_then_one"
    _launch(one_then_two, 3, processes=1, devices_per_process=4)
    log = _launch(two_then_one, 3, processes=2, devices_per_process=2)
    assert "Training from step 0 to 3" in log
    # The same global batches and randomness: the 2-process run equals the 1-process run.
    a3, b3 = _params(one_then_two, 3), _params(two_then_one, 3)
    for x, y in zip(jax.tree.leaves(a3), jax.tree.leaves(b3)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)

    # Each workdir resumes in the other launch mode and the two runs stay the same run.
    log = _launch(one_then_two, 6, processes=2, devices_per_process=2)
    assert "Training from step 3 to 6" in log, log[-3000:]
    log = _launch(two_then_one, 6, processes=1, devices_per_process=4)
    assert "Training from step 3 to 6" in log, log[-3000:]
    a6, b6 = _params(one_then_two, 6), _params(two_then_one, 6)
    for x, y in zip(jax.tree.leaves(a6), jax.tree.leaves(b6)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)
    assert not any(np.allclose(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a3), jax.tree.leaves(a6))
                   if np.size(x) > 1), "the resumed runs did not train"
    # One checkpoint per step, written once by the processes together.
    assert _checkpoints(one_then_two) == _checkpoints(two_then_one) == [3, 6]

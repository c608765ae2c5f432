"""Suite-wide pytest setup.

* Gives the CPU backend several virtual devices so sharding tests can run, and makes XLA's CPU
  compiler cheaper: backend optimisations off, and the loop emitter instead of the MLIR fusion
  emitters (the fusion emitters compile a DiT's JVP+grad 2.3x slower, 5.7 s against 2.5 s, and
  run it 1.3x faster; compile time is most of the suite), where this XLA still has that switch.
  Each flag only where XLA_FLAGS does not already set it (this must happen before jax is
  imported); subprocesses inherit them (``tests/cpu_env.py`` changes only the device count).
* Shares one persistent compilation cache between the suite's processes (xdist workers and the
  subprocesses tests launch), so a program that several tests compile is compiled once per run.
  It lives in a fresh temporary directory, removed when the run ends, so every run starts cold;
  a ``JAX_COMPILATION_CACHE_DIR`` set by the caller is used instead and left alone.
* Skips tests marked ``gpu`` when no CUDA GPU is visible.
"""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=4"
if "--xla_backend_optimization_level" not in _flags:
    # CPU tests are dominated by compile time; unoptimised CPU code compiles ~3x faster.
    _flags += " --xla_backend_optimization_level=0"


def _xla_accepts(flag: str) -> bool:
    """Whether this jaxlib's XLA knows ``flag``: an unknown flag in XLA_FLAGS aborts the process
    that creates a backend (jax 0.11's XLA no longer has the loop-emitter switch), so a child
    process asks (about 2 s, once per run: xdist workers inherit the result in XLA_FLAGS)."""
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"], env=env,
                           capture_output=True, timeout=300)
    return probe.returncode == 0


_LOOP_EMITTER = "--xla_cpu_use_fusion_emitters=false"
if "--xla_cpu_use_fusion_emitters" not in _flags and _xla_accepts(_LOOP_EMITTER):
    _flags += " " + _LOOP_EMITTER
os.environ["XLA_FLAGS"] = _flags.strip()

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # Set before xdist starts its workers (this file is imported first by the controlling
    # process), so they and every subprocess inherit the same directory.
    _cache_dir = tempfile.mkdtemp(prefix="tvm_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    # A size limit turns on jax's file lock around cache reads and writes (several processes
    # share the directory); far above what one run writes.
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import pytest


def _has_gpu() -> bool:
    import jax

    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

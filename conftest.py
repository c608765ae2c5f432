"""Suite-wide pytest setup.

* Gives the CPU backend several virtual devices so sharding tests can run, and turns off
  XLA's CPU backend optimisations (compile time dominates the suite); each only where XLA_FLAGS
  does not already set it (this must happen before jax is imported).
* Skips tests marked ``gpu`` when no CUDA GPU is visible.
"""
import os

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=4"
if "--xla_backend_optimization_level" not in _flags:
    # CPU tests are dominated by compile time; unoptimised CPU code compiles ~3x faster.
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

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

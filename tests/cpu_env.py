"""XLA_FLAGS for the CPU subprocesses tests launch: the suite's own (``conftest.py``: unoptimised
backend, loop emitter) with another virtual device count."""
from __future__ import annotations

import os

_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def cpu_xla_flags(devices: int) -> str:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT)]
    return " ".join([*flags, f"{_DEVICE_COUNT}={devices}"])

"""Tiny hostile checkpoint files cannot make the readers allocate gigabytes, and cannot alter the
readers' shared objects (issue 16, item 1). Each bomb is built byte-for-byte as described there;
the reads run in a subprocess whose peak RSS is compared with a subprocess reading only a valid
file."""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
REPO = Path(__file__).resolve().parents[1]

_STORAGE = object()


class _Pickler(pickle.Pickler):
    """Pickles ``_STORAGE`` as the given persistent id, as torch.save's pickler does for storages."""

    def __init__(self, f, pid):
        super().__init__(f, protocol=2)
        self.pid = pid

    def persistent_id(self, obj):
        return self.pid if obj is _STORAGE else None


class _Tensor:
    def __init__(self, size, stride):
        self.size, self.stride = size, stride

    def __reduce__(self):  # what torch.save writes for a tensor: torch._utils._rebuild_tensor_v2(...)
        return torch._utils._rebuild_tensor_v2, (_STORAGE, 0, self.size, self.stride, False, collections.OrderedDict())


def _pickle(obj, pid) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, pid).dump(obj)
    return buf.getvalue()


def stride0_bomb(path):
    """torch.save of a stride-0 32768x32768 view of a one-element storage (~1 KB; 4 GiB if copied)."""
    torch.save({"w": torch.zeros(1).expand(32768, 32768)}, path)


def inflate_bomb(path, mib=256):
    """A valid torch.save whose storage entry is replaced by a deflated entry of ``mib`` MiB of
    zeros (~1/1000 of that on disk); the tensor needs 4 bytes of it."""
    torch.save({"w": torch.zeros(1)}, path)
    with zipfile.ZipFile(path) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    storage = next(n for n in entries if "/data/" in n)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, raw in entries.items():
            if name == storage:
                with zf.open(name, "w", force_zip64=True) as f:
                    for _ in range(mib):
                        f.write(bytes(1 << 20))
            else:
                zf.writestr(name, raw)


def legacy_bomb(path):
    """A ~300-byte legacy torch.save stream declaring a storage of 2^40 float32 elements."""
    n = 1 << 40
    head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    body = _pickle({"w": _Tensor((n,), (1,))}, ("storage", torch.FloatStorage, "0", "cpu", n, None))
    Path(path).write_bytes(head + body + pickle.dumps(["0"], protocol=2) + struct.pack("<q", n) + bytes(4))


def build_bomb(path):
    """A torch.save archive whose data.pkl BUILDs on the allow-listed ``torch.FloatStorage``."""
    pkl = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x04\x00\x00\x00evil\x73b."
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
    Path(path).write_bytes(buf.getvalue())


BOMBS = {
    "stride0.pt": (stride0_bomb, "would materialise"),
    "inflate.pt": (inflate_bomb, "has 268435456 bytes, expected 1 x 4"),
    "legacy.pt": (legacy_bomb, "but only 4 bytes are left in the file"),
    "build.pt": (build_bomb, "refusing a pickle BUILD on the allow-listed object torch.FloatStorage"),
}

SCRIPT = r"""
import json, resource, sys
from tvm_jax.weights import torch_io
paths, valid = json.loads(sys.argv[1]), sys.argv[2]
errors = {}
for p in paths:
    try:
        torch_io.load_state_dict(p)
        errors[p] = None
    except Exception as e:
        errors[p] = f"{type(e).__name__}: {e}"
good = torch_io.load_state_dict(valid)
print(json.dumps({"errors": errors, "valid": sorted(good), "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _read_in_subprocess(paths, valid) -> dict:
    run = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([str(p) for p in paths]), str(valid)],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_bombs_are_refused_within_bounded_memory(tmp_path):
    paths = []
    for name, (make, _) in BOMBS.items():
        make(tmp_path / name)
        paths.append(tmp_path / name)
        assert os.path.getsize(tmp_path / name) < 2 << 20, name  # tiny files
    valid = tmp_path / "valid.pt"
    torch.save({"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5)}, valid)

    baseline = _read_in_subprocess([], valid)
    result = _read_in_subprocess(paths, valid)
    for path, (name, (_, message)) in zip(paths, BOMBS.items()):
        error = result["errors"][str(path)]
        assert error is not None and message in error, (name, error)
        assert error.startswith(("CheckpointFormatError", "UnsafePickleError")) and "\n" not in error
    assert result["valid"] == ["a", "b"]  # a valid file read after the malicious ones (BUILD included)
    extra_mib = (result["maxrss_kib"] - baseline["maxrss_kib"]) / 1024
    total_file_mib = sum(os.path.getsize(p) for p in paths) / 2**20
    assert extra_mib < 16 + 4 * total_file_mib, (extra_mib, total_file_mib)


def test_genuine_views_still_read(tmp_path):
    from tvm_jax.weights import torch_io

    base = torch.arange(24.0).reshape(4, 6)
    path = tmp_path / "views.pt"
    torch.save({"t": base.t(), "row": base[1], "expanded": torch.ones(3).expand(4, 3), "base": base}, path)
    got = torch_io.load_state_dict(str(path))
    assert (got["t"] == base.t().numpy()).all() and (got["expanded"] == 1).all() and got["expanded"].shape == (4, 3)

"""The record format of prepared latent datasets (ArrayRecord shards).

One record holds one image's VAE encoder output and its label::

    b"TVML" | uint32 header length | JSON header | mean bytes | std bytes

with header ``{"shape": [H, W, C], "dtype": "float16" | "float32", "label": int}``; ``mean`` and
``std`` are the encoder's per-pixel mean and standard deviation (NHWC, C = 4 for the SD VAE).

A dataset directory holds ``*.array_record`` shards and ``dataset.json``::

    {"format": "tvm-jax-latents/1", "shape": [H, W, C], "num_classes": 1000,
     "num_records": N, "resolution": 256, "raw_mean": [...], "raw_std": [...], ...}

written by ``python -m tvm_jax.data.prepare_imagenet``; the trainer checks it against the config
before anything is compiled.
"""
from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any

import numpy as np

MAGIC = b"TVML"
FORMAT = "tvm-jax-latents/1"
METADATA_FILE = "dataset.json"


def encode_record(mean: np.ndarray, std: np.ndarray, label: int, dtype: str = "float16") -> bytes:
    mean, std = np.asarray(mean), np.asarray(std)
    if mean.shape != std.shape or mean.ndim != 3:
        raise ValueError(f"mean and std must both be (H, W, C); got {mean.shape} and {std.shape}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"record dtype must be float16 or float32, got {dtype!r}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise ValueError("mean/std contain non-finite values")
    header = json.dumps({"shape": list(mean.shape), "dtype": dtype, "label": int(label)}).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header,
                     mean.astype(dtype).tobytes(), std.astype(dtype).tobytes()])


def decode_record(data: bytes) -> dict[str, Any]:
    """Returns ``{"mean": (H,W,C) float32, "std": ..., "label": int}``."""
    if data[:4] != MAGIC:
        raise ValueError("not a tvm-jax latent record (bad magic bytes)")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + n])
    shape, dtype = tuple(header["shape"]), np.dtype(header["dtype"])
    size = int(np.prod(shape)) * dtype.itemsize
    body = data[8 + n:]
    if len(body) != 2 * size:
        raise ValueError(f"truncated latent record: expected {2 * size} bytes of arrays, got {len(body)}")
    mean = np.frombuffer(body[:size], dtype).reshape(shape).astype(np.float32)
    std = np.frombuffer(body[size:], dtype).reshape(shape).astype(np.float32)
    return {"mean": mean, "std": std, "label": int(header["label"])}


def shard_paths(path: str) -> list[str]:
    """The ArrayRecord files of a dataset directory (or a glob / single file)."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.array_record")))
    else:
        files = sorted(glob.glob(path))
    if not files:
        raise FileNotFoundError(f"data.path: no ArrayRecord files (*.array_record) found at {path!r}")
    return files


def read_metadata(path: str) -> dict[str, Any] | None:
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    meta_path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unknown dataset format {meta.get('format')!r} (expected {FORMAT!r})")
    return meta


def write_metadata(directory: str, **fields: Any) -> str:
    path = os.path.join(directory, METADATA_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, **fields}, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def write_shard(path: str, records: list[bytes]) -> None:
    """Writes one ArrayRecord shard atomically (to ``path.tmp`` then renamed)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()
    os.replace(tmp, path)

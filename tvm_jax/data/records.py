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


def _read_header(data: bytes, where: str) -> tuple[dict[str, Any], int]:
    """The checked JSON header of a record and its length in bytes."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise ValueError(f"{where}: not a tvm-jax latent record (bad magic bytes)")
    (n,) = struct.unpack("<I", data[4:8])
    if 8 + n > len(data):
        raise ValueError(f"{where}: truncated latent record (header of {n} bytes, record of {len(data)})")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: unreadable record header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: the record header is not a JSON object")
    missing = [k for k in ("shape", "dtype", "label") if k not in header]
    if missing:
        raise ValueError(f"{where}: the record header has no {', '.join(repr(k) for k in missing)} "
                         f"(found {sorted(header)})")
    shape, label = header["shape"], header["label"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(x) is int and x > 0 for x in shape)):
        raise ValueError(f"{where}: the record header's shape must be 3 positive integers, got {shape!r}")
    if header["dtype"] not in ("float16", "float32"):
        raise ValueError(f"{where}: the record dtype must be float16 or float32, got {header['dtype']!r}")
    if type(label) is not int:
        raise ValueError(f"{where}: the record label must be an integer, got {label!r}")
    return header, n


def decode_record(data: bytes, where: str = "latent record") -> dict[str, Any]:
    """Returns ``{"mean": (H,W,C) float32, "std": ..., "label": int}``.

    Raises ``ValueError`` starting with ``where`` (e.g. ``"FILE record 17"``) for anything that is
    not a complete, finite record of this format (so a bad file is named wherever it is read).
    """
    data = bytes(data)
    header, n = _read_header(data, where)
    shape, dtype, label = tuple(header["shape"]), np.dtype(header["dtype"]), header["label"]
    size = int(np.prod(shape)) * dtype.itemsize
    body = data[8 + n:]
    if len(body) != 2 * size:
        raise ValueError(f"{where}: truncated latent record: expected {2 * size} bytes of arrays, got {len(body)}")
    mean = np.frombuffer(body[:size], dtype).reshape(shape).astype(np.float32)
    std = np.frombuffer(body[size:], dtype).reshape(shape).astype(np.float32)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ValueError(f"{where}: mean/std contain NaN or inf (the writer refuses such records; re-create "
                         "this shard)")
    return {"mean": mean, "std": std, "label": label}


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
    """``dataset.json`` next to the shards (None if there is none). Raises ``ValueError`` naming
    the file for invalid JSON, an unknown format or a missing/invalid ``shape``/``num_classes``."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    meta_path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: not a readable JSON file ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unknown dataset format {meta.get('format')!r} (expected {FORMAT!r})")
    for key, ok in (("num_classes", lambda v: type(v) is int and v > 0),
                    ("shape", lambda v: isinstance(v, list) and len(v) == 3 and all(type(x) is int for x in v))):
        if key not in meta:
            raise ValueError(f"{meta_path}: no {key!r} field (written by python -m tvm_jax.data.prepare_imagenet)")
        if not ok(meta[key]):
            raise ValueError(f"{meta_path}: invalid {key!r}: {meta[key]!r}")
    return meta


def shard_record_counts(files: list[str]) -> list[int]:
    """The number of records in each ArrayRecord file, after reading and decoding each file's first
    record. Raises ``ValueError`` naming the file (and record) for anything unreadable."""
    from array_record.python.array_record_module import ArrayRecordReader

    counts = []
    for path in files:
        try:
            reader = ArrayRecordReader(path)
        except (RuntimeError, OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable ArrayRecord file ({first_line(e)})") from None
        try:
            if not reader.ok():  # a broken file opens "successfully"; its reader reports why on close
                raise RuntimeError("the reader reports a broken file")
            n = int(reader.num_records())
            first = reader.read([0])[0] if n else None
            reader.close()
        except (RuntimeError, OSError, ValueError) as e:
            try:
                reader.close()
            except RuntimeError as close_error:
                e = close_error
            raise ValueError(f"{path}: not a readable ArrayRecord file ({first_line(e)})") from None
        if first is not None:
            decode_record(first, f"{path} record 0")
        counts.append(n)
    return counts


def draw_training_labels(path: str, n: int, seed: int) -> tuple[np.ndarray, str]:
    """The labels of ``n`` training items drawn uniformly with replacement (seeded by ``seed``):
    samples of the dataset's label distribution. Returns ``(labels, how they were read)``.

    With the per-class record counts of ``dataset.json`` (``class_counts``, written by
    ``prepare_imagenet``; used when they add up to the records in the shards) item ``i`` of the
    class-ordered list is drawn, which is the same distribution without reading a record;
    otherwise the drawn records' headers are read.
    """
    files = shard_paths(path)
    counts = shard_record_counts(files)
    total = sum(counts)
    if total == 0:
        raise ValueError(f"data.path: the ArrayRecord files at {path!r} hold no records")
    index = np.random.default_rng(seed).integers(0, total, n)
    meta = read_metadata(path)
    class_counts = (meta or {}).get("class_counts")
    if (isinstance(class_counts, list) and all(type(c) is int and c >= 0 for c in class_counts)
            and sum(class_counts) == total):
        labels = np.searchsorted(np.cumsum(class_counts), index, side="right")
        return labels.astype(np.int32), f"class_counts of {os.path.join(os.path.abspath(path), METADATA_FILE)}"
    from array_record.python.array_record_module import ArrayRecordReader

    labels = np.empty(n, np.int32)
    starts = np.cumsum([0] + counts)
    shard_of = np.searchsorted(starts, index, side="right") - 1
    for s, file in enumerate(files):
        rows = np.flatnonzero(shard_of == s)
        if not len(rows):
            continue
        local = index[rows] - starts[s]
        unique, inverse = np.unique(local, return_inverse=True)
        reader = ArrayRecordReader(file)
        try:
            read = reader.read([int(i) for i in unique])
        finally:
            reader.close()
        found = np.array([_read_header(bytes(d), f"{file} record {i}")[0]["label"] for i, d in zip(unique, read)])
        labels[rows] = found[inverse]
    return labels, f"record headers of {len(files)} shards at {os.path.abspath(path)}"


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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

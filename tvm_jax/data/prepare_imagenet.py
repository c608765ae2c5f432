r"""Encodes an ImageNet-style image folder into VAE-latent ArrayRecord shards for training.

    python -m tvm_jax.data.prepare_imagenet --src /data/imagenet/train --out /data/in256_latents \
        --size 256 --vae /models/sd-vae-ft-ema [--batch_size 64] [--shard_size 10000] \
        [--dtype float16|float32] [--vae_dtype float32|bfloat16] [--limit N] [--num_workers N] \
        [--max_shards N] [--overwrite]

Input
  ``SRC/<class folder>/<files>`` (files may sit in nested sub-folders of a class folder). Class
  index = position of the class folder in the sorted list of class folders (code-point order, as
  torchvision's ``ImageFolder``), so ImageNet's wnid folders give the standard 0..999 indices.
  Every non-hidden file is a candidate: files PIL cannot decode (corrupt, truncated, not an image)
  are skipped and reported with the reason. Hidden entries (``.name``) are ignored; files lying
  directly in SRC are ignored with a warning. A flat folder with a labels file is not supported:
  put each class in its own folder. ``--limit N`` keeps the first N files of that order (so the
  first classes only) but every class folder still counts for ``num_classes`` and the indices.

Preprocessing (identical to guided-diffusion's ``center_crop_arr``)
  ``convert("RGB")`` (grayscale/palette/CMYK colour-converted by PIL, alpha dropped; 16-bit
  grayscale scaled to 8 bit; EXIF orientation ignored, as ADM), then while the short side is at
  least ``2 * size`` halve the image with a BOX filter, then resize so the short side is ``size``
  (BICUBIC, rounded sizes), then centre-crop ``size x size``; pixels map to [-1, 1].

Encoding
  Each batch is split over a 1-D mesh of all ``jax.devices()`` (batch size rounded up to a multiple
  of the device count; a short batch is padded and the padded rows dropped). The encoder's
  per-pixel posterior ``mean`` and ``std`` are both stored (records of
  :func:`tvm_jax.data.records.encode_record`); the trainer draws ``mean + std * N(0, 1)``.
  ``--vae_dtype bfloat16`` computes the VAE in bf16 (statistics and outputs stay fp32).
  Images are decoded by ``--num_workers`` spawned processes (0: in this process), ahead of the
  encoder.

Output (``OUT/``)
  ``latents-XXXXX-of-NNNNN.array_record``  shard i holds the images among input files
      ``[i * shard_size, (i + 1) * shard_size)`` of the sorted file list, in that order.
  ``classes.json``     class folder name -> index.
  ``files.jsonl``      the input file list, one ``[label, size_in_bytes, "class/relative/path"]``
                       per line (the order of the records, skipped files included).
  ``manifest.json``    settings, the file-list hash and which input files each shard covers.
  ``progress/<shard>.json``  written after each shard: record count, size, sha256, class counts,
                       skipped files and the sums for the raw statistics of that shard.
  ``dataset.json``     (:func:`tvm_jax.data.records.write_metadata`) only once every shard is done.

Resuming (the process may be killed at any moment)
  A shard is written to ``.tmp`` and renamed into place (``records.write_shard``), then its progress
  file is written (also tmp + rename). On restart leftover ``.tmp`` files are deleted, every shard
  with a progress file is verified (file size, record count, first/last record decodable with the
  right shape and labels) and kept; a shard without its progress file (killed between the two
  renames), or failing verification, is re-encoded with a warning. The settings (size, record
  dtype, VAE compute dtype, shard size, VAE weights hash, preprocessing) and the hash of the file
  list are stored in ``manifest.json``: a restart with anything different refuses with the
  differences spelled out, unless ``--overwrite``, which deletes only files this tool writes
  (never anything in SRC; OUT and SRC may not overlap). ``--max_shards N`` stops after N new
  shards (e.g. for time-limited jobs); rerun the same command to continue.

Raw latent statistics (``raw_mean``/``raw_std`` of dataset.json)
  Per channel, of the latents the trainer samples, ``z = mean + std * eps``, computed analytically
  (no sampling noise) from the stored (dtype-rounded) values over all records and pixels:
  ``raw_mean = E[mean]``, ``raw_std = sqrt(E[mean^2 + std^2] - E[mean]^2)``, float64 sums. They are
  printed next to ``tvm_jax.config.RAW_MEAN_256/RAW_STD_256`` (or ``_512``), which the configs use
  for normalisation.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import stat
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np
from absl import logging

from tvm_jax.data import records

MANIFEST_FORMAT = "tvm-jax-prepare-imagenet/1"
PREPROCESSING = "adm-center-crop/1"
MANIFEST_FILE = "manifest.json"
FILES_FILE = "files.jsonl"
CLASSES_FILE = "classes.json"
PROGRESS_DIR = "progress"
SHARD_PREFIX = "latents-"
SHARD_SUFFIX = ".array_record"
RAW_STATS_METHOD = ("analytic: per channel over all records and pixels, raw_mean = E[mean], "
                    "raw_std = sqrt(E[mean^2 + std^2] - E[mean]^2) of z = mean + std * N(0, 1)")


class PrepareError(ValueError):
    """Bad input or an output directory that cannot be used as asked; the message says why."""


# ----------------------------------------------------------------------------- images


def center_crop(image, size: int) -> np.ndarray:
    """guided-diffusion's ``center_crop_arr`` on an RGB PIL image -> (size, size, 3) uint8."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    out = arr[top:top + size, left:left + size]
    if out.shape != (size, size, 3):  # e.g. a 1-pixel-wide image rounded to a zero side
        raise ValueError(f"image of size {image.size} cannot be centre-cropped to {size}x{size}")
    return np.ascontiguousarray(out)


def to_rgb(image):
    """Any PIL image -> mode RGB (alpha dropped, as ``convert('RGB')``; 16-bit grayscale to 8 bit)."""
    from PIL import Image

    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        arr8 = ((arr * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        raise ValueError("floating-point (mode F) images are not supported")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if mode == "RGB" else image.convert("RGB")


def load_image(path: str, size: int) -> tuple[np.ndarray | None, str | None]:
    """(cropped uint8 (size, size, 3), None), or (None, reason) for a file that cannot be used."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return center_crop(to_rgb(image), size), None
    except Exception as e:  # noqa: BLE001 - any decoding failure skips (and reports) this one file
        return None, f"{type(e).__name__}: {e}"


def _load_many(paths: Sequence[str], size: int) -> list[tuple[np.ndarray | None, str | None]]:
    return [load_image(p, size) for p in paths]


# ----------------------------------------------------------------------------- input listing


@dataclasses.dataclass(frozen=True)
class FileEntry:
    label: int
    size: int  # bytes, part of the file-list hash (a replaced file changes it)
    path: str  # relative to SRC, "/"-separated

    def to_json(self) -> str:
        return json.dumps([self.label, self.size, self.path])


def list_dataset(src: str) -> tuple[list[str], list[FileEntry]]:
    """Sorted class folders and every non-hidden file below them, in (class, path) order."""
    if not os.path.exists(src):
        raise PrepareError(f"--src: {src!r} does not exist")
    if not os.path.isdir(src):
        raise PrepareError(f"--src: {src!r} is not a directory")
    classes, loose = [], []
    with os.scandir(src) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            (classes if entry.is_dir() else loose).append(entry.name)
    classes.sort()
    if not classes:
        raise PrepareError(
            f"--src: {src!r} has no class sub-folders; expected SRC/<class>/<image files> (a flat folder "
            f"with a labels file is not supported: put each class in its own folder)"
            + (f"; found {len(loose)} files directly in it" if loose else ""))
    if loose:
        logging.warning("ignoring %d files lying directly in %s (not in a class folder): %s%s", len(loose), src,
                        ", ".join(sorted(loose)[:10]), " ..." if len(loose) > 10 else "")
    files, hidden, special = [], 0, []
    for label, name in enumerate(classes):
        root = os.path.join(src, name)
        found = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            hidden += sum(d.startswith(".") for d in dirnames) + sum(f.startswith(".") for f in filenames)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, src).replace(os.sep, "/")
            for f in filenames:
                if f.startswith("."):
                    continue
                full = os.path.join(dirpath, f)
                try:
                    st = os.stat(full)
                except OSError:  # e.g. a dangling symlink: listed, then skipped with the reason when read
                    found.append(FileEntry(label, -1, f"{rel_dir}/{f}"))
                    continue
                if not stat.S_ISREG(st.st_mode):  # FIFOs, sockets, devices: never opened
                    special.append(full)
                    continue
                found.append(FileEntry(label, int(st.st_size), f"{rel_dir}/{f}"))
        found.sort(key=lambda e: e.path)
        files.extend(found)
    if special:
        logging.warning("ignoring %d special files (not regular files): %s%s", len(special), ", ".join(special[:10]),
                        " ..." if len(special) > 10 else "")
    if hidden:
        logging.info("ignored %d hidden files/folders (names starting with '.') in %s", hidden, src)
    return classes, files


# ----------------------------------------------------------------------------- small helpers


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> Any | None:
    """The parsed file, or None when it is missing or not valid JSON (e.g. cut short)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _inside(path: str, parent: str) -> bool:
    return os.path.commonpath([path, parent]) == parent


def shard_name(index: int, num_shards: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def _own_files(out: str) -> list[str]:
    """Every file in OUT that this tool writes (also leftovers of an earlier, different run)."""
    names = []
    for name in sorted(os.listdir(out)):
        base = name[:-4] if name.endswith(".tmp") else name
        if base in (MANIFEST_FILE, FILES_FILE, CLASSES_FILE, records.METADATA_FILE) or (
                base.startswith(SHARD_PREFIX) and base.endswith(SHARD_SUFFIX)):
            names.append(os.path.join(out, name))
    progress = os.path.join(out, PROGRESS_DIR)
    if os.path.isdir(progress):
        names += [os.path.join(progress, n) for n in sorted(os.listdir(progress))
                  if n.endswith(".json") or n.endswith(".json.tmp")]
    return names


# ----------------------------------------------------------------------------- settings / manifest


def _vae_identity(vae_dir: str, size: int):
    """Checks the VAE folder cheaply (no weights loaded) -> (config, sha256 of config + weights)."""
    from tvm_jax import vae as vae_lib

    if not os.path.isdir(vae_dir):
        raise PrepareError(f"--vae: VAE folder not found: {vae_dir!r} (a diffusers AutoencoderKL folder with "
                           f"{vae_lib.CONFIG_NAME} and {vae_lib.WEIGHTS_NAME})")
    cfg_path = os.path.join(vae_dir, vae_lib.CONFIG_NAME)
    w_path = os.path.join(vae_dir, vae_lib.WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise PrepareError(f"--vae: the VAE folder {vae_dir!r} has no {os.path.basename(p)}")
    try:
        with open(cfg_path) as f:
            cfg = vae_lib.VAEConfig.from_dict(json.load(f))
    except ValueError as e:  # JSON errors included
        raise PrepareError(f"--vae: {cfg_path}: {e}") from None
    f = cfg.downsample_factor
    if size % f:
        raise PrepareError(f"--size {size} is not a multiple of the VAE's downsampling factor {f}")
    h = hashlib.sha256()
    h.update(hashlib.sha256(open(cfg_path, "rb").read()).digest())
    h.update(_sha256_file(w_path).encode())
    return cfg, h.hexdigest()


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _first_difference(old: list[str], new: list[str]) -> str:
    for i, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return f"first difference at file #{i}: was {a}, now {b}"
    if len(old) != len(new):
        i = min(len(old), len(new))
        extra = (old if len(old) > len(new) else new)[i]
        return f"the lists agree up to file #{i}; {'only the old' if len(old) > len(new) else 'only the new'} " \
               f"list goes on, with {extra}"
    return "same entries"


# ----------------------------------------------------------------------------- encoding


_ENCODE_CACHE: dict = {}


def _encode_fn():
    """The jitted ``(graphdef, state, uint8 images) -> (mean, std)``; one per process, so that repeated
    in-process runs with the same VAE architecture reuse the compiled code."""
    if "fn" not in _ENCODE_CACHE:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        def encode(graphdef, state, images_u8):
            x = images_u8.astype(jnp.float32) / 127.5 - 1.0
            return nnx.merge(graphdef, state).encode(x)

        _ENCODE_CACHE["fn"] = jax.jit(encode, static_argnums=(0,))
    return _ENCODE_CACHE["fn"]


class _Encoder:
    """Encodes uint8 batches with the VAE, each batch split over a 1-D mesh of all devices."""

    def __init__(self, vae, batch_size: int):
        import jax
        from flax import nnx
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devices = jax.devices()
        self.num_devices = len(devices)
        mesh = Mesh(np.asarray(devices), ("batch",))
        self.in_sharding = NamedSharding(mesh, PartitionSpec("batch"))
        self.graphdef, state = nnx.split(vae)
        self.state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        self.batch_size = int(math.ceil(batch_size / self.num_devices) * self.num_devices)
        self.fn = _encode_fn()

    def __call__(self, images_u8: np.ndarray):
        """Dispatches (asynchronously) the encoding of up to ``batch_size`` images -> (mean, std, n)."""
        import jax

        n = images_u8.shape[0]
        if n < self.batch_size:
            pad = np.zeros((self.batch_size - n,) + images_u8.shape[1:], images_u8.dtype)
            images_u8 = np.concatenate([images_u8, pad])
        x = jax.device_put(images_u8, self.in_sharding)
        mean, std = self.fn(self.graphdef, self.state, x)
        return mean, std, n


# ----------------------------------------------------------------------------- the work


@dataclasses.dataclass
class _ShardPlan:
    index: int
    name: str
    start: int
    end: int


@dataclasses.dataclass
class _ShardBuffer:
    plan: _ShardPlan
    records: list = dataclasses.field(default_factory=list)
    labels: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    sum_mean: np.ndarray | None = None
    sum_sq: np.ndarray | None = None


def _decoded_stream(paths: list[str], size: int, num_workers: int, lookahead: int
                    ) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """load_image over ``paths`` in order; with workers, decoding runs up to ``lookahead`` ahead."""
    if num_workers <= 0:
        for p in paths:
            yield load_image(p, size)
        return
    chunk = 8
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    max_pending = max(2 * num_workers, lookahead // chunk + 1)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs JAX threads
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
        pending: collections.deque = collections.deque()
        it = iter(chunks)
        try:
            for c in it:
                pending.append(pool.submit(_load_many, c, size))
                if len(pending) >= max_pending:
                    break
            while pending:
                results = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(_load_many, nxt, size))
                yield from results
        finally:
            for f in pending:
                f.cancel()


def _verify_shard(out: str, plan: _ShardPlan, info: dict | None, settings_hash: str, shape, num_classes: int
                  ) -> str | None:
    """None if the shard and its progress file are complete and consistent, else the reason."""
    from array_record.python.array_record_module import ArrayRecordReader

    path = os.path.join(out, plan.name)
    if info is None:
        return "its progress file is missing or unreadable (interrupted right after the shard was written?)"
    if not os.path.isfile(path):
        return "the shard file is missing"
    expect = {"name": plan.name, "files": [plan.start, plan.end], "settings_sha256": settings_hash}
    for k, v in expect.items():
        if info.get(k) != v:
            return f"its progress file says {k} = {info.get(k)!r}, expected {v!r}"
    size = os.path.getsize(path)
    if size != info.get("bytes"):
        return f"the shard has {size} bytes, its progress file says {info.get('bytes')}"
    try:
        reader = ArrayRecordReader(path)
        try:
            n = reader.num_records()
            if n != info.get("num_records"):
                return f"the shard holds {n} records, its progress file says {info.get('num_records')}"
            for i in sorted({0, n - 1}) if n else []:
                rec = records.decode_record(reader.read([i])[0])
                if tuple(rec["mean"].shape) != tuple(shape):
                    return f"record {i} has shape {rec['mean'].shape}, expected {tuple(shape)}"
                if not 0 <= rec["label"] < num_classes:
                    return f"record {i} has label {rec['label']} outside [0, {num_classes})"
        finally:
            reader.close()
    except Exception as e:  # noqa: BLE001 - any read failure means: not a usable shard
        return f"the shard cannot be read ({type(e).__name__}: {e})"
    return None


def prepare(src: str, out: str, size: int, vae: str, *, batch_size: int = 64, shard_size: int = 10000,
            dtype: str = "float16", vae_dtype: str = "float32", limit: int | None = None,
            num_workers: int = 0, overwrite: bool = False, max_shards: int | None = None,
            log_every: float = 30.0) -> dict[str, Any]:
    """Does the work of the command line (see the module docstring). Returns a summary dict with
    ``complete`` (all shards written, dataset.json present), ``shards_written`` (this call),
    ``shards_reused``, ``num_shards`` and, once complete, ``num_records``, ``skipped``, ``raw_mean``,
    ``raw_std``, ``class_counts``. Raises :class:`PrepareError` for bad input or an unusable --out."""
    # -- arguments
    if size < 1:
        raise PrepareError(f"--size must be positive, got {size}")
    if batch_size < 1:
        raise PrepareError(f"--batch_size must be >= 1, got {batch_size}")
    if shard_size < 1:
        raise PrepareError(f"--shard_size must be >= 1, got {shard_size}")
    if dtype not in ("float16", "float32"):
        raise PrepareError(f"--dtype must be float16 or float32, got {dtype!r}")
    if vae_dtype not in ("float32", "bfloat16"):
        raise PrepareError(f"--vae_dtype must be float32 or bfloat16, got {vae_dtype!r}")
    if limit is not None and limit < 1:
        raise PrepareError(f"--limit must be >= 1, got {limit}")
    if num_workers < 0:
        raise PrepareError(f"--num_workers must be >= 0, got {num_workers}")
    if max_shards is not None and max_shards < 1:
        raise PrepareError(f"--max_shards must be >= 1, got {max_shards}")
    if not src:
        raise PrepareError("--src is required")
    if not out:
        raise PrepareError("--out is required")
    if not vae:
        raise PrepareError("--vae is required")
    src_abs, out_abs, vae_abs = (os.path.realpath(p) for p in (src, out, vae))
    if not os.path.exists(src_abs):
        raise PrepareError(f"--src: {src!r} does not exist")
    if _inside(out_abs, src_abs) or _inside(src_abs, out_abs):
        raise PrepareError(f"--out {out!r} and --src {src!r} overlap; the output must live outside the image "
                           f"folder (and not contain it)")
    if os.path.exists(out_abs) and not os.path.isdir(out_abs):
        raise PrepareError(f"--out: {out!r} exists and is not a directory")
    vae_cfg, vae_sha = _vae_identity(vae_abs, size)

    # -- inputs
    classes, files = list_dataset(src_abs)
    total_found = len(files)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise PrepareError(f"--src: no files found in the {len(classes)} class folders of {src!r}")
    num_classes = len(classes)
    f = vae_cfg.downsample_factor
    shape = [size // f, size // f, vae_cfg.latent_channels]
    files_text = "".join(e.to_json() + "\n" for e in files)
    classes_map = {name: i for i, name in enumerate(classes)}
    settings = {
        "size": size, "dtype": dtype, "vae_dtype": vae_dtype, "shard_size": shard_size,
        "vae_sha256": vae_sha, "preprocessing": PREPROCESSING, "shape": shape,
        "num_classes": num_classes,
        "classes_sha256": hashlib.sha256(json.dumps(classes).encode()).hexdigest(),
        "num_files": len(files),
        "file_list_sha256": hashlib.sha256(files_text.encode()).hexdigest(),
    }
    settings_hash = _settings_hash(settings)
    num_shards = math.ceil(len(files) / shard_size)
    plans = [_ShardPlan(i, shard_name(i, num_shards), i * shard_size, min((i + 1) * shard_size, len(files)))
             for i in range(num_shards)]
    logging.info("%d classes, %d files%s in %s -> %d shards of up to %d files in %s", num_classes, len(files),
                 f" (--limit {limit} of {total_found})" if limit is not None and limit < total_found else "",
                 src_abs, num_shards, shard_size, out_abs)

    # -- output directory
    manifest_path = os.path.join(out_abs, MANIFEST_FILE)
    os.makedirs(out_abs, exist_ok=True)
    old = _read_json(manifest_path) if os.path.exists(manifest_path) else None
    if os.path.exists(manifest_path) and (old is None or old.get("format") != MANIFEST_FORMAT):
        if not overwrite:
            raise PrepareError(f"{manifest_path} is not a readable {MANIFEST_FORMAT} manifest; pass --overwrite to "
                               f"discard this output directory's prepared data, or choose another --out")
    if old is not None and old.get("format") == MANIFEST_FORMAT and old.get("settings") != settings \
            and not overwrite:
        raise PrepareError(_mismatch_message(out_abs, old, settings, files_text))
    if overwrite:
        removed = _own_files(out_abs)
        # dataset.json first (the trainer must never see a half-deleted dataset as complete), then the manifest.
        first = [os.path.join(out_abs, n) for n in (records.METADATA_FILE, MANIFEST_FILE)]
        removed = [p for p in first if p in removed] + [p for p in removed if p not in first]
        for p in removed:
            os.remove(p)
        if removed:
            logging.warning("--overwrite: deleted %d files of the earlier output in %s", len(removed), out_abs)
        old = None
    elif old is None:
        data_files = [n for n in os.listdir(out_abs) if n.endswith(SHARD_SUFFIX) or n == records.METADATA_FILE]
        progress_dir = os.path.join(out_abs, PROGRESS_DIR)
        if os.path.isdir(progress_dir):
            data_files += [f"{PROGRESS_DIR}/{n}" for n in os.listdir(progress_dir)]
        if data_files:
            raise PrepareError(f"--out {out!r} already holds data ({', '.join(sorted(data_files)[:5])}) but no "
                               f"{MANIFEST_FILE}; choose an empty or new --out, or pass --overwrite")
    foreign = [n for n in os.listdir(out_abs) if n.endswith(SHARD_SUFFIX) and n not in {p.name for p in plans}]
    if foreign:
        raise PrepareError(f"--out {out!r} holds ArrayRecord files that are not shards of this dataset "
                           f"({', '.join(sorted(foreign)[:5])}); the trainer would read them too. Move them away "
                           f"or pass --overwrite (which deletes this tool's files only)")

    os.makedirs(os.path.join(out_abs, PROGRESS_DIR), exist_ok=True)
    files_path = os.path.join(out_abs, FILES_FILE)
    if not os.path.isfile(files_path) or _sha256_file(files_path) != settings["file_list_sha256"]:
        _write_text_atomic(files_path, files_text)
    _write_json_atomic(os.path.join(out_abs, CLASSES_FILE), classes_map)
    if old is None:
        manifest = {
            "format": MANIFEST_FORMAT, "settings": settings, "settings_sha256": settings_hash,
            "src": src_abs, "vae": vae_abs, "limit": limit,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shards": [{"name": p.name, "files": [p.start, p.end], "first_file": files[p.start].path,
                        "last_file": files[p.end - 1].path} for p in plans],
        }
        _write_json_atomic(manifest_path, manifest)
    else:
        if old.get("src") != src_abs or old.get("vae") != vae_abs:
            logging.info("resuming with --src/--vae at new locations (%s, %s); file list and VAE weights match",
                         src_abs, vae_abs)
        logging.info("resuming the preparation started %s", old.get("started"))

    # -- what is done already
    for p in _own_files(out_abs):
        if p.endswith(".tmp"):
            logging.info("discarding the partial file %s of an interrupted run", p)
            os.remove(p)
    progress: dict[int, dict] = {}
    todo: list[_ShardPlan] = []
    for plan in plans:
        ppath = os.path.join(out_abs, PROGRESS_DIR, plan.name[:-len(SHARD_SUFFIX)] + ".json")
        spath = os.path.join(out_abs, plan.name)
        if not os.path.exists(ppath) and not os.path.exists(spath):
            todo.append(plan)
            continue
        info = _read_json(ppath)
        reason = _verify_shard(out_abs, plan, info, settings_hash, shape, num_classes)
        if reason is None:
            progress[plan.index] = info
            continue
        logging.warning("re-encoding %s: %s", plan.name, reason)
        for p in (ppath, spath):
            if os.path.exists(p):
                os.remove(p)
        todo.append(plan)
    if progress:
        logging.info("%d of %d shards already complete and verified", len(progress), num_shards)

    written = 0
    if todo:
        written = _encode_shards(todo, files, src_abs, out_abs, size, vae_abs, vae_dtype, dtype, shape, num_classes,
                                 batch_size, num_workers, max_shards, settings_hash, progress, log_every,
                                 total_files=len(files), num_shards=num_shards)
    summary: dict[str, Any] = {"complete": False, "shards_written": written,
                               "shards_reused": num_shards - len(todo), "num_shards": num_shards}
    if len(progress) < num_shards:
        logging.info("stopped after writing %d shards (--max_shards %s): %d of %d shards complete; rerun the same "
                     "command to continue", written, max_shards, len(progress), num_shards)
        return summary

    # -- everything is there: dataset.json and the summary
    infos = [progress[i] for i in range(num_shards)]
    num_records = sum(i["num_records"] for i in infos)
    skipped = [s for i in infos for s in i["skipped"]]
    class_counts = np.sum([i["class_counts"] for i in infos], axis=0).astype(int).tolist()
    count = sum(i["num_values"] for i in infos)
    if num_records == 0:
        raise PrepareError(f"none of the {len(files)} files could be used ({len(skipped)} skipped, e.g. "
                           f"{skipped[0]['path']}: {skipped[0]['reason']}); no dataset.json written")
    sum_mean = np.sum([i["sum_mean"] for i in infos], axis=0)
    sum_sq = np.sum([i["sum_sq"] for i in infos], axis=0)
    raw_mean = sum_mean / count
    raw_std = np.sqrt(np.maximum(sum_sq / count - raw_mean ** 2, 0.0))
    meta_path = os.path.join(out_abs, records.METADATA_FILE)
    created = (_read_json(meta_path) or {}).get("created") or \
        datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    records.write_metadata(
        out_abs, shape=shape, num_classes=num_classes, num_records=num_records, resolution=size,
        raw_mean=raw_mean.tolist(), raw_std=raw_std.tolist(), raw_stats_method=RAW_STATS_METHOD,
        class_counts=class_counts, skipped=skipped, num_files=len(files), dtype=dtype,
        vae={"path": vae_abs, "sha256": vae_sha, "compute_dtype": vae_dtype,
             "latent_channels": vae_cfg.latent_channels, "downsample_factor": f,
             "scaling_factor": vae_cfg.scaling_factor},
        src=src_abs, limit=limit, preprocessing=PREPROCESSING, classes_file=CLASSES_FILE,
        shards=[{"name": i["name"], "num_records": i["num_records"], "bytes": i["bytes"], "sha256": i["sha256"]}
                for i in infos],
        created=created)
    _log_summary(classes, class_counts, num_records, skipped, raw_mean, raw_std, size, meta_path)
    summary.update(complete=True, num_records=num_records, skipped=skipped, raw_mean=raw_mean.tolist(),
                   raw_std=raw_std.tolist(), class_counts=class_counts)
    return summary


def _mismatch_message(out: str, old: dict, settings: dict, files_text: str) -> str:
    lines = [f"--out {out!r} holds a preparation with different settings; refusing to mix data:"]
    old_settings = old.get("settings") or {}
    for k in sorted(set(old_settings) | set(settings)):
        if k == "file_list_sha256":
            continue
        if old_settings.get(k) != settings.get(k):
            lines.append(f"  {k}: {old_settings.get(k)!r} there, {settings.get(k)!r} now")
    if old_settings.get("file_list_sha256") != settings["file_list_sha256"]:
        old_lines = None
        try:
            with open(os.path.join(out, FILES_FILE)) as f:
                old_lines = f.read().splitlines()
        except OSError:
            pass
        detail = _first_difference(old_lines, files_text.splitlines()) if old_lines is not None else \
            f"{FILES_FILE} is missing"
        lines.append(f"  the input file list changed (--src contents or --limit): {detail}")
    lines.append("Rerun with the original settings to resume, use a new --out, or pass --overwrite to delete the "
                 "earlier output (only files this tool writes; --src is never touched).")
    return "\n".join(lines)


def _encode_shards(todo, files, src, out, size, vae_path, vae_dtype, dtype, shape, num_classes, batch_size,
                   num_workers, max_shards, settings_hash, progress, log_every, total_files, num_shards) -> int:
    import jax
    import jax.numpy as jnp

    from tvm_jax.vae import load_vae

    if jax.process_count() > 1:
        raise PrepareError("run prepare_imagenet as a single process (it uses all devices of this host)")
    model = load_vae(vae_path, dtype=jnp.bfloat16 if vae_dtype == "bfloat16" else jnp.float32)
    encoder = _Encoder(model, batch_size)
    logging.info("encoding on %d device(s) (%s), batch size %d, VAE compute dtype %s, records %s; decoding with "
                 "%d worker process(es)", encoder.num_devices, jax.devices()[0].platform, encoder.batch_size,
                 vae_dtype, dtype, num_workers)
    if encoder.batch_size != batch_size:
        logging.info("--batch_size %d rounded up to %d (a multiple of the %d devices)", batch_size,
                     encoder.batch_size, encoder.num_devices)
    if max_shards is not None:
        todo = todo[:max_shards]
    remaining_files = sum(p.end - p.start for p in todo)
    paths = [os.path.join(src, files[i].path) for p in todo for i in range(p.start, p.end)]
    stream = _decoded_stream(paths, size, num_workers, lookahead=3 * encoder.batch_size)
    channels = shape[-1]
    t0 = time.time()
    last_log = t0
    done_files = 0
    written = 0
    pending = None  # (buffer, labels, (mean, std, n)) of the batch in flight on the devices

    def collect(item):
        buf, labels, (mean, std, n) = item
        mean = np.asarray(mean)[:n].astype(dtype)
        std = np.asarray(std)[:n].astype(dtype)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
            raise PrepareError(f"the VAE produced non-finite latents (in {dtype}) for a batch of {buf.plan.name}; "
                               f"try --vae_dtype float32 / --dtype float32")
        m64 = mean.astype(np.float64)
        s64 = std.astype(np.float64)
        buf.sum_mean += m64.reshape(-1, channels).sum(axis=0)
        buf.sum_sq += (m64 * m64 + s64 * s64).reshape(-1, channels).sum(axis=0)
        for i, label in enumerate(labels):
            buf.records.append(records.encode_record(mean[i], std[i], label, dtype))

    def finish(buf: _ShardBuffer):
        path = os.path.join(out, buf.plan.name)
        records.write_shard(path, buf.records)
        counts = np.bincount(np.asarray(buf.labels, np.int64), minlength=num_classes).tolist()
        info = {"name": buf.plan.name, "index": buf.plan.index, "files": [buf.plan.start, buf.plan.end],
                "settings_sha256": settings_hash, "num_records": len(buf.records),
                "bytes": os.path.getsize(path), "sha256": _sha256_file(path), "class_counts": counts,
                "skipped": buf.skipped, "num_values": len(buf.records) * shape[0] * shape[1],
                "sum_mean": buf.sum_mean.tolist(), "sum_sq": buf.sum_sq.tolist()}
        _write_json_atomic(os.path.join(out, PROGRESS_DIR, buf.plan.name[:-len(SHARD_SUFFIX)] + ".json"), info)
        progress[buf.plan.index] = info
        logging.info("wrote %s: %d records%s (%d of %d shards complete)", buf.plan.name, len(buf.records),
                     f", {len(buf.skipped)} files skipped" if buf.skipped else "", len(progress), num_shards)

    try:
        for plan in todo:
            buf = _ShardBuffer(plan, sum_mean=np.zeros(channels), sum_sq=np.zeros(channels))
            images, labels = [], []
            for i in range(plan.start, plan.end):
                image, reason = next(stream)
                done_files += 1
                if image is None:
                    entry = {"path": files[i].path, "reason": reason}
                    buf.skipped.append(entry)
                    logging.warning("skipping %s: %s", os.path.join(src, files[i].path), reason)
                else:
                    images.append(image)
                    labels.append(files[i].label)
                if len(images) == encoder.batch_size or (i == plan.end - 1 and images):
                    item = (buf, labels, encoder(np.stack(images)))
                    buf.labels.extend(labels)
                    if pending is not None:
                        collect(pending)
                    pending = item
                    images, labels = [], []
                now = time.time()
                if now - last_log >= log_every:
                    last_log = now
                    rate = done_files / (now - t0)
                    logging.info("%d/%d files this run (%.1f%% of all %d), %.1f img/s, ETA %s", done_files,
                                 remaining_files, 100.0 * (total_files - remaining_files + done_files) / total_files,
                                 total_files, rate, _fmt_duration((remaining_files - done_files) / rate))
            if pending is not None:
                collect(pending)
                pending = None
            finish(buf)
            written += 1
    finally:
        stream.close()
    elapsed = time.time() - t0
    logging.info("encoded %d files in %s (%.1f img/s)", done_files, _fmt_duration(elapsed),
                 done_files / max(elapsed, 1e-9))
    return written


def _log_summary(classes, class_counts, num_records, skipped, raw_mean, raw_std, size, meta_path) -> None:
    from tvm_jax import config as config_lib

    counts = np.asarray(class_counts)
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    logging.info("done: %d records in %d classes; per class min %d, max %d, mean %.1f", num_records, len(classes),
                 counts.min(), counts.max(), counts.mean())
    if empty:
        logging.warning("%d classes have no images: %s%s", len(empty), ", ".join(empty[:20]),
                        " ..." if len(empty) > 20 else "")
    if skipped:
        logging.warning("%d files skipped (listed in %s under 'skipped'):", len(skipped), meta_path)
        for s in skipped[:50]:
            logging.warning("  %s: %s", s["path"], s["reason"])
        if len(skipped) > 50:
            logging.warning("  ... and %d more", len(skipped) - 50)
    logging.info("skipped files: %d", len(skipped))
    ref = {256: (config_lib.RAW_MEAN_256, config_lib.RAW_STD_256),
           512: (config_lib.RAW_MEAN_512, config_lib.RAW_STD_512)}.get(size)
    logging.info("raw latent statistics per channel (%s):", RAW_STATS_METHOD)
    for c in range(len(raw_mean)):
        if ref is not None and c < len(ref[0]):
            logging.info("  channel %d: mean %+.4f (config RAW_MEAN_%d %+.4f)  std %.4f (config RAW_STD_%d %.4f)",
                         c, raw_mean[c], size, ref[0][c], raw_std[c], size, ref[1][c])
        else:
            logging.info("  channel %d: mean %+.4f  std %.4f", c, raw_mean[c], raw_std[c])
    if ref is None:
        logging.info("  (no reference values in tvm_jax.config for size %d; set data.raw_mean/raw_std from "
                     "dataset.json)", size)


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tvm_jax.data.prepare_imagenet",
                                description="Encode an ImageNet-style folder into VAE-latent ArrayRecord shards.")
    p.add_argument("--src", required=True, help="image folder: SRC/<class>/<images>")
    p.add_argument("--out", required=True, help="output directory (created; resumable)")
    p.add_argument("--size", required=True, type=int, help="pixel resolution (256 or 512 for the paper's setups)")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (config.json + safetensors)")
    p.add_argument("--batch_size", type=int, default=64, help="images per encoder call (over all devices)")
    p.add_argument("--shard_size", type=int, default=10000, help="input files per output shard")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="dtype of the stored records")
    p.add_argument("--vae_dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of the VAE encoder")
    p.add_argument("--limit", type=int, default=None, help="only the first N files of the sorted list (a trial)")
    p.add_argument("--num_workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="image-decoding processes (0: decode in this process)")
    p.add_argument("--max_shards", type=int, default=None,
                   help="stop after writing N new shards (rerun to continue)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an earlier output in --out made with other settings (deletes only this tool's files)")
    p.add_argument("--log_every", type=float, default=30.0, help="seconds between progress lines")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.set_verbosity(logging.INFO)
    try:
        summary = prepare(args.src, args.out, args.size, args.vae, batch_size=args.batch_size,
                          shard_size=args.shard_size, dtype=args.dtype, vae_dtype=args.vae_dtype, limit=args.limit,
                          num_workers=args.num_workers, overwrite=args.overwrite, max_shards=args.max_shards,
                          log_every=args.log_every)
    except (PrepareError, FileNotFoundError) as e:
        print(f"prepare_imagenet: error: {e}", file=sys.stderr)
        return 2
    if summary["complete"]:
        print(f"prepare_imagenet: {summary['num_records']} records in {summary['num_shards']} shards, "
              f"{len(summary['skipped'])} files skipped -> {os.path.abspath(args.out)}")
    else:
        print(f"prepare_imagenet: incomplete ({summary['shards_reused'] + summary['shards_written']} of "
              f"{summary['num_shards']} shards); rerun the same command to continue")
    return 0


if __name__ == "__main__":
    from absl import flags

    logging.use_absl_handler()
    flags.FLAGS.mark_as_parsed()  # argparse parses the command line; silences absl's pre-parse warning
    sys.exit(main())

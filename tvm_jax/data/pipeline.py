"""grain input pipelines for every data source; each yields ``{"x": (B, ...), "label": (B,)}``.

Sources (``config.data.source``):

* ``latents``: prepared ImageNet latents in ArrayRecord shards (:mod:`tvm_jax.data.records`).
  Each record holds the VAE encoder's mean and std; every time a record is read a fresh latent
  ``mean + std * N(0, 1)`` is drawn (the noise is seeded by the record's position in the
  shuffled stream, so it differs per epoch and replays exactly after a restore), then normalised
  per channel with ``scale = final_std / raw_std``, ``bias = -raw_mean * scale``.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), scaled to
  [-1, 1] and upsampled by ``data.upsample`` (nearest neighbour).
* ``gmm``: 131072 points drawn once (seeded by ``config.seed``) from the class-conditional ring
  mixture of :func:`tvm_jax.gmm_truth.ring_mixture` (``data.num_classes`` classes,
  ``data.gmm_components_per_class`` components each, ``data.gmm_dim`` dimensions).
* ``synthetic``: N(0, 1) arrays of ``data.shape`` with uniform labels (speed tests).

Order: one global stream of examples (shuffled per epoch, deterministic given ``seed``); global
batch ``k`` is the stream's ``k``-th block of ``global_batch`` examples, and every JAX process
reads its contiguous part of that block (``global_batch / process_count`` examples). The batches
depend on neither the process count nor the number of loading workers, and the position of the
data is the training step: a run resumes at any step, on any number of processes, without a
saved iterator state (:func:`make_loader` takes ``start_step``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import grain
import jax
import numpy as np

from tvm_jax.data import records
from tvm_jax.data.workers import WorkerSide


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    shape: tuple[int, ...]  # one example, after upsampling
    num_classes: int
    num_records: int | None  # None: endless stream
    description: str


# ----------------------------------------------------------------------------- sources


class ArraySource(WorkerSide, grain.sources.RandomAccessDataSource):
    """In-memory arrays as a random-access source."""

    def __init__(self, x: np.ndarray, labels: np.ndarray):
        if len(x) != len(labels):
            raise ValueError(f"{len(x)} examples but {len(labels)} labels")
        self._x, self._labels = x, labels
        self._repr: str | None = None

    def __len__(self) -> int:
        return len(self._x)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"x": self._x[index], "label": np.int32(self._labels[index])}

    def __repr__(self) -> str:
        # grain checks ``repr(data_source)`` when restoring an iterator: it must be the same in a
        # new process for the same data (the default repr holds the object's address).
        if self._repr is None:
            digest = hashlib.sha256(np.ascontiguousarray(self._x).tobytes())
            digest.update(np.ascontiguousarray(self._labels).tobytes())
            self._repr = (f"ArraySource(num_records={len(self._x)}, shape={tuple(self._x.shape[1:])}, "
                          f"dtype={self._x.dtype}, sha256={digest.hexdigest()[:16]})")
        return self._repr


class _IndexSource(WorkerSide, grain.sources.RandomAccessDataSource):
    """Records are their own index (the generated sources draw from the per-record rng)."""

    def __init__(self, n: int):
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> int:
        return index

    def __repr__(self) -> str:  # stable across processes (grain validates it on restore)
        return f"_IndexSource({self._n})"


class LatentRecordSource(WorkerSide, grain.sources.RandomAccessDataSource):
    """The decoded records of ArrayRecord shards (grain's ``ArrayRecordDataSource``), checked on
    the way: a record that does not decode, has another shape, a label outside
    ``[0, num_classes)`` or non-finite values raises ``ValueError`` naming its file and index
    within the file. Opening checks every shard and its first record (same errors)."""

    def __init__(self, files: list[str], expected_shape=None, num_classes: int | None = None):
        self._files = list(files)
        self._starts = np.cumsum([0] + records.shard_record_counts(self._files))
        self._records = grain.sources.ArrayRecordDataSource(self._files)
        self._expected_shape = None if expected_shape is None else tuple(expected_shape)
        self._num_classes = num_classes

    def __len__(self) -> int:
        return int(self._starts[-1])

    def where(self, index: int) -> str:
        """``"FILE record I"`` of global record ``index``."""
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return f"{self._files[shard]} record {index - int(self._starts[shard])}"

    def __getitem__(self, index) -> dict[str, Any]:
        index = int(index)
        try:
            data = self._records[index]
        except RuntimeError as e:
            raise ValueError(f"{self.where(index)}: cannot be read ({records.first_line(e)})") from None
        rec = records.decode_record(data, self.where(index))
        if self._expected_shape is not None and rec["mean"].shape != self._expected_shape:
            raise ValueError(f"{self.where(index)}: latent of shape {rec['mean'].shape} but data.shape is "
                             f"{self._expected_shape}")
        if self._num_classes is not None and not 0 <= rec["label"] < self._num_classes:
            raise ValueError(f"{self.where(index)}: label {rec['label']} outside [0, {self._num_classes})")
        return rec

    def __repr__(self) -> str:  # grain validates it on restore: the same as the plain ArrayRecord source
        return repr(self._records)


def load_digits(upsample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (N, 8u, 8u, 1) float32 in [-1, 1] and int labels."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = (d.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    if upsample > 1:
        x = np.repeat(np.repeat(x, upsample, axis=1), upsample, axis=2)
    return x[..., None], d.target.astype(np.int32)


def gmm_mixture(config):
    from tvm_jax.gmm_truth import ring_mixture

    return ring_mixture(num_classes=config.data.num_classes,
                        components_per_class=config.data.gmm_components_per_class, d=config.data.gmm_dim,
                        seed=config.seed)


# ----------------------------------------------------------------------------- transforms


class DecodeLatent(grain.transforms.RandomMap):
    """A record of :class:`LatentRecordSource` -> normalised latent sample
    ``(mean + std * N(0,1)) * scale + bias``."""

    def __init__(self, raw_mean, raw_std, final_std: float):
        self.scale = (final_std / np.asarray(raw_std, np.float32)).astype(np.float32)
        self.bias = (-np.asarray(raw_mean, np.float32) * self.scale).astype(np.float32)

    def random_map(self, rec: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        z = rec["mean"] + rec["std"] * rng.standard_normal(rec["mean"].shape, dtype=np.float32)
        return {"x": (z * self.scale + self.bias).astype(np.float32), "label": np.int32(rec["label"])}


class SampleSynthetic(grain.transforms.RandomMap):
    def __init__(self, shape, num_classes: int):
        self.shape, self.num_classes = tuple(shape), num_classes

    def random_map(self, element: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"x": rng.standard_normal(self.shape, dtype=np.float32),
                "label": np.int32(rng.integers(self.num_classes))}


# ----------------------------------------------------------------------------- pipeline

_ENDLESS = 1 << 40
GMM_POINTS = 1 << 17


def dataset_info(config) -> DatasetInfo:
    """Shape and label count of the configured data, read cheaply (used by the pre-flight checks)."""
    d = config.data
    if d.source == "digits":
        return DatasetInfo((8 * d.upsample, 8 * d.upsample, 1), 10, 1797, "scikit-learn digits")
    if d.source == "gmm":
        return DatasetInfo((d.gmm_dim,), d.num_classes, GMM_POINTS, f"{d.num_classes}-class ring mixture")
    if d.source == "synthetic":
        return DatasetInfo(tuple(d.shape), d.num_classes, None, "synthetic N(0, 1)")
    if not d.path:
        raise ValueError("data.path: no dataset given (set --config.data.path to the prepared latents)")
    if not os.path.exists(d.path) and not any(ch in d.path for ch in "*?["):
        raise FileNotFoundError(f"data.path: {d.path!r} does not exist")
    files = records.shard_paths(d.path)
    meta = records.read_metadata(d.path)
    source = LatentRecordSource(files)  # opens every shard and decodes its first record
    if len(source) == 0:
        raise ValueError(f"data.path: the ArrayRecord files at {d.path!r} hold no records")
    shape = tuple(source[0]["mean"].shape)
    num_classes = meta["num_classes"] if meta else d.num_classes
    if meta and tuple(meta["shape"]) != shape:
        raise ValueError(f"{d.path}: dataset.json says shape {tuple(meta['shape'])} but records are {shape}")
    return DatasetInfo(shape, int(num_classes), len(source), f"{len(source)} latent records in {len(files)} shards")


class _GlobalOrder(grain.sources.RandomAccessDataSource):
    """This process's examples of the global example stream, in the order it consumes them.

    The global stream is one grain ``IndexSampler`` over all records (shuffled per epoch with
    ``seed``, no process sharding): global batch ``k`` is global positions ``[k B, (k + 1) B)``.
    Process ``p`` of ``P`` reads positions ``[k B + p b, k B + (p + 1) b)`` of it (``b = B / P``):
    local position ``j`` is global position ``(j // b) B + p b + j % b``. Each example is read
    and transformed here with the sampler's per-position rng (seeded by the *global* position),
    so every global batch, latent noise included, is the same whatever the number of processes,
    data-loading workers or devices, and the stream can start at any step without a saved
    iterator state.
    """

    def __init__(self, source, sampler, transform, *, global_batch: int, process_index: int, process_count: int):
        self._source, self._sampler, self._transform = source, sampler, transform
        self._global_batch = global_batch
        self._local_batch = global_batch // process_count
        self._offset = process_index * self._local_batch

    def __len__(self) -> int:
        return _ENDLESS

    def global_position(self, j: int) -> int:
        step, within = divmod(j, self._local_batch)
        return step * self._global_batch + self._offset + within

    def __getitem__(self, j: int):
        meta = self._sampler[self.global_position(j)]
        element = self._source[meta.record_key]
        return element if self._transform is None else self._transform.random_map(element, meta.rng)

    def __repr__(self) -> str:
        return (f"_GlobalOrder({self._source!r}, global_batch={self._global_batch}, "
                f"local_batch={self._local_batch}, offset={self._offset})")


def _source_and_transform(config):
    d = config.data
    if d.source == "latents":
        source = LatentRecordSource(records.shard_paths(d.path), tuple(d.shape), d.num_classes)
        return source, DecodeLatent(d.raw_mean, d.raw_std, d.final_std)
    if d.source == "digits":
        return ArraySource(*load_digits(d.upsample)), None
    if d.source == "gmm":
        x, labels = gmm_mixture(config).sample(np.random.default_rng(config.seed), GMM_POINTS)
        return ArraySource(x.astype(np.float32), labels.astype(np.int32)), None
    if d.source == "synthetic":
        return _IndexSource(_ENDLESS), SampleSynthetic(d.shape, d.num_classes)
    raise ValueError(f"data.source: unknown source {d.source!r}")


def make_loader(config, *, global_batch_size: int, seed: int, start_step: int = 0,
                worker_count: int | None = None) -> grain.IterDataset:
    """This process's share of every global batch from ``start_step`` on, forever.

    Yields ``{"x": (b, ...), "label": (b,)}`` with ``b = global_batch_size / process_count``;
    the global batches are independent of the process count and of ``worker_count`` (see
    :class:`_GlobalOrder`), so the data position of a run is its step and nothing else.
    ``worker_count`` (default ``data.worker_count``) > 0 decodes in that many processes.
    """
    d = config.data
    local_batch = process_batch_size(global_batch_size)
    source, transform = _source_and_transform(config)
    # Generated sources draw from the per-position rng: shuffling their index stream adds nothing.
    sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=grain.sharding.NoSharding(),
                                          shuffle=d.source != "synthetic", num_epochs=None, seed=seed)
    view = _GlobalOrder(source, sampler, transform, global_batch=global_batch_size,
                        process_index=jax.process_index(), process_count=jax.process_count())
    batches = grain.MapDataset.source(view).batch(local_batch, drop_remainder=True)
    if start_step:
        batches = batches[start_step:]
    dataset = batches.to_iter_dataset()
    workers = d.worker_count if worker_count is None else worker_count
    if workers:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return dataset


def process_batch_size(global_batch_size: int) -> int:
    n = jax.process_count()
    if global_batch_size % n:
        raise ValueError(f"train.global_batch_size {global_batch_size} is not divisible by the {n} processes")
    return global_batch_size // n

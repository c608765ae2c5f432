"""Fréchet Inception Distance: feature extraction, statistics, reference files.

* :class:`InceptionFeatures` — jitted, batched pool3 features of the FID Inception-v3
  (:mod:`tvm_jax.evaluation.inception`) for uint8 NHWC images (or floats in [0, 255]), optionally with
  the batch split over all local devices.
* :func:`compute_statistics` / :func:`frechet_distance` — float64 mean/covariance and the
  Fréchet distance as in pytorch-fid (``scipy.linalg.sqrtm``, eps-offset fallback for singular
  products, imaginary-part check).
* :func:`load_reference_statistics` (ADM-style ``.npz`` with ``mu``/``sigma``; EDM2-style
  ``.pkl`` read with a numpy-only restricted unpickler), :func:`save_statistics`,
  :func:`statistics_from_folder`.

Typical use::

    extractor = InceptionFeatures("/weights/pt_inception-2015-12-05-6726825d.pth", batch_size=250)
    mu, sigma = compute_statistics(extractor(samples_uint8))
    ref_mu, ref_sigma = load_reference_statistics("/refs/VIRTUAL_imagenet256_labeled.npz")
    fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import tempfile
import time
import zipfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tvm_jax.evaluation.inception import FEATURE_DIM, FIDInceptionV3, load_inception

__all__ = [
    "InceptionFeatures",
    "compute_statistics",
    "frechet_distance",
    "load_reference_statistics",
    "save_statistics",
    "list_image_files",
    "features_from_folder",
    "statistics_from_folder",
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# --------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------


@partial(jax.jit, static_argnums=(0,))
def _features(graphdef, state, images):
    model = nnx.merge(graphdef, state)
    return model(images.astype(jnp.float32) / 255.0)


class InceptionFeatures:
    """Batched pool3 (2048-d) features of the FID Inception-v3.

    Args:
      model: a :class:`FIDInceptionV3` or a weights path for :func:`load_inception`.
      batch_size: images per jitted call (rounded up to a multiple of the device count when
        sharding). Inputs of N images run in ceil(N / batch_size) calls; the last one is
        padded and the padded rows are dropped.
      shard: split each batch over a 1-D mesh of ``devices`` (default: all local devices) with
        ``NamedSharding``; the weights are replicated. Local devices, so that under
        multi-process JAX each process extracts features for its own images.

    ``__call__(images)``: (N, H, W, 3) uint8, or floats in [0, 255]; any H, W (resized to
    299x299 bilinearly, as pytorch-fid). Returns float32 numpy (N, 2048).
    """

    def __init__(
        self,
        model: FIDInceptionV3 | str | os.PathLike,
        *,
        batch_size: int = 100,
        shard: bool = False,
        devices: Sequence[jax.Device] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(model, FIDInceptionV3):
            model = load_inception(model)
        self.graphdef, state = nnx.split(model)
        self.shard = shard
        if shard:
            devs = list(devices) if devices is not None else jax.local_devices()
            self.mesh = Mesh(np.array(devs), ("batch",))
            self.n_devices = len(devs)
            self._data_sharding = NamedSharding(self.mesh, PartitionSpec("batch"))
            state = jax.device_put(state, NamedSharding(self.mesh, PartitionSpec()))
        else:
            self.mesh = None
            self.n_devices = 1
            self._data_sharding = None
        self.state = state
        self.batch_size = int(math.ceil(batch_size / self.n_devices) * self.n_devices)

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        x = jax.device_put(chunk, self._data_sharding) if self.shard else jnp.asarray(chunk)
        return np.asarray(_features(self.graphdef, self.state, x))

    def __call__(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"InceptionFeatures: expected (N, H, W, 3) RGB images, got shape {images.shape}")
        if images.dtype != np.uint8:
            if not np.issubdtype(images.dtype, np.floating):
                raise TypeError(f"InceptionFeatures: images must be uint8 or float in [0, 255], got {images.dtype}")
            images = images.astype(np.float32)
        n = images.shape[0]
        if n == 0:
            return np.zeros((0, FEATURE_DIM), np.float32)
        # A call with fewer images than a batch runs at its own (device-divisible) size.
        size = min(self.batch_size, int(math.ceil(n / self.n_devices) * self.n_devices))
        out = []
        for start in range(0, n, size):
            chunk = images[start : start + size]
            m = chunk.shape[0]
            if m < size:
                chunk = np.concatenate([chunk, np.zeros((size - m,) + chunk.shape[1:], chunk.dtype)])
            out.append(self._run(chunk)[:m])
        return np.concatenate(out, axis=0)


# --------------------------------------------------------------------------------------
# Statistics and distance
# --------------------------------------------------------------------------------------


def compute_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mu (D,), sigma (D, D)), float64; sigma is the unbiased covariance."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"compute_statistics: features must be (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"compute_statistics: need at least 2 feature vectors, got {f.shape[0]}")
    if not np.isfinite(f).all():
        raise ValueError("compute_statistics: features contain NaN or inf")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1:
        raise ValueError(f"{name}: mu must be 1-D, got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: sigma must be ({mu.shape[0]}, {mu.shape[0]}) to match mu, got {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: statistics contain NaN or inf")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

    ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))``.

    As pytorch-fid: if ``sqrtm(sigma1 @ sigma2)`` is not finite (singular product), retry with
    ``eps`` added to both diagonals; a complex result is accepted only if its diagonal's
    imaginary part is below 1e-3 (then the real part is used).
    """
    from scipy import linalg

    mu1, sigma1 = _check_stats(mu1, sigma1, "frechet_distance (first)")
    mu2, sigma2 = _check_stats(mu2, sigma2, "frechet_distance (second)")
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        logging.warning("frechet_distance: singular product; adding %g to the covariance diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm has an imaginary component {max_imag:g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# --------------------------------------------------------------------------------------
# Reference statistics files
# --------------------------------------------------------------------------------------


def _numpy_core():
    """numpy's core package: ``numpy._core`` (numpy >= 2) or ``numpy.core`` (numpy 1.x)."""
    core = getattr(np, "_core", None)
    return core if core is not None and hasattr(core, "multiarray") else np.core


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A statistics pickle that names something other than numpy arrays and plain containers."""


class _ArrayClass:
    """Stands for ``numpy.ndarray`` in a pickle: only :func:`_reconstruct` accepts it (calling
    ``ndarray(shape)`` directly could allocate any amount of memory)."""

    def __new__(cls, *args, **kwargs):
        raise UnsafePickleError(f"refusing to call numpy.ndarray{args!r} (numpy pickles never do)")


def _reconstruct(subtype, shape, dtype):
    # numpy pickles an array as _reconstruct(ndarray, (0,), b"b") followed by its state, whose
    # bytes must then match the declared shape; anything else is not numpy's own output.
    if subtype is not _ArrayClass or not isinstance(shape, tuple) or shape != (0,):
        raise UnsafePickleError(f"refusing to reconstruct an array of {subtype!r} with shape {shape!r}")
    return _numpy_core().multiarray._reconstruct(np.ndarray, (0,), dtype)


def _latin1(text, encoding="latin1"):
    # protocol-2 pickles of numpy arrays store the bytes as _codecs.encode(str, "latin1")
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays/scalars and plain containers, and nothing else.

    The globals a numpy pickle names are mapped to fixed objects (never imported by the name the
    file gives): numpy 1.x writes ``numpy.core.multiarray``/``numpy.core.numeric``, numpy 2.x
    ``numpy._core.*``; both resolve to the installed numpy's functions."""

    def __init__(self, file):
        super().__init__(file)
        core = _numpy_core()
        allowed = {("numpy", "ndarray"): _ArrayClass, ("numpy", "dtype"): np.dtype,
                   ("collections", "OrderedDict"): collections.OrderedDict,
                   ("_codecs", "encode"): _latin1}
        for package in ("numpy.core", "numpy._core"):
            allowed[(f"{package}.multiarray", "_reconstruct")] = _reconstruct
            allowed[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
            allowed[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer
        self._allowed = allowed

    def find_class(self, module, name):
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        raise UnsafePickleError(f"refusing to unpickle global {module}.{name} (only numpy arrays are allowed)")


def _load_safe_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()


def _mu_sigma(obj) -> dict | None:
    """The dict holding ``mu``/``sigma`` in a statistics pickle: top level, or EDM2's
    ``{"num_images": N, "fid": {"mu", "sigma"}, "fd_dinov2": {...}}``."""
    if isinstance(obj, dict) and "mu" in obj and "sigma" in obj:
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("fid"), dict) and "mu" in obj["fid"] and "sigma" in obj["fid"]:
        return obj["fid"]
    return None


def load_reference_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads the Inception (mu, sigma) as float64 from

    * an ADM-style ``.npz`` (keys ``mu``, ``sigma``; other keys such as ``arr_0`` are ignored), or
    * an EDM2-style ``.pkl``: what EDM2's ``calculate_metrics.py ref`` writes (``img256.pkl``,
      ``img512.pkl``), ``pickle.dump(dict(num_images=N, fid=dict(mu=..., sigma=...),
      fd_dinov2=...))`` of numpy arrays, or a pickled dict with ``mu``/``sigma`` at the top;
      read with a numpy-only unpickler that executes nothing from the file.

    Raises ``FileNotFoundError``, ``KeyError`` (no mu/sigma) or ``ValueError`` (unreadable,
    unsafe or malformed content), each naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                keys = list(f.files)
                if "mu" not in keys or "sigma" not in keys:
                    raise KeyError(f"{path}: expected arrays 'mu' and 'sigma', found {keys}")
                mu, sigma = f["mu"], f["sigma"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    elif suffix == ".pkl":
        try:
            obj = _load_safe_pickle(path)
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                MemoryError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable statistics pickle ({type(e).__name__}: {e})") from None
        stats = _mu_sigma(obj)
        if stats is None:
            found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise KeyError(f"{path}: expected a dict with 'mu' and 'sigma' (or EDM2's 'fid': {{'mu', 'sigma'}}), "
                           f"found {found}")
        mu, sigma = stats["mu"], stats["sigma"]
    else:
        raise ValueError(f"reference statistics {path}: unsupported suffix {suffix!r} (expected .npz or .pkl)")
    for name, a in (("mu", mu), ("sigma", sigma)):
        if not isinstance(a, np.ndarray) or not (
            np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
        ):
            raise ValueError(f"{path}: {name} must be a numeric numpy array, got {type(a).__name__}")
    return _check_stats(mu, sigma, str(path))


def save_statistics(path: str | os.PathLike, mu, sigma, *, overwrite: bool = False) -> Path:
    """Writes ``mu``/``sigma`` (float64) to an ``.npz`` (the suffix is added if missing).

    Refuses to replace an existing file unless ``overwrite=True``. The file is written to a
    temporary name and renamed, so a reader never sees a partial file. Returns the path.
    """
    path = Path(path)
    if path.suffix.lower() != ".npz":
        path = path.with_name(path.name + ".npz")
    mu, sigma = _check_stats(mu, sigma, "save_statistics")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# --------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------


def list_image_files(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """Sorted PNG/JPEG files (case-insensitive suffix) in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no {'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} images in {folder}")
    return files


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def features_from_folder(
    folder: str | os.PathLike,
    extractor: Callable[[np.ndarray], np.ndarray],
    batch_size: int = 100,
    *,
    recursive: bool = False,
    max_images: int | None = None,
    log_every: int = 10,
) -> np.ndarray:
    """Inception features (N, 2048) of the images in ``folder`` (sorted by name).

    Images are read with PIL as RGB uint8, ``batch_size`` at a time, and must share one size
    within a batch. Progress is logged with absl every ``log_every`` batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    files = list_image_files(folder, recursive=recursive)
    if max_images is not None:
        files = files[:max_images]
    n_batches = math.ceil(len(files) / batch_size)
    logging.info("FID features: %d images in %s, %d batches of %d", len(files), folder, n_batches, batch_size)
    t0 = time.time()
    out = []
    for b in range(n_batches):
        paths = files[b * batch_size : (b + 1) * batch_size]
        imgs = [_read_image(p) for p in paths]
        shape = imgs[0].shape
        for p, im in zip(paths, imgs):
            if im.shape != shape:
                raise ValueError(f"image {p} has size {im.shape[:2]}, but {paths[0]} has {shape[:2]}; "
                                 "all images in a batch must share one size")
        out.append(np.asarray(extractor(np.stack(imgs)), dtype=np.float32))
        if (b + 1) % log_every == 0 or b + 1 == n_batches:
            logging.info("FID features: %d/%d images (%.1fs)", min((b + 1) * batch_size, len(files)), len(files),
                         time.time() - t0)
    return np.concatenate(out, axis=0)


def statistics_from_folder(
    folder: str | os.PathLike,
    extractor: Callable[[np.ndarray], np.ndarray],
    batch_size: int = 100,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the Inception features of a folder of PNG/JPEG images.

    See :func:`features_from_folder` for ``kwargs`` (``recursive``, ``max_images``, ``log_every``).
    """
    return compute_statistics(features_from_folder(folder, extractor, batch_size, **kwargs))

"""Turning samples into pictures: uint8 conversion, grids, PNG files, 2-D point plots."""
from __future__ import annotations

import math
import os

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """NHWC floats in [-1, 1] -> uint8 (rounded, clipped)."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def latents_to_rgb(latents: np.ndarray) -> np.ndarray:
    """A look at undecoded latents: first three channels, each rescaled to [-1, 1] over the batch.
    (Not an image of the sample: configure ``data.vae_path`` to decode latents to pixels.)"""
    x = np.asarray(latents, np.float32)[..., :3]
    lo = x.min(axis=(0, 1, 2), keepdims=True)
    hi = x.max(axis=(0, 1, 2), keepdims=True)
    return 2.0 * (x - lo) / np.maximum(hi - lo, 1e-6) - 1.0


def make_grid(images_u8: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image, row-major."""
    images_u8 = np.asarray(images_u8)
    if images_u8.ndim != 4:
        raise ValueError(f"make_grid needs NHWC images, got shape {images_u8.shape}")
    n, h, w, c = images_u8.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images_u8[i]
    return grid


def save_png(path: str, image_u8: np.ndarray, *, scale: int = 1) -> str:
    """Writes an HWC uint8 image (C = 1 or 3); ``scale`` enlarges small images (nearest)."""
    from PIL import Image

    img = np.asarray(image_u8)
    if scale > 1:
        img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    if img.shape[-1] == 1:
        img = img[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def scatter_png(path: str, points: dict[str, np.ndarray], *, labels: dict[str, np.ndarray] | None = None,
                title: str = "", lim: float | None = None) -> str:
    """Side-by-side 2-D scatter plots (one panel per entry), for vector data such as the mixture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(3.2 * len(points), 3.4), squeeze=False)
    for ax, (name, pts) in zip(axes[0], points.items()):
        pts = np.asarray(pts)
        c = None if labels is None or name not in labels else np.asarray(labels[name])
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c=c, cmap="tab10", alpha=0.6)
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal")
        if lim:
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

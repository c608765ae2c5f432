"""Metric writing with clu: log lines plus TensorBoard event files, without TensorFlow.

clu's own TensorBoard writer (``clu.metric_writers.SummaryWriter``) imports TensorFlow, and clu's
package ``__init__`` imports it eagerly. :func:`import_clu` therefore registers a placeholder for
that one module when TensorFlow is absent (using it raises a clear ImportError) so the rest of
clu (``LoggingWriter``, ``MultiWriter``, ``periodic_actions``) works. TensorBoard files come from
:class:`TensorboardXWriter`, a clu ``MetricWriter`` backed by the maintained ``tensorboardX``
package (pure Python, protobuf only).
"""
from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any, Mapping

import numpy as np


def import_clu():
    """Returns ``(metric_writers, periodic_actions)`` from clu, TensorFlow or not."""
    name = "clu.metric_writers.summary_writer"
    if name not in sys.modules and importlib.util.find_spec("tensorflow") is None:
        placeholder = types.ModuleType(name)

        class SummaryWriter:  # noqa: D401  (stands in for clu's TF-backed writer)
            def __init__(self, *args, **kwargs):
                raise ImportError("clu's SummaryWriter needs TensorFlow; tvm-jax writes TensorBoard files with "
                                  "tvm_jax.metric_writing.TensorboardXWriter instead")

        placeholder.SummaryWriter = SummaryWriter
        sys.modules[name] = placeholder
    from clu import metric_writers, periodic_actions

    return metric_writers, periodic_actions


metric_writers, periodic_actions = import_clu()


class TensorboardXWriter(metric_writers.MetricWriter):
    """clu ``MetricWriter`` writing TensorBoard event files through tensorboardX."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=logdir)

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata=None):
        for key, value in values.items():
            self._writer.add_scalar(key, float(np.asarray(value)), global_step=step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(np.asarray(value)), global_step=step)

    def write_images(self, step: int, images: Mapping[str, Any]):
        for key, value in images.items():
            value = np.asarray(value)
            if value.ndim == 4:  # clu passes batches of images; tensorboardX takes NHWC
                self._writer.add_images(key, value, global_step=step, dataformats="NHWC")
            else:
                self._writer.add_image(key, value, global_step=step, dataformats="HWC")

    def write_videos(self, step: int, videos: Mapping[str, Any]):
        for key, value in videos.items():
            self._writer.add_video(key, np.asarray(value)[None], global_step=step)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
        for key, value in audios.items():
            self._writer.add_audio(key, np.asarray(value), global_step=step, sample_rate=sample_rate)

    def write_texts(self, step: int, texts: Mapping[str, str]):
        for key, value in texts.items():
            self._writer.add_text(key, value, global_step=step)

    def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None):
        for key, value in arrays.items():
            self._writer.add_histogram(key, np.asarray(value), global_step=step)

    def write_hparams(self, hparams: Mapping[str, Any]):
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        self._writer.add_text("hparams", "\n".join(f"{k}: {v}" for k, v in sorted(flat.items())), global_step=0)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


def create_writer(logdir: str, *, tensorboard: bool = True, just_logging: bool = False):
    """Logging (absl) plus TensorBoard files under ``logdir``; only process 0 writes files."""
    import jax

    writers = [metric_writers.LoggingWriter()]
    if tensorboard and not just_logging and jax.process_index() == 0:
        writers.append(TensorboardXWriter(logdir))
    return metric_writers.MultiWriter(writers)

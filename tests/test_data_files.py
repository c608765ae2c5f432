"""Bad latent datasets (tvm_jax.data.records / pipeline) and grain's worker processes.

Each case writes its own bad input next to good shards: random or zero bytes named
``*.array_record``, a record header without ``label``/``shape``, a ``dataset.json`` without
``num_classes`` or not JSON at all, a NaN record in the middle of a shard. The errors are one
``ValueError`` line naming the file (and the record index within it) whether they are found by the
pre-flight (every shard opened, its first record decoded) or when the record is read, also inside
grain worker processes. Worker processes end with a killed parent.
"""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tvm_jax.config import base_config
from tvm_jax.data import pipeline, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (4, 4, 4)


def _record(mean, std, label, header=None) -> bytes:
    """Record bytes laid out as encode_record does, but without its checks (the bad records a
    broken or foreign writer could leave)."""
    head = json.dumps(header if header is not None else
                      {"shape": list(mean.shape), "dtype": "float32", "label": label}).encode()
    return b"".join([records.MAGIC, struct.pack("<I", len(head)), head, mean.astype(np.float32).tobytes(),
                     std.astype(np.float32).tobytes()])


def _good(i: int) -> bytes:
    return records.encode_record(np.full(SHAPE, float(i)), np.full(SHAPE, 0.5), i % 10)


def _dataset(directory, shards=None, meta=True) -> str:
    """Two shards of 10 good records each unless ``shards`` says otherwise (name -> records or bytes)."""
    os.makedirs(directory, exist_ok=True)
    shards = shards or {}
    for s in range(2):
        name = f"latents-{s:05d}-of-00002.array_record"
        content = shards.get(name, [_good(10 * s + i) for i in range(10)])
        if isinstance(content, bytes):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(content)
        else:
            records.write_shard(os.path.join(directory, name), content)
    if meta:
        records.write_metadata(str(directory), shape=list(SHAPE), num_classes=10, num_records=20, resolution=32,
                               raw_mean=[0.0] * 4, raw_std=[1.0] * 4)
    return str(directory)


def _config(path):
    c = base_config()
    c.data.path = path
    c.data.shape = SHAPE
    c.data.num_classes = 10
    c.data.raw_mean, c.data.raw_std = (0.0,) * 4, (1.0,) * 4
    return c


SECOND = "latents-00001-of-00002.array_record"


@pytest.mark.parametrize("content", [os.urandom(3000), bytes(3000), os.urandom(100_000), b""],
                         ids=["random", "zeros", "random-100k", "empty"])
def test_garbage_shard_is_named_by_the_preflight(tmp_path, content):
    path = _dataset(tmp_path / "ds", {SECOND: content})
    with pytest.raises(ValueError, match=rf"^{tmp_path}/ds/{SECOND}: not a readable ArrayRecord file \(") as e:
        pipeline.dataset_info(_config(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("missing", ["label", "shape"])
def test_record_header_without_a_field(tmp_path, missing):
    header = {"shape": list(SHAPE), "dtype": "float32", "label": 1}
    del header[missing]
    bad = _record(np.zeros(SHAPE), np.ones(SHAPE), 1, header)
    # first record of a shard: found by the pre-flight
    path = _dataset(tmp_path / "first", {SECOND: [bad] + [_good(i) for i in range(9)]})
    with pytest.raises(ValueError, match=rf"{SECOND} record 0: the record header has no '{missing}'"):
        pipeline.dataset_info(_config(path))
    # a later record: found when it is read
    path = _dataset(tmp_path / "later", {SECOND: [_good(i) for i in range(6)] + [bad] + [_good(i) for i in range(3)]})
    source = pipeline.LatentRecordSource(records.shard_paths(path), SHAPE, 10)
    with pytest.raises(ValueError, match=rf"{SECOND} record 6: the record header has no '{missing}'"):
        source[16]


def test_dataset_json_without_num_classes_or_not_json(tmp_path):
    path = _dataset(tmp_path / "ds", meta=False)
    meta_path = os.path.join(path, records.METADATA_FILE)
    with open(meta_path, "w") as f:
        json.dump({"format": records.FORMAT, "shape": list(SHAPE)}, f)
    with pytest.raises(ValueError, match=rf"^{meta_path}: no 'num_classes' field"):
        pipeline.dataset_info(_config(path))
    with open(meta_path, "w") as f:
        f.write('{"format": "tvm-jax-latents/1", "shape": [4, 4, 4],')  # cut short
    with pytest.raises(ValueError, match=rf"^{meta_path}: not a readable JSON file"):
        pipeline.dataset_info(_config(path))
    with open(meta_path, "wb") as f:
        f.write(os.urandom(64))
    with pytest.raises(ValueError, match=rf"^{meta_path}: not a readable JSON file"):
        pipeline.dataset_info(_config(path))


def test_nan_record_is_refused_with_file_and_index(tmp_path):
    mean = np.zeros(SHAPE)
    mean[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):  # the writer refuses it...
        records.encode_record(mean, np.ones(SHAPE), 3)
    bad = _record(mean, np.ones(SHAPE), 3)  # ...so does the reader
    path = _dataset(tmp_path / "ds", {SECOND: [_good(i) for i in range(3)] + [bad] + [_good(i) for i in range(6)]})
    pipeline.dataset_info(_config(path))  # the first records are fine: the pre-flight passes
    loader = pipeline.make_loader(_config(path), global_batch_size=4, seed=0, worker_count=0)
    it = iter(loader)
    with pytest.raises(ValueError, match=rf"^{tmp_path}/ds/{SECOND} record 3: mean/std contain NaN or inf"):
        for _ in range(10):  # 20 records, batches of 4: every record within two epochs
            next(it)


def test_bad_shard_from_the_command_line(tmp_path):
    """``python -m tvm_jax.main`` on a dataset with a shard of random bytes: exit 2, one line naming
    the file, before anything is compiled; nothing written in the workdir."""
    path = _dataset(tmp_path / "ds", {SECOND: os.urandom(5000)})
    workdir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "tvm_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
                          "--config.data.source=latents", f"--config.data.path={path}", "--config.data.shape=4,4,4",
                          "--config.model.patch_size=2"],
                         cwd=REPO, capture_output=True, text=True, timeout=180)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {path}/{SECOND}: not a readable ArrayRecord file "
                      "(ArrayRecord file should be at least 64KB big)"], res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not workdir.exists()


_WORKER_SCRIPT = """
import sys, time
from absl import flags
from tvm_jax.config import base_config
from tvm_jax.data import pipeline

if __name__ == "__main__":
    flags.FLAGS(sys.argv[:1])  # grain reads its absl flags
    c = base_config()
    c.data.path, c.data.shape, c.data.num_classes = sys.argv[1], (4, 4, 4), 10
    c.data.raw_mean, c.data.raw_std = (0.0,) * 4, (1.0,) * 4
    it = iter(pipeline.make_loader(c, global_batch_size=4, seed=0, worker_count=2))
    try:
        for _ in range(10):
            next(it)
    except ValueError as e:
        print("ValueError:", e, flush=True)
    time.sleep(600)  # the iterator (and its worker processes) stays open
"""


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(name))
    return out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
def test_worker_errors_and_worker_lifetime(tmp_path):
    """With ``data.worker_count=2``: (a) a NaN record read inside a grain worker process still
    reaches the main process as the ValueError naming file and record; (b) after ``kill -9`` of the
    main process its workers (and multiprocessing's helper) are gone within seconds."""
    script = tmp_path / "loader.py"
    script.write_text(textwrap.dedent(_WORKER_SCRIPT))
    mean = np.zeros(SHAPE)
    mean[0, 0, 0] = np.inf
    bad = _dataset(tmp_path / "bad", {SECOND: [_good(i) for i in range(5)] + [_record(mean, np.ones(SHAPE), 1)] +
                                      [_good(i) for i in range(4)]})
    proc = subprocess.Popen([sys.executable, str(script), bad], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=dict(os.environ, PYTHONPATH=REPO))
    left = []
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith(f"ValueError: {bad}/{SECOND} record 5: mean/std contain NaN or inf"), line
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 20
        while any(_running(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        left = [w for w in workers if _running(w)]
    finally:
        if proc.poll() is None:
            proc.kill()
    for w in left:  # do not leave them behind even when the test fails
        os.kill(w, signal.SIGKILL)
    assert not left, f"worker processes {left} outlived their killed parent"

"""The training loop end to end (tvm_jax.trainer and the ``python -m tvm_jax.main`` CLI).

Exact resume (bitwise: an MLP on the mixture, a tiny digits DiT, a DiT on latent records across
an epoch boundary), SIGTERM -> checkpoint -> resume,
corrupt and mismatched checkpoints, pre-flight errors before any compilation, TensorBoard/PNG/log
outputs, the sample/export CLI, and a synthetic ImageNet-like latent dataset through the grain
pipeline. Models are shrunk to seconds of compilation; most runs call ``trainer.train`` in this
process and share their workdirs through module-scoped fixtures, the CLI tests run subprocesses
(with the suite's 4 virtual CPU devices, inherited through XLA_FLAGS from conftest.py).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import logging as std_logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import logging

from tvm_jax import trainer
from tvm_jax.checkpointing import CheckpointError
from tvm_jax.config import load_config_file
from tvm_jax.data import pipeline, records
from weight_fixtures import write_vae_folder

# After a failed restore of a corrupt checkpoint, tensorstore completes its outstanding reads on
# an asyncio loop orbax has already closed ("Event loop is closed", reported from a background
# thread whenever it happens, possibly during a later test). Harmless here; not our code.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

# CLI overrides that shrink configs/gmm.py and configs/digits.py; the in-process configs below
# apply the same values, so either side can resume the other's checkpoints.
GMM_OVERRIDES = {"model.mlp_width": 32, "model.mlp_depth": 2, "train.global_batch_size": 16,
                 "train.log_every": 2, "train.checkpoint_every": 1000, "train.sample_every": 1000,
                 "sample.num_images": 32}
DIGITS_OVERRIDES = {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "model.patch_size": 4,
                    "model.attention_impl": "xla", "train.global_batch_size": 8, "train.log_every": 1,
                    "train.checkpoint_every": 1000, "train.sample_every": 1000, "sample.num_images": 4,
                    "sample.steps": (1,)}


def _config(name: str, overrides: dict, **more):
    c = load_config_file(os.path.join(CONFIGS, f"{name}.py"))
    for key, value in {**overrides, **more}.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _gmm(num_steps: int, **more):
    return _config("gmm", GMM_OVERRIDES, **{"train.num_steps": num_steps, **more})


def _digits(num_steps: int, **more):
    return _config("digits", DIGITS_OVERRIDES, **{"train.num_steps": num_steps, **more})


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this module (and its subprocesses): every run here
    compiles the same few programs again, which then costs a cache read instead of seconds of
    XLA. The previous settings are restored afterwards."""
    try:
        from jax._src import compilation_cache as cc

        cc.reset_cache  # noqa: B018
    except (ImportError, AttributeError):  # private API moved: run without the cache (slower, same results)
        yield None
        return
    path = str(tmp_path_factory.mktemp("jax_cache"))
    old = {name: getattr(jax.config, name) for name in ("jax_compilation_cache_dir",
                                                         "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    yield path
    for name, value in old.items():
        jax.config.update(name, value)
    cc.reset_cache()


def _subprocess_env(cache_dir) -> dict[str, str]:
    env = dict(os.environ)  # XLA_FLAGS from conftest.py: 4 CPU devices, unoptimised
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _cli_flags(overrides: dict) -> list[str]:
    def fmt(v):
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

    return [f"--config.{k}={fmt(v)}" for k, v in overrides.items()]


class _Log(std_logging.Handler):
    """Collects absl log messages (INFO and up) while active."""

    def __init__(self):
        super().__init__(std_logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.contextmanager
def _capture_log():
    log = _Log()
    logger = std_logging.getLogger("absl")
    verbosity, level = logging.get_verbosity(), logger.level
    logging.set_verbosity(logging.INFO)
    logger.addHandler(log)
    try:
        yield log
    finally:
        logger.removeHandler(log)
        logging.set_verbosity(verbosity)
        logger.setLevel(level)  # set_verbosity(-1) sets WARNING on a logger whose level was unset


def _train(config, workdir):
    with _capture_log() as log:
        state = trainer.train(config, str(workdir))
    return jax.device_get(state), log.text


def _assert_states_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _snapshot(directory) -> dict[str, str]:
    """relative path -> content hash ("dir" for directories) of everything under ``directory``."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), directory)] = "dir"
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, directory)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _main(*args, timeout=300):
    """``python -m tvm_jax.main ARGS`` (sharing this module's compilation cache)."""
    return subprocess.run([sys.executable, "-m", "tvm_jax.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=_subprocess_env(jax.config.jax_compilation_cache_dir))


def _checkpoint_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


# ----------------------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def gmm_runs(tmp_path_factory):
    """6 steps in one run (all outputs on) and 3 + restart + 3 in another."""
    root = tmp_path_factory.mktemp("gmm")
    full, resumed = root / "full", root / "resumed"
    state_full, log_full = _train(_gmm(6), full)
    _, log_first = _train(_gmm(3, **{"sample.steps": (1,)}), resumed)
    state_resumed, log_resumed = _train(_gmm(6, **{"sample.steps": (1,)}), resumed)
    return dict(full=full, resumed=resumed, state_full=state_full, state_resumed=state_resumed, log_full=log_full,
                log_first=log_first, log_resumed=log_resumed)


def test_gmm_resume_is_bitwise_exact(gmm_runs):
    r = gmm_runs
    assert "Training from step 0 to 3" in r["log_first"]
    assert "Training from step 3 to 6" in r["log_resumed"], "the second run must resume, not start over"
    assert int(r["state_full"].step) == int(r["state_resumed"].step) == 6
    # params, optimiser moments and count, both EMAs, step, RNG, skip counters
    _assert_states_equal(r["state_full"], r["state_resumed"])
    assert _checkpoint_steps(r["resumed"]) == [3, 6] and _checkpoint_steps(r["full"]) == [6]
    # the data position is the step: a checkpoint holds the state and the run's settings only
    items = {n for n in os.listdir(os.path.join(r["resumed"], "checkpoints", "3"))
             if os.path.isdir(os.path.join(r["resumed"], "checkpoints", "3", n))}
    assert items == {"meta", "state"}


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    full, resumed = root / "full", root / "resumed"
    state_full, _ = _train(_digits(4), full)
    _train(_digits(2), resumed)
    state_resumed, log_resumed = _train(_digits(4), resumed)
    return dict(full=full, resumed=resumed, state_full=state_full, state_resumed=state_resumed,
                log_resumed=log_resumed)


def test_digits_dit_resume_is_bitwise_exact(digits_runs):
    r = digits_runs
    assert "Training from step 2 to 4" in r["log_resumed"]
    assert int(r["state_resumed"].step) == 4
    _assert_states_equal(r["state_full"], r["state_resumed"])


# ----------------------------------------------------------------------------- outputs


def _read_events(logdir) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    """(scalars tag -> [(step, value)], images tag -> [step]) from tensorboardX event files."""
    from tensorboardX.proto import event_pb2

    scalars, images = {}, {}
    files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
    assert files, f"no TensorBoard event files in {logdir}"
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("image"):
                    images.setdefault(v.tag, []).append(event.step)
                elif v.HasField("simple_value"):
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
                elif v.HasField("tensor") and v.tensor.float_val:
                    scalars.setdefault(v.tag, []).append((event.step, v.tensor.float_val[0]))
    return scalars, images


def test_training_writes_tensorboard_samples_and_progress_log(gmm_runs):
    workdir, log = gmm_runs["full"], gmm_runs["log_full"]
    scalars, images = _read_events(os.path.join(workdir, "tensorboard"))
    for tag in ("train/loss", "train/terminal", "train/fm", "train/grad_norm", "train/skipped",
                "train/skipped_total", "train/images_per_sec", "train/param_norm"):
        assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"
        assert [s for s, _ in scalars[tag]] == [2, 4, 6], tag
        assert all(np.isfinite(v) for _, v in scalars[tag]), tag
    assert all(v > 0 for _, v in scalars["train/images_per_sec"])
    assert all(v == 0 for _, v in scalars["train/skipped_total"])
    # logged outside the step (tvm_jax.training.parameter_norm): the last one is the final parameters' norm
    final_norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(p, np.float64)))
                                   for p in jax.tree.leaves(gmm_runs["state_full"].params))))
    assert scalars["train/param_norm"][-1][1] == pytest.approx(final_norm, rel=1e-5)
    for n in (1, 2, 4):
        png = os.path.join(workdir, "samples", f"step00000006_{n}step.png")
        assert os.path.getsize(png) > 1000, png
        assert images.get(f"samples/{n}step") == [6]
    # the terminal and FM losses per quarter of t (as the official loop bins them), where a quarter had samples
    for step in (2, 4, 6):
        for name in ("terminal", "fm"):
            bins = [tag for tag in scalars if tag.startswith(f"train/{name}_t")
                    and step in [s for s, _ in scalars[tag]]]
            assert bins and set(bins) <= {f"train/{name}_t{q}" for q in ("0.00-0.25", "0.25-0.50", "0.50-0.75",
                                                                         "0.75-1.00")}, (step, bins)
            assert all(np.isfinite(v) for tag in bins for s, v in scalars[tag] if s == step)
    assert not any(tag.endswith("_count") for tag in scalars)
    progress = [line for line in log.splitlines() if line.startswith("step ")]
    assert len(progress) == 3, log
    quarter = r"(\S+|-)/(\S+|-)/(\S+|-)/(\S+|-)"
    assert re.fullmatch(r"step 6/6  loss \S+  grad_norm \S+  skipped 0  \S+ img/s  ETA 0m00s  "
                        rf"terminal by t quarter {quarter}  fm by t quarter {quarter}", progress[-1]), progress
    assert re.search(r"step 2/6 .* ETA \d+m\d\ds", progress[0]), progress


# ----------------------------------------------------------------------------- corrupt / mismatched


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def _garble(path):
    with open(path, "wb") as f:
        f.write(b"\x00not a checkpoint\xff" * 3)


CORRUPTIONS = {
    "truncated array data": lambda step_dir: [_truncate(p) for p in glob.glob(f"{step_dir}/state/**/d/*",
                                                                              recursive=True)],
    "garbled state manifest": lambda step_dir: [_garble(p) for p in glob.glob(f"{step_dir}/state/**/manifest.ocdbt",
                                                                             recursive=True)],
    "garbled run metadata": lambda step_dir: _garble(f"{step_dir}/meta/metadata"),
    "garbled state metadata": lambda step_dir: _garble(f"{step_dir}/state/_METADATA"),
    "missing state": lambda step_dir: shutil.rmtree(f"{step_dir}/state"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_is_reported_and_left_untouched(gmm_runs, tmp_path, corruption):
    workdir = tmp_path / "run"
    shutil.copytree(gmm_runs["resumed"], workdir)  # checkpoints 3 and 6
    step_dir = os.path.join(workdir, "checkpoints", "6")
    CORRUPTIONS[corruption](step_dir)
    before = _snapshot(workdir / "checkpoints")
    with pytest.raises(CheckpointError) as err:
        trainer.train(_gmm(8), str(workdir))
    message = str(err.value)
    assert step_dir in message and ("corrupt" in message or "unreadable" in message), message
    assert _snapshot(workdir / "checkpoints") == before
    assert _checkpoint_steps(workdir) == [3, 6]


def test_checkpoint_of_another_model_config_is_refused_and_left_untouched(gmm_runs, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(gmm_runs["full"], workdir)
    before = _snapshot(workdir)
    with pytest.raises(CheckpointError) as err:
        trainer.train(_gmm(8, **{"model.mlp_width": 48}), str(workdir))
    message = str(err.value)
    assert os.path.join(str(workdir), "checkpoints", "6") in message, message
    assert "model.mlp_width: checkpoint 32, config 48" in message, message
    assert _snapshot(workdir) == before

    # the CLI: a one-line error and exit status 2, nothing written
    res = _main("--config=configs/gmm.py", f"--workdir={workdir}", *_cli_flags(GMM_OVERRIDES),
                "--config.train.num_steps=8", "--config.optimizer.lr=0.002")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "error: checkpoint" in res.stderr and "optimizer.lr: checkpoint 0.001, config 0.002" in res.stderr
    assert "Traceback" not in res.stderr
    assert _snapshot(workdir) == before


# ----------------------------------------------------------------------------- pre-flight


def _write_latents(directory, n: int = 40, shape=(8, 8, 4), num_classes: int = 10, std: float = 0.25,
                   shards: int = 2):
    """Record i has mean == i everywhere (so a sample identifies its record), std ``std``, label i % 10."""
    os.makedirs(directory, exist_ok=True)
    recs = [records.encode_record(np.full(shape, i, np.float32), np.full(shape, std, np.float32), i % num_classes)
            for i in range(n)]
    per = -(-n // shards)
    for s in range(shards):
        records.write_shard(os.path.join(directory, f"train-{s:05d}-of-{shards:05d}.array_record"),
                            recs[s * per:(s + 1) * per])
    records.write_metadata(str(directory), shape=list(shape), num_classes=num_classes, num_records=n,
                           resolution=8 * shape[0], raw_mean=[0.0] * shape[-1], raw_std=[1.0] * shape[-1])
    return str(directory)


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    return _write_latents(tmp_path_factory.mktemp("latents") / "in8")


def _latent_config(path, num_steps: int = 3, **more):
    c = _config("digits", DIGITS_OVERRIDES, **{
        "data.source": "latents", "data.path": path, "data.shape": (8, 8, 4), "data.num_classes": 10,
        "data.raw_mean": (0.0,) * 4, "data.raw_std": (1.0,) * 4, "model.patch_size": 2, "train.num_steps": num_steps,
        **more})
    return c


@pytest.fixture
def no_compilation(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("compilation started before the pre-flight error")

    monkeypatch.setattr(jax, "jit", fail)


def _preflight_cases(latent_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    return {
        "no data path": (_latent_config(""), r"data\.path: no dataset given"),
        "missing data path": (_latent_config(str(tmp_path / "nowhere")), r"data\.path: .*nowhere.* does not exist"),
        "latent shape": (_latent_config(latent_dir, **{"data.shape": (16, 16, 4)}),
                         r"data\.shape: .*\(8, 8, 4\).*\(16, 16, 4\)"),
        "label count": (_latent_config(latent_dir, **{"data.num_classes": 12}),
                        r"data\.num_classes: the config says 12 classes but the dataset .* has 10"),
        "batch vs devices": (_gmm(4, **{"train.global_batch_size": 6}),
                             r"train\.global_batch_size 6 is not divisible by the 4 devices"),
        "unknown source": (_gmm(4, **{"data.source": "imagenet"}), r"data\.source: unknown data source 'imagenet'"),
        "unknown model type": (_gmm(4, **{"model.type": "unet"}), r"model\.type: unknown model type 'unet'"),
        "unknown model size": (_digits(4, **{"model.size": "XXL/2"}), r"model\.size: unknown model size"),
        "unwritable workdir": (_gmm(4), r"--workdir .*a_file/run is not writable"),
        "micro-batch size": (_gmm(4, **{"train.microbatch_size": 3}),
                             r"train\.microbatch_size: 3 does not divide the per-device batch 4 "
                             r"\(train\.global_batch_size 16 over 4 devices\)"),
        "init_from not a model": (_digits(4, **{"train.init_from": str(tmp_path)}),
                                  r"train\.init_from: .* is not an exported tvm-jax model"),
    }


PREFLIGHT = ["no data path", "missing data path", "latent shape", "label count", "batch vs devices",
             "unknown source", "unknown model type", "unknown model size", "unwritable workdir", "micro-batch size",
             "init_from not a model"]


@pytest.mark.parametrize("case", PREFLIGHT)
def test_preflight_errors_come_before_compilation(case, latent_dir, tmp_path, no_compilation):
    config, pattern = _preflight_cases(latent_dir, tmp_path)[case]
    workdir = tmp_path / ("a_file/run" if case == "unwritable workdir" else "run")
    t0 = time.time()
    with pytest.raises((ValueError, FileNotFoundError), match=pattern):
        trainer.train(config, str(workdir))
    assert time.time() - t0 < 10
    assert not os.path.exists(workdir) or case == "unwritable workdir"


def test_read_only_workdir_is_a_preflight_error(tmp_path, no_compilation):
    if os.geteuid() == 0:
        pytest.skip("root can write into read-only directories (the a-file-in-the-path case covers this)")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=r"--workdir .*ro/run is not writable"):
            trainer.train(_gmm(4), str(parent / "run"))
        assert not os.path.exists(parent / "run")
    finally:
        parent.chmod(0o755)


def test_unknown_config_key_on_the_command_line(tmp_path):
    res = _main("--config=configs/gmm.py", f"--workdir={tmp_path}/w", "--config.train.num_stepz=5", timeout=120)
    assert res.returncode == 2
    assert 'error: --config.train.num_stepz: the config has no field \'num_stepz\'; Did you mean "num_steps"' \
        in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not os.path.exists(tmp_path / "w")


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_saves_a_checkpoint_and_training_resumes_from_it(tmp_path, compilation_cache):
    workdir = tmp_path / "run"
    log_path = tmp_path / "train.log"
    overrides = {**GMM_OVERRIDES, "train.log_every": 1, "train.num_steps": 1_000_000}
    cmd = [sys.executable, "-m", "tvm_jax.main", "--config=configs/gmm.py", f"--workdir={workdir}",
           *_cli_flags(overrides)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=_subprocess_env(compilation_cache))
    try:
        deadline = time.time() + 180
        while "step 5/1000000" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "training never logged step 5"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert rc == 128 + signal.SIGTERM, text[-3000:]  # documented: 128 + the signal number
    stopped = re.search(r"Stopped by signal 15 at step (\d+); checkpoint saved", text)
    assert stopped, text[-3000:]
    step = int(stopped.group(1))
    assert step >= 5
    assert _checkpoint_steps(workdir) == [step]
    assert os.path.exists(workdir / "checkpoints" / str(step) / "state" / "commit_success.txt")

    # restart (in this process: a different process from the one that saved) for two more steps
    state, log = _train(_gmm(step + 2, **{"train.log_every": 1, "sample.steps": (1,)}), workdir)
    assert f"Training from step {step} to {step + 2}" in log
    assert int(state.step) == step + 2
    assert _checkpoint_steps(workdir) == [step, step + 2]


# ----------------------------------------------------------------------------- sample / export CLI




def test_sample_and_export_cli(digits_runs, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(digits_runs["full"], workdir)
    run_flags = ["--config=configs/digits.py", f"--workdir={workdir}", *_cli_flags(DIGITS_OVERRIDES)]
    sample_flags = ["--steps=1,2", "--classes=1,2,3", "--num=6", "--seed=0"]
    res = _main("--mode=sample", *run_flags, *sample_flags)
    assert res.returncode == 0, res.stderr[-3000:]
    out = workdir / "sampled"
    names = sorted(os.listdir(out))
    assert names == ["samples_1step.npz", "samples_1step.png", "samples_2step.npz", "samples_2step.png"], names
    with np.load(out / "samples_1step.npz") as z:
        assert z["samples"].shape == (6, 8, 8, 1) and np.all(np.isfinite(z["samples"]))
        np.testing.assert_array_equal(z["labels"], [1, 2, 3, 1, 2, 3])
        from_workdir = z["samples"]
    before = _snapshot(out)

    again = _main("--mode=sample", *run_flags, *sample_flags)
    assert again.returncode == 2
    assert "exists" in again.stderr and "--overwrite" in again.stderr, again.stderr[-3000:]
    assert _snapshot(out) == before

    # an output directory that cannot be made (a file in its path) is refused before sampling
    (tmp_path / "a_file").write_text("x")
    bad = _main("--mode=sample", *run_flags, *sample_flags, f"--out={tmp_path / 'a_file' / 'out'}")
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert bad.stderr.strip().splitlines()[-1] == (f"error: --out {tmp_path / 'a_file' / 'out'} is not writable: "
                                                   "Not a directory"), bad.stderr[-3000:]
    assert "Sampling" not in bad.stderr  # refused before the model was loaded and sampled

    exported = tmp_path / "exported"
    res = _main("--mode=export", *run_flags, f"--out={exported}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.isfile(exported / "model_config.json")

    res = _main("--mode=sample", f"--checkpoint={exported}", *sample_flags)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(exported / "sampled" / "samples_1step.npz") as z:
        np.testing.assert_array_equal(z["labels"], [1, 2, 3, 1, 2, 3])
        np.testing.assert_allclose(z["samples"], from_workdir, rtol=1e-5, atol=1e-5)
    assert os.path.isfile(exported / "sampled" / "samples_2step.png")


# ----------------------------------------------------------------------------- latents


def test_in_memory_sources_have_a_stable_repr():
    """grain refuses to restore an iterator whose ``repr(data_source)`` changed, so it must not
    hold the object's address (a resume in a new process would fail) but must tell data apart."""
    x, y = pipeline.load_digits(1)
    a, b = pipeline.ArraySource(x, y), pipeline.ArraySource(x.copy(), y.copy())
    assert repr(a) == repr(b) and " at 0x" not in repr(a) and "num_records=1797" in repr(a)
    assert repr(pipeline.ArraySource(x, np.roll(y, 1))) != repr(a)
    assert repr(pipeline._IndexSource(7)) == repr(pipeline._IndexSource(7)) != repr(pipeline._IndexSource(8))


def _record_ids(x: np.ndarray) -> np.ndarray:
    """Record i has mean i (raw_mean 0, raw_std 1, final_std 1: the normalisation is the identity)."""
    ids = x.reshape(len(x), -1).mean(axis=1)
    np.testing.assert_allclose(ids, np.round(ids), atol=0.1)
    return np.round(ids).astype(int)


def test_latent_pipeline_draws_fresh_noise_each_epoch_reproducibly(latent_dir):
    config = _latent_config(latent_dir)
    assert pipeline.dataset_info(config).num_records == 40

    def epochs(loader_or_iter, n_batches=10):
        it = iter(loader_or_iter)
        return [next(it) for _ in range(n_batches)]

    batches = epochs(pipeline.make_loader(config, global_batch_size=8, seed=0))  # 2 epochs of 5 batches
    ids = [_record_ids(b["x"]) for b in batches]
    epoch1, epoch2 = np.concatenate(ids[:5]), np.concatenate(ids[5:])
    assert sorted(epoch1) == sorted(epoch2) == list(range(40))  # every record once per epoch
    assert not np.array_equal(epoch1, epoch2)  # reshuffled
    x1 = {i: x for b, bi in zip(batches[:5], ids[:5]) for i, x in zip(bi, b["x"])}
    x2 = {i: x for b, bi in zip(batches[5:], ids[5:]) for i, x in zip(bi, b["x"])}
    for i in range(40):
        assert not np.allclose(x1[i], x2[i]), f"record {i}: the same noise in both epochs"
        assert 0.15 < float(np.std(x1[i] - i)) < 0.35  # std 0.25 noise around the mean
    for b, bi in zip(batches, ids):
        np.testing.assert_array_equal(b["label"], bi % 10)

    again = epochs(pipeline.make_loader(config, global_batch_size=8, seed=0))
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = epochs(pipeline.make_loader(config, global_batch_size=8, seed=1), 1)
    assert not np.array_equal(other[0]["x"], batches[0]["x"])

    # the stream starts at any step (the data position of a run is its step), across the epoch
    # boundary, and decoding in worker processes gives the same batches
    resumed = iter(pipeline.make_loader(config, global_batch_size=8, seed=0, start_step=4))
    for b in batches[4:8]:
        np.testing.assert_array_equal(next(resumed)["x"], b["x"])
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; the CLI parses them
        flags.FLAGS.mark_as_parsed()
    workers = iter(pipeline.make_loader(config, global_batch_size=8, seed=0, start_step=3, worker_count=2))
    for b in batches[3:7]:
        np.testing.assert_array_equal(next(workers)["x"], b["x"])
    workers.close()


@pytest.fixture(scope="module")
def latent_runs(latent_dir, tmp_path_factory):
    """A DiT on the latent records: 8 steps (5 batches per epoch) in one run, and 4 + restart + 4."""
    root = tmp_path_factory.mktemp("latent_runs")
    full, resumed = root / "full", root / "resumed"
    state_full, log_full = _train(_latent_config(latent_dir, num_steps=8), full)
    _train(_latent_config(latent_dir, num_steps=4), resumed)
    state_resumed, log_resumed = _train(_latent_config(latent_dir, num_steps=8), resumed)
    return dict(full=full, resumed=resumed, state_full=state_full, state_resumed=state_resumed, log_full=log_full,
                log_resumed=log_resumed)


def test_dit_trains_on_latent_records(latent_runs):
    state, log, workdir = latent_runs["state_full"], latent_runs["log_full"], latent_runs["full"]
    assert int(state.step) == 8 and int(state.skipped) == 0
    assert "40 latent records in 2 shards" in log
    progress = [line for line in log.splitlines() if line.startswith("step ")]
    assert len(progress) == 8 and all("nan" not in line for line in progress), progress
    assert _checkpoint_steps(workdir) == [8]
    assert os.path.getsize(workdir / "samples" / "step00000008_1step.png") > 100


def test_latent_dit_resume_across_an_epoch_is_bitwise_exact(latent_runs):
    r = latent_runs
    assert "Training from step 4 to 8" in r["log_resumed"]
    _assert_states_equal(r["state_full"], r["state_resumed"])


# ----------------------------------------------------------------------------- VAE-decoded sample grids

def test_render_samples_decodes_latents_when_given_a_decoder(tmp_path):
    from PIL import Image

    c = _latent_config("unused")
    latents = np.random.default_rng(0).standard_normal((4, 8, 8, 4)).astype(np.float32)
    seen = []

    def decode(z):
        seen.append(z.shape)
        return np.full((z.shape[0], 16, 16, 3), 0.5, np.float32)  # a flat colour: 191 after to_uint8

    grid = trainer.render_samples(c, latents, np.arange(4), str(tmp_path / "g.png"), decode=decode)
    assert seen == [(4, 8, 8, 4)]
    png = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    assert grid.shape[-1] == 3 and 191 in png and set(np.unique(png)) <= {0, 191, 255}
    without = trainer.render_samples(c, latents, np.arange(4), str(tmp_path / "l.png"))
    assert not np.array_equal(without, grid)


def test_latent_run_with_a_vae_writes_decoded_grids(latent_dir, tmp_path):
    vae = write_vae_folder(tmp_path / "vae")
    c = _latent_config(latent_dir, num_steps=1, **{"data.vae_path": str(vae), "train.sample_every": 1})
    _, log = _train(c, tmp_path / "run")
    assert "decoded to pixels with the VAE" in log
    assert os.path.getsize(tmp_path / "run" / "samples" / "step00000001_1step.png") > 100


def test_missing_vae_folder_is_a_preflight_error(latent_dir, tmp_path, no_compilation):
    c = _latent_config(latent_dir, **{"data.vae_path": str(tmp_path / "no_vae")})
    with pytest.raises(ValueError, match=r"data\.vae_path: .*no_vae.*config\.json"):
        trainer.train(c, str(tmp_path / "run"))


# ----------------------------------------------------------------------------- gradient accumulation


def test_resume_with_another_microbatch_size_continues_the_same_run(tmp_path):
    """4 steps over the whole per-device batch (4 of the global 16 on each of 4 devices) equal 2
    steps in micro-batches of 1, stopped, and 2 more in micro-batches of 2 (float rounding only:
    the per-example randomness is keyed by the example's index in the global batch)."""
    tight = {"optimizer.eps": 1e-3, "sample.steps": (1,)}  # see tests/test_accumulation.py for eps
    full, log_full = _train(_gmm(4, **tight), tmp_path / "full")
    _, log_first = _train(_gmm(2, **tight, **{"train.microbatch_size": 1}), tmp_path / "resumed")
    resumed, log_resumed = _train(_gmm(4, **tight, **{"train.microbatch_size": 2}), tmp_path / "resumed")
    assert "Micro-batch size 4 per device (the whole per-device batch" in log_full
    assert "Micro-batch size 1 per device (train.microbatch_size)" in log_first
    assert "Micro-batch size 2 per device (train.microbatch_size)" in log_resumed
    assert "Training from step 2 to 4" in log_resumed
    assert int(resumed.step) == int(full.step) == 4
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(full)[0], jax.tree.leaves(resumed)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- out of memory

# XLA's allocator error as jaxlib raises it when a step's buffers do not fit the device: the
# class jax.errors.JaxRuntimeError (jaxlib's XlaRuntimeError before the rename) with a message
# "RESOURCE_EXHAUSTED: Out of memory while trying to allocate N bytes." followed by XLA's
# buffer-assignment report; the exact text is in the tracebacks quoted in jax-ml/jax#13428
# (GPU, BFC allocator) and google-deepmind/jaxline#11.
_OOM_DRIVER = """
import dataclasses, sys
import jax
from absl import app
from tvm_jax import generate, main, trainer

MESSAGE = ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1165282566144 bytes.\\n"
           "BufferAssignment OOM Debugging.\\nBufferAssignment stats:\\n"
           "             parameter allocation:    2.50GiB\\n"
           "              constant allocation:         0B\\n"
           "        maybe_live_out allocation:    2.50GiB\\n"
           "     preallocated temp allocation:    1.06TiB\\n")

def out_of_memory(*args, **kwargs):
    raise jax.errors.JaxRuntimeError(MESSAGE)

real_compile = trainer.compile_train_step
def compile_train_step(*args, **kwargs):  # the step compiles, its first execution runs out of memory
    return dataclasses.replace(real_compile(*args, **kwargs), compiled=out_of_memory)

trainer.compile_train_step = compile_train_step
generate.sample = out_of_memory
sys.argv = ["tvm_jax.main", *sys.argv[1:]]
app.run(main.main, flags_parser=main._parse_flags)
"""


def _main_with_oom(*args):
    return subprocess.run([sys.executable, "-c", _OOM_DRIVER, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=_subprocess_env(jax.config.jax_compilation_cache_dir))


def test_out_of_memory_is_one_line_and_exit_status_2(gmm_runs, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(gmm_runs["full"], workdir)  # a checkpoint at step 6
    before = _snapshot(workdir / "checkpoints")
    res = _main_with_oom("--config=configs/gmm.py", f"--workdir={workdir}", *_cli_flags(GMM_OVERRIDES),
                         "--config.train.num_steps=8")
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert errors[0].startswith("error: out of memory on the device (RESOURCE_EXHAUSTED: Out of memory while trying "
                                "to allocate 1165282566144 bytes.); lower train.microbatch_size"), errors
    for setting in ("mesh.fsdp", "model.remat"):
        assert setting in errors[0]
    assert "Traceback" not in res.stderr and "BufferAssignment" not in res.stderr
    assert _snapshot(workdir / "checkpoints") == before

    res = _main_with_oom("--mode=sample", "--config=configs/gmm.py", f"--workdir={workdir}",
                         *_cli_flags(GMM_OVERRIDES), "--num=8")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "error: out of memory on the device" in res.stderr and "--num" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not os.path.exists(workdir / "sampled" / "samples_1step.npz")
    assert _snapshot(workdir / "checkpoints") == before


# ----------------------------------------------------------------------------- init_from


@pytest.fixture(scope="module")
def exported_models(digits_runs, tmp_path_factory):
    """The digits run's EMA weights exported; a model of another width; a model full of NaN."""
    from tvm_jax.weights import model_io
    from tvm_jax.config import dit_config
    from tvm_jax.networks import build_network

    root = tmp_path_factory.mktemp("exported")
    config = _digits(4)
    ema = digits_runs["state_full"].ema_params
    model_io.save_model(str(root / "digits"), dit_config(config), ema)
    wider = _digits(4, **{"model.hidden_size": 48})
    model_io.save_model(str(root / "wider"), dit_config(wider), build_network(wider).params)
    model_io.save_model(str(root / "nan"), dit_config(config), jax.tree.map(lambda p: np.full(p.shape, np.nan,
                                                                                              np.float32), ema))
    return dict(digits=str(root / "digits"), wider=str(root / "wider"), nan=str(root / "nan"), ema=ema)


def test_init_from_an_exported_model_trains_from_its_weights(exported_models, tmp_path):
    workdir = tmp_path / "run"
    state, log = _train(_digits(0, **{"train.init_from": exported_models["digits"]}), workdir)
    assert f"Initialised the parameters and both EMAs from {exported_models['digits']}" in log
    for tree in (state.params, state.ema_params, state.target_params):
        _assert_states_equal(tree, exported_models["ema"])
    assert int(state.step) == 0 and all(np.all(np.asarray(m) == 0) for m in jax.tree.leaves(state.opt_state)
                                        if np.ndim(m))  # a fresh optimiser

    state, log = _train(_digits(2, **{"train.init_from": exported_models["digits"]}), workdir)
    assert "Training from step 0 to 2" in log and int(state.step) == 2 and int(state.skipped) == 0
    # an existing checkpoint wins over init_from (even a mismatching one), and the log says so
    state, log = _train(_digits(3, **{"train.init_from": exported_models["wider"]}), workdir)
    assert "Training from step 2 to 3" in log
    assert re.search(r"Resuming from the checkpoint of step 2 in .*; train\.init_from=.*wider is ignored", log), log


def test_init_from_a_model_of_another_shape_is_refused_before_compiling(exported_models, tmp_path, no_compilation):
    with pytest.raises(ValueError, match=r"train\.init_from: .*wider has a different architecture: "
                                         r"model\.hidden_size \(hidden_size\): exported 48, config 32"):
        trainer.train(_digits(2, **{"train.init_from": exported_models["wider"]}), str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"train\.init_from: .*data\.shape \(in_channels\): exported 1, config 4"):
        trainer.train(_digits(2, **{"train.init_from": exported_models["digits"], "data.source": "synthetic",
                                    "data.shape": (8, 8, 4)}), str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"train\.init_from: exported models are DiTs, but model\.type is 'mlp'"):
        trainer.train(_gmm(2, **{"train.init_from": exported_models["digits"]}), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


# ----------------------------------------------------------------------------- divergence


def test_divergence_aborts_at_the_limit_step_with_exit_status_2(exported_models, tmp_path):
    """NaN weights: every step is non-finite, so the third consecutive one is the limit's."""
    workdir = tmp_path / "run"
    config = _digits(10, **{"train.init_from": exported_models["nan"], "train.max_skipped_steps": 3,
                            "train.checkpoint_every": 1})
    with pytest.raises(trainer.TrainingAborted, match=r"3 consecutive steps up to step 3 had a non-finite loss"):
        trainer.train(config, str(workdir))
    # the steps before the limit were checkpointed (their updates discarded), the limit's was not
    assert _checkpoint_steps(workdir) == [1, 2]

    res = _main("--config=configs/digits.py", f"--workdir={tmp_path / 'cli'}", *_cli_flags(DIGITS_OVERRIDES),
                "--config.train.num_steps=10", f"--config.train.init_from={exported_models['nan']}",
                "--config.train.max_skipped_steps=3")
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: training diverged: 3 consecutive steps up to step 3 had a non-finite loss or gradient "
                      "(limit train.max_skipped_steps = 3); their updates were discarded and the last good checkpoint "
                      "is kept. Lower optimizer.lr or set optimizer.max_grad_norm, then resume."], res.stderr[-3000:]
    assert "Traceback" not in res.stderr


def test_a_run_whose_every_step_was_skipped_does_not_succeed(exported_models, tmp_path):
    config = _digits(3, **{"train.init_from": exported_models["nan"], "train.max_skipped_steps": 100})
    with pytest.raises(trainer.TrainingAborted, match=r"every step of this run \(steps 1 to 3\) had a non-finite"):
        trainer.train(config, str(tmp_path / "run"))
    assert _checkpoint_steps(tmp_path / "run") == []


# ----------------------------------------------------------------------------- errors during training


def test_an_error_mid_training_keeps_the_checkpoint_being_saved(tmp_path):
    """A bad record read while the previous step's checkpoint is still being written (every step
    is saved, asynchronously): the save completes, the cause is the one line the user sees, and no
    library noise (asyncio's "Event loop is closed" from abandoned saves) follows it."""
    data = _write_latents(tmp_path / "latents", n=40, shards=1)
    # record 17 gets a label outside [0, 10): reading it (DecodeLatent) raises in a later batch
    recs = [records.encode_record(np.full((8, 8, 4), i, np.float32), np.full((8, 8, 4), 0.25, np.float32),
                                  99 if i == 17 else i % 10) for i in range(40)]
    records.write_shard(os.path.join(data, "train-00000-of-00001.array_record"), recs)
    workdir = tmp_path / "run"
    overrides = {**DIGITS_OVERRIDES, "data.source": "latents", "data.path": data, "data.shape": (8, 8, 4),
                 "data.raw_mean": (0.0,) * 4, "data.raw_std": (1.0,) * 4, "model.patch_size": 2,
                 "train.num_steps": 20, "train.checkpoint_every": 1}
    res = _main("--config=configs/digits.py", f"--workdir={workdir}", *_cli_flags(overrides))
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if not line.startswith("I")]  # absl INFO lines
    shard = os.path.join(data, "train-00000-of-00001.array_record")
    assert lines[-1] == f"error: {shard} record 17: label 99 outside [0, 10)", res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "Event loop is closed" not in res.stderr, res.stderr[-3000:]
    steps = _checkpoint_steps(workdir)
    assert steps, "the steps before the bad record were checkpointed"
    leftovers = [n for n in os.listdir(workdir / "checkpoints") if not n.isdigit()]
    assert leftovers == [], leftovers  # no save abandoned half-written
    for step in steps:
        assert os.path.exists(workdir / "checkpoints" / str(step) / "state" / "commit_success.txt")
    # the latest checkpoint restores (the run is "already trained" to it)
    _, log = _train(_latent_config(data, num_steps=steps[-1]), workdir)
    assert f"Already trained to step {steps[-1]}" in log

"""Bad command lines of ``python -m tvm_jax.main``: one ``error:`` line on stderr and exit status 2
(the README's promise), never a traceback or absl's usage dump; Ctrl-C during start-up: one line,
status 130.

Every case builds its own bad input. The flag cases use a config file written here that needs only
ml_collections (no JAX import), so each subprocess lives about half a second.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CONFIG = """
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict({"num_steps": 5})
    return c
"""


def _main(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "tvm_jax.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _assert_one_line_error(res, *fragments):
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _config_files(tmp_path):
    files = {
        "tiny": TINY_CONFIG,
        "syntax": "def get_config(:\n    return None\n",
        "no_get_config": "import ml_collections\n\nCONFIG = ml_collections.ConfigDict()\n",
        "raises": "def get_config():\n    raise RuntimeError('the cluster is down')\n",
        "returns_none": "def get_config():\n    c = 1\n",
        "missing_inner": ("from tvm_jax.config import load_config_file\n\n\ndef get_config():\n"
                          "    return load_config_file('/nonexistent/base.py')\n"),
    }
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / f"{name}.py"
        paths[name].write_text(text)
    return paths


@pytest.mark.parametrize("case", ["missing file", "directory", "syntax error", "no get_config", "get_config raises",
                                  "get_config returns None", "inner config missing"])
def test_bad_config_files(tmp_path, case):
    files = _config_files(tmp_path)
    workdir = tmp_path / "run"
    arg, expected = {
        "missing file": (tmp_path / "nope.py", ["--config:", "nope.py does not exist"]),
        "directory": (tmp_path, ["--config:", "is not a file"]),
        "syntax error": (files["syntax"], ["syntax.py:1", "not valid Python"]),
        "no get_config": (files["no_get_config"], ["no_get_config.py defines no get_config()"]),
        "get_config raises": (files["raises"], ["raises.py", "RuntimeError: the cluster is down"]),
        "get_config returns None": (files["returns_none"], ["returns_none.py", "returned None"]),
        "inner config missing": (files["missing_inner"], ["missing_inner.py", "/nonexistent/base.py",
                                                          "does not exist"]),
    }[case]
    res = _main(f"--config={arg}", f"--workdir={workdir}")
    _assert_one_line_error(res, *expected)
    assert "Traceback" not in res.stderr
    assert not workdir.exists()


@pytest.mark.parametrize("flag_args, expected", [
    (["--config.train.num_steps=abc"], ["--config.train.num_steps=abc", "invalid literal for int()"]),
    (["--config.train.num_steps"], ["Missing value for flag --config.train.num_steps"]),
    (["--config.train.num_stepz=3"], ["--config.train.num_stepz: the config has no field 'num_stepz'",
                                      'Did you mean "num_steps"']),
    (["--steps=abc"], ["--steps must be a comma-separated list of positive integers"]),
    (["--steps=0"], ["--steps must be"]),
    (["--steps=-1"], ["--steps must be"]),
    (["--steps=1,,2"], ["--steps must be"]),
    (["--num=many"], ["--num=many"]),
    (["--mode=dance"], ["--mode"]),
    (["--no_such_flag=1"], ["Unknown command line flag 'no_such_flag'"]),
])
def test_bad_flags(tmp_path, flag_args, expected):
    config = _config_files(tmp_path)["tiny"]
    workdir = tmp_path / "run"
    res = _main(f"--config={config}", f"--workdir={workdir}", "--mode=sample", *flag_args)
    _assert_one_line_error(res, *expected)
    assert "Traceback" not in res.stderr and "USAGE" not in res.stderr.upper()
    assert not workdir.exists()


def test_missing_config_flag_and_stray_arguments(tmp_path):
    res = _main(f"--workdir={tmp_path / 'run'}")
    _assert_one_line_error(res, "--config is required")
    res = _main(f"--config={_config_files(tmp_path)['tiny']}", f"--workdir={tmp_path / 'run'}", "stray")
    _assert_one_line_error(res, "unexpected arguments", "stray")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_during_start_up_is_one_line_and_status_130(tmp_path):
    """SIGINT while the process is still importing JAX and building the run (before the trainer's
    own checkpoint-then-stop handler exists): no KeyboardInterrupt traceback, exit 130, no workdir."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tvm_jax.main", "--config=configs/gmm.py", f"--workdir={workdir}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.8)  # past interpreter start-up, well before training starts
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert [ln for ln in err.splitlines() if ln.strip()][-1] == "error: interrupted (Ctrl-C)"
    assert not (workdir / "checkpoints").exists()


@pytest.mark.parametrize("mode", ["sample", "evaluate"])
def test_reading_a_missing_workdir_creates_nothing(tmp_path, mode):
    """--mode=sample/evaluate only read a run: a workdir that does not exist (or has no checkpoints)
    is an error, and no WORKDIR/checkpoints (or anything else) appears."""
    workdir = tmp_path / "no_such_run"
    res = _main(f"--mode={mode}", "--config=configs/gmm.py", f"--workdir={workdir}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"error: --workdir {workdir} does not exist: train first" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not workdir.exists()
    workdir.mkdir()
    res = _main(f"--mode={mode}", "--config=configs/gmm.py", f"--workdir={workdir}")
    assert res.returncode == 2 and f"has no checkpoints ({workdir}/checkpoints is missing)" in res.stderr
    assert os.listdir(workdir) == []


def test_default_workdir_is_runs_config_name(tmp_path):
    """Without --workdir, training writes runs/<config file name> (under the current directory)
    and --mode=sample/export read the same place; a usage error is one line."""
    config = _config_files(tmp_path)["tiny"]  # tiny.py: its get_config lacks most fields
    res = subprocess.run([sys.executable, "-m", "tvm_jax.main", "--mode=sample", f"--config={REPO}/configs/gmm.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    line = _assert_one_line_error(res, "--workdir runs/gmm does not exist: train first")
    assert "Traceback" not in res.stderr and not (tmp_path / "runs").exists(), line
    res = subprocess.run([sys.executable, "-m", "tvm_jax.main", "--mode=export", f"--config={config}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    _assert_one_line_error(res, "data: the config has no such field")  # tiny.py lacks most sections
    overrides = ["--config.train.num_steps=2", "--config.train.global_batch_size=16", "--config.model.mlp_width=16",
                 "--config.model.mlp_depth=1", "--config.sample.num_images=8", "--config.sample.steps=1"]
    res = subprocess.run([sys.executable, "-m", "tvm_jax.main", f"--config={REPO}/configs/gmm.py", *overrides],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "No --workdir given: using runs/gmm" in res.stderr
    assert sorted(os.listdir(tmp_path / "runs" / "gmm" / "checkpoints")) == ["2"]

"""notebooks/sampling.ipynb runs headless (nbclient) against a tiny checkpoint built here.

A tiny digits DiT is trained for two steps in a temporary workdir and exported as a model
directory (as ``--mode=export`` does); the notebook is then executed once against the exported
directory (``TVM_NOTEBOOK_CHECKPOINT``) and once against the training run (``TVM_NOTEBOOK_WORKDIR``
+ ``TVM_NOTEBOOK_CONFIG``), in a fresh kernel each time, with the environment variables it reads.
"""
import base64
import os
import sys

import nbformat
import numpy as np
import pytest
from cpu_env import cpu_xla_flags
from nbclient import NotebookClient

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NOTEBOOK = os.path.join(ROOT, "notebooks", "sampling.ipynb")
CELL_TIMEOUT_S = 240  # per cell: generous, the machine may be shared

TINY_CONFIG = f'''"""configs/digits.py shrunk for the notebook test."""
from tvm_jax.config import load_config_file


def get_config():
    c = load_config_file({os.path.join(ROOT, "configs", "digits.py")!r})
    c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.patch_size = 32, 2, 2, 4
    c.model.attention_impl = "xla"
    c.train.global_batch_size = 8
    c.train.num_steps = 2
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.sample_every = 2
    c.sample.steps = (1,)
    c.sample.num_images = 4
    return c
'''


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(config file, training workdir, exported model directory) of a 2-step tiny digits run."""
    from tvm_jax import generate, trainer
    from tvm_jax.weights import model_io
    from tvm_jax.config import dit_config, load_config_file

    base = tmp_path_factory.mktemp("notebook")
    config_path = str(base / "tiny_digits.py")
    with open(config_path, "w") as f:
        f.write(TINY_CONFIG)
    config = load_config_file(config_path)
    workdir = str(base / "run")
    trainer.train(config, workdir)
    # what `python -m tvm_jax.main --mode=export` writes
    model = generate.load_for_sampling(config, checkpoint=None, workdir=workdir)
    exported = str(base / "exported")
    model_io.save_model(exported, dit_config(config), model.params,
                        metadata={"scaled_param": bool(config.objective.scaled_param), "source": model.description,
                                  "w": float(config.sample.w), "raw_mean": list(config.data.raw_mean),
                                  "raw_std": list(config.data.raw_std)})
    return config_path, workdir, exported


def _execute(tmp_path, devices=1, extra_env=None, **params):
    """Runs the notebook in a fresh kernel (``devices`` CPU devices) with TVM_NOTEBOOK_<NAME> = value
    (the quick start off unless ``QUICK_START`` is given); returns it executed."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TVM_NOTEBOOK_", "HF_"))}
    params.setdefault("QUICK_START", "0")
    env.update({f"TVM_NOTEBOOK_{k}": str(v) for k, v in params.items()})
    env.update(extra_env or {})
    env.update({
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": cpu_xla_flags(devices),  # the suite's (compile time dominates on the CPU)
        "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
    })
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)
    return nb


def _cell(nb, tag):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}"
    return cells[0]


def _stdout(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def _pngs(cell) -> list[bytes]:
    return [base64.b64decode(o.data["image/png"]) for o in cell.outputs
            if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]


def _check_common(nb, steps):
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    for tag in ("side-by-side", "per-class"):
        pngs = _pngs(_cell(nb, tag))
        assert len(pngs) == 1, f"cell {tag!r} should show one figure"
        assert pngs[0].startswith(b"\x89PNG\r\n\x1a\n") and len(pngs[0]) > 2000
    out = _stdout(nb)
    for n in steps:
        assert f"{n} step" in out and "compile" in out
    assert "display shape: (8, 8, 8, 1)" in out  # 2 classes x 4 samples, digits pixels (no latents message)
    assert "No VAE configured" not in out
    return out


def test_notebook_on_exported_model(tiny_run, tmp_path):
    _, _, exported = tiny_run
    nb = _execute(tmp_path, CHECKPOINT=exported, CLASSES="3,7", STEPS="1,2,4")
    out = _check_common(nb, (1, 2, 4))
    assert f"Model: exported model {exported}" in out
    assert "CFG weight w = 1.5 (the checkpoint's recipe)" in out
    assert "hidden 32, depth 2, 2 heads, patch 4" in out
    assert all(not c.outputs for c in nbformat.read(NOTEBOOK, as_version=4).cells
               if c.cell_type == "code"), "commit the notebook with its outputs cleared"


def test_notebook_on_training_run(tiny_run, tmp_path):
    config_path, workdir, _ = tiny_run
    import jax

    from tvm_jax import generate
    from tvm_jax.config import load_config_file

    out_dir = str(tmp_path / "sampled")
    # The run was trained on this process's 4 CPU devices (conftest.py); the notebook's kernel has one, so
    # this also checks that a checkpoint restores on another device count than it was saved on.
    assert jax.device_count() > 1
    nb = _execute(tmp_path, devices=1, WORKDIR=workdir, CONFIG=config_path, CLASSES="0,9",
                  STEPS="1,2", W="2", SEED="3", OUT_DIR=out_dir)
    out = _check_common(nb, (1, 2))
    assert f"Model: ema weights of {workdir} at step 2" in out
    assert "CFG weight w = 2 (the W parameter)" in out
    # the notebook's samples are what --mode=sample draws for the same seed, classes and w
    model = generate.load_for_sampling(load_config_file(config_path), checkpoint=None, workdir=workdir)
    labels = np.repeat(np.array([0, 9], np.int32), 4)
    expected = generate.sample(model, steps=[2], w=2.0, labels=labels, seed=3)[2]
    written = np.load(os.path.join(out_dir, "samples_2step.npz"))
    np.testing.assert_array_equal(written["labels"], labels)
    np.testing.assert_allclose(written["samples"], expected, rtol=1e-4, atol=1e-4)
    assert os.path.isfile(os.path.join(out_dir, "samples_1step.png"))


@pytest.mark.torch
def test_notebook_quick_start_offline(tmp_path):
    """The Colab quick start as shipped (hf://lumaai/tvm/im256_w2.pkl, hf://stabilityai/sd-vae-ft-ema),
    run offline (HF_HUB_OFFLINE=1) against a Hugging Face cache laid out in huggingface_hub's own
    layout that holds a tiny official-style snapshot under that name and a tiny VAE."""
    pytest.importorskip("torch")
    pytest.importorskip("omegaconf")
    import official_fixtures as of
    from weight_fixtures import write_vae_folder

    from tvm_jax.vae import CONFIG_NAME, WEIGHTS_NAME

    cache = tmp_path / "hf" / "hub"
    snapshot = tmp_path / "network-snapshot.pkl"
    of.write_snapshot(snapshot, tmp_path / "official_src")
    of.hub_cache_file(cache, "lumaai/tvm", "im256_w2.pkl", snapshot.read_bytes())
    vae = write_vae_folder(tmp_path / "vae")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        of.hub_cache_file(cache, "stabilityai/sd-vae-ft-ema", name, (vae / name).read_bytes(), commit="b" * 40)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    nb = _execute(run_dir, QUICK_START="1", CLASSES="3,7", SAMPLES_PER_CLASS="2", STEPS="1,2,4",
                  extra_env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache)})
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    out = _stdout(nb)
    assert "JAX runs on: cpu" in out and "No GPU/TPU visible to JAX" in out
    assert "converting it to converted/im256_w2" in out and "scaled_param True, w 2.0" in out
    assert "quick start: CHECKPOINT = 'converted/im256_w2', VAE_PATH = 'hf://stabilityai/sd-vae-ft-ema'" in out
    assert "CFG weight w = 2 (the checkpoint's recipe)" in out
    assert "Decoding latents with the VAE in hf://stabilityai/sd-vae-ft-ema" in out
    assert "display shape: (4, 64, 64, 3)" in out  # 2 classes x 2 samples, decoded 32x32x4 latents
    for n in (1, 2, 4):
        assert f"decoded the {n}-step latents" in out
    for tag in ("side-by-side", "per-class"):
        assert len(_pngs(_cell(nb, tag))) == 1

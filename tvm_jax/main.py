r"""tvm-jax command line: train, sample, evaluate or export a model.

  python -m tvm_jax.main --config=configs/digits.py --workdir=runs/digits            # train (default)
  python -m tvm_jax.main --config=configs/in256.py --config.data.path=/data/in256 --workdir=runs/in256
  python -m tvm_jax.main --mode=sample --config=configs/digits.py --workdir=runs/digits --steps=1,2,4
  python -m tvm_jax.main --mode=sample --checkpoint=converted/in256_w2 --classes=207,360,387 --num=16
  python -m tvm_jax.main --mode=evaluate --config=configs/gmm.py --workdir=runs/gmm
  python -m tvm_jax.main --mode=export --config=configs/digits.py --workdir=runs/digits --out=exported/digits

Any config field can be overridden as ``--config.a.b=value``.

Exit status: 0 on success; 2 for a configuration, data, workdir or checkpoint problem (the
message says which; what can be checked up front is checked before anything is compiled), for
a device out of memory (the message names the settings to change) and for a training run that
diverged (``train.max_skipped_steps``); 128 + the signal number (143 for SIGTERM, 130 for
SIGINT) when training was stopped by a signal, after saving a checkpoint of the step reached
(rerun the same command to resume). Any other error prints its one-line cause first, then the
traceback.

Multi-host jobs (SLURM, or ``--coordinator_address``/``--num_processes``/``--process_id``)
initialise ``jax.distributed`` before anything touches a device; see ``launch/``.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "evaluate", "export"], "What to do.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "sample/evaluate: an exported model directory "
                                  "(from tvm_jax.convert or --mode=export) instead of a training workdir.")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "params"], "Which weights of a training run to use.")
_STEPS = flags.DEFINE_list("steps", None, "sample/evaluate: step counts (default: config.sample.steps).")
_W = flags.DEFINE_float("w", None, "sample/evaluate: CFG weight (default: config.sample.w).")
_CLASSES = flags.DEFINE_string("classes", "random", "sample: 'random', 'null' or a comma list of class ids.")
_NUM = flags.DEFINE_integer("num", 16, "sample: how many samples per step count.")
_SEED = flags.DEFINE_integer("seed", 0, "sample/evaluate: noise seed.")
_OUT = flags.DEFINE_string("out", None, "sample: output directory (default WORKDIR/sampled); export: target.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Allow replacing existing outputs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def _steps(config) -> list[int]:
    raw = _STEPS.value if _STEPS.value is not None else list(config.sample.steps) if config is not None else [1, 2, 4]
    try:
        steps = [int(s) for s in raw]
    except ValueError:
        raise app.UsageError(f"--steps must be integers, got {raw}") from None
    if not steps or min(steps) < 1:
        raise app.UsageError(f"--steps must be positive, got {steps}")
    return steps


class _QuietLibraries(logging.logging.Filter):
    """Drops INFO chatter of Orbax/grain/JAX internals from the log (warnings still show)."""

    NOISY = ("/orbax/", "/grain/", "/jax/_src/", "/clu/")

    def filter(self, record):
        return record.levelno >= logging.logging.WARNING or not any(p in record.pathname for p in self.NOISY)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from tvm_jax import sharding
    from tvm_jax.checkpointing import CheckpointError
    from tvm_jax.microbatching import is_out_of_memory
    from tvm_jax.trainer import TrainingAborted

    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = _CONFIG.value
    mode = _MODE.value
    if config is None and not (mode == "sample" and _CHECKPOINT.value):
        raise app.UsageError("--config is required (e.g. --config=configs/digits.py)")

    try:
        if mode == "train":
            from tvm_jax.trainer import train

            if not _WORKDIR.value:
                raise app.UsageError("--workdir is required for training")
            train(config, _WORKDIR.value)
        elif mode == "sample":
            _sample(config)
        elif mode == "evaluate":
            from tvm_jax.evaluation import evaluate

            if not _WORKDIR.value and not _CHECKPOINT.value:
                raise app.UsageError("--mode=evaluate needs --workdir (a training run) or --checkpoint")
            results = evaluate(config, workdir=_WORKDIR.value, checkpoint=_CHECKPOINT.value, steps=_steps(config),
                               w=_W.value, seed=_SEED.value, weights=_WEIGHTS.value, overwrite=_OVERWRITE.value)
            print(json.dumps(results, indent=2))
        elif mode == "export":
            _export(config)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, TrainingAborted) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if is_out_of_memory(e):
            print(f"error: out of memory on the device ({str(e).strip().splitlines()[0]}); {_OOM_ADVICE[mode]}",
                  file=sys.stderr)
            sys.exit(2)
        print(f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
              file=sys.stderr)  # the cause first; the traceback follows
        raise


_OOM_ADVICE = {
    "train": "lower train.microbatch_size (0 picks the largest that fits), shard the parameters with mesh.fsdp, or "
             "rematerialise activations with model.remat ('dots' or 'block'); the checkpoints were left as they were",
    "sample": "sample fewer images at once (--num)",
    "evaluate": "lower eval.batch_size",
    "export": "export on a device with more memory",
}


def _sample(config) -> None:
    from tvm_jax import generate

    out_dir = _OUT.value or os.path.join(_WORKDIR.value or _CHECKPOINT.value or ".", "sampled")
    generate.sample_output_paths(out_dir, _steps(config), overwrite=_OVERWRITE.value)  # fail before sampling
    model = generate.load_for_sampling(config, checkpoint=_CHECKPOINT.value, workdir=_WORKDIR.value,
                                       weights=_WEIGHTS.value)
    if _W.value is not None:
        w = _W.value
    elif config is not None:
        w = config.sample.w
    else:
        w = model.default_w or 1.0
    if _NUM.value < 1:
        raise ValueError(f"--num must be positive, got {_NUM.value}")
    labels = generate.parse_classes(_CLASSES.value, _NUM.value, model.num_classes, _SEED.value)
    logging.info("Sampling %d images from %s at %s steps, w = %g", _NUM.value, model.description, _steps(config), w)
    samples = generate.sample(model, steps=_steps(config), w=w, labels=labels, seed=_SEED.value)
    decode = generate.make_decoder(config) if model.is_latent else None
    generate.write_outputs(out_dir, samples, labels, config=config, overwrite=_OVERWRITE.value, decode=decode)


def _export(config) -> None:
    from tvm_jax import generate, model_io
    from tvm_jax.config import dit_config

    if config.model.type != "dit":
        raise ValueError("--mode=export writes DiT models; model.type is " + repr(config.model.type))
    if not _WORKDIR.value or not _OUT.value:
        raise app.UsageError("--mode=export needs --workdir (the run) and --out (the new model directory)")
    model = generate.load_for_sampling(config, checkpoint=None, workdir=_WORKDIR.value, weights=_WEIGHTS.value)
    model_io.save_model(_OUT.value, dit_config(config), model.params, overwrite=_OVERWRITE.value,
                        metadata={"scaled_param": bool(config.objective.scaled_param), "source": model.description,
                                  "w": float(config.sample.w), "raw_mean": list(config.data.raw_mean),
                                  "raw_std": list(config.data.raw_std)})
    logging.info("Exported %s to %s", model.description, _OUT.value)


def _parse_flags(argv):
    """absl's parser, plus a one-line error (exit status 2) for a ``--config.a.b=value`` override of
    a field the config does not have (ml_collections raises KeyError/AttributeError, with a
    did-you-mean suggestion, instead of a flags error)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError) as e:
        cause = e
        while cause.args and isinstance(cause.args[0], BaseException):  # AttributeError(KeyError(message))
            cause = cause.args[0]
        message = cause.args[0] if cause.args and isinstance(cause.args[0], str) else str(cause)
        key = message.split("\n")[0].strip("'\"")
        flag = next((a.split("=")[0] for a in argv[1:]
                     if a.startswith("--config.") and key in a.split("=")[0].split(".")[1:]), None)
        if flag is None:  # not an override (e.g. a bug in the config file itself)
            raise
        print(f"error: {flag}: the config has no field {message.replace(chr(10), '; ')}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)

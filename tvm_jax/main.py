r"""tvm-jax command line: train, sample, evaluate or export a model.

  python -m tvm_jax.main --config=configs/digits.py --workdir=runs/digits            # train (default)
  python -m tvm_jax.main --config=configs/in256.py --config.data.path=/data/in256 --workdir=runs/in256
  python -m tvm_jax.main --mode=sample --config=configs/digits.py --workdir=runs/digits --steps=1,2,4
  python -m tvm_jax.main --mode=sample --checkpoint=converted/in256_w2 --classes=207,360,387 --num=16
  python -m tvm_jax.main --mode=evaluate --config=configs/gmm.py --workdir=runs/gmm
  python -m tvm_jax.main --mode=export --config=configs/digits.py --workdir=runs/digits --out=exported/digits

Any config field can be overridden as ``--config.a.b=value``.

Exit status: 0 on success; 2 for bad input: a flag, a config file (missing, a syntax error, no
``get_config``, an error inside it), a configuration, data, workdir or checkpoint problem (one line
``error: ...`` on stderr says which; what can be checked up front is checked before anything is
compiled), a device out of memory (the line names the settings to change) and a training run
that diverged (``train.max_skipped_steps``); 128 + the signal number (143 for SIGTERM, 130 for
SIGINT) when training was stopped by a signal, after saving a checkpoint of the step reached
(rerun the same command to resume). Ctrl-C outside training (start-up, sampling, evaluation)
stops at once with one line and status 130. Any other error prints its one-line cause first,
then the traceback.

Multi-host jobs (SLURM, or ``--coordinator_address``/``--num_processes``/``--process_id``)
initialise ``jax.distributed`` before anything touches a device; see ``launch/``.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys

EXIT_BAD_INPUT = 2


def _stop_on_interrupt(signum, frame):
    """SIGINT outside training (whose own handler checkpoints first): one line, status 130, no
    ``KeyboardInterrupt`` traceback. Installed before the heavy imports below. The process ends at
    once (``os._exit``): unwinding through JAX/XLA start-up can crash the interpreter on its way out,
    and nothing is half-written at that point (results and outputs are written at the very end)."""
    sys.stderr.write("error: interrupted (Ctrl-C)\n")
    sys.stderr.flush()
    os._exit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _stop_on_interrupt)

import ast  # noqa: E402
import json  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import ConfigDict, config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples (default: "
                                "runs/<config file name>, e.g. runs/in256 for --config=configs/in256.py).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "evaluate", "export"], "What to do.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "sample/evaluate: an exported model directory "
                                  "(from tvm_jax.convert or --mode=export) instead of a training workdir.")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "params"], "Which weights of a training run to use.")
_STEPS = flags.DEFINE_list("steps", None, "sample/evaluate: step counts (default: config.sample.steps).")
flags.register_validator("steps", lambda v: v is None or all(s.strip().isdigit() and int(s) >= 1 for s in v) and
                         len(v) > 0, "--steps must be a comma-separated list of positive integers, e.g. --steps=1,2,4")
_W = flags.DEFINE_float("w", None, "sample/evaluate: CFG weight (default: config.sample.w).")
_CLASSES = flags.DEFINE_string("classes", "random", "sample: 'random', 'null' or a comma list of class ids.")
_NUM = flags.DEFINE_integer("num", 16, "sample: how many samples per step count.")
_SEED = flags.DEFINE_integer("seed", 0, "sample/evaluate: noise seed.")
_VAE_PATH = flags.DEFINE_string("vae_path", None, "sample: the VAE that decodes latents (a diffusers folder or "
                                "hf://ORG/NAME; '' for none). Default: config.data.vae_path, else the exported "
                                "model's recorded VAE.")
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
    if config is not None:
        from tvm_jax.config import check_fields

        try:
            check_fields(config)
        except ValueError as e:
            _fail(f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}: {e}")

    try:
        if mode == "train":
            from tvm_jax.trainer import train

            train(config, _workdir(announce=True))
        elif mode == "sample":
            _sample(config)
        elif mode == "evaluate":
            from tvm_jax.evaluation import evaluate

            workdir = None if _CHECKPOINT.value else _workdir()
            results = evaluate(config, workdir=workdir, checkpoint=_CHECKPOINT.value, steps=_steps(config),
                               w=_W.value, seed=_SEED.value, weights=_WEIGHTS.value, overwrite=_OVERWRITE.value)
            print(json.dumps(results, indent=2))
        elif mode == "export":
            _export(config)
    except app.UsageError:
        raise  # answered by _run in one line
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, TrainingAborted) as e:
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


def _workdir(announce: bool = False) -> str:
    """--workdir, or ``runs/<config file name without .py>`` (logged when ``announce``, for
    training; reading modes name it in their errors): the same default for training and for
    sampling, evaluating or exporting the run it wrote."""
    if _WORKDIR.value:
        return _WORKDIR.value
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
    workdir = os.path.join("runs", name)
    if announce:
        logging.info("No --workdir given: using %s", workdir)
    return workdir


def _sample(config) -> None:
    from tvm_jax import generate

    workdir = None if _CHECKPOINT.value else _workdir()
    out_dir = _OUT.value or os.path.join(workdir or _CHECKPOINT.value, "sampled")
    generate.sample_output_paths(out_dir, _steps(config), overwrite=_OVERWRITE.value)  # fail before sampling
    model = generate.load_for_sampling(config, checkpoint=_CHECKPOINT.value, workdir=workdir,
                                       weights=_WEIGHTS.value)
    generate.prepare_output_dir(out_dir)  # the run or model exists: now the outputs' place may be made
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
    decode = None  # built (the VAE fetched and checked) before sampling
    if model.is_latent:  # the run's config, else what the exported model records (no --config needed)
        decoding = generate.LatentDecoding.from_config(config) if config is not None else model.decoding
        if decoding is not None and _VAE_PATH.value is not None:
            decoding = dataclasses.replace(decoding, vae_path=_VAE_PATH.value)
        elif decoding is None and _VAE_PATH.value:
            raise ValueError(f"--vae_path: {model.description} records no latent statistics (raw_mean/raw_std); "
                             "pass the run's --config")
        decode = generate.make_latent_decoder(decoding)
    samples = generate.sample(model, steps=_steps(config), w=w, labels=labels, seed=_SEED.value)
    generate.write_outputs(out_dir, samples, labels, config=config, overwrite=_OVERWRITE.value, decode=decode)


def _export(config) -> None:
    from tvm_jax import generate
    from tvm_jax.weights import model_io
    from tvm_jax.config import dit_config

    if config.model.type != "dit":
        raise ValueError("--mode=export writes DiT models; model.type is " + repr(config.model.type))
    if not _OUT.value:
        raise app.UsageError("--mode=export needs --out (the new model directory)")
    model = generate.load_for_sampling(config, checkpoint=None, workdir=_workdir(), weights=_WEIGHTS.value)
    model_io.save_model(_OUT.value, dit_config(config), model.params, overwrite=_OVERWRITE.value,
                        metadata={"scaled_param": bool(config.objective.scaled_param), "source": model.description,
                                  "w": float(config.sample.w), "raw_mean": list(config.data.raw_mean),
                                  "raw_std": list(config.data.raw_std), "final_std": float(config.data.final_std),
                                  "vae_path": str(config.data.get("vae_path", "") or "")})
    logging.info("Exported %s to %s", model.description, _OUT.value)


def _fail(message: str) -> None:
    """The CLI's answer to bad input: ``error: MESSAGE`` on one line, exit status 2."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _config_argument(argv) -> str | None:
    """The value of ``--config=PATH`` / ``--config PATH`` in ``argv`` (the last one wins)."""
    path = None
    for i, a in enumerate(argv[1:], start=1):
        if a.startswith("--config="):
            path = a[len("--config="):]
        elif a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    return path


def check_config_file(path: str) -> None:
    """Raises ``ValueError`` (one line, naming the file) for a config file that cannot be a
    config: missing, not a file, unreadable, not valid Python, or without a module-level
    ``get_config``. Static: nothing in the file runs here."""
    if not path:
        raise ValueError("--config: empty path (e.g. --config=configs/digits.py)")
    if not os.path.exists(path):
        raise ValueError(f"--config: {path} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"--config: {path} is not a file")
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as e:
        raise ValueError(f"--config: cannot read {path}: {e.strerror or e}") from None
    try:
        tree = ast.parse(source, filename=path)
    except (SyntaxError, ValueError) as e:
        where = f"{path}:{e.lineno}" if getattr(e, "lineno", None) else path
        raise ValueError(f"--config: {where}: {getattr(e, 'msg', None) or e} (not valid Python)") from None
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    if "get_config" not in names and "*" not in names:
        raise ValueError(f"--config: {path} defines no get_config() (a config file returns its ConfigDict from "
                         "get_config(), see configs/digits.py)")


def _unknown_override(error: Exception, argv) -> str | None:
    """The one-line message for a ``--config.a.b=value`` override of a field the config does not
    have (ml_collections raises KeyError/AttributeError with a did-you-mean suggestion), else None."""
    cause = error
    while cause.args and isinstance(cause.args[0], BaseException):  # AttributeError(KeyError(message))
        cause = cause.args[0]
    message = cause.args[0] if cause.args and isinstance(cause.args[0], str) else str(cause)
    key = message.split("\n")[0].strip("'\"")
    flag = next((a.split("=")[0] for a in argv[1:]
                 if a.startswith("--config.") and key in a.split("=")[0].split(".")[1:]), None)
    return None if flag is None else f"{flag}: the config has no field {message.replace(chr(10), '; ')}"


def _flag_error(error: Exception) -> str:
    """A flags error in one line (a ValueError raised inside the config file comes wrapped with its
    whole traceback: keep its last line)."""
    text = str(error)
    if "Error whilst parsing config file" in text:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return f"{lines[0].split(':')[0]}: {lines[-1].strip()}"
    return text


def _parse_flags(argv):
    """absl's flag parser with every kind of bad input answered by one ``error:`` line and exit
    status 2 instead of a traceback or a usage dump: unknown or malformed flags, ``--steps`` that
    are not positive integers, a config file that is missing, not Python, has no ``get_config``
    or fails when run, and ``--config.a.b=value`` overrides of missing fields or of the wrong type."""
    config_path = _config_argument(argv)
    if config_path is not None:
        try:
            check_config_file(config_path.split(":", 1)[0])
        except ValueError as e:
            _fail(str(e))
    absl_logger = logging.get_absl_logger()
    absl_logger.disabled = True  # config_flags logs warnings before logging is set up (e.g. "returned None")
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        _fail(_flag_error(e))
    except (KeyError, AttributeError) as e:
        message = _unknown_override(e, argv)
        _fail(message or f"--config={config_path}: {type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - raised by the config file's own code
        _fail(f"--config={config_path}: running get_config() failed: {type(e).__name__}: {e}")
    finally:
        absl_logger.disabled = False
    config = _CONFIG.value
    if config_path is not None and not isinstance(config, ConfigDict):
        if config is None:
            _fail(f"--config={config_path}: get_config() returned None, not a ConfigDict (missing return?)")
        try:  # ml_collections defers an IOError raised by the config file until the config is used
            getattr(config, "to_dict", None)
        except OSError as e:
            cause = e.__cause__ or e
            _fail(f"--config={config_path}: running get_config() failed: {type(cause).__name__}: {cause}")
        _fail(f"--config={config_path}: get_config() returned a {type(config).__name__}, not a ConfigDict")
    return rest


def _run(argv) -> None:
    """``main`` with a usage error (a missing or inconsistent flag) answered by one line, exit 2."""
    try:
        main(argv)
    except app.UsageError as e:
        _fail(str(e))


if __name__ == "__main__":
    app.run(_run, flags_parser=_parse_flags)

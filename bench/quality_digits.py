"""Quality benchmark on scikit-learn's bundled 8x8 digits with a small label-conditional DiT.

TVM, Flow Matching (FM) and MeanFlow train the same small DiT (:func:`tvm_jax.networks.build_dit`,
Lipschitz switches on) with the same data, batch, steps, optimiser and learning rate. Every run
uses the library's jitted training step; TVM's teacher is the EMA target (``target_decay``);
samples come from the evaluation EMA (``ema_decay``). Optimiser: the library's AdamW
(:func:`tvm_jax.training.make_optimizer`, b1 0.9, b2 0.95) with the same peak learning rate for
every run and a cosine decay to ``final_lr_fraction`` of it. Guidance: TVM and MeanFlow learn
guided maps (``w ~ U[1, train_w_max]``, label dropout); FM learns conditional + unconditional
velocities (label dropout) and is guided by CFG at sampling time (two calls per Euler step).

Runs (``--methods``; all with the same budget):

* ``tvm``, ``fm``, ``meanflow``: the comparison;
* ``tvm_naive_dit``: TVM on the naive DiT (``lipschitz=False``: LayerNorm, no mod-norm, no
  QK-norm, xavier init). Paper claim: the Lipschitz changes matter;
* ``tvm_no_ema_target`` (``target_decay = 0``: the teacher is the current parameters),
  ``tvm_trunc``, ``tvm_clamp`` (those time samplers instead of gap*). Paper claims: the EMA
  target beats no EMA target; gap* beats trunc and clamp;
* ``tvm_seed1`` (more with ``--tvm_seeds``): the baseline TVM run again with another seed (model
  init, data order, training randomness): the seed-to-seed spread the claims are judged against.

The default order puts the comparison and the seed run first, so that ``--deadline_s`` drops
ablations first.

Data: ``load_digits(upsample)`` in [-1, 1], split once (stratified, ``--split_seed``) into a
train split (generative models and classifier train on it) and a held-out split, itself split in
two stratified halves A and B.

Judge: an MLP classifier (flattened image -> 256 -> 64 -> 10, GELU) trained on the train split
(AdamW, light Gaussian-noise augmentation); its held-out accuracy is reported. For every run,
CFG weight ``w`` and step count (TVM/MeanFlow: N-step flow map, 1/2/4/8; FM: Euler with CFG,
1..64):

* ``acc``: the fraction of conditional samples (labels = the held-out labels, so the class mix
  is the data's) that the classifier assigns to their conditioning label;
* ``fd``: Fréchet distance in the classifier's 64-d penultimate feature space,
  ``(FD(S_A, B) + FD(S_B, A)) / 2`` where ``S_A`` are samples with the labels of half A; the
  floor is ``FD(A, B)`` (two disjoint real halves of the same size, never seen in training):
  what a perfect generator scores.

Training randomness, data order and model init are seeded (``--seed``); sampling noise is fixed
(``--eval_seed``) and shared by all runs.

Outputs (``--out_dir DIR`` puts all of them in DIR): the JSON (``--out``, rewritten after every
run, ``"complete": false`` until the end), the accuracy/FD curves (``--plot``) and the sample
grids of every run in one image, one row per run (``<grids>_samples.png``; ``--per_run_grids``
adds ``<grids>_<run>.png``); ``--grids`` is the prefix (default: ``--plot`` without ``.png``).
``--deadline_s`` skips the runs that would not end before that many seconds (recorded as
skipped).

Run (from the repository root):

    python bench/quality_digits.py --out_dir bench/results --deadline_s 300    # one H100, ~5-6 min
    python bench/quality_digits.py --quick --out /tmp/qd.json --plot /tmp/qd.png     # CPU smoke test, ~5 min

On XLA:GPU the GEMM autotuner is switched off (``--xla_autotune`` keeps it) and compiled programs
go to a persistent cache (``--compile_cache``), so the extra seed run reuses the baseline's.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

# XLA:GPU's GEMM autotuning adds compile time per run and buys nothing at these tiny sizes; off unless
# --xla_autotune is given or XLA_FLAGS already sets it (must happen before jax starts).
if "--xla_autotune" not in sys.argv and "xla_gpu_autotune_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_common as qc  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from tvm_jax.data.pipeline import load_digits  # noqa: E402
from tvm_jax.dit import DiTConfig  # noqa: E402
from tvm_jax.evaluation.fid import compute_statistics, frechet_distance  # noqa: E402
from tvm_jax.networks import build_dit  # noqa: E402
from tvm_jax.objectives import GuidanceConfig, ObjectiveConfig, make_objective  # noqa: E402
from tvm_jax.time_sampling import TimeSamplerConfig  # noqa: E402

NUM_CLASSES = 10
FLOW_MAP_STEPS = (1, 2, 4, 8)
FM_STEPS = (1, 2, 4, 8, 16, 32, 64)
MAIN_RUNS = ("tvm", "fm", "meanflow")
DEFAULT_METHODS = ["tvm", "fm", "meanflow", "tvm_naive_dit", "tvm_seed1", "tvm_no_ema_target", "tvm_trunc",
                   "tvm_clamp"]


# ----------------------------------------------------------------------------- data


def split_digits(upsample: int, n_heldout: int, seed: int):
    """Stratified split: train, held-out half A, held-out half B."""
    from sklearn.model_selection import train_test_split

    x, y = load_digits(upsample)
    idx = np.arange(len(y))
    tr, ho = train_test_split(idx, test_size=n_heldout, stratify=y, random_state=seed)
    a, b = train_test_split(ho, test_size=n_heldout // 2, stratify=y[ho], random_state=seed + 1)
    return {"train": (x[tr], y[tr]), "A": (x[a], y[a]), "B": (x[b], y[b])}


def epoch_batches(x, y, batch: int, seed: int):
    """Shuffled epochs (numpy ``Generator``), drop-remainder batches, forever."""
    rng = np.random.default_rng(seed)
    n = len(y)
    while True:
        perm = rng.permutation(n)
        for i in range(0, n - batch + 1, batch):
            j = perm[i:i + batch]
            yield {"x": x[j], "label": y[j]}


# ----------------------------------------------------------------------------- classifier


def _init_mlp(key, sizes):
    params = []
    for k, (din, dout) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        lim = np.sqrt(6.0 / (din + dout))
        params.append({"w": jax.random.uniform(k, (din, dout), jnp.float32, -lim, lim),
                       "b": jnp.zeros((dout,), jnp.float32)})
    return params


def classifier_apply(params, x):
    """``(logits, penultimate features)`` for images (B, H, W, C) in [-1, 1]."""
    h = x.reshape(x.shape[0], -1)
    for layer in params[:-1]:
        h = jax.nn.gelu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"], h


def train_classifier(x, y, x_test, y_test, *, seed: int, steps: int, lr: float, batch: int, noise_std: float,
                     hidden=(256, 64), weight_decay: float = 1e-4) -> tuple[list, dict]:
    key = jax.random.key(seed)
    params = _init_mlp(key, (int(np.prod(x.shape[1:])),) + tuple(hidden) + (NUM_CLASSES,))
    opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb, k):
        xb = xb + noise_std * jax.random.normal(k, xb.shape)

        def loss_fn(p):
            logits, _ = classifier_apply(p, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    batches = epoch_batches(x, y, batch, seed)
    t0 = time.time()
    for i in range(steps):
        b = next(batches)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(b["x"]), jnp.asarray(b["label"]),
                                       jax.random.fold_in(key, i))
    logits, _ = classifier_apply(params, jnp.asarray(x_test))
    acc = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == y_test))
    train_logits, _ = classifier_apply(params, jnp.asarray(x))
    train_acc = float(np.mean(np.asarray(jnp.argmax(train_logits, -1)) == y))
    info = {"architecture": f"MLP {int(np.prod(x.shape[1:]))}-" + "-".join(map(str, hidden)) + f"-{NUM_CLASSES} GELU",
            "feature_dim": hidden[-1], "steps": steps, "lr": lr, "schedule": "cosine", "batch": batch,
            "noise_aug_std": noise_std, "weight_decay": weight_decay, "heldout_accuracy": acc,
            "train_accuracy": train_acc, "n_train": int(len(y)), "n_heldout": int(len(y_test)),
            "seconds": time.time() - t0, "final_loss": float(loss)}
    return params, info


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class RunSpec:
    name: str
    objective: ObjectiveConfig
    kind: str  # "flow_map" (TVM, MeanFlow) or "velocity" (FM)
    lipschitz: bool
    target_decay: float
    steps_eval: tuple[int, ...]
    description: str
    seed: int | None = None  # None: --seed


def run_specs(args) -> dict[str, RunSpec]:
    guided = GuidanceConfig(num_classes=NUM_CLASSES, mode="uniform_w", w_min=1.0, w_max=args.train_w_max,
                            label_dropout=args.label_dropout)
    plain = GuidanceConfig(num_classes=NUM_CLASSES, mode="constant", w=1.0, label_dropout=args.label_dropout)
    tvm = ObjectiveConfig(name="tvm", times=TimeSamplerConfig(name="gap*"), guidance=guided)
    td = args.target_decay
    specs = {
        "tvm": RunSpec("tvm", tvm, "flow_map", True, td, FLOW_MAP_STEPS, "TVM, gap*, EMA target, Lipschitz DiT"),
        "fm": RunSpec("fm", ObjectiveConfig(name="fm", guidance=plain), "velocity", True, td, FM_STEPS,
                      "flow matching (conditional, label dropout), Euler + CFG, Lipschitz DiT"),
        "meanflow": RunSpec("meanflow", ObjectiveConfig(name="meanflow", guidance=guided, times=TimeSamplerConfig(
            name="clamp", p_equal=args.meanflow_p_equal)), "flow_map", True, td, FLOW_MAP_STEPS,
            "MeanFlow (clamp times, p_equal, adaptive weight), Lipschitz DiT"),
        "tvm_naive_dit": RunSpec("tvm_naive_dit", tvm, "flow_map", False, td, FLOW_MAP_STEPS,
                                 "TVM, gap*, EMA target, naive DiT (lipschitz=False)"),
        "tvm_no_ema_target": RunSpec("tvm_no_ema_target", tvm, "flow_map", True, 0.0, FLOW_MAP_STEPS,
                                     "TVM, gap*, target_decay = 0 (teacher = current params), Lipschitz DiT"),
    }
    for sampler in ("trunc", "clamp"):
        specs[f"tvm_{sampler}"] = RunSpec(
            f"tvm_{sampler}", dataclasses.replace(tvm, times=TimeSamplerConfig(name=sampler)), "flow_map", True, td,
            FLOW_MAP_STEPS, f"TVM, {sampler} time sampler, EMA target, Lipschitz DiT")
    seeds = list(args.tvm_seeds) + [int(m[len("tvm_seed"):]) for m in args.methods
                                    if m.startswith("tvm_seed") and m[len("tvm_seed"):].isdigit()]
    for seed in seeds:
        specs[f"tvm_seed{seed}"] = RunSpec(f"tvm_seed{seed}", tvm, "flow_map", True, td, FLOW_MAP_STEPS,
                                           f"TVM baseline again with seed {seed} (seed-to-seed spread)", seed)
    return specs


def dit_config(args, lipschitz: bool) -> DiTConfig:
    return DiTConfig.create(None, lipschitz=lipschitz, input_size=8 * args.upsample, in_channels=1,
                            hidden_size=args.hidden, depth=args.depth, num_heads=args.heads,
                            patch_size=args.patch, num_classes=NUM_CLASSES, dtype="float32", attention_impl="xla")


@jax.jit
def _classify(clf_params, images):
    logits, feats = classifier_apply(clf_params, images)
    return jnp.argmax(logits, -1), feats


def features_and_preds(clf_params, images: np.ndarray):
    pred, feats = _classify(clf_params, jnp.asarray(images, jnp.float32))
    return np.asarray(feats, np.float64), np.asarray(pred)


def fd(f1: np.ndarray, f2: np.ndarray) -> float:
    try:
        return float(frechet_distance(*compute_statistics(f1), *compute_statistics(f2)))
    except ValueError:  # complex sqrtm beyond tolerance: report nan rather than abort the benchmark
        return float("nan")


def evaluate(apply, params, spec: RunSpec, evalset: dict, clf_params, ws, sample_batch: int,
             keep_grid: dict) -> dict:
    """Accuracy and FD per (w, steps); non-finite samples count as wrong and make FD nan."""
    out = {}
    labels = {h: jnp.asarray(evalset[h]["labels"]) for h in ("A", "B")}
    noise = {h: jnp.asarray(evalset[h]["noise"]) for h in ("A", "B")}
    for w in ws:
        res = {"acc": {}, "fd": {}, "fd_A": {}, "fd_B": {}, "nonfinite_samples": {}}
        for n_steps in spec.steps_eval:
            def fn(z, lab, n_steps=n_steps, w=w):
                return qc.sample(apply, params, z, lab, kind=spec.kind, steps=n_steps, w=w, null_label=NUM_CLASSES)

            samples, correct, total, feats, bad = {}, 0, 0, {}, 0
            for h in ("A", "B"):
                x = qc.batched(fn, noise[h], labels[h], batch=sample_batch)
                finite = np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)
                bad += int((~finite).sum())
                xc = np.clip(np.where(finite[:, None, None, None], x, 0.0), -1.0, 1.0)
                f, pred = features_and_preds(clf_params, xc)
                correct += int(np.sum((pred == evalset[h]["labels"]) & finite))
                total += len(pred)
                feats[h] = f
                samples[h] = x
            res["acc"][n_steps] = correct / total
            res["nonfinite_samples"][n_steps] = bad
            if bad:
                res["fd"][n_steps] = res["fd_A"][n_steps] = res["fd_B"][n_steps] = float("nan")
            else:
                res["fd_A"][n_steps] = fd(feats["A"], evalset["B"]["feats"])  # samples with A's labels vs B
                res["fd_B"][n_steps] = fd(feats["B"], evalset["A"]["feats"])
                res["fd"][n_steps] = 0.5 * (res["fd_A"][n_steps] + res["fd_B"][n_steps])
            keep_grid[(w, n_steps)] = samples["A"]
        out[w] = res
    return out


# ----------------------------------------------------------------------------- plots


COLORS = {"tvm": "C0", "fm": "C1", "meanflow": "C2", "tvm_naive_dit": "C3", "tvm_no_ema_target": "C4",
          "tvm_trunc": "C5", "tvm_clamp": "C6"}


def grid_image(samples: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """Rows = classes 0..9, ``per_class`` samples each (first ones of that label), in [0, 1]
    (NaN pixels shown mid grey, infinities clipped)."""
    h, wd = samples.shape[1:3]
    img = np.ones((NUM_CLASSES * (h + 1) + 1, per_class * (wd + 1) + 1))
    for c in range(NUM_CLASSES):
        idx = np.nonzero(labels == c)[0][:per_class]
        for j, i in enumerate(idx):
            im = np.nan_to_num(samples[i, ..., 0], nan=0.0, posinf=1.0, neginf=-1.0)
            im = (np.clip(im, -1, 1) + 1) / 2
            img[1 + c * (h + 1): 1 + c * (h + 1) + h, 1 + j * (wd + 1): 1 + j * (wd + 1) + wd] = im
    return img


def _show(ax, title: str, im: np.ndarray, h: int) -> None:
    ax.imshow(im, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks(np.arange(NUM_CLASSES) * (h + 1) + 1 + h / 2, [str(c) for c in range(NUM_CLASSES)], fontsize=6)


def _acc_fd(ev: dict, w: float, n: int) -> str:
    e = ev[w]
    return f"acc {100 * e['acc'][n]:.1f}% FD {e['fd'][n]:.2f}"


def plot_grids(path: str, name: str, grids: dict, ev: dict, labels: np.ndarray, ws, steps, real: np.ndarray,
               real_labels: np.ndarray, per_class: int = 8) -> str:
    """One run: real held-out digits, then its samples for every (w, steps) in ``steps``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [("real (held-out A)", grid_image(real, real_labels, per_class))]
    for w in ws:
        for n in steps:
            if (w, n) in grids:
                cols.append((f"{n} step{'s' if n > 1 else ''}, w={w:g}\n{_acc_fd(ev, w, n)}",
                             grid_image(grids[(w, n)], labels, per_class)))
    fig, axes = plt.subplots(1, len(cols), figsize=(2.3 * len(cols), 3.4), squeeze=False)
    for ax, (title, im) in zip(axes[0], cols):
        _show(ax, title, im, real.shape[1])
    fig.suptitle(f"{name}: conditional samples (same noise for every run), rows = classes 0-9", fontsize=9)
    qc.save_figure(fig, path, dpi=120)
    return path


def plot_sample_rows(path: str, grids_by_run: dict, evals: dict, steps_by_run: dict, labels: np.ndarray, ws,
                     real: np.ndarray, real_labels: np.ndarray, per_class: int = 8) -> str:
    """Every run in one image: one row per run (real held-out digits, then its samples for every w and
    the step counts of ``steps_by_run``), the same noise for every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(grids_by_run)
    ncols = 1 + max(len(ws) * len(steps_by_run[n]) for n in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.2 * ncols, 3.1 * len(rows)), squeeze=False)
    real_im = grid_image(real, real_labels, per_class)
    for i, name in enumerate(rows):
        _show(axes[i, 0], f"{name}\nreal (held-out A)", real_im, real.shape[1])
        cols = [(w, n) for w in ws for n in steps_by_run[name] if (w, n) in grids_by_run[name]]
        for j in range(1, ncols):
            ax = axes[i, j]
            if j > len(cols):
                ax.axis("off")
                continue
            w, n = cols[j - 1]
            _show(ax, f"{name}: {n} step{'s' if n > 1 else ''}, w={w:g}\n{_acc_fd(evals[name], w, n)}",
                  grid_image(grids_by_run[name][(w, n)], labels, per_class), real.shape[1])
    fig.suptitle("digits: conditional samples (same noise for every run), rows of each grid = classes 0-9",
                 fontsize=10)
    qc.save_figure(fig, path, dpi=90)
    return path


def plot_curves(path: str, results: dict, floor_fd: float, clf_acc: float, ws, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(ws), figsize=(4.8 * len(ws), 7), squeeze=False)
    for j, w in enumerate(ws):
        for name, r in results.items():
            e = r["eval"][w]
            steps = sorted(e["acc"])
            main = name in MAIN_RUNS
            style = "o-" if main else ("s--" if name.startswith("tvm_seed") else "x:")
            kw = dict(color=COLORS.get(name, "C0" if name.startswith("tvm_seed") else None), label=name,
                      lw=2 if main else 1, ms=4)
            axes[0, j].plot(steps, [100 * e["acc"][k] for k in steps], style, **kw)
            axes[1, j].plot(steps, [e["fd"][k] for k in steps], style, **kw)
        axes[0, j].axhline(100 * clf_acc, ls="--", color="k", lw=1, label="classifier held-out acc")
        axes[1, j].axhline(floor_fd, ls="--", color="k", lw=1, label="real-vs-real floor")
        axes[0, j].set_ylabel("class accuracy of samples (%)")
        axes[1, j].set_ylabel("FD (classifier features)")
        axes[1, j].set_yscale("log")
        for i in range(2):
            axes[i, j].set_xscale("log", base=2)
            axes[i, j].set_xlabel("sampling steps")
            axes[i, j].set_title(f"w = {w:g}")
            axes[i, j].grid(True, which="both", alpha=0.3)
            axes[i, j].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    qc.save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, fewer runs")
    p.add_argument("--out_dir", default=None,
                   help="write everything here: quality_digits.json, quality_digits.png, quality_digits_<run>.png "
                        "(overrides --out/--plot/--grids)")
    p.add_argument("--out", default="bench/results/quality_digits.json", help="JSON ('' to skip)")
    p.add_argument("--plot", default="bench/results/quality_digits.png", help="curves PNG ('' to skip all images)")
    p.add_argument("--grids", default=None, help="prefix of the sample-grid PNGs (default: --plot minus .png)")
    p.add_argument("--per_run_grids", action="store_true",
                   help="also write one sample-grid PNG per run (<grids>_<run>.png); <grids>_samples.png always "
                        "holds every run's grids")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 4000; quick 60)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, the same for every run")
    p.add_argument("--lr_schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--final_lr_fraction", type=float, default=0.05, help="cosine: final lr / peak lr")
    p.add_argument("--upsample", type=int, default=1)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--ema_decay", type=float, default=0.999, help="evaluation EMA (quick: 0.9)")
    p.add_argument("--target_decay", type=float, default=0.99, help="EMA target (teacher) decay")
    p.add_argument("--train_w_max", type=float, default=3.0)
    p.add_argument("--label_dropout", type=float, default=0.1)
    p.add_argument("--meanflow_p_equal", type=float, default=0.75)
    p.add_argument("--eval_w", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--n_heldout", type=int, default=800, help="held-out images (two halves A, B)")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"runs, in order (default {' '.join(DEFAULT_METHODS)}; quick: tvm fm meanflow tvm_naive_dit)")
    p.add_argument("--tvm_seeds", type=int, nargs="*", default=[],
                   help="more seeds of the baseline TVM run (tvm_seed<k>), run after --methods; tvm_seed<k> can "
                        "also be named in --methods")
    p.add_argument("--deadline_s", type=float, default=0.0,
                   help="skip a run if the script's elapsed time plus 1.1 x the longest run so far plus 15 s "
                        "(final plots) would pass this many seconds (0: no deadline)")
    p.add_argument("--xla_autotune", action="store_true",
                   help="keep XLA:GPU GEMM autotuning (off by default: --xla_gpu_autotune_level=0 in XLA_FLAGS)")
    p.add_argument("--compile_cache", default="/tmp/tvm_jax_quality_jax_cache",
                   help="JAX persistent compilation cache folder ('' for none); identical programs (the extra "
                        "seed run, reruns) then compile once")
    p.add_argument("--clf_steps", type=int, default=3000)
    p.add_argument("--clf_lr", type=float, default=1e-3)
    p.add_argument("--clf_noise", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--eval_seed", type=int, default=1234)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 60 if args.quick else 4000
    if args.methods is None:
        args.methods = ["tvm", "fm", "meanflow", "tvm_naive_dit"] if args.quick else list(DEFAULT_METHODS)
    if args.quick:
        args.clf_steps = min(args.clf_steps, 500)
        args.ema_decay = min(args.ema_decay, 0.9)
    if args.out_dir:
        args.out = os.path.join(args.out_dir, "quality_digits.json")
        args.plot = os.path.join(args.out_dir, "quality_digits.png")
        args.grids = os.path.join(args.out_dir, "quality_digits")
    if args.grids is None:
        args.grids = os.path.splitext(args.plot)[0] if args.plot else ""
    return args


def main(argv=None):
    args = parse_args(argv)
    t_script = time.time()
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    meta = qc.run_metadata(sys.argv if argv is None else ["bench/quality_digits.py"] + list(argv))
    print(f"devices {meta['machine']['jax_devices']} ({meta['machine'].get('device_kind')})", flush=True)
    ws = [float(w) for w in args.eval_w]
    data = split_digits(args.upsample, args.n_heldout, args.split_seed)
    x_tr, y_tr = data["train"]
    x_ho = np.concatenate([data["A"][0], data["B"][0]])
    y_ho = np.concatenate([data["A"][1], data["B"][1]])

    print("== classifier", flush=True)
    clf, clf_info = train_classifier(x_tr, y_tr, x_ho, y_ho, seed=args.seed, steps=args.clf_steps, lr=args.clf_lr,
                                     batch=128, noise_std=args.clf_noise)
    print(f"  held-out accuracy {clf_info['heldout_accuracy']:.4f} (train {clf_info['train_accuracy']:.4f}, "
          f"{clf_info['seconds']:.0f}s)", flush=True)
    rng = np.random.default_rng(args.eval_seed)
    evalset = {}
    for h in ("A", "B"):
        x, y = data[h]
        f, pred = features_and_preds(clf, x)
        evalset[h] = {"labels": y.astype(np.int32), "feats": f,
                      "noise": rng.standard_normal(x.shape).astype(np.float32), "real_acc": float(np.mean(pred == y))}
    floor = fd(evalset["A"]["feats"], evalset["B"]["feats"])
    print(f"  real-vs-real FD floor (A vs B, {len(evalset['A']['labels'])} vs {len(evalset['B']['labels'])}): "
          f"{floor:.4f}", flush=True)

    specs = run_specs(args)
    order = list(dict.fromkeys(list(args.methods) + [f"tvm_seed{s}" for s in args.tvm_seeds]))
    unknown = [m for m in order if m not in specs]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(specs)}")
    opt = qc.OptConfig(lr=args.lr, schedule=args.lr_schedule, decay_steps=args.steps,
                       final_lr_fraction=args.final_lr_fraction)
    # One network function per architecture, shared by its runs (the position table does not depend on
    # the seed), so the jitted samplers compile once per architecture, not once per run.
    applies, results, grids_by_run, model_info, skipped_runs, grid_paths = {}, {}, {}, {}, [], {}
    longest_run = 0.0
    grid_steps = {"flow_map": (1, 2, 4), "velocity": (1, 8, 64)}

    def payload(complete: bool) -> dict:
        return {
            "benchmark": "quality_digits",
            "complete": complete,
            "meta": meta,
            "total_seconds": time.time() - t_script,
            "config": {**vars(args), "optimizer": opt, "models": model_info,
                       "data": {"source": "tvm_jax.data.pipeline.load_digits", "n_train": int(len(y_tr)),
                                "n_heldout_A": int(len(data["A"][1])), "n_heldout_B": int(len(data["B"][1])),
                                "resolution": 8 * args.upsample},
                       "eval_params": "evaluation EMA (ema_params)", "flow_map_steps": FLOW_MAP_STEPS,
                       "fm_steps": FM_STEPS, "samples_per_eval": int(len(y_ho))},
            "classifier": {**clf_info, "real_accuracy_A": evalset["A"]["real_acc"],
                           "real_accuracy_B": evalset["B"]["real_acc"]},
            "floor_fd_real_A_vs_B": floor,
            "runs": {n: {**r, "eval": {str(w): e for w, e in r["eval"].items()}} for n, r in results.items()},
            "skipped_runs": skipped_runs,
            "checks": targets_and_claims(results, ws),
            "images": {"curves": args.plot or None, "grids": grid_paths},
        }

    for name in order:
        elapsed = time.time() - t_script
        if args.deadline_s and results and elapsed + 1.1 * longest_run + 15.0 > args.deadline_s:
            print(f"== {name}: SKIPPED (elapsed {elapsed:.0f}s + longest run {longest_run:.0f}s would pass the "
                  f"deadline {args.deadline_s:.0f}s)", flush=True)
            skipped_runs.append(name)
            continue
        t_run = time.time()
        spec = specs[name]
        seed = args.seed if spec.seed is None else spec.seed
        cfg = dit_config(args, spec.lipschitz)
        apply_new, params0 = build_dit(cfg, seed=seed)
        apply = applies.setdefault(spec.lipschitz, apply_new)
        model_info[name] = {"config": cfg, "num_params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(params0)))}
        print(f"== {name}: {spec.description} (seed {seed}, {model_info[name]['num_params']} params)", flush=True)
        tr = qc.train(apply, make_objective(spec.objective), params0, steps=args.steps,
                      batches=epoch_batches(x_tr, y_tr, args.batch, seed), opt=opt, ema_decay=args.ema_decay,
                      target_decay=spec.target_decay, seed=seed, log_every=max(args.steps // 10, 1), name=name)
        t1 = time.time()
        grids = {}
        ev = evaluate(apply, tr.state.ema_params, spec, evalset, clf, ws, sample_batch=400, keep_grid=grids)
        eval_seconds = time.time() - t1
        grids_by_run[name] = grids
        results[name] = {
            "description": spec.description, "objective": spec.objective, "kind": spec.kind,
            "lipschitz": spec.lipschitz, "target_decay": spec.target_decay, "seed": seed, "eval": ev,
            "train": tr.summary(),
            "eval_seconds": eval_seconds,
        }
        for w in ws:
            e = ev[w]
            print(f"  w={w:g} acc " + " ".join(f"{k}:{100 * v:.1f}" for k, v in e["acc"].items())
                  + " | FD " + " ".join(f"{k}:{v:.3f}" for k, v in e["fd"].items()), flush=True)
        if args.grids and args.per_run_grids:
            grid_paths[name] = plot_grids(f"{args.grids}_{name}.png", name, grids, ev, evalset["A"]["labels"], ws,
                                          grid_steps[spec.kind], data["A"][0], data["A"][1])
        run_seconds = time.time() - t_run
        results[name]["run_seconds"] = run_seconds
        longest_run = max(longest_run, run_seconds)
        print(f"  train {tr.train_seconds:.0f}s ({tr.train_seconds / max(tr.steps - 1, 1) * 1e3:.1f} ms/step) + "
              f"compile {tr.compile_seconds:.0f}s, eval {eval_seconds:.0f}s, run {run_seconds:.0f}s, skipped steps "
              f"{tr.skipped}, non-finite losses {tr.nonfinite_loss_steps} [elapsed {time.time() - t_script:.0f}s]",
              flush=True)
        if args.out:
            qc.write_json(args.out, payload(complete=False))

    if args.grids and results:
        grid_paths["all_runs"] = plot_sample_rows(
            f"{args.grids}_samples.png", grids_by_run, {n: r["eval"] for n, r in results.items()},
            {n: grid_steps[r["kind"]] for n, r in results.items()}, evalset["A"]["labels"], ws, data["A"][0],
            data["A"][1])
    if args.plot and results:
        plot_curves(args.plot, results, floor, clf_info["heldout_accuracy"], ws,
                    f"digits {8 * args.upsample}x{8 * args.upsample}, DiT h{args.hidden} d{args.depth} "
                    f"p{args.patch}, {args.steps} steps x batch {args.batch}, lr {args.lr:g}, seed {args.seed}; "
                    f"{meta['machine'].get('device_kind')}")
    if grid_paths or args.plot:
        print(f"wrote {args.plot} and {sorted(grid_paths.values())}", flush=True)

    final = payload(complete=True)
    for c in final["checks"].values():
        print(f"CHECK {c['name']}: {c['statement']} -> {c['passed']}", flush=True)
    if args.out:
        qc.write_json(args.out, final)
        print(f"wrote {args.out}", flush=True)
    print(f"total {final['total_seconds']:.0f}s", flush=True)
    return final


def _better(metric: str, a: float, b: float) -> bool:
    """Is ``a`` better than ``b``? (accuracy: higher; FD: lower; nan is worst)."""
    if not np.isfinite(b):
        return bool(np.isfinite(a))
    if not np.isfinite(a):
        return False
    return a > b if metric == "acc" else a < b


def _compare(results: dict, base: str, other: str, ws, seeds: list[str]) -> dict:
    """Baseline ``base`` vs ``other`` on acc and FD at 1 and 2 steps, every w; a difference counts as
    clear when it exceeds the spread (max - min) of the baseline over its seeds."""
    per_w, wins, clear_wins, clear_losses = {}, [], 0, 0
    for w in ws:
        row = {}
        for metric in ("acc", "fd"):
            for n in (1, 2):
                a, b = results[base]["eval"][w][metric][n], results[other]["eval"][w][metric][n]
                base_vals = [a] + [results[s]["eval"][w][metric][n] for s in seeds]
                finite = [v for v in base_vals if np.isfinite(v)]
                spread = float(max(finite) - min(finite)) if len(base_vals) > 1 and finite else None
                better = _better(metric, a, b)
                clear = spread is not None and (not np.isfinite(a - b) or abs(a - b) > spread)
                row[f"{metric}_{n}step"] = {base: a, other: b, "baseline_better": better,
                                            "baseline_seed_values": base_vals, "baseline_seed_spread": spread,
                                            "difference_exceeds_seed_spread": bool(clear)}
                wins.append(better)
                clear_wins += int(clear and better)
                clear_losses += int(clear and not better)
        per_w[str(w)] = row
    return {"metrics": per_w, "wins": int(sum(wins)), "total": len(wins), "wins_beyond_seed_spread": clear_wins,
            "losses_beyond_seed_spread": clear_losses, "baseline_seeds": [base] + seeds,
            "passed": bool(sum(wins) == len(wins))}


def targets_and_claims(results: dict, ws) -> dict:
    checks = {}
    if "tvm" in results and "fm" in results:
        for w in ws:
            a, b = results["tvm"]["eval"][w]["acc"][1], results["fm"]["eval"][w]["acc"][64]
            checks[f"target_tvm1_acc_vs_fm64_w{w:g}"] = {
                "name": f"target: TVM 1-step class accuracy within 3 points of FM 64-step (w = {w:g})",
                "statement": f"TVM 1-step {100 * a:.1f}% vs FM 64-step {100 * b:.1f}% (diff {100 * (a - b):+.1f})",
                "tvm_1step_acc": a, "fm_64step_acc": b, "diff_points": 100 * (a - b),
                "passed": bool(a >= b - 0.03),
                "tvm_1step_fd": results["tvm"]["eval"][w]["fd"][1], "fm_64step_fd": results["fm"]["eval"][w]["fd"][64]}
    seeds = [n for n in results if n.startswith("tvm_seed")]
    if "tvm" not in results:
        return checks
    for other, claim in (("tvm_naive_dit", "the Lipschitz DiT changes matter (TVM, Lipschitz vs naive DiT)"),
                         ("tvm_no_ema_target", "the EMA target beats no EMA target"),
                         ("tvm_trunc", "gap* beats the trunc time sampler"),
                         ("tvm_clamp", "gap* beats the clamp time sampler")):
        if other not in results:
            continue
        c = _compare(results, "tvm", other, ws, seeds)
        tr_b, tr_o = results["tvm"]["train"], results[other]["train"]
        c.update(name=f"paper claim: {claim}",
                 statement=f"baseline TVM better on {c['wins']}/{c['total']} metrics (acc and FD at 1 and 2 steps, "
                           f"every w); beyond the seed-to-seed spread of the baseline: {c['wins_beyond_seed_spread']} "
                           f"better, {c['losses_beyond_seed_spread']} worse"
                           + ("" if seeds else " (no extra seed run: spread unknown)")
                           + f"; skipped steps {tr_b['skipped_steps']} vs {tr_o['skipped_steps']}",
                 baseline_skipped_steps=tr_b["skipped_steps"], other_skipped_steps=tr_o["skipped_steps"],
                 other_nonfinite_loss_steps=tr_o["nonfinite_loss_steps"],
                 baseline_final_grad_norm=tr_b["final_metrics"].get("grad_norm"),
                 other_final_grad_norm=tr_o["final_metrics"].get("grad_norm"))
        checks[f"claim_{other}"] = c
    return checks


if __name__ == "__main__":
    main()

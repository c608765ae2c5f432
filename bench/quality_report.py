"""Markdown tables of the quality benchmarks, read from their JSON result files.

    python bench/quality_report.py                        # print the tables
    python bench/quality_report.py --write bench/QUALITY.md

``--write`` replaces, in that file, the text between ``<!-- BEGIN quality_report:NAME -->`` and
``<!-- END quality_report:NAME -->`` (NAME = ``gmm``, ``digits``) with freshly generated tables,
leaving everything else as written. A missing JSON file renders as a note saying so.

Claim verdicts (same rule for both benchmarks): the baseline TVM run (gap*, EMA target, Lipschitz
DiT) is compared with the ablation on every listed metric; a difference counts as *clear* when it
is larger than the spread (max - min) of the baseline over its seeds (``tvm`` and ``tvm_seed*``).
``supported``: the baseline is better on more than half of the metrics, and on more metrics
clearly than clearly worse. ``refuted``: the mirror image. Otherwise ``not resolved``. Without
extra seed runs there is no spread, and the verdict rests on the counts alone (marked so).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GMM_JSON = os.path.join(ROOT, "bench", "results", "quality_gmm.json")
DIGITS_JSON = os.path.join(ROOT, "bench", "results", "quality_digits.json")
ALL_STEPS = (1, 2, 4, 8, 16, 32, 64)


def _f(v, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if not math.isfinite(v):
        return "nan"
    return f"{v:.{digits}f}"


def _pct(v) -> str:
    return "" if v is None else ("nan" if not math.isfinite(v) else f"{100 * v:.1f}")


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _num(v):
    """JSON stores non-finite floats as strings ('nan')."""
    return float(v) if isinstance(v, str) else v


def _steps_of(runs: dict, w: str, key: str) -> list[int]:
    steps = set()
    for r in runs.values():
        steps |= {int(k) for k in r["eval"].get(w, {}).get(key, {})}
    return [s for s in ALL_STEPS if s in steps]


def _provenance(d: dict) -> str:
    m = d.get("meta", {})
    mach = m.get("machine", {})
    dev = mach.get("device_kind") or mach.get("jax_backend")
    hw = dev if mach.get("jax_backend") == "gpu" else f"{mach.get('cpu', '?')} ({mach.get('logical_cores', '?')} " \
                                                        f"logical cores, load {_f((mach.get('load_average_at_start') or [math.nan])[0], 1)} at start)"
    v = m.get("versions", {})
    git = m.get("git") or {}
    head = git.get("head") or m.get("git_commit", "")
    lines = [f"- command: `{m.get('command', '?')}`",
             f"- date: {m.get('date', '?')}; device: {hw}; jax {v.get('jax', '?')}, flax {v.get('flax', '?')}, "
             f"optax {v.get('optax', '?')}; git {head[:12] if head else '?'}"
             + (" (with local changes)" if git.get("status_library_and_bench") or "modified" in str(head) else ""),
             f"- total wall time: {_f(d.get('total_seconds'), 0)} s"]
    if mach.get("nvidia_smi"):
        lines.append(f"- nvidia-smi: {'; '.join(mach['nvidia_smi'])}")
    if d.get("complete") is False:
        lines.append("- **incomplete file** (the run stopped before its end)")
    return "\n".join(lines)


def _seed_runs(runs: dict) -> list[str]:
    return [n for n in runs if n.startswith("tvm_seed")]


def _claim_table(runs: dict, other: str, metrics: list[tuple[str, str, int | None, bool]], label: str) -> tuple[str, str]:
    """``metrics``: (w, key, steps or None, higher_is_better). Returns (table, verdict line)."""
    seeds = _seed_runs(runs)
    rows, wins, clear_w, clear_l = [], 0, 0, 0

    def get(name, w, key, steps):
        e = runs[name]["eval"][w]
        v = e[key] if steps is None else e[key].get(str(steps))
        return _num(v)

    for w, key, steps, higher in metrics:
        a, b = get("tvm", w, key, steps), get(other, w, key, steps)
        if a is None or b is None:
            continue
        base_vals = [a] + [get(s, w, key, steps) for s in seeds]
        finite = [x for x in base_vals if x is not None and math.isfinite(x)]
        spread = (max(finite) - min(finite)) if seeds and finite else None
        if not math.isfinite(b):
            better = math.isfinite(a)
        elif not math.isfinite(a):
            better = False
        else:
            better = a > b if higher else a < b
        clear = spread is not None and (not math.isfinite(a - b) or abs(a - b) > spread)
        wins += better
        clear_w += clear and better
        clear_l += clear and not better
        name = f"{key}" + (f" {steps}-step" if steps is not None else "")
        fmt = _pct if key == "acc" else _f
        rows.append([f"w={float(w):g}", name + (" (%)" if key == "acc" else ""), fmt(a), fmt(b),
                     "" if spread is None else fmt(spread), "yes" if better else "no",
                     "" if spread is None else ("yes" if clear else "no")])
    n = len(rows)
    if seeds:
        if wins > n / 2 and clear_w > clear_l:
            verdict = "supported"
        elif wins < n / 2 and clear_l > clear_w:
            verdict = "refuted"
        else:
            verdict = "not resolved"
        why = (f"baseline better on {wins}/{n} metrics; beyond the seed spread of the baseline "
               f"({', '.join(['tvm'] + seeds)}): {clear_w} better, {clear_l} worse")
    else:
        verdict = "supported (no seed spread)" if wins > n / 2 else ("refuted (no seed spread)" if wins < n / 2
                                                                      else "not resolved (no seed spread)")
        why = f"baseline better on {wins}/{n} metrics; no extra seed run, so no seed spread to judge by"
    table = _table(["w", "metric", "tvm (baseline)", other, "baseline seed spread", "baseline better",
                    "beyond spread"], rows)
    return table, f"**{label}: {verdict}** ({why})."


# ----------------------------------------------------------------------------- gmm


def gmm_section(path: str) -> str:
    if not os.path.exists(path):
        return f"_No result file `{os.path.relpath(path, ROOT)}` yet._"
    d = json.load(open(path))
    c, runs, truth = d["config"], d["runs"], d["truth"]
    ws = list(truth)
    out = [_provenance(d),
           f"- setup: FlowMLP {c['model']['width']}x{c['model']['depth']} ({c['model']['num_params']} params), "
           f"{c['steps']} steps x batch {c['batch']}, AdamW lr {c['lr']:g} ({c['lr_schedule']}), evaluation EMA "
           f"{c['ema_decay']}, target EMA {c['target_decay']}, train w ~ U[1, {c['train_w_max']:g}], label dropout "
           f"{c['label_dropout']}; W2 sets of n = {c['n_eval']}, displacement set of {c['n_disp']} points; "
           f"evaluated: evaluation-EMA parameters", ""]
    for w in ws:
        fl = truth[w]["floor"]
        steps = _steps_of(runs, w, "w2")
        rows = []
        for name, r in runs.items():
            e = r["eval"][w]
            rows.append([f"`{name}`"] + [_f(_num(e["w2"].get(str(s)))) for s in steps]
                        + [_f(_num(e["w2_cond"].get("1")))])
        rows.append(["data vs data (floor, any step count)", f"{fl['w2_mean']:.3f} ± {fl['w2_std']:.3f}"]
                    + [""] * (len(steps) - 1) + [f"{fl['w2_cond_mean']:.3f} ± {fl['w2_cond_std']:.3f}"])
        out += [f"**W2 to the true {'data distribution' if float(w) == 1 else 'CFG pushforward'}, "
                f"w = {float(w):g}** (exact, n = {c['n_eval']}; columns: sampling steps; flow maps: N jumps, FM: "
                f"N Euler steps; last column: label-respecting W2 of the 1-step samples; floor: mean ± std over "
                f"{fl['repeats']} independent true sets)", "",
                _table(["run"] + [str(s) for s in steps] + ["W2 per class, 1 step"], rows), ""]
    rows = []
    for name, r in runs.items():
        rows.append([f"`{name}`"] + sum([[_f(_num(r["eval"][w]["disp_train"]), 4), _f(_num(r["eval"][w]["disp_10"]), 3)]
                                          for w in ws], []))
    rows.append(["identity map f = x_t"] + sum([[_f(truth[w]["baselines"]["disp_train_identity"], 4),
                                                 _f(truth[w]["baselines"]["disp_10_identity"], 3)] for w in ws], []))
    rows.append(["best noise-independent map E[psi | c]"] + sum([["", _f(truth[w]["baselines"]["disp_10_class_mean"], 3)]
                                                                  for w in ws], []))
    out += ["**Displacement error** `E|f(x_t, t, s) - psi(x_t, t, s)|^2` (psi: exact flow map): over the gap* "
            "training time distribution (`train`) and at (t, s) = (1, 0) on the sampling noise (`(1,0)`); FM's f "
            "is one (CFG) Euler step", "",
            _table(["run"] + sum([[f"train, w={float(w):g}", f"(1,0), w={float(w):g}"] for w in ws], []), rows), ""]

    out += ["**Target and claims**", ""]
    w1 = next((w for w in ws if float(w) == 1.0), ws[0])
    if "tvm" in runs and "fm" in runs:
        a, b = _num(runs["tvm"]["eval"][w1]["w2"]["1"]), _num(runs["fm"]["eval"][w1]["w2"]["64"])
        out += [f"- target, TVM 1-step W2 <= 1.5 x FM 64-step W2 (w = {float(w1):g}): {a:.4f} vs 1.5 x {b:.4f} = "
                f"{1.5 * b:.4f} (ratio {a / b:.2f}): **{'met' if a <= 1.5 * b else 'missed'}** "
                f"(floor {truth[w1]['floor']['w2_mean']:.3f})", ""]
    metrics = [(w, key, s, False) for w in ws for key, s in (("w2", 1), ("w2", 2), ("disp_10", None),
                                                              ("disp_train", None))]
    for other, label in (("tvm_no_ema_target", "EMA target beats no EMA target"),
                         ("tvm_trunc", "gap* beats the trunc sampler"),
                         ("tvm_clamp", "gap* beats the clamp sampler")):
        if other in runs and "tvm" in runs:
            table, verdict = _claim_table(runs, other, metrics, label)
            out += [verdict, "", table, ""]
    rows = [[f"`{n}`", str(r["train"]["steps"]), _f(r["train"]["seconds"], 0), _f(1e3 * r["train"]["sec_per_step"], 1),
             _f(r["train"]["compile_seconds"], 1), _f(r.get("eval_seconds"), 0), str(r["train"]["skipped_steps"])]
            for n, r in runs.items()]
    out += ["**Cost** (this machine)", "",
            _table(["run", "steps", "train s", "ms/step", "compile s", "eval s", "skipped steps"], rows)]
    return "\n".join(out)


# ----------------------------------------------------------------------------- digits


def digits_section(path: str) -> str:
    if not os.path.exists(path):
        return (f"_No result file `{os.path.relpath(path, ROOT)}` yet: run the command above, then "
                f"`python bench/quality_report.py --write bench/QUALITY.md`._")
    d = json.load(open(path))
    c, runs, clf = d["config"], d["runs"], d["classifier"]
    ws = sorted({w for r in runs.values() for w in r["eval"]}, key=float)
    model = next(iter(c.get("models", {}).values()), {})
    out = [_provenance(d),
           f"- setup: DiT h{c['hidden']} d{c['depth']} heads {c['heads']} patch {c['patch']} "
           f"({model.get('num_params', '?')} params), digits {c['data']['resolution']}x{c['data']['resolution']}, "
           f"{c['data']['n_train']} train images, {c['steps']} steps x batch {c['batch']}, AdamW lr {c['lr']:g} "
           f"({c['lr_schedule']}), evaluation EMA {c['ema_decay']}, target EMA {c['target_decay']}, train "
           f"w ~ U[1, {c['train_w_max']:g}], label dropout {c['label_dropout']}",
           f"- judge: {clf['architecture']}, held-out accuracy {100 * clf['heldout_accuracy']:.1f}% on "
           f"{clf['n_heldout']} real held-out digits; Fréchet distance floor (real half A vs real half B, "
           f"{c['data']['n_heldout_A']} vs {c['data']['n_heldout_B']}): {_f(d['floor_fd_real_A_vs_B'])}; "
           f"{c['samples_per_eval']} samples per evaluation (labels = the held-out labels)"]
    if d.get("skipped_runs"):
        out.append(f"- runs skipped for the deadline: {', '.join(d['skipped_runs'])}")
    out.append("")
    for w in ws:
        steps = _steps_of(runs, w, "acc")
        rows = [[f"`{n}`"] + [_pct(_num(r["eval"][w]["acc"].get(str(s)))) for s in steps] for n, r in runs.items()]
        rows.append(["real held-out digits"] + [_pct(clf["heldout_accuracy"])] + [""] * (len(steps) - 1))
        out += [f"**Class accuracy (%) of conditional samples, w = {float(w):g}** (columns: sampling steps)", "",
                _table(["run"] + [str(s) for s in steps], rows), ""]
        rows = [[f"`{n}`"] + [_f(_num(r["eval"][w]["fd"].get(str(s))), 2) for s in steps] for n, r in runs.items()]
        rows.append(["real vs real (floor)"] + [_f(d["floor_fd_real_A_vs_B"], 2)] + [""] * (len(steps) - 1))
        out += [f"**Fréchet distance in the classifier's feature space, w = {float(w):g}**", "",
                _table(["run"] + [str(s) for s in steps], rows), ""]
    out += ["**Target and claims**", ""]
    if "tvm" in runs and "fm" in runs:
        for w in ws:
            a, b = _num(runs["tvm"]["eval"][w]["acc"]["1"]), _num(runs["fm"]["eval"][w]["acc"]["64"])
            out.append(f"- target, TVM 1-step class accuracy within 3 points of FM 64-step (w = {float(w):g}): "
                       f"{100 * a:.1f}% vs {100 * b:.1f}% ({100 * (a - b):+.1f} points): "
                       f"**{'met' if a >= b - 0.03 else 'missed'}**")
        out.append("")
    metrics = [(w, key, s, key == "acc") for w in ws for key in ("acc", "fd") for s in (1, 2)]
    for other, label in (("tvm_naive_dit", "the Lipschitz DiT changes matter"),
                         ("tvm_no_ema_target", "EMA target beats no EMA target"),
                         ("tvm_trunc", "gap* beats the trunc sampler"),
                         ("tvm_clamp", "gap* beats the clamp sampler")):
        if other in runs and "tvm" in runs:
            table, verdict = _claim_table(runs, other, metrics, label)
            tr = runs[other]["train"]
            out += [verdict + f" Skipped (non-finite) steps: tvm {runs['tvm']['train']['skipped_steps']}, "
                              f"{other} {tr['skipped_steps']}.", "", table, ""]
    rows = [[f"`{n}`", str(r["train"]["steps"]), _f(r["train"]["seconds"], 0), _f(1e3 * r["train"]["sec_per_step"], 1),
             _f(r["train"]["compile_seconds"], 1), _f(r.get("eval_seconds"), 0), str(r["train"]["skipped_steps"])]
            for n, r in runs.items()]
    out += ["**Cost** (this machine)", "",
            _table(["run", "steps", "train s", "ms/step", "compile s", "eval s", "skipped steps"], rows)]
    imgs = d.get("images", {}).get("grids", {})
    if imgs:
        out += ["", "Sample grids: " + ", ".join(f"`{os.path.basename(p)}`" for p in imgs.values())]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def render(gmm: str, digits: str) -> dict[str, str]:
    return {"gmm": gmm_section(gmm), "digits": digits_section(digits)}


def write_into(path: str, sections: dict[str, str]) -> None:
    text = open(path).read()
    for name, body in sections.items():
        pat = re.compile(rf"(<!-- BEGIN quality_report:{name} -->\n).*?(<!-- END quality_report:{name} -->)", re.S)
        if not pat.search(text):
            raise SystemExit(f"{path}: no block <!-- BEGIN quality_report:{name} --> ... <!-- END ... -->")
        text = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    with open(path, "w") as f:
        f.write(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gmm", default=GMM_JSON)
    p.add_argument("--digits", default=DIGITS_JSON)
    p.add_argument("--write", default=None, help="markdown file whose generated blocks are replaced")
    args = p.parse_args(argv)
    sections = render(args.gmm, args.digits)
    if args.write:
        write_into(args.write, sections)
        print(f"updated {args.write}")
    else:
        for name, body in sections.items():
            print(f"## {name}\n\n{body}\n")


if __name__ == "__main__":
    main()

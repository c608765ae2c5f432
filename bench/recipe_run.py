"""Benchmark of the headline command: the paper's recipe at its global batch, as a user runs it.

Runs, on the visible GPUs and synthetic latents, for a few steps::

    python -m tvm_jax.main --config=CONFIG --config.data.source=synthetic --workdir=TMP \
        --config.train.num_steps=N --config.train.log_every=1 [--config.a.b=value ...]

(or, with ``--processes P``, the same through ``NUM_PROCESSES=P bash launch/local.sh``: one process
per GPU share) and reads from its log the micro-batch size the trainer chose (with the compiled
step's estimated memory) and the images/s of every step. The first step also pays for the
first execution; the reported rate is the median over steps 2..N. Writes JSON with the GPU name,
date and command; prints a summary last.

    python bench/recipe_run.py --config configs/in256.py --steps 4 --out bench/results/recipe_in256_h200.json
    python bench/recipe_run.py --config configs/in256.py --set mesh.fsdp=2 --out fsdp.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from queue import Empty, Queue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_STEP = re.compile(r"step (\d+)/(\d+)  loss (\S+)  grad_norm (\S+) .*?([\d.]+) img/s")
_MICRO = re.compile(r"Micro-batch size (\d+) per device \(([^)]*)\).*?estimated memory ([\d.]+ [GM]iB)")


def parse_log(text: str) -> dict:
    steps = list(_STEP.finditer(text))
    micro = _MICRO.search(text)
    return {
        "images_per_s_by_step": {int(m.group(1)): float(m.group(5)) for m in steps},
        # as logged (4 and 3 decimals): enough to compare runs of one recipe on different device counts
        "loss_by_step": {int(m.group(1)): float(m.group(3)) for m in steps},
        "grad_norm_by_step": {int(m.group(1)): float(m.group(4)) for m in steps},
        "microbatch_size": int(micro.group(1)) if micro else None,
        "microbatch_reason": micro.group(2) if micro else None,
        "estimated_memory_per_device": micro.group(3) if micro else None,
    }


def follow_run(cmd: list[str], env: dict, *, last_step: int, timeout: float) -> tuple[list[str], str, int]:
    """Runs ``cmd`` and reads its log as it comes until the line of step ``last_step`` (outcome
    ``measured``), the process's exit (``exited``) or ``timeout`` seconds (``timeout``), whichever is
    first; then stops the process group (its end-of-run sample grids and checkpoint are not what is
    measured). The deadline holds while the run is silent (a step of 2048 at 512px logs nothing for
    80 s), so the caller always gets to write what was measured before any outer time limit."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    queue: Queue = Queue()

    def pump():
        for line in proc.stdout:
            queue.put(line)
        queue.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    last = re.compile(rf"step {last_step}/{last_step} ")
    lines, outcome = [], "timeout"
    try:
        while True:
            try:
                line = queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                break
            if line is None:
                outcome = "exited"
                break
            lines.append(line)
            if last.search(line):
                outcome = "measured"
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait()
    return lines, outcome, proc.returncode


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "in256.py"))
    p.add_argument("--steps", type=int, default=4, help="training steps (>= 2; the first is not timed)")
    p.add_argument("--processes", type=int, default=1, help="> 1: one process per GPU share via launch/local.sh")
    p.add_argument("--set", action="append", default=[], help="extra config override a.b=value (repeatable)")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2")

    # Device facts from a short-lived process: this one must not hold GPU memory during the run.
    facts = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices(); "
                            "print(jax.__version__); print(len(d)); print(d[0].device_kind)"],
                           capture_output=True, text=True, check=True).stdout.strip().splitlines()
    jax_version, n_dev, gpu = facts[-3], int(facts[-2]), facts[-1]
    workdir = tempfile.mkdtemp(prefix="recipe_run_")
    flags = ["--config.data.source=synthetic", f"--config.train.num_steps={args.steps}", "--config.train.log_every=1",
             *[f"--config.{kv}" for kv in args.set]]
    if args.processes > 1:
        cmd = ["bash", "launch/local.sh", args.config, workdir, *flags]
        env = dict(os.environ, NUM_PROCESSES=str(args.processes))
    else:
        cmd = [sys.executable, "-m", "tvm_jax.main", f"--config={args.config}", f"--workdir={workdir}", *flags]
        env = dict(os.environ)
    t0 = time.time()
    lines, outcome, returncode = follow_run(cmd, env, last_step=args.steps, timeout=args.timeout)
    wall = time.time() - t0
    log = "".join(lines)
    shutil.rmtree(workdir, ignore_errors=True)
    parsed = parse_log(log)
    timed = [r for s, r in parsed["images_per_s_by_step"].items() if s >= 2]
    report = {
        "gpu": gpu, "num_devices": n_dev, "processes": args.processes,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax_version, "command": " ".join(cmd), "bench_command": " ".join(sys.argv),
        "outcome": outcome, "returncode": returncode, "wall_s": wall, **parsed,
        "images_per_s": statistics.median(timed) if timed else None,
        "log_tail": log[-4000:],
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print(f"{gpu} x{n_dev} ({args.processes} process(es)), {os.path.relpath(args.config, ROOT)} {args.set}: "
          f"{outcome}, micro-batch {parsed['microbatch_size']} ({parsed['microbatch_reason']}), "
          f"est. {parsed['estimated_memory_per_device']}/device, {report['images_per_s']} img/s "
          f"(steps {parsed['images_per_s_by_step']}), wall {wall:.0f} s")
    return report


if __name__ == "__main__":
    main()

"""Experiment-tracking overhead per training step (run.report_to), in ONE run on the demo's tiny model.

Four modes train the same SFT steps from the same base model: ``off`` (no tracker: the loop's one
``tracking.log_signals`` call finds no active run), ``tensorboard``, ``mlflow`` (SQLite store) and
``tensorboard+mlflow``. Rounds alternate the modes (the order rotates every round) so that the load of a
shared machine drifts over all of them alike. Per mode: the loop's seconds per step (``train_seconds`` of the
summary / steps; the one checkpoint at the end is in every mode), the median over rounds, and the overhead
``median(mode) / median(off) - 1``; also the median of the per-round ratios (each against the ``off`` run of
its own round). A warm-up round (not counted) pays the imports and MLflow's store creation.

On a machine shared with other jobs the wall-clock figures swing by more than the effect; the CPU that the
tracker's writer thread spends per step (``time.thread_time`` in ``redi.tracking.Tracker``: batching, the
TensorBoard protos, MLflow's SQLite inserts; the backends' one-off opening excluded) does not depend on the
load, and is reported beside them, as a share of the training's own CPU per step (the ``off`` runs of two
lengths, so that the set-up cancels): the most the writer can add to a step when it competes with training
for the same core (with a free core it adds next to nothing). Also: the cost of one
``tracking.log_signals`` call on the training thread (a queue put), and the time ``close`` takes to write what
was queued at the end of a run.

Usage: ``python benchmarks/bench_tracking.py [--rounds 5 --steps 60]``. Writes docs/benchmarks/tracking.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
log = logging.getLogger("bench_tracking")

MODES = ("off", "tensorboard", "mlflow", "tensorboard+mlflow")


def upstream(tmp: Path, n_train: int):
    """The demo recipe's model and positives (synthetic data, tiny Qwen2) built through the Pipeline."""
    from redi.config import load_recipe
    from redi.pipeline import Pipeline

    recipe = load_recipe(ROOT / "redi" / "recipes" / "demo.yaml", {
        "run.artifact_root": str(tmp / "artifacts"), "data.synth.n_train": n_train, "data.synth.n_test": 10,
        "data.synth.n_val": 0, "verify.decontaminate": False, "run.device": "cpu"})
    pipe = Pipeline(recipe)
    model = pipe.base_model()
    verify = pipe.verify(model=model)
    return recipe, model.dir, verify.file("positives.parquet")


def one_run(mode: str, recipe, model_dir: Path, positives: Path, tmp: Path, tdir: Path, run_id: str, steps: int) -> dict:
    from redi import tracking
    from redi.train import train_sft

    cfg = recipe.sft.model_copy(update={"max_steps": steps, "save_steps": steps, "log_steps": 10 ** 6})
    tracker = None
    if mode != "off":
        trk = tracking.Tracking(mode.split("+"), tdir, "bench", tracking.flatten(recipe.model_dump(mode="json")), "bench: 1\n")
        tracker = trk.tracker("sft", f"{mode}-{run_id}")
    cpu0 = time.thread_time()  # torch runs on this thread (set_num_threads(1)): the training's CPU
    with tracking.activate(tracker):
        summary = train_sft(cfg, model_dir, positives, tmp / run_id / "out", tmp / run_id / "work", "cpu",
                            recipe.prompt.train)
    main_cpu = time.thread_time() - cpu0
    t0 = time.perf_counter()
    if tracker:
        tracker.close()
        assert not tracker.errors, tracker.errors
    cpu = tracker.cpu_s if tracker else {"open": 0.0, "write": 0.0}
    return {"mode": mode, "s_per_step": summary["train_seconds"] / steps, "close_s": time.perf_counter() - t0,
            "writer_ms_per_step": 1000 * cpu["write"] / steps, "open_s": cpu["open"], "main_cpu_s": main_cpu, "steps": steps}


def call_cost(tdir: Path, n: int = 20000) -> float:
    """Microseconds of one log_signals call with a tracker active (the writer thread drains in the background)."""
    from redi import tracking

    trk = tracking.Tracking(["tensorboard", "mlflow"], tdir, "bench", {}, "bench: 1\n")
    tracker = trk.tracker("calls", "c")
    rec = {"step": 0, "epoch": 0.1, "loss": 1.0, "chosen_logp": -1.0, "rejected_logp": None, "margin": None,
           "grad_norm": 1.0, "update_norm": 0.1, "lr": 1e-3, "tokens": 1000, "tokens_per_s": 1e4, "collapsed": False}
    with tracking.activate(tracker):
        t0 = time.perf_counter()
        for i in range(n):
            rec["step"] = i + 1
            tracking.log_signals(rec)
        per = (time.perf_counter() - t0) / n * 1e6
    tracker.close()
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60, help="Optimiser steps per run.")
    ap.add_argument("--n-train", type=int, default=400, help="Synthetic training problems (4 traces each).")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a thread pool oversubscribed on a shared "
                    "machine makes step times swing by whole seconds).")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "tracking.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    tdir = tmp / "tracking"
    import torch

    torch.set_num_threads(args.threads)
    os.environ["REDI_THREADS"] = str(args.threads)  # redi.train sets its threads from it
    recipe, model_dir, positives = upstream(tmp, args.n_train)

    warm = {mode: one_run(mode, recipe, model_dir, positives, tmp, tdir, f"warm-{mode.replace('+', '-')}",
                          max(5, args.steps // 10)) for mode in MODES}  # warm-up: imports, MLflow's store, token cache
    rows = []
    for r in range(args.rounds):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
        for mode in order:
            row = one_run(mode, recipe, model_dir, positives, tmp, tdir, f"r{r}-{mode.replace('+', '-')}", args.steps)
            rows.append({**row, "round": r})
            log.warning("round %d %-20s %.4f s/step (close %.2f s)", r, mode, row["s_per_step"], row["close_s"])
    per_call_us = call_cost(tmp / "calls")
    text = report(rows, args, per_call_us, torch.get_num_threads(), warm["off"])
    args.out.write_text(text)
    print(text)
    print(json.dumps(rows))


def report(rows: list[dict], args, per_call_us: float, threads: int, warm_off: dict) -> str:
    def med(mode: str, key: str = "s_per_step") -> float:
        return statistics.median(r[key] for r in rows if r["mode"] == mode)

    off = med("off")
    # The training's CPU per step: two run lengths of the off mode, so the set-up (model load, data) cancels.
    train_cpu_ms = 1000 * (med("off", "main_cpu_s") - warm_off["main_cpu_s"]) / (args.steps - warm_off["steps"])
    lines = [
        "# Tracking overhead per training step (benchmarks/bench_tracking.py)", "",
        (__doc__ or "").split("\n\n", 1)[1].split("Usage:")[0].strip(), "",
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.rounds} rounds x {args.steps} SFT steps per mode, "
        f"demo tiny model (hidden 64, 4 layers), global batch 16, CPU, torch threads {threads}, "
        f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared with other jobs).", "",
        "| mode | median s/step | overhead vs off | median per-round ratio - 1 | writer CPU per step | writer CPU / training CPU | median close (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        ratios = [r["s_per_step"] / next(o["s_per_step"] for o in rows if o["mode"] == "off" and o["round"] == r["round"])
                  for r in rows if r["mode"] == mode]
        lines.append(f"| {mode} | {med(mode):.4f} | {100 * (med(mode) / off - 1):+.2f} % | "
                     f"{100 * (statistics.median(ratios) - 1):+.2f} % | {med(mode, 'writer_ms_per_step'):.2f} ms | "
                     f"{100 * med(mode, 'writer_ms_per_step') / train_cpu_ms:.2f} % | {med(mode, 'close_s'):.2f} |")
    lines += ["", f"Training CPU per step (off mode, set-up cancelled): {train_cpu_ms:.1f} ms.",
              "", f"One `tracking.log_signals` call with TensorBoard + MLflow active: {per_call_us:.1f} us on the training thread.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

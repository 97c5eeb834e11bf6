"""Independent DAG nodes side by side vs one at a time: the ``redi-pipeline`` flow, cold, in one process.

    .venv/bin/python benchmarks/bench_parallel.py                      # the demo DAG, shrunk to 1-core nodes
    .venv/bin/python benchmarks/bench_parallel.py --full-demo          # the demo recipe as shipped (~2 x 7 min)
    .venv/bin/python benchmarks/bench_parallel.py --set sft.max_steps=500 --reps 2

Each repetition runs the same recipe cold (a fresh artifact root) with ``run.max_parallel=1`` and with the
default (as many nodes as the machine's cores, GPUs and the in-process rule allow, flows.pipeline.schedule),
alternating which goes first. Reports wall times, their ratio, the summed node time over the wall time
(how many nodes ran at once on average), which nodes overlapped, and checks that both runs produced the same
keys and the same metrics. Writes docs/benchmarks/parallel.md.

Default recipe: the demo's DAG (synthetic teacher, tiny model, every stage) with one core per node
(run.threads=1, one grading worker, the transformers backend) and fewer steps, so that on a 2-core machine
two nodes fit side by side; ``--full-demo`` keeps the demo as shipped, where each heavy node asks for every
core and nothing overlaps on 2 cores (what the scheduler is meant to do there).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["run.threads=1", "verify.workers=1", "evaluate.grade_workers=1", "evaluate.backend=hf", "sft.max_steps=300",
         "redi.max_steps=60", "evaluate.n_samples=2", "evaluate.max_problems=100", "data.synth.n_train=1000",
         "evaluate.benchmarks=[demo_test]", "verify.decontaminate=false"]


def task_runs(flow_run_id) -> dict[str, tuple[float, float]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.split(" [")[0]: (r.start_time.timestamp(), r.end_time.timestamp()) for r in runs
            if r.start_time and r.end_time and not r.name.startswith(("report", "publish"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "deployments" / "demo" / "recipe.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--full-demo", action="store_true", help="the recipe as shipped (no 1-core shrink)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "parallel.md"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-par-"))
    os.environ.setdefault("PREFECT_HOME", str(work / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import redi_pipeline, resolve_recipe

    overrides = ([] if args.full_demo else SMALL) + args.overrides
    rows, results = [], {}
    with prefect_test_harness(server_startup_timeout=120):
        for rep in range(args.reps):
            order = [("one at a time", 1), ("side by side", None)]
            for mode, par in order if rep % 2 == 0 else order[::-1]:
                root = work / f"{rep}-{par}"
                r = resolve_recipe(args.recipe, None, [*overrides, f"run.artifact_root={root}", f"run.max_parallel={par or 'null'}"])
                t0 = time.time()
                state = redi_pipeline(recipe=r, return_state=True)
                wall = time.time() - t0
                if not state.is_completed():
                    raise SystemExit(f"{mode}: the flow failed: {state.message}")
                res, times = state.result(), task_runs(state.state_details.flow_run_id)
                busy = sum(e - s for s, e in times.values())
                pairs = sorted(f"{a} + {b}" for a in times for b in times if a < b
                               and min(times[a][1], times[b][1]) - max(times[a][0], times[b][0]) > 1.0)
                rows.append({"rep": rep, "mode": mode, "wall": wall, "busy": busy, "pairs": pairs})
                results.setdefault(mode, []).append(res)
                print(f"rep {rep} {mode:14s} wall {wall:7.1f} s  node time {busy:7.1f} s  overlapping: {', '.join(pairs) or '-'}",
                      flush=True)
    seq, par = results["one at a time"][0], results["side by side"][0]
    same_keys = {k: a["key"] for k, a in seq["artifacts"].items()} == {k: a["key"] for k, a in par["artifacts"].items()}
    same_numbers = seq["report"]["table_rows"] == par["report"]["table_rows"]
    walls = {m: [r["wall"] for r in rows if r["mode"] == m] for m in results}
    ratio = min(walls["one at a time"]) / min(walls["side by side"])
    cores = len(os.sched_getaffinity(0))
    lines = [
        "# Independent DAG nodes side by side vs one at a time",
        "",
        f"`benchmarks/bench_parallel.py{' --full-demo' if args.full_demo else ''}"
        f"{''.join(' --set ' + o for o in args.overrides)} --reps {args.reps}`: the `redi-pipeline` flow, cold "
        f"(fresh artifact root each run), `run.max_parallel=1` vs the default, in one process on {cores} cores "
        "(shared with other work: single runs are noisy).",
        "",
        f"Recipe: {args.recipe if args.full_demo else 'the demo DAG with ' + ', '.join(f'`{o}`' for o in SMALL)}.",
        "",
        "| rep | mode | wall (s) | node time (s) | node time / wall | nodes that overlapped (> 1 s) |",
        "|---|---|---|---|---|---|",
        *[f"| {r['rep']} | {r['mode']} | {r['wall']:.1f} | {r['busy']:.1f} | {r['busy'] / r['wall']:.2f} | "
          f"{', '.join(r['pairs']) or '-'} |" for r in rows],
        "",
        f"**Ratio one-at-a-time / side-by-side wall time: {ratio:.2f}x** (best of each). "
        f"Same keys: {same_keys}; same metrics: {same_numbers}.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    if not (same_keys and same_numbers):
        raise SystemExit("side by side changed the keys or the metrics")


if __name__ == "__main__":
    main()

"""Overhead of orchestration: Prefect + bookkeeping vs compute in a full run, and the fully cached rerun.

    .venv/bin/python benchmarks/bench_orchestration.py                       # the demo recipe
    .venv/bin/python benchmarks/bench_orchestration.py --recipe R.yaml --set evaluate.n_samples=2 --reps 3

Measured in ONE process, alternatives interleaved (the machine is shared and noisy):
0. a throwaway cold library run first (imports and one-time initialisation billed to nobody);
1. cold full run through the ``redi-pipeline`` flow in a fresh artifact root:
   wall time, compute (sum of the build seconds in the manifests of every artifact the run created)
   and bookkeeping = wall - compute (Prefect task/flow runs, API calls, artifact checksums, keys);
2. cold full run of the library alone (``Pipeline.run``) in another fresh root, same split;
3. fully cached reruns, alternating flow / library, ``--reps`` times each (in-process, after warm-up);
4. fully cached reruns as a user types them: ``redi run R`` vs ``redi run R --no-prefect`` in fresh
   processes (interpreter, imports and, without PREFECT_API_URL, Prefect's temporary server included).
Prints a table with ratios and writes docs/benchmarks/orchestration.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def built_seconds(root: Path, since: float) -> float:
    """Build seconds of every artifact created under root after `since` (the run's compute)."""
    total = 0.0
    for m in root.glob("*/*/manifest.json"):
        if m.stat().st_mtime >= since - 1:
            total += json.loads(m.read_text()).get("seconds", 0.0)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "deployments" / "demo" / "recipe.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cli-reps", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "orchestration.md"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    os.environ.setdefault("PREFECT_HOME", str(work / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from redi.config import load_recipe
    from redi.pipeline import Pipeline

    def recipe(root: Path):
        return load_recipe(args.recipe, [*args.overrides, f"run.artifact_root={root}"])

    t0 = time.time()
    import flows.pipeline as fp  # imports prefect

    t_import = time.time() - t0
    t0 = time.time()
    fp.resolve_recipe  # noqa: B018
    from prefect import flow

    @flow(name="bench-warmup")
    def warmup() -> int:
        return 1

    warmup()  # starts the temporary server when PREFECT_API_URL is unset
    t_server = time.time() - t0

    # Warm-up: one throwaway cold library run, so that first imports of torch/transformers/trl and
    # compiled kernels are not billed to whichever mode happens to run first.
    t0 = time.time()
    Pipeline(recipe(work / "warmup")).run()
    t_warm = time.time() - t0
    print(f"warm-up cold run {t_warm:.1f}s", flush=True)

    rows = []
    # ---- cold runs: flow, then library (each in its own fresh root)
    cold = {}
    for mode in ("prefect", "library"):
        root = work / f"cold-{mode}"
        r = recipe(root)
        t0 = time.time()
        if mode == "prefect":
            fp.redi_pipeline(recipe=r.model_dump(mode="json", by_alias=True))
        else:
            Pipeline(r).run()
        wall = time.time() - t0
        compute = built_seconds(root, t0)
        cold[mode] = (wall, compute)
        rows.append((f"cold full run, {mode}", wall, compute, wall - compute))
        print(f"{mode:8s} cold: wall {wall:.1f}s compute {compute:.1f}s bookkeeping {wall - compute:.1f}s", flush=True)

    # ---- cached reruns, interleaved, in-process (root of the prefect cold run)
    root = work / "cold-prefect"
    r = recipe(root)
    times: dict[str, list[float]] = {"prefect": [], "library": []}
    for _ in range(args.reps):
        for mode in ("prefect", "library"):
            t0 = time.time()
            if mode == "prefect":
                out = fp.redi_pipeline(recipe=r.model_dump(mode="json", by_alias=True))
                assert all(x["status"] == "cache hit" for x in out["dag"]), out["dag"]
            else:
                Pipeline(r).run()
            times[mode].append(time.time() - t0)

    # ---- cached reruns as CLI invocations (fresh processes)
    rec = work / "recipe.yaml"
    from redi.config import recipe_to_yaml

    rec.write_text(recipe_to_yaml(r))
    cli: dict[str, list[float]] = {"prefect": [], "library": []}
    env = dict(os.environ, PREFECT_HOME=str(work / ".prefect-cli"))
    for _ in range(args.cli_reps):
        for mode in ("prefect", "library"):
            cmd = [sys.executable, "-m", "redi.cli", "run", str(rec)] + (["--no-prefect"] if mode == "library" else [])
            t0 = time.time()
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            cli[mode].append(time.time() - t0)
            assert p.returncode == 0, p.stderr[-2000:]

    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cli.items()}
    (wp, cp), (wl, cl) = cold["prefect"], cold["library"]
    lines = [
        "# Orchestration overhead",
        "",
        f"Recipe `{args.recipe}` {' '.join(args.overrides)}; {os.cpu_count()} CPUs; medians of {args.reps} in-process "
        f"and {args.cli_reps} CLI reruns, modes interleaved in one run.",
        "",
        "| measurement | wall s | compute s | bookkeeping s | bookkeeping / compute |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, wall, comp, book in rows:
        lines.append(f"| {name} | {wall:.1f} | {comp:.1f} | {book:.1f} | {book / comp if comp else float('nan'):.3f} |")
    lines += [
        "",
        "| fully cached rerun | Prefect flow s | library s | ratio flow / library |",
        "|---|---:|---:|---:|",
        f"| in-process | {med['prefect']:.2f} | {med['library']:.2f} | {med['prefect'] / med['library']:.1f}x |",
        f"| CLI, fresh process | {cmed['prefect']:.2f} | {cmed['library']:.2f} | {cmed['prefect'] / cmed['library']:.1f}x |",
        "",
        f"Prefect extras paid once per process: `import flows.pipeline` (prefect) {t_import:.1f} s; first flow run "
        f"(temporary local server when PREFECT_API_URL is unset) {t_server:.1f} s.",
        f"Cold-run orchestration cost of Prefect over the library: {(wp - cp) - (wl - cl):+.1f} s "
        f"({((wp - cp) - (wl - cl)) / cp if cp else float('nan'):+.1%} of compute).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

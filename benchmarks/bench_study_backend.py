"""Which generation backend makes the CPU study faster end to end: vLLM or transformers ``generate``?

The study evaluates ~45 tiny models (SFT rounds, the validation search, 3 seeds x 5 methods on test), so
what matters is the whole ``redi.evaluate.evaluate_model`` call per model, engine start-up included
(vLLM: one engine process per model). Both backends run on the same model and the same split, in ONE
process, interleaved (hf, vllm, hf, vllm, ...), because the machine is shared and timings are noisy.

Usage: ``python benchmarks/bench_study_backend.py MODEL_DIR BENCH_JSONL [--n 4 16 --rounds 1]``
(MODEL_DIR: e.g. an SFT round of the study, ``<artifact_root>/sft/<key>/model``; BENCH_JSONL: the
download artifact's ``benchmarks/demo_val.jsonl``). Writes docs/benchmarks/study_backend.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_once(backend: str, n: int, model_dir: Path, bench: Path, recipe_dir: Path) -> dict:
    from redi import evaluate as ev
    from redi.config import EvaluateConfig
    from redi.study import load_study

    recipe, _ = load_study(recipe_dir)
    cfg = EvaluateConfig.model_validate({**recipe.evaluate.model_dump(mode="json"), "benchmarks": ["demo_val"],
                                         "n_samples": n, "backend": backend})
    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        m = ev.evaluate_model(cfg, model_dir, Path(out), {"demo_val": bench}, f"bench-{backend}")
        wall = time.time() - t0
    return {"backend": backend, "n": n, "wall_s": wall, "startup_s": m["timings"]["engine_startup_s"],
            "samples": m["n_samples_total"], "pass@1": m["average"]["pass@1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("bench")
    ap.add_argument("--n", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--recipe", default=str(ROOT / "deployments" / "study-cpu"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "study_backend.md"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)  # as the study (run.threads: 1): 2 threads on a shared 2-core machine were slower
    rows = []
    for _ in range(a.rounds):
        for n in a.n:
            for backend in ("hf", "vllm"):
                rows.append(run_once(backend, n, Path(a.model_dir), Path(a.bench), Path(a.recipe)))
                print(json.dumps(rows[-1]), flush=True)
    lines = ["# Study evaluation backend: vLLM vs transformers generate, end to end per model", "",
             f"Model `{a.model_dir}`, split `{Path(a.bench).name}`, interleaved in one process ({a.rounds} round(s)).", "",
             "| n | samples | hf wall s | vllm wall s (start-up) | vllm / hf | pass@1 hf / vllm |", "|---|---|---|---|---|---|"]
    for n in a.n:
        h = [r for r in rows if r["n"] == n and r["backend"] == "hf"]
        v = [r for r in rows if r["n"] == n and r["backend"] == "vllm"]
        hw, vw = statistics.median(r["wall_s"] for r in h), statistics.median(r["wall_s"] for r in v)
        lines.append(f"| {n} | {h[0]['samples']} | {hw:.1f} | {vw:.1f} ({statistics.median(r['startup_s'] for r in v):.1f}) | "
                     f"{vw / hw:.2f} | {h[0]['pass@1']:.3f} / {v[0]['pass@1']:.3f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Serve every REDI deployment from one process (no work pool or worker needed): ``redi serve``.

    prefect server start --host 127.0.0.1 &            # UI on http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python deployments/serve.py                        # or: redi serve

Deployments (flow/deployment):
  redi-pipeline/demo, redi-pipeline/redi-qwen2.5-math-1.5b     the whole DAG of each recipe
  redi-stage/{download,model,verify,sft,redi,evaluate}         one stage of the demo recipe
  nightly-eval/nightly                                         cron 03:00 UTC over registered runs
  redi-eval/adhoc                                              any model folder or Hub id
  redi-study/study-cpu                                         the CPU-scale study (issue 6)

The run form of the pipeline deployments is pre-filled with the recipe's resolved fields (edit any
of them, e.g. redi.alpha, before a run). Serving makes no network listener of its own; flow runs
start in this process's subprocesses. Run it from the repository root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make flows/ and tasks/ importable
    sys.path.insert(0, str(REPO))

RECIPES = {"demo": REPO / "deployments" / "demo" / "recipe.yaml",
           "redi-qwen2.5-math-1.5b": REPO / "deployments" / "redi-qwen2.5-math-1.5b" / "recipe.yaml"}
STAGES = ("download", "model", "verify", "sft", "redi", "evaluate")
NIGHTLY_CRON = os.environ.get("REDI_NIGHTLY_CRON", "0 3 * * *")


def _prefilled(path: Path) -> dict:
    """The recipe's resolved fields, artifact_root made absolute (runs start in other working dirs)."""
    from redi.config import load_recipe

    r = load_recipe(path)
    r.run.artifact_root = str(Path(r.run.artifact_root).expanduser().resolve())
    return r.model_dump(mode="json", by_alias=True)


def build_deployments(artifact_root: str | None = None) -> list:
    from prefect.schedules import Cron

    from flows.nightly import nightly_eval, redi_eval
    from flows.pipeline import redi_pipeline, redi_stage
    from flows.study import redi_study

    root = str(Path(artifact_root or os.environ.get("REDI_ARTIFACT_ROOT", "artifacts")).resolve())
    out = []
    for name, path in RECIPES.items():
        if path.exists():
            out.append(redi_pipeline.to_deployment(name, parameters={"recipe": _prefilled(path)}, tags=["redi"],
                                                   description=f"The whole DAG of {path.relative_to(REPO)}"))
    demo = _prefilled(RECIPES["demo"]) if RECIPES["demo"].exists() else None
    for stage in STAGES:
        params = {"stage": stage} | ({"recipe": demo} if demo else {})
        out.append(redi_stage.to_deployment(stage, parameters=params, tags=["redi", "stage"],
                                            description=f"Stage {stage} of the demo recipe; upstream from cache."))
    out.append(nightly_eval.to_deployment("nightly", schedules=[Cron(NIGHTLY_CRON, timezone="UTC")],
                                          parameters={"artifact_root": root}, tags=["redi", "nightly"]))
    out.append(redi_eval.to_deployment("adhoc", parameters={"recipe_path": str(RECIPES["demo"])}, tags=["redi", "eval"]))
    out.append(redi_study.to_deployment("study-cpu", parameters={"recipe_path": str(REPO / "deployments" / "study-cpu")},
                                        tags=["redi", "study"]))
    return out


def main(limit: int | None = None) -> None:
    from prefect import serve

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    serve(*build_deployments(), limit=limit)


if __name__ == "__main__":
    main()

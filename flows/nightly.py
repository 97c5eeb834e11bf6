"""Flows outside one recipe's DAG: ``nightly-eval`` (every registered run's latest models) and
``redi-eval`` (any model folder or Hub id). The library side is ``redi.registry``."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from redi.config import EvaluateConfig
from tasks.nightly import evaluate_registered, publish_history


@flow(name="nightly-eval", description="Evaluate the latest model of each registered run on the benchmark suite; append to the history.")
def nightly_eval(
    artifact_root: str = "artifacts",
    evaluate: EvaluateConfig | None = None,
    evaluate_overrides: dict[str, Any] | None = None,
    runs: list[str] | None = None,
    labels: list[Literal["base", "sft", "redi"]] | None = None,
    results_db: str | None = None,
) -> dict[str, Any]:
    """``evaluate`` replaces each run's own evaluation section (None keeps it); ``evaluate_overrides``
    ({"n_samples": 4, "benchmarks": [...]}) is applied on top. ``runs``/``labels`` narrow the selection."""
    ev = evaluate.model_dump(mode="json") if evaluate is not None else None
    tonight = evaluate_registered(artifact_root, ev, evaluate_overrides, runs, labels, results_db)
    hist = publish_history(artifact_root, results_db, tonight)
    get_run_logger().info("nightly: %d model(s) evaluated or checked; history: %s", len(tonight), hist.get("results"))
    return {"tonight": tonight, "history": hist}


@task(name="evaluate-model", cache_policy=NONE)
def _evaluate_model(model: str, recipe: dict[str, Any], name: str | None) -> dict[str, Any]:
    from redi import registry
    from redi.config import Recipe

    return registry.evaluate_external(model, Recipe.model_validate(recipe), name)


@flow(name="redi-eval", description="Evaluate any model folder or Hub id on benchmarks; append to the results store.")
def redi_eval(model: str, recipe_path: str | None = None, overrides: dict[str, Any] | None = None,
              name: str | None = None) -> dict[str, Any]:
    from flows.pipeline import resolve_recipe
    from tasks.report import artifact_key

    r = resolve_recipe(recipe_path, None, overrides)
    res = _evaluate_model(model, r.model_dump(mode="json", by_alias=True), name)
    from redi.registry import metrics_rows

    rows = metrics_rows(res["metrics"])
    key = artifact_key(name or r.run.name, "eval")
    create_table_artifact(rows, key=key, description=f"Evaluation of {model}")
    create_markdown_artifact(f"## Evaluation of `{model}`\n\nFolder: `{res['artifact']['path']}`\n\nResults store: `{res['results']}`",
                             key=key + "-md")
    return res

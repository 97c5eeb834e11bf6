"""Flows outside one recipe's DAG: ``nightly-eval`` (every registered run's latest models) and
``redi-eval`` (any model folder or Hub id). The library side is ``redi.runs``."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from flows.pipeline import documented
from redi.config import EvaluateConfig
from redi.interrupt import stoppable
from tasks.nightly import evaluate_registered, publish_history

NIGHTLY_HELP = {
    "artifact_root": "The artifact store whose registered runs (runs/RUN/latest.json, RUN = a run name) are evaluated.",
    "evaluate_overrides": "Changes to each run's own evaluation settings, e.g. {\"n_samples\": 4, \"benchmarks\": [\"math500\"]} "
                          "(fields of the evaluate section, without the `evaluate.` prefix).",
    "runs": "Only these registered runs (default: all of them).",
    "labels": "Only these models of each run: base, sft, redi (default: every registered one).",
    "results_db": "Results store to append to (default: the results folder of artifact_root).",
    "evaluate": "A whole evaluation protocol that replaces each run's own evaluate section (empty: each run keeps its own; "
                "evaluate_overrides still apply on top).",
}


@flow(name="nightly-eval", description="Evaluate the latest model of each registered run on the benchmark suite; append to the history.")
@stoppable
@documented("Evaluate the latest models of every registered run (what the last full run of each recipe registered); "
            "append to the history.", "artifact_root", "evaluate_overrides", "runs", "labels", "results_db", "evaluate",
            extra=NIGHTLY_HELP)
def nightly_eval(
    artifact_root: str = "artifacts",
    evaluate_overrides: dict[str, Any] | None = None,
    runs: list[str] | None = None,
    labels: list[Literal["base", "sft", "redi"]] | None = None,
    results_db: str | None = None,
    evaluate: EvaluateConfig | None = None,
) -> dict[str, Any]:
    ev = evaluate.model_dump(mode="json") if evaluate is not None else None
    tonight = evaluate_registered(artifact_root, ev, evaluate_overrides, runs, labels, results_db)
    hist = publish_history(artifact_root, results_db, tonight)
    get_run_logger().info("nightly: %d model(s) evaluated or checked; history: %s", len(tonight), hist.get("results"))
    return {"tonight": tonight, "history": hist}


@task(name="evaluate-model", cache_policy=NONE)
def _evaluate_model(model: str, recipe: dict[str, Any], name: str | None) -> dict[str, Any]:
    from redi import runs as run_registry
    from redi.config import Recipe

    return run_registry.evaluate_external(model, Recipe.model_validate(recipe), name)


@flow(name="redi-eval", description="Evaluate any model folder or Hub id on benchmarks; append to the results store.")
@stoppable
@documented("Evaluate any model folder or Hub id with a recipe's evaluation settings.", "model", "overrides", "recipe_path", "name",
            extra={"model": "A model folder (e.g. an sft artifact's model/) or a Hugging Face Hub id.",
                   "overrides": "Recipe fields to change, as dotted keys: {\"evaluate.n_samples\": 4, \"evaluate.benchmarks\": [\"math500\"]}.",
                   "recipe_path": "The recipe whose evaluate and run sections to use (default: built-in defaults).",
                   "name": "Label of this model in the results store (default: the folder name)."})
def redi_eval(model: str, overrides: dict[str, Any] | None = None, recipe_path: str | None = None,
              name: str | None = None) -> dict[str, Any]:
    from flows.pipeline import resolve_recipe
    from tasks.report import artifact_key

    r = resolve_recipe(recipe_path, None, overrides)
    res = _evaluate_model(model, r.model_dump(mode="json", by_alias=True), name)
    from redi.runs import metrics_rows

    rows = metrics_rows(res["metrics"])
    key = artifact_key(name or r.run.name, "eval")
    create_table_artifact(rows, key=key, description=f"Evaluation of {model}")
    create_markdown_artifact(f"## Evaluation of `{model}`\n\nFolder: `{res['artifact']['path']}`\n\nResults store: `{res['results']}`",
                             key=key + "-md")
    return res

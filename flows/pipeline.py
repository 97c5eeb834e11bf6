"""Flows of the REDI DAG: ``redi-pipeline`` (the whole run) and ``redi-stage`` (one stage, upstream from cache).

The flows only order tasks, and not even that themselves: ``run_dag`` hands ``redi.dag.walk`` (the
library's one walker over the table ``redi.dag.NODES``) a step that calls the node's Prefect task, so
the UI shows one task per node. Every task is a thin wrapper over :class:`redi.pipeline.Pipeline`, and
the content-addressed store decides what is a cache hit, so running a stage whose upstream is
cached costs one checksum pass per upstream artifact.

Precedence: defaults < the recipe (``recipe_path`` YAML, or a whole ``recipe``) < overrides < refresh.
Giving both ``recipe`` and ``recipe_path`` is an error, never a silent choice. The per-stage
deployments (one form per stage, the recipe picked from a dropdown) are in ``flows/stages.py``.

Registration: only a full run (``redi-pipeline``) or ``register_run=True`` rewrites what nightly
evaluation evaluates (``runs/<name>/latest.json``); see :meth:`redi.pipeline.Pipeline.report`.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from prefect import flow, get_run_logger

from redi import dag
from redi.config import Recipe, RecipeError, apply_overrides, load_recipe
from redi.storage import normalize_root
from tasks.curves import curves
from tasks.download import download
from tasks.evaluate import evaluate
from tasks.model import base_model
from tasks.redi import stage2
from tasks.report import publish, report
from tasks.sft import sft
from tasks.verify import verify

Stage = Literal[dag.STAGES]  # type: ignore[valid-type]
Label = Literal[dag.MODEL_LABELS]  # type: ignore[valid-type]
TASKS = {"download": download, "model": base_model, "verify": verify, "sft": sft, "redi": stage2, "curves": curves,
         "evaluate": evaluate}
"""The Prefect task of each node of ``redi.dag.NODES``; called with (recipe, *upstream artifacts) or (recipe, label, model)."""
if set(TASKS) != set(dag.STAGES):  # a node added to the table needs its task here
    raise ImportError(f"flows.pipeline.TASKS {sorted(TASKS)} do not match the DAG's stages {list(dag.STAGES)}")

HELP = {
    "overrides": "Recipe fields to change for this run, as dotted keys: {\"redi.alpha\": 1.0, \"evaluate.n_samples\": 8}. "
                 "Applied after the recipe. Changed fields change the cache keys of the stages they determine.",
    "refresh": "Stages to recompute even when a valid cached artifact exists (added to the recipe's run.refresh).",
    "recipe_path": "A recipe YAML (or its folder), relative to the directory `redi serve` runs in. "
                   "Give either this or `recipe`, not both.",
    "recipe": "The whole recipe, typed (the deployment pre-fills it with its recipe's resolved fields; edit any field). "
              "Give either this or `recipe_path`, not both.",
    "labels": "Which models to evaluate: base, sft, redi (default: the recipe's evaluate.models).",
    "register_run": "Register this result for nightly evaluation: rewrite runs/RUN/recipe.yaml and latest.json (RUN = run.name) with this "
                "recipe and these models. Off: the rerun is recorded on its own (results store kind=stage, "
                "runs/RUN/stage-runs/RECIPE_HASH/) and nightly evaluates what the last full run registered.",
}


def documented(summary: str, *params: str, extra: dict[str, str] | None = None):
    """Give a flow function a Google-style docstring whose Args section Prefect shows as each parameter's help."""
    def wrap(fn):
        helps = HELP | (extra or {})
        fn.__doc__ = summary + "\n\nArgs:\n" + "".join(f"    {p}: {helps[p]}\n" for p in params)
        return fn
    return wrap


def resolve_recipe(recipe_path: str | None = None, recipe: Recipe | dict[str, Any] | None = None,
                   overrides: dict[str, Any] | list[str] | None = None, refresh: list[str] | None = None) -> Recipe:
    """Defaults < YAML (or a whole recipe) < overrides < refresh. Raises RecipeError naming the field."""
    if recipe is not None and recipe_path:
        raise RecipeError(f"give either recipe (the typed form) or recipe_path ({recipe_path!r}), not both: "
                          "clear one of them")
    if recipe is not None:
        tree = recipe.model_dump(mode="json", by_alias=True) if isinstance(recipe, Recipe) else dict(recipe)
        if overrides:
            apply_overrides(tree, overrides)
        try:
            r = Recipe.model_validate(tree)
        except Exception as e:
            raise RecipeError(f"invalid recipe (flow parameter): {e}") from None
    else:
        r = load_recipe(recipe_path, overrides or None)
    if refresh:
        try:
            r.run.refresh = sorted(set(r.run.refresh) | set(refresh), key=dag.STAGES.index)
        except Exception as e:
            raise RecipeError(f"refresh: {e}") from None
    return r


def run_dag(r: Recipe, until: str = "report", labels: list[str] | None = None, register: bool = False) -> dict[str, Any]:
    """Run the DAG up to ``until`` (a stage, or "report" for everything), in dependency order.

    ``labels`` limits which models are evaluated (default: the recipe's evaluate.models); ``register``
    makes the report register the run (what nightly evaluates). Returns {"artifacts": {node: artifact
    dict}, "report": ..., "dag": rows, "seconds": wall time}.
    """
    t0 = time.time()
    rd = r.model_dump(mode="json", by_alias=True)
    labels = list(labels or r.evaluate.models)

    def step(node: dag.Node, upstream: list[dict[str, Any]], label: str | None) -> dict[str, Any]:
        task = TASKS[node.name]
        return task(rd, label, *upstream) if node.per_label else task(rd, *upstream)

    stages, evaluations = dag.walk(until, labels, step, skip=dag.disabled(r))
    arts: dict[str, dict[str, Any]] = dict(stages)
    for nodes in evaluations.values():  # evaluate[lab] (the samples) and grade[lab]
        arts |= nodes
    rep = None
    if evaluations:
        grades = {lab: nodes[dag.node_name("grade", lab)] for lab, nodes in evaluations.items()}
        rep = report(rd, {lab: stages[dag.LABEL_STAGE[lab]] for lab in labels}, grades, register or until == "report")
    rows = dag.node_rows(arts)
    made = publish(r.run.name, rep, rows, round(time.time() - t0, 1))
    out = {"run": r.run.name, "artifacts": arts, "report": rep, "dag": rows, "prefect_artifacts": made,
           "seconds": round(time.time() - t0, 2)}
    get_run_logger().info("run %s: %d/%d nodes from cache, %.1fs; artifacts under %s", r.run.name,
                          sum(x["status"] == "cache hit" for x in rows), len(rows), out["seconds"],
                          normalize_root(r.run.artifact_root))
    return out


@flow(name="redi-pipeline", description="The whole REDI run: download -> model -> verify -> sft -> redi -> evaluate -> report. "
      "Registers the run for nightly evaluation.")
@documented("The whole DAG of a recipe; registers the run (runs/RUN/latest.json) for nightly evaluation.",
            "overrides", "refresh", "recipe_path", "recipe")
def redi_pipeline(
    overrides: dict[str, Any] | None = None,
    refresh: list[Stage] | None = None,
    recipe_path: str | None = None,
    recipe: Recipe | None = None,
) -> dict[str, Any]:
    r = resolve_recipe(recipe_path, recipe, overrides, refresh)
    return run_dag(r, "report", register=True)


@flow(name="redi-stage", description="One stage of the REDI DAG; its upstream is taken from cache (or computed).")
@documented("One stage of a recipe; upstream from cache. stage=evaluate evaluates `labels` and records the result.",
            "stage", "overrides", "refresh", "recipe_path", "recipe", "labels", "register_run",
            extra={"stage": "The stage to run: " + ", ".join(dag.STAGES) + "."})
def redi_stage(
    stage: Stage,
    overrides: dict[str, Any] | None = None,
    refresh: list[Stage] | None = None,
    recipe_path: str | None = None,
    recipe: Recipe | None = None,
    labels: list[Label] | None = None,
    register_run: bool = False,
) -> dict[str, Any]:
    r = resolve_recipe(recipe_path, recipe, overrides, refresh)
    return run_dag(r, stage, labels, register_run)

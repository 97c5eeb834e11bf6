"""Flows of the REDI DAG: ``redi-pipeline`` (the whole run) and ``redi-stage`` (one stage, upstream from cache).

The flows only order tasks. Every task is a thin wrapper over :class:`redi.pipeline.Pipeline`, and
the content-addressed store decides what is a cache hit, so running a stage whose upstream is
cached costs one checksum pass per upstream artifact.

Parameters (the UI run form shows the recipe fields, typed):
  recipe_path  a recipe YAML (or its folder); the base of the run
  recipe       a whole recipe (replaces recipe_path; deployments pre-fill it from their YAML)
  overrides    dotted keys applied last, e.g. {"redi.alpha": 1.0, "evaluate.n_samples": 8}
  refresh      stages to recompute even when cached (added to the recipe's run.refresh)
Precedence: defaults < recipe_path YAML (or recipe) < overrides < refresh.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger

from redi.config import Recipe, RecipeError, apply_overrides, load_recipe
from tasks.download import download
from tasks.evaluate import evaluate
from tasks.model import base_model
from tasks.redi import stage2
from tasks.report import dag_rows, publish, report
from tasks.sft import sft
from tasks.verify import verify

Stage = Literal["download", "model", "verify", "sft", "redi", "evaluate"]
ORDER = ("download", "model", "verify", "sft", "redi", "evaluate")
LABEL_NEEDS = {"base": "model", "sft": "sft", "redi": "redi"}


def resolve_recipe(recipe_path: str | None = None, recipe: Recipe | dict[str, Any] | None = None,
                   overrides: dict[str, Any] | list[str] | None = None, refresh: list[str] | None = None) -> Recipe:
    """Defaults < YAML (or a whole recipe) < overrides < refresh. Raises RecipeError naming the field."""
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
            r.run.refresh = sorted(set(r.run.refresh) | set(refresh), key=ORDER.index)
        except Exception as e:
            raise RecipeError(f"refresh: {e}") from None
    return r


def run_dag(r: Recipe, until: str = "report", labels: list[str] | None = None) -> dict[str, Any]:
    """Run the DAG up to ``until`` (a stage, or "report" for everything), in dependency order.

    ``labels`` limits which models are evaluated (default: the recipe's evaluate.models). Returns
    {"artifacts": {node: artifact dict}, "report": ..., "dag": rows, "seconds": wall time}.
    """
    t0 = time.time()
    rd = r.model_dump(mode="json", by_alias=True)
    labels = list(labels or r.evaluate.models)
    if until in ("evaluate", "report"):
        need = {"model"} | {LABEL_NEEDS[lab] for lab in labels}
        last = max(ORDER.index(s) for s in need)
    else:
        last = ORDER.index(until)
    arts: dict[str, dict[str, Any]] = {}
    data = download(rd)
    arts["download"] = data
    if last >= 1:
        arts["model"] = base_model(rd, data)
    if last >= 2:
        arts["verify"] = verify(rd, data, arts["model"])
    if last >= 3:
        arts["sft"] = sft(rd, arts["verify"], arts["model"])
    if last >= 4:
        arts["redi"] = stage2(rd, arts["verify"], arts["sft"])
    rep = None
    if until in ("evaluate", "report"):
        grades = {lab: evaluate(rd, lab, arts[LABEL_NEEDS[lab]]) for lab in labels}
        arts |= {f"grade[{lab}]": g for lab, g in grades.items()}
        rep = report(rd, {lab: arts[LABEL_NEEDS[lab]] for lab in labels}, grades)
    rows = dag_rows(arts)
    made = publish(r.run.name, rep, rows)
    out = {"run": r.run.name, "artifacts": arts, "report": rep, "dag": rows, "prefect_artifacts": made,
           "seconds": round(time.time() - t0, 2)}
    get_run_logger().info("run %s: %d/%d stages from cache, %.1fs; artifacts under %s", r.run.name,
                          sum(x["status"] == "cache hit" for x in rows), len(rows), out["seconds"],
                          Path(r.run.artifact_root).resolve())
    return out


@flow(name="redi-pipeline", description="The whole REDI run: download -> model -> verify -> sft -> redi -> evaluate -> report.")
def redi_pipeline(
    recipe_path: str | None = None,
    recipe: Recipe | None = None,
    overrides: dict[str, Any] | None = None,
    refresh: list[Stage] | None = None,
) -> dict[str, Any]:
    r = resolve_recipe(recipe_path, recipe, overrides, refresh)
    return run_dag(r, "report")


@flow(name="redi-stage", description="One stage of the REDI DAG; its upstream is taken from cache (or computed).")
def redi_stage(
    stage: Stage,
    recipe_path: str | None = None,
    recipe: Recipe | None = None,
    overrides: dict[str, Any] | None = None,
    refresh: list[Stage] | None = None,
    labels: list[Literal["base", "sft", "redi"]] | None = None,
) -> dict[str, Any]:
    """``stage=evaluate`` evaluates ``labels`` (default: the recipe's models) and reports them."""
    r = resolve_recipe(recipe_path, recipe, overrides, refresh)
    return run_dag(r, stage, labels)

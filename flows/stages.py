"""One flow per stage, for the per-stage deployments ``redi-stage/<stage>`` (the UI's rerun forms).

Each form (they share the flow name ``redi-stage``) has no ``stage`` field (the deployment fixes it),
a ``recipe`` dropdown of the recipes under ``deployments/`` (``custom`` = the YAML in ``recipe_path``),
``overrides`` and ``refresh`` near the top, and the stage's own config section, typed, with every field
empty: a filled field changes that field of the chosen recipe, an empty one keeps the recipe's value.
Nothing is pre-filled that could silently win over the chosen recipe; contradictory choices
(``recipe_path`` with a named recipe, one field in both the section and ``overrides``) are errors.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from pydantic import BaseModel, create_model

from flows.pipeline import HELP, Label, Stage, documented, resolve_recipe, run_dag
from redi import dag
from redi.config import (
    DataConfig,
    EvaluateConfig,
    ModelConfig,
    RecipeError,
    SFTConfig,
    Stage2Config,
    StrictModel,
    VerifyConfig,
)
from redi.interrupt import stoppable

REPO = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO / "deployments"
CUSTOM = "custom"


def recipe_names() -> tuple[str, ...]:
    """Every folder under deployments/ with a recipe.yaml."""
    return tuple(sorted(p.parent.name for p in RECIPES_DIR.glob("*/recipe.yaml")))


RecipeName = Literal[recipe_names() + (CUSTOM,)]  # type: ignore[valid-type]


def changes_model(cls: type[BaseModel], prefix: str) -> type[BaseModel]:
    """``cls`` with every field optional and empty by default: the changes a form makes to one section.

    Nested sections become nested change models, so changing one nested field keeps its siblings.
    A field cannot be set to None through this form (empty means "keep"): use ``overrides`` for that.
    """
    fields: dict[str, Any] = {}
    for name, f in cls.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            ann = changes_model(ann, prefix)
        fi = copy.copy(f)
        fi.default, fi.default_factory = None, None
        fi.description = f"{f.description or ''} Empty: the recipe's value."
        fields[name] = (ann | None, fi)
    return create_model(f"{cls.__name__}Changes", __base__=StrictModel,
                        __doc__=f"Changes to the recipe's `{prefix}` section (empty fields keep the recipe's values).",
                        **fields)


DataChanges = changes_model(DataConfig, "data")
ModelChanges = changes_model(ModelConfig, "model")
VerifyChanges = changes_model(VerifyConfig, "verify")
SFTChanges = changes_model(SFTConfig, "sft")
RediChanges = changes_model(Stage2Config, "redi")
EvaluateChanges = changes_model(EvaluateConfig, "evaluate")
# Defaults of the section parameters: an empty change set, so the form shows the section's fields at once
# (a None default hides them behind a type toggle).
NO_DATA_CHANGES, NO_MODEL_CHANGES, NO_VERIFY_CHANGES = DataChanges(), ModelChanges(), VerifyChanges()
NO_SFT_CHANGES, NO_REDI_CHANGES, NO_EVALUATE_CHANGES = SFTChanges(), RediChanges(), EvaluateChanges()
SECTION = {n.name: n.section for n in dag.NODES}


def _dotted(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out |= _dotted(v, f"{prefix}.{k}")
        else:
            out[f"{prefix}.{k}"] = v
    return out


def pick_recipe(recipe: str, recipe_path: str | None) -> Path | str:
    """The recipe file the form chose: deployments/<recipe>/recipe.yaml, or recipe_path for ``custom``."""
    if recipe == CUSTOM:
        if not recipe_path:
            raise RecipeError("recipe=custom needs recipe_path (a recipe YAML or its folder)")
        return recipe_path
    if recipe_path:
        raise RecipeError(f"recipe_path={recipe_path!r} is set but recipe is {recipe!r}: choose recipe=custom "
                          "to run that file, or clear recipe_path")
    path = RECIPES_DIR / recipe / "recipe.yaml"
    if not path.is_file():
        raise RecipeError(f"recipe {recipe!r}: no {path}; choose one of {', '.join(recipe_names())} or custom")
    return path


def run_stage(stage: str, recipe: str, recipe_path: str | None, section: BaseModel | dict | None,
              overrides: dict[str, Any] | None, refresh: list[str] | None, labels: list[str] | None = None,
              register: bool = False) -> dict[str, Any]:
    """Resolve the chosen recipe + the section's filled fields + overrides, then run the DAG up to ``stage``."""
    name = SECTION[stage]
    filled = section.model_dump(mode="json", by_alias=True, exclude_none=True) if isinstance(section, BaseModel) else dict(section or {})
    changes = _dotted(filled, name)
    both = sorted(set(changes) & set(overrides or {}))
    if both:
        raise RecipeError(f"{', '.join(both)} set both in the `{name}` section and in overrides: keep one")
    r = resolve_recipe(pick_recipe(recipe, recipe_path), None, changes | dict(overrides or {}), refresh)
    return run_dag(r, stage, labels, register)


STAGE_HELP = {
    "recipe": "Which recipe: a folder under deployments/ (" + ", ".join(recipe_names()) + "), or `custom` for the YAML "
              "in recipe_path.",
    "recipe_path": "Only with recipe=custom: a recipe YAML (or its folder), relative to where `redi serve` runs.",
    "data": "Changes to the chosen recipe's `data` section (stage download); empty fields keep the recipe's values.",
    "model": "Changes to the chosen recipe's `model` section; empty fields keep the recipe's values.",
    "verify": "Changes to the chosen recipe's `verify` section; empty fields keep the recipe's values.",
    "sft": "Changes to the chosen recipe's `sft` section; empty fields keep the recipe's values.",
    "redi": "Changes to the chosen recipe's `redi` section (stage 2); empty fields keep the recipe's values.",
    "evaluate": "Changes to the chosen recipe's `evaluate` section; empty fields keep the recipe's values.",
    "labels": HELP["labels"],
    "register_run": HELP["register_run"],
}


def _doc(stage: str, *params: str):
    return documented(f"Stage `{stage}` of the chosen recipe; its upstream comes from cache (or is computed).",
                      "recipe", "overrides", "refresh", "recipe_path", *params, extra=STAGE_HELP)


@flow(name="redi-stage", description="Stage download of any recipe (upstream from cache).")
@stoppable
@_doc("download", "data")
def download_stage(recipe: RecipeName = "demo", overrides: dict[str, Any] | None = None, refresh: list[Stage] | None = None,
                   recipe_path: str | None = None, data: DataChanges = NO_DATA_CHANGES) -> dict[str, Any]:
    return run_stage("download", recipe, recipe_path, data, overrides, refresh)


@flow(name="redi-stage", description="Stage model (the base model) of any recipe (upstream from cache).")
@stoppable
@_doc("model", "model")
def model_stage(recipe: RecipeName = "demo", overrides: dict[str, Any] | None = None, refresh: list[Stage] | None = None,
                recipe_path: str | None = None, model: ModelChanges = NO_MODEL_CHANGES) -> dict[str, Any]:
    return run_stage("model", recipe, recipe_path, model, overrides, refresh)


@flow(name="redi-stage", description="Stage verify (label, filter, split) of any recipe (upstream from cache).")
@stoppable
@_doc("verify", "verify")
def verify_stage(recipe: RecipeName = "demo", overrides: dict[str, Any] | None = None, refresh: list[Stage] | None = None,
                 recipe_path: str | None = None, verify: VerifyChanges = NO_VERIFY_CHANGES) -> dict[str, Any]:
    return run_stage("verify", recipe, recipe_path, verify, overrides, refresh)


@flow(name="redi-stage", description="Stage sft (stage 1) of any recipe (upstream from cache).")
@stoppable
@_doc("sft", "sft")
def sft_stage(recipe: RecipeName = "demo", overrides: dict[str, Any] | None = None, refresh: list[Stage] | None = None,
              recipe_path: str | None = None, sft: SFTChanges = NO_SFT_CHANGES) -> dict[str, Any]:
    return run_stage("sft", recipe, recipe_path, sft, overrides, refresh)


@flow(name="redi-stage", description="Stage redi (stage 2: REDI, DPO or SimPO) of any recipe (upstream from cache).")
@stoppable
@_doc("redi", "redi")
def redi_stage2(recipe: RecipeName = "demo", overrides: dict[str, Any] | None = None, refresh: list[Stage] | None = None,
                recipe_path: str | None = None, redi: RediChanges = NO_REDI_CHANGES) -> dict[str, Any]:
    return run_stage("redi", recipe, recipe_path, redi, overrides, refresh)


@flow(name="redi-stage", description="Stage evaluate of any recipe: evaluate models, record the result "
      "(registered for nightly only with register_run=true).")
@stoppable
@_doc("evaluate", "labels", "register_run", "evaluate")
def evaluate_stage(recipe: RecipeName = "demo", overrides: dict[str, Any] | None = None, refresh: list[Stage] | None = None,
                   recipe_path: str | None = None, labels: list[Label] | None = None, register_run: bool = False,
                   evaluate: EvaluateChanges = NO_EVALUATE_CHANGES) -> dict[str, Any]:
    return run_stage("evaluate", recipe, recipe_path, evaluate, overrides, refresh, labels, register_run)


@flow(name="redi-stage", description="Stage curves of any recipe: evaluate the models kept during training "
      "(sft/redi.keep_checkpoints) with evaluate.checkpoints; pass@1 and response length against the step.")
@stoppable
@_doc("curves", "evaluate")
def curves_stage(recipe: RecipeName = "demo", overrides: dict[str, Any] | None = None, refresh: list[Stage] | None = None,
                 recipe_path: str | None = None, evaluate: EvaluateChanges = NO_EVALUATE_CHANGES) -> dict[str, Any]:
    return run_stage("curves", recipe, recipe_path, evaluate, overrides, refresh)


STAGE_FLOWS = {"download": download_stage, "model": model_stage, "verify": verify_stage, "sft": sft_stage,
               "redi": redi_stage2, "curves": curves_stage, "evaluate": evaluate_stage}
"""One typed form per node of ``redi.dag.NODES`` (each takes its node's config section)."""
if list(STAGE_FLOWS) != list(dag.STAGES):  # a node added to the table needs its form here
    raise ImportError(f"flows.stages.STAGE_FLOWS {list(STAGE_FLOWS)} do not match the DAG's stages {list(dag.STAGES)}")

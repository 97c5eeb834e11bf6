"""The study's settings: its methods (an objective, fixed fields, a grid searched on validation), the
``study.yaml`` schema and loading it beside a recipe."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import Field, ValidationError, model_validator

from ..config import Recipe, RecipeError, apply_overrides, load_recipe
from ..config.base import StrictModel
from ..losses import OBJECTIVES

CONTINUED_SFT = "sft"  # the `none` row: SFT continued on the positives (not a stage-2 objective)


def method_fields() -> dict[str, set[str]]:
    """Fields a method may set or search, per loss: each objective's ``search`` (redi.losses.OBJECTIVES), and lr for continued SFT."""
    return {CONTINUED_SFT: {"lr"}, **{name: set(o.search) for name, o in OBJECTIVES.items()}}


class MethodSpec(StrictModel):
    """One stage-2 method of the study: an objective, fixed fields and a grid searched on validation."""

    name: str = Field(..., min_length=1, description="Row label, e.g. `redi`, `redi-sym`, `dpo`, `simpo`, `none`.")
    loss: str = Field(..., description="`sft` = continued SFT on positives (the `none` row); else a stage-2 objective of "
                      "redi.losses.OBJECTIVES (redi, dpo, simpo, ...).")
    fixed: dict[str, float] = Field(default_factory=dict, description="Fields set for every point, e.g. {alpha: 0.8}.")
    grid: dict[str, list[float]] = Field(default_factory=dict, description="Fields searched on validation (cartesian product), e.g. {lr: [1e-5, 1e-4]}.")
    final: bool = Field(True, description="Run on test over all seeds (false: a validation-only probe, e.g. an alpha sweep).")

    @model_validator(mode="after")
    def _fields(self) -> MethodSpec:
        allowed = method_fields()
        if self.loss not in allowed:
            raise ValueError(f"method {self.name!r}: unknown loss {self.loss!r}; valid: {', '.join(allowed)}")
        bad = (set(self.fixed) | set(self.grid)) - allowed[self.loss]
        if bad:
            raise ValueError(f"method {self.name!r} (loss {self.loss}): {sorted(bad)} not searchable; valid: {sorted(allowed[self.loss])}")
        if set(self.fixed) & set(self.grid):
            raise ValueError(f"method {self.name!r}: {sorted(set(self.fixed) & set(self.grid))} both fixed and searched")
        if any(not v for v in self.grid.values()):
            raise ValueError(f"method {self.name!r}: every grid list needs at least one value")
        return self

    def points(self) -> list[dict[str, float]]:
        """Every grid point (fixed fields included), in grid order."""
        keys = list(self.grid)
        return [{**self.fixed, **dict(zip(keys, vals, strict=True))} for vals in itertools.product(*(self.grid[k] for k in keys))]


def _default_methods() -> list[MethodSpec]:
    lrs = [1e-5, 1e-4, 1e-3]
    return [
        MethodSpec(name="none", loss="sft", grid={"lr": lrs}),
        MethodSpec(name="dpo", loss="dpo", fixed={"beta": 0.1}, grid={"lr": lrs}),
        MethodSpec(name="simpo", loss="simpo", fixed={"beta": 2.0, "gamma": 1.0}, grid={"lr": lrs}),
        MethodSpec(name="redi-sym", loss="redi", fixed={"alpha": 1.0}, grid={"lr": lrs}),
        MethodSpec(name="redi", loss="redi", fixed={"alpha": 0.8}, grid={"lr": lrs}),
    ]


class PointJob(NamedTuple):
    """One stage-2 point to train and evaluate: a method of the study (by name), its setting, a seed, a split."""

    method: str
    params: dict[str, float]
    seed: int
    split: str


class StudyConfig(StrictModel):
    """The study's own settings (``study.yaml`` beside the recipe); the recipe supplies every stage's defaults."""

    methods: list[MethodSpec] = Field(default_factory=_default_methods, description="Stage-2 methods with their validation grids.")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="Training seeds of the final runs (mean and SEM over them).")
    search_seed: int = Field(0, description="Training seed of the validation search.")
    sft_round_epochs: float = Field(1.0, gt=0, description="SFT epochs per round; validation after each round.")
    sft_max_rounds: int = Field(8, ge=1, description="Stop SFT after this many rounds even if still improving (reported).")
    plateau_patience: int = Field(1, ge=1, description="Rounds in a row without a significant gain before SFT stops.")
    plateau_z: float = Field(1.0, ge=0, description="A gain is significant when it exceeds z x the combined standard error of the two rounds.")
    plateau_min_delta: float = Field(0.0, ge=0, description="...and exceeds this absolute pass@1 gain.")
    plateau_floor: float = Field(0.0, ge=0, le=1, description="Rounds count towards the plateau only once val pass@1 has reached this: "
                                 "a curve flat at the floor is a model that has not started to solve problems, not a plateau.")
    val_benchmark: str = Field("demo_val", description="Validation split (plateau detection and the search).")
    test_benchmark: str = Field("demo_test", description="Held-out test split (final table only).")
    val_n_samples: int = Field(4, ge=1, description="Samples per validation problem.")
    test_n_samples: int = Field(16, ge=1, description="Samples per test problem (paper: 16).")
    val_max_problems: int | None = Field(None, ge=1, description="Evaluate only the first N validation problems.")
    test_max_problems: int | None = Field(None, ge=1, description="Evaluate only the first N test problems.")
    stage2_steps: int | None = Field(None, ge=1, description="Optimiser steps of every stage-2 run (and of `none`); None = redi.epochs over the pairs.")
    negatives: Literal["teacher", "on_policy"] = Field(
        "teacher", description="Where stage 2's pairs come from. `teacher`: the recipe's verify stage (the paper's offline "
        "setting). `on_policy`: `on_policy_n` samples per training problem from the SFT start itself (the `generate` data "
        "source with the recipe's evaluate sampling settings), graded and verified into (first correct, first incorrect) "
        "pairs with the recipe's verify settings: negatives are the student's own mistakes, a departure from the paper. "
        "In both, `none` continues SFT on the recipe's positives.")
    on_policy_n: int = Field(4, ge=2, le=64, description="negatives: on_policy: samples per training problem drawn from the SFT start.")
    workers: int = Field(1, ge=1, le=64, description="Stage-2 points (search, then final seeds) trained and evaluated at once, "
                         "each in its own process (`python -m redi.study.worker`) with run.threads torch threads (default: "
                         "the cores / workers), training in that process whatever run.launcher says. SFT rounds stay one at a "
                         "time (run.launcher applies). Not part of any key: results differ only by float rounding.")

    def hash_fields(self) -> dict[str, Any]:
        """The settings that decide the study's results (``workers`` only decides how fast)."""
        return self.model_dump(mode="json", exclude={"workers"})

    @model_validator(mode="after")
    def _names(self) -> StudyConfig:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"study.methods: duplicate names {names}")
        if not self.seeds:
            raise ValueError("study.seeds must list at least one seed")
        return self


def load_study(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, StudyConfig]:
    """``path``: a folder with ``recipe.yaml`` and ``study.yaml`` (or the recipe file, study.yaml beside it).

    ``study.x=v`` overrides go to the study config, every other override to the recipe.
    """
    p = Path(path)
    recipe_path = p / "recipe.yaml" if p.is_dir() else p
    study_path = recipe_path.parent / "study.yaml"
    ov = list(overrides or [])
    study_ov = [o[len("study."):] for o in ov if o.startswith("study.")]
    recipe = load_recipe(recipe_path, [o for o in ov if not o.startswith("study.")])
    tree = (yaml.safe_load(study_path.read_text()) or {}) if study_path.exists() else {}
    if study_ov:
        apply_overrides(tree, study_ov)
    try:
        return recipe, StudyConfig.model_validate(tree)
    except ValidationError as e:
        lines = [f"invalid study config ({study_path}):"]
        lines += [f"  study.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise RecipeError("\n".join(lines)) from None


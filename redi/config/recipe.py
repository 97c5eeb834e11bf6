"""The recipe: one typed config per stage, loaded with precedence defaults < YAML < overrides.

``load_recipe(path, overrides=["redi.alpha=1.0", ...])`` is the one entry point; an unknown key,
a wrong type or an impossible value raises :class:`RecipeError` naming the field, before any work.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ..dag import STAGES
from ..tracking import BACKENDS, TrackingError, check_installed
from .base import StrictModel
from .data import DataConfig
from .evaluate import EvaluateConfig
from .model import ModelConfig
from .prompt import PromptConfig
from .train import SFTConfig, Stage2Config
from .verify import VerifyConfig


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the field and what is wrong."""


class RunConfig(StrictModel):
    """Run-wide settings."""

    name: str = Field("run", min_length=1, description="Run name: registered in the results store and used by nightly evaluation.")
    artifact_root: str = Field(
        default_factory=lambda: os.environ.get("REDI_ARTIFACT_ROOT", "artifacts"),
        description="Where stage artifacts live (content-addressed folders). Env REDI_ARTIFACT_ROOT. A local path, or an "
        "fsspec URL (s3://bucket/prefix, gs://..., az://...) with credentials and endpoint from the environment (docs/caching.md).",
    )
    results_db: str | None = Field(None, description="Results store (Parquet folder); None = <artifact_root>/results.")
    cache_dir: str | None = Field(None, description="Local cache of a URL artifact_root (artifacts pulled, builds before "
                                  "upload); None = $REDI_CACHE_DIR or ~/.cache/redi. Unused for a local root.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA when available, else CPU.")
    refresh: list[Literal[STAGES]] = Field(  # type: ignore[valid-type]  # the stages of redi.dag.NODES
        default_factory=list, description="Stages to recompute even when a valid cached artifact exists."
    )
    threads: int | None = Field(None, ge=1, description="torch threads on CPU; None = torch's default.")
    max_parallel: int | None = Field(
        None, ge=1, description="The Prefect flow runs up to this many DAG nodes at once, each as soon as its upstream is "
        "done and the GPUs and cores it needs are free (redi.dag.needs); None = as many as those allow, 1 = one at a time. "
        "Never changes results; the library path (redi run --no-prefect) always runs one node at a time.")
    offline: bool = Field(
        False, description="Never touch the network: sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, so a Hub source fails at once "
        "(with a message naming the local alternative) instead of retrying. The demo sets it."
    )
    launcher: Literal["inprocess", "accelerate"] = Field(
        "inprocess",
        description="How training stages run: in this process, or as `accelerate launch -m redi.train` (multi-GPU / multi-node; "
        "the artifact is still built and cached by this process).",
    )
    accelerate_config: str | None = Field(
        None, description="`accelerate launch --config_file` for launcher=accelerate (deployments/accelerate/{ddp,fsdp,zero2,zero3}.yaml)."
    )
    num_processes: int | None = Field(None, ge=1, description="`accelerate launch --num_processes` (launcher=accelerate); None = the config's.")
    report_to: list[Literal[BACKENDS]] = Field(  # type: ignore[valid-type]  # redi.tracking.BACKENDS
        default_factory=list, description="Experiment trackers (tensorboard, mlflow, wandb, trackio): the recipe, training "
        "signals per step, evaluation metrics and artifact keys (docs/tracking.md). Empty: none."
    )
    tracking_dir: str | None = Field(None, description="Where the trackers write (a local path); None = <artifact_root>/runs/<name>/tracking.")

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, v: list[str]) -> list[str]:
        """A tracker named twice, or whose library is missing, fails here (before any work), naming the extra."""
        dup = sorted({b for b in v if v.count(b) > 1})
        if dup:
            raise ValueError(f"{dup} named more than once")
        try:
            check_installed(v)
        except TrackingError as e:
            raise ValueError(str(e)) from None
        return v


class Recipe(StrictModel):
    """A whole run: every stage's config. Each stage's cache key uses only its own section (+ upstream hashes)."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run-wide settings.")
    data: DataConfig = Field(default_factory=DataConfig, description="Stage `download`.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="The training prompt protocol (verify, sft, redi).")
    verify: VerifyConfig = Field(default_factory=VerifyConfig, description="Stage `verify`.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Stage `sft`.")
    redi: Stage2Config = Field(default_factory=Stage2Config, description="Stage `redi`: stage 2 with an objective of redi.losses.OBJECTIVES (redi, dpo, simpo, ...).")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Stage `evaluate`.")

    @model_validator(mode="after")
    def _evaluation_protocol(self) -> Recipe:
        """An unset evaluation protocol is the training one, written out so the resolved recipe says it."""
        if self.evaluate.prompt_protocol is None:
            self.evaluate.prompt_protocol = self.prompt.train
        return self

    @model_validator(mode="after")
    def _save_dtype(self) -> Recipe:
        """``save_dtype: auto`` is the dtype the evaluation serves in, written out so the stage key hashes it."""
        served = "float32" if self.evaluate.dtype == "auto" else self.evaluate.dtype
        for section in (self.sft, self.redi):
            if section.save_dtype == "auto":
                section.save_dtype = served
        return self


def _parse_value(raw: str) -> Any:
    """`--set` values are YAML scalars/lists: `1e-6`, `true`, `[math500, aime24]`, `null`."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(tree: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``redi.alpha=1.0`` or ``{"redi.alpha": 1.0}``) in a nested dict, in place."""
    items = overrides.items() if isinstance(overrides, dict) else [split_override(o) for o in overrides]
    for key, value in items:
        parts = key.split(".")
        node = tree
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise RecipeError(f"override {key!r}: {p!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return tree


def split_override(item: str) -> tuple[str, Any]:
    """``"redi.alpha=1.0"`` -> ``("redi.alpha", 1.0)`` (the value read as YAML)."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} must look like section.field=value (e.g. redi.alpha=1.0)")
    k, v = item.split("=", 1)
    return k.strip(), _parse_value(v.strip())


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid recipe ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this section)"
        lines.append(f"  {loc}: {msg} (got {e.get('input')!r})" if e["type"] != "extra_forbidden" else f"  {loc}: {msg}")
    return "\n".join(lines)


RECIPE_PATHS: tuple[tuple[str, str], ...] = (
    ("run", "artifact_root"), ("run", "results_db"), ("run", "accelerate_config"), ("run", "tracking_dir"),
    ("run", "cache_dir"), ("data", "local_path"), ("evaluate", "benchmark_dir"), ("model", "base"),
)
"""Recipe fields that are local paths: a relative one in a recipe file is relative to that file's folder."""


def resolve_paths(tree: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the relative paths of ``RECIPE_PATHS`` in ``tree`` (a recipe file's sections) relative to ``base``.

    Absolute paths and ``~`` are kept. ``model.base`` is a path only when it starts with ``.`` or names an
    existing folder beside the recipe: ``tiny`` and Hub ids (``Qwen/Qwen2.5-Math-1.5B``) are kept.
    ``evaluate.benchmark_paths`` values are resolved the same way; ``data.generate.model`` and ``.problems`` as
    ``model.base`` (a Hub id, a benchmark name and ``synthetic`` are kept).
    """
    def resolve(value: str) -> str:
        p = Path(value).expanduser()
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):  # an fsspec URL (s3://bucket/prefix): not a path
            return value
        return value if p.is_absolute() or value.startswith("~") else str((base / p).resolve())

    for section, key in RECIPE_PATHS:
        node = tree.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value:
            continue
        if (section, key) == ("model", "base") and not (value.startswith(".") or (base / value).is_dir()):
            continue
        node[key] = resolve(value)
    gen = (tree.get("data") or {}).get("generate") if isinstance(tree.get("data"), dict) else None
    if isinstance(gen, dict):  # data.generate.model / .problems: paths when they start with "." or exist beside the recipe
        for key in ("model", "problems"):
            value = gen.get(key)
            if isinstance(value, str) and value and (value.startswith(".") or (base / value).exists()):
                gen[key] = resolve(value)
    ev = tree.get("evaluate")
    if isinstance(ev, dict) and isinstance(ev.get("benchmark_paths"), dict):
        ev["benchmark_paths"] = {k: resolve(v) if isinstance(v, str) else v for k, v in ev["benchmark_paths"].items()}
    return tree


def load_recipe(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Defaults < the YAML file at `path` < `overrides`. Raises RecipeError naming any bad field.

    Relative paths in the file (``RECIPE_PATHS``) are relative to the file's folder, so a recipe runs the same
    from any working directory; paths in ``overrides`` (the command line) are relative to the working directory.
    """
    tree: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / "recipe.yaml"
        if not p.exists():
            raise RecipeError(f"recipe file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe {p} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise RecipeError(f"recipe {p} must be a mapping of sections, got {type(tree).__name__}")
        resolve_paths(tree, p.absolute().parent)
        origin = str(p)
    if overrides:
        apply_overrides(tree, overrides)
        origin += " + overrides"
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise RecipeError(_format_error(e, origin)) from None


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe, as written into every run's folder."""
    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False)

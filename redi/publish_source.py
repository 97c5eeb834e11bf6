"""The registered run a push reads: its recipe, chosen model, verify artifact and grades, each validated.

:func:`load_run` resolves ``redi push RUN --model LABEL`` against the runs registry (:mod:`redi.runs`) and the
content-addressed store; every missing or corrupt input is a one-line :class:`PublishError` naming the fix.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import Artifact, ArtifactStore
from .dag import LABEL_STAGE, MODEL_LABELS

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("redi.publish")


class PublishError(ValueError):
    """Bad input for a push (a one-line message naming the thing and the fix)."""



@dataclass
class RunSource:
    """What a push reads from one registered run (resolved and checked by :func:`load_run`)."""

    name: str
    run_dir: Path
    recipe: Any  # redi.config.Recipe
    recipe_yaml: str
    latest: dict[str, Any]
    store: ArtifactStore
    label: str  # the DAG label of the chosen model
    model: Artifact
    verify: Artifact | None = None
    grades: dict[str, Artifact] = field(default_factory=dict)

    def result_label(self, label: str) -> str:
        """base / sft, or the stage-2 objective's name (as the results store calls the stage-2 model)."""
        return self.recipe.redi.loss if LABEL_STAGE[label] == "redi" else label

    @property
    def name_of_model(self) -> str:
        return self.result_label(self.label)

    def model_dir(self) -> Path:
        return self.model.dir if self.label == "base" else self.model.file("model")


def _labels_help(recipe: Any) -> str:
    return ", ".join(dict.fromkeys([*MODEL_LABELS, recipe.redi.loss]))


def resolve_label(label: str, recipe: Any) -> str:
    """The DAG label of ``label``: ``base``/``sft``/``redi``, or the stage-2 objective the run trained with."""
    if label in MODEL_LABELS:
        return label
    if label == recipe.redi.loss:
        return "redi"
    raise PublishError(f"--model {label!r}: this run has no such model; choose one of {_labels_help(recipe)} "
                       f"(its stage-2 objective is {recipe.redi.loss!r})")


def find_run(artifact_root: str | os.PathLike[str], run: str) -> Any:
    """The registration of ``run`` (a :class:`redi.runs.RegisteredRun`), else a one-line PublishError naming the
    registered runs; reads only the registry (cheap enough to check before Prefect starts)."""
    from .runs import registered_runs

    found = registered_runs(artifact_root)
    match = [r for r in found if r.name == run]
    if not match:
        names = ", ".join(r.name for r in found) or "none"
        raise PublishError(f"run {run!r} is not registered under {artifact_root}/runs (registered: {names}): run its "
                           "recipe to the end (`redi run RECIPE`), or pass --artifact-root of the store it ran in")
    return match[0]


def load_run(artifact_root: str | os.PathLike[str], run: str, label: str, need_verify: bool = True) -> RunSource:
    """The registered run ``run`` with its chosen model, verify artifact and grades, every artifact validated."""
    from .config import RecipeError, load_recipe

    reg = find_run(artifact_root, run)
    try:
        recipe = load_recipe(reg.run_dir / "recipe.yaml")
    except (RecipeError, OSError) as e:
        raise PublishError(f"run {run!r}: its recipe {reg.run_dir / 'recipe.yaml'} cannot be read ({e}): run its recipe again") from None
    dag_label = resolve_label(label, recipe)
    entry = reg.models.get(dag_label)
    if not entry:
        raise PublishError(f"run {run!r} registered no {dag_label} model (registered: {', '.join(reg.models) or 'none'}): "
                           f"evaluate it with `redi stage evaluate RECIPE --labels {dag_label} --register`, or choose another --model")
    store = ArtifactStore(artifact_root)
    model = _artifact(store, LABEL_STAGE[dag_label], entry["key"], f"the {dag_label} model of run {run!r}")
    src = RunSource(run, reg.run_dir, recipe, (reg.run_dir / "recipe.yaml").read_text(), reg.latest, store, dag_label, model)
    try:
        src.verify = _verify_artifact(src)
    except PublishError:
        if need_verify:
            raise
    for lab, key in sorted(reg.latest.get("grades", {}).items(), key=lambda kv: MODEL_LABELS.index(kv[0]) if kv[0] in MODEL_LABELS else 99):
        g = store.lookup("grade", key)
        if g is None:
            log.warning("push: the grade artifact %s of %s/%s is missing or corrupt: left out of the metrics", key, run, lab)
            continue
        src.grades[lab] = g
    return src


def _artifact(store: ArtifactStore, stage: str, key: str, what: str) -> Artifact:
    art = store.lookup(stage, key)
    if art is None:
        raise PublishError(f"{what} ({stage} artifact {key} under {store.location}) is missing or corrupt: rerun the "
                           "run's recipe (`redi run RECIPE`) to rebuild it, then push again")
    return art


def _verify_artifact(src: RunSource) -> Artifact:
    """The verify artifact the run's trained models learnt from (their manifests name it)."""
    for lab in ("sft", "redi"):
        entry = src.latest.get("models", {}).get(lab)
        if entry:
            art = src.model if lab == src.label else src.store.lookup(LABEL_STAGE[lab], entry["key"])
            key = (art.manifest.get("inputs", {}) if art else {}).get("verify")
            if key:
                return _artifact(src.store, "verify", key, f"the training data of run {src.name!r}")
    raise PublishError(f"run {src.name!r} registered no trained model (sft or redi), so it names no verify artifact: "
                       "register one (`redi run RECIPE`), or leave the dataset out with --only model,details")


def evaluation_samples(src: RunSource, label: str) -> pd.DataFrame | None:
    """Every sample of ``label``'s registered evaluation under the current grader: the grade artifact's
    samples.parquet when it re-graded, else the evaluation's (whose verdicts the grade copied)."""
    import pandas as pd

    g = src.grades.get(label)
    if g is None:
        return None
    if (g.dir / "samples.parquet").exists():
        return pd.read_parquet(g.dir / "samples.parquet")
    ek = g.manifest.get("inputs", {}).get("evaluate")
    ev = src.store.lookup("evaluate", ek) if ek else None
    if ev is None or not (ev.dir / "samples.parquet").exists():
        log.warning("push: the evaluation samples of %s/%s (evaluate %s) are missing: no details for it", src.name, label, ek)
        return None
    return pd.read_parquet(ev.dir / "samples.parquet")

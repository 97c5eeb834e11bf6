"""Tasks of the ``redi-study`` flow: thin wrappers over :class:`redi.study.Study`.

One task per SFT round, per validation-search point and per final (method, seed), so the Prefect UI
shows each model, and a rerun after a change to one method rebuilds only that method's artifacts
(the content-addressed store decides; Prefect's own caching is off as for every task here).
Inputs and outputs are JSON: the recipe and study config as dicts, artifacts as ``Artifact.to_dict``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import task
from prefect.cache_policies import NONE


def _study(recipe: dict[str, Any], study: dict[str, Any]):
    from redi.config import Recipe
    from redi.study import Study, StudyConfig

    return Study(Recipe.model_validate(recipe), StudyConfig.model_validate(study))


def _arts(d: dict[str, dict[str, Any]]):
    from redi.artifacts import Artifact

    return {k: Artifact.from_dict(v) for k, v in d.items()}


@task(name="study-base", cache_policy=NONE)
def base(recipe: dict[str, Any], study: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """download, model and verify through the Pipeline (same artifacts as `redi run`)."""
    return {k: a.to_dict() for k, a in _study(recipe, study).base().items()}


@task(name="study-sft-round", cache_policy=NONE, task_run_name="sft-round-{r}")
def sft_round(recipe: dict[str, Any], study: dict[str, Any], r: int, start: dict[str, Any],
              base: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One SFT round from ``start`` and its validation score: {"artifact", "row"}."""
    from redi.artifacts import Artifact

    art, row = _study(recipe, study).sft_round_eval(r, Artifact.from_dict(start), _arts(base))
    return {"artifact": art.to_dict(), "row": row}


@task(name="study-on-policy-pairs", cache_policy=NONE)
def on_policy(recipe: dict[str, Any], study: dict[str, Any], base: dict[str, dict[str, Any]],
              start: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``negatives: on_policy``: traces sampled from the SFT start, verified into pairs: {"pairs": artifact}."""
    from redi.artifacts import Artifact

    return {k: a.to_dict() for k, a in _study(recipe, study).on_policy(_arts(base), Artifact.from_dict(start)).items()}


@task(name="study-eval", cache_policy=NONE, task_run_name="eval-{label}-{split}")
def evaluate(recipe: dict[str, Any], study: dict[str, Any], model: dict[str, Any], split: str,
             base: dict[str, dict[str, Any]], label: str) -> dict[str, Any]:
    from redi.artifacts import Artifact

    return asdict(_study(recipe, study).evaluate(Artifact.from_dict(model), split, _arts(base)["download"], label))


@task(name="study-point", cache_policy=NONE, task_run_name="{method}-{split}-seed{seed}-{tag}")
def point(recipe: dict[str, Any], study: dict[str, Any], method: str, params: dict[str, float], seed: int,
          split: str, base: dict[str, dict[str, Any]], start: dict[str, Any], tag: str = "") -> dict[str, Any]:
    """Train one (method, setting, seed) from the SFT start and evaluate it on ``split`` (``study.workers`` > 1: in
    a child process, as the flow runs that many of these tasks at once)."""
    from redi.artifacts import Artifact
    from redi.study import PointJob

    res = _study(recipe, study).points([PointJob(method, params, seed, split)], _arts(base), Artifact.from_dict(start))
    return asdict(res[0])


@task(name="study-report", cache_policy=NONE)
def report(recipe: dict[str, Any], study: dict[str, Any], base: dict[str, dict[str, Any]], sft: dict[str, Any],
           sft_test: dict[str, Any], search: dict[str, list[dict[str, Any]]], final: dict[str, list[dict[str, Any]]],
           wall_s: float, out_dir: str | None = None) -> dict[str, Any]:
    """Table 2, the search table, the SFT curve and the signal plots (a `study` artifact + runs/<name>/study)."""
    from pathlib import Path

    from redi.artifacts import Artifact
    from redi.study import EvalResult, PointResult

    s = _study(recipe, study)
    sft = {**sft, "start": Artifact.from_dict(sft["start"])}
    pts = {k: [PointResult.from_dict(p) for p in v] for k, v in search.items()}
    fin = {k: [PointResult.from_dict(p) for p in v] for k, v in final.items()}
    result = s.assemble(_arts(base), sft, EvalResult(**sft_test), pts, fin, wall_s)
    return s.report(result, Path(out_dir) if out_dir else None)

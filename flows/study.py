"""Flow ``redi-study``: the CPU-scale study (deployments/study-cpu), as ordered tasks.

SFT rounds until the validation plateau -> (``negatives: on_policy``: pairs sampled from the SFT start) ->
per-method validation search -> final runs on test over seeds -> report. The decisions (plateau, best setting) are the library's pure functions
(``redi.study.plateau_decision``, ``redi.study.choose``); each model is its own task and its own
content-addressed artifact, so a change to one method reruns only that method.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from redi.interrupt import stoppable
from tasks.study import base as base_task
from tasks.study import evaluate, on_policy, point, report, sft_round


@flow(name="redi-study", log_prints=False)
@stoppable
def redi_study(recipe_path: str = "deployments/study-cpu", overrides: list[str] | None = None,
               out_dir: str | None = None) -> dict[str, Any]:
    """Run the study of a recipe folder: SFT to its validation plateau, per-method search, final seeds on test.

    Args:
        recipe_path: A folder with recipe.yaml + study.yaml (e.g. deployments/study-cpu).
        overrides: Fields to change, as key=value strings: ["redi.max_length=512", "study.seeds=[0]"]
            (study.* keys go to the study config, the others to the recipe).
        out_dir: Report folder (default: the study folder of the run under artifact_root: runs/RUN/study).
    """
    from redi.artifacts import Artifact
    from redi.study import Study, choose, load_study, sft_summary

    logger = get_run_logger()
    t0 = time.time()
    recipe, cfg = load_study(recipe_path, overrides)
    rd, sd = recipe.model_dump(mode="json", by_alias=True), cfg.model_dump(mode="json")
    s = Study(recipe, cfg)
    base = base_task(rd, sd)
    curve, arts, prev = [], [], base["model"]
    for r in range(1, cfg.sft_max_rounds + 1):
        out = sft_round(rd, sd, r, prev, base)
        curve.append(out["row"])
        arts.append(out["artifact"])
        decision = s.decide(curve)
        logger.info("SFT round %d: val pass@1 %.3f -> %s", r, out["row"]["pass@1"], decision.reason)
        if decision.stop:
            break
        prev = out["artifact"]
    start = arts[decision.best_round - 1]
    sft = {**sft_summary(curve, decision, Artifact.from_dict(start)), "start": start}
    sft_test = evaluate(rd, sd, start, "test", base, "sft-plateau")
    if cfg.negatives == "on_policy":
        base = {**base, **on_policy(rd, sd, base, start)}
    search, final = {}, {}
    for m in cfg.methods:
        search[m.name] = [point(rd, sd, m.name, p, cfg.search_seed, "val", base, start, tag=_tag(p)) for p in m.points()]
    for m in cfg.methods:
        if m.final:
            chosen = choose(m, [_row(p) for p in search[m.name]])
            logger.info("%s: chosen on validation %s", m.name, chosen)
            final[m.name] = [point(rd, sd, m.name, chosen, seed, "test", base, start, tag=_tag(chosen)) for seed in cfg.seeds]
    rep = report(rd, sd, base, sft, sft_test, search, final, time.time() - t0, out_dir)
    logger.info("study report: %s\n%s", rep["out_dir"], rep["table_markdown"])
    return rep


def _tag(params: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in params.items())


def _row(p: dict[str, Any]) -> dict[str, Any]:
    return {**p["params"], "val_pass@1": p["eval"]["pass1"]}

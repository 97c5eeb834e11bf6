"""Flow ``redi-study``: the CPU-scale study (deployments/study-cpu), as ordered tasks.

SFT rounds until the validation plateau -> (``negatives: on_policy``: pairs sampled from the SFT start) ->
per-method validation search -> final runs on test over seeds -> report. The points of the search and of the
final runs run ``study.workers`` at a time. The decisions (plateau, best setting) are the library's pure functions
(``redi.study.plateau_decision``, ``redi.study.choose``); each model is its own task and its own
content-addressed artifact, so a change to one method reruns only that method.
"""

from __future__ import annotations

import queue
import time
from typing import Any

from prefect import flow, get_run_logger

from redi import interrupt
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
    search = _points(s.cfg.workers, [j for m in cfg.methods for j in s.search_jobs(m)], rd, sd, base, start)
    chosen = {}
    for m in cfg.methods:
        if m.final:
            chosen[m.name] = choose(m, [_row(p) for p in search[m.name]])
            logger.info("%s: chosen on validation %s", m.name, chosen[m.name])
    final = _points(s.cfg.workers, [j for m in cfg.methods if m.final for j in s.final_jobs(m, chosen[m.name])],
                    rd, sd, base, start)
    rep = report(rd, sd, base, sft, sft_test, search, final, time.time() - t0, out_dir)
    logger.info("study report: %s\n%s", rep["out_dir"], rep["table_markdown"])
    return rep


def _points(workers: int, jobs: list, rd: dict[str, Any], sd: dict[str, Any], base: dict[str, Any],
            start: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """One task per point, ``study.workers`` at a time (each then trains in a child process), grouped by method."""
    out: dict[str, list[dict[str, Any]]] = {}
    for i in range(0, len(jobs), workers):
        wave = jobs[i:i + workers]
        futures = [point.submit(rd, sd, j.method, j.params, j.seed, j.split, base, start, tag=_tag(j.params)) for j in wave]
        done: queue.SimpleQueue = queue.SimpleQueue()
        for f in futures:
            f.add_done_callback(lambda _f, q=done: q.put(None))
        for _ in futures:  # short waits, not f.result(): a SIGTERM handed to a worker thread still runs its handler
            interrupt.get(done)
        for j, f in zip(wave, futures, strict=True):
            out.setdefault(j.method, []).append(f.result())
    return out


def _tag(params: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in params.items())


def _row(p: dict[str, Any]) -> dict[str, Any]:
    return {**p["params"], "val_pass@1": p["eval"]["pass1"]}

"""The ``curves`` stage: evaluate the models kept during training and draw pass@1 and response length
against the optimiser step (the paper's MATH-500 curves over training).

The training stages keep the model at the steps ``sft/redi.keep_checkpoints`` name, as exported model
folders in their artifact (``checkpoints/step-<n>/``, the final model's format and dtype); the last step is
the stage's ``model/``. This stage evaluates, for each stage of ``evaluate.checkpoints.stages``, the
starting model (step 0, with ``include_start``), every kept step and the final model, with the
``evaluate`` section's protocol changed by ``evaluate.checkpoints`` (paper: MATH-500, n = 4).

Each point is evaluated by the ``evaluate`` stage's own code (``redi.evaluate.evaluate_model``, then the
``grade`` step: copied or re-graded) into ordinary ``evaluate`` and ``grade`` artifacts, one per point, keyed
by the checkpoint's CONTENT (the sha256 table of its files in the training artifact's manifest), not by its
path: a retrained stage whose step 200 has the same weights reuses that evaluation, and adding a kept step
evaluates only the new one. The ``curves`` artifact itself holds ``curves.json`` / ``curves.csv`` (one row per
stage, step and benchmark) and ``curves.png``; its key hashes the training stages' keys and this config,
so a second run is one cache hit.

Departure from the official code: it kept every ``save_steps`` checkpoint of the HF Trainer (resume state
included) and evaluated them with a separate lighteval run; here only the weights are kept, in the
serving dtype, and evaluated inside the DAG.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from .artifacts import Artifact, hash_obj, stage_key
from .config.evaluate import EvaluateConfig

log = logging.getLogger(__name__)
# ``pipe`` below is a redi.pipeline.Pipeline and ``recipe`` a redi.config.Recipe; neither is imported, so the stage's
# code version (redi.artifacts.module_closure) is this module and the evaluation code, not the whole pipeline.

CURVES_JSON, CURVES_CSV, CURVES_PNG = "curves.json", "curves.csv", "curves.png"
METRICS = ("pass@1", "mean_completion_tokens")
KEPT_DIR = "checkpoints"
"""= ``redi.train_kept.KEPT_DIR`` (not imported: the training code would join this stage's code version)."""


# ------------------------------------------------------------------ config and keys (no work done)
def eval_config(ev: EvaluateConfig) -> EvaluateConfig:
    """The ``evaluate`` section with ``evaluate.checkpoints`` applied: the protocol of every curve point."""
    ck = ev.checkpoints
    if ck is None:
        raise ValueError("evaluate.checkpoints is not set: the curves stage is off")
    d = ev.model_dump(mode="json")
    d.update(benchmarks=ck.benchmarks, n_samples=ck.n_samples, checkpoints=None,
             pass_k=[k for k in ev.pass_k if k <= ck.n_samples] or [1])
    for f in ("max_problems", "max_new_tokens", "prompt_protocol"):
        if getattr(ck, f) is not None:
            d[f] = getattr(ck, f)
    return EvaluateConfig.model_validate(d)


def curve_config(recipe: Any) -> dict[str, Any]:
    """What the ``curves`` artifact's key hashes besides its upstream: the points' protocol and which points."""
    ck = recipe.evaluate.checkpoints
    return {"evaluate": eval_config(recipe.evaluate).hash_fields(), "stages": list(ck.stages), "include_start": ck.include_start}


def content_fingerprint(art: Artifact, prefix: str) -> str:
    """The content address of the model folder ``prefix`` of ``art`` (``""``: the whole artifact): a hash of the
    size and sha256 of its files, from the artifact's manifest (nothing is read again)."""
    files = art.manifest.get("files", {})
    pre = f"{prefix.rstrip('/')}/" if prefix else ""
    table = {rel[len(pre):]: meta for rel, meta in files.items() if rel.startswith(pre)}
    if not table:
        raise FileNotFoundError(f"{art.stage} artifact {art.key} has no files under {prefix or '.'!r} in its manifest ({art.path})")
    return hash_obj(table)


def kept_steps(art: Artifact) -> list[int]:
    """The kept steps of a training artifact (its ``checkpoints/step-<n>`` folders in the manifest), ascending."""
    steps = {int(rel.split("/")[1].removeprefix("step-")) for rel in art.manifest.get("files", {})
             if rel.startswith(f"{KEPT_DIR}/step-")}
    return sorted(steps)


def final_step(art: Artifact) -> int:
    """The last optimiser step of a training artifact (its summary's ``steps``)."""
    steps = art.summary.get("steps")
    if not isinstance(steps, int):
        raise ValueError(f"{art.stage} artifact {art.key} has no step count in its summary ({art.path}): not a training stage")
    return steps


def points(pipe: Any, stage: str, arts: dict[str, Artifact]) -> list[dict[str, Any]]:
    """The models on one stage's curve: ``{stage, step, dir, content}`` for the start (step 0: the base model for
    sft, the SFT model for redi), each kept step and the final model."""
    out, art = [], arts[stage]
    if pipe.recipe.evaluate.checkpoints.include_start:
        start = pipe.base_model() if stage == "sft" else arts["sft"]
        sub = "" if stage == "sft" else "model"
        out.append({"stage": stage, "step": 0, "dir": start.dir / sub if sub else start.dir,
                    "content": content_fingerprint(start, sub)})
    for n in kept_steps(art):
        sub = f"{KEPT_DIR}/step-{n}"
        out.append({"stage": stage, "step": n, "dir": art.dir / sub, "content": content_fingerprint(art, sub)})
    out.append({"stage": stage, "step": final_step(art), "dir": art.dir / "model", "content": content_fingerprint(art, "model")})
    return out


# ------------------------------------------------------------------ one point: the evaluate stage's code
def evaluate_point(pipe: Any, cfg: EvaluateConfig, point: dict[str, Any]) -> tuple[Artifact, Artifact]:
    """The ``evaluate`` and ``grade`` artifacts of one model on the curve (built, or taken from cache)."""
    from . import evaluate as ev

    name = f"curves[{point['stage']}@{point['step']}]"
    t0 = time.time()
    refresh = pipe.refreshing("curves")
    inputs = {"model": f"content:{point['content']}", "benchmarks": pipe._benchmark_fingerprints(cfg)}
    key = stage_key("evaluate", cfg.hash_fields(), inputs, pipe._code["evaluate"])
    extra = pipe.extra_benchmark_paths(cfg)
    label = f"{point['stage']}@step-{point['step']}"
    gen = pipe.store.build("evaluate", key, lambda out, work: ev.evaluate_model(cfg, point["dir"], out, extra, label, work=work),
                           config=cfg.hash_fields(), refresh=refresh,
                           inputs={**inputs, "grader_code": pipe._code["grade"], "model_dir": str(point["dir"]),
                                   "curve_point": {"stage": point["stage"], "step": point["step"]}})

    def grade(out: Path, work: Path) -> dict:
        if gen.manifest.get("inputs", {}).get("grader_code") == pipe._code["grade"]:
            shutil.copy(gen.file(ev.METRICS_FILE), out / ev.METRICS_FILE)
            return json.loads((out / ev.METRICS_FILE).read_text())
        return ev.regrade(gen.file(ev.SAMPLES_FILE), cfg, out)

    gcfg = {"grade_timeout_s": cfg.grade_timeout_s, "pass_k": cfg.pass_k}
    gkey = stage_key("grade", gcfg, {"evaluate": key}, pipe._code["grade"])
    graded = pipe.store.build("grade", gkey, grade, config=gcfg, inputs={"evaluate": key}, refresh=refresh)
    pipe.timings[name] = time.time() - t0
    pipe.nodes[name] = gen
    log.info("%s: %s (%.1fs)", name, "cache hit" if gen.cached else "evaluated", pipe.timings[name])
    return gen, graded


def rows_of(point: dict[str, Any], graded: Artifact, eval_key: str) -> list[dict[str, Any]]:
    """One row per benchmark (and ``average`` with several) of a graded point."""
    m = json.loads(graded.file("metrics.json").read_text())
    per = dict(m["benchmarks"])
    if len(per) > 1:
        per["average"] = m["average"]
    return [{"stage": point["stage"], "step": point["step"], "benchmark": b, "pass@1": v.get("pass@1"),
             "mean_completion_tokens": v.get("mean_completion_tokens", v.get("completion_tokens_mean")),
             "truncated_share": v.get("truncated_share"), "eval_key": eval_key, "model_dir": str(point["dir"])}
            for b, v in per.items()]


# ------------------------------------------------------------------ the stage
def evaluate_curves(pipe: Any, arts: dict[str, Artifact]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Evaluate (or take from cache) every point of every stage's curve: (rows, {evaluated, cached}).

    Called by every process of a launch, outside the ``curves`` build: each point is a top-level build as the
    evaluate stage's (rank 0 builds, the others wait for it), never a build nested in another rank-0-only one."""
    cfg = eval_config(pipe.recipe.evaluate)
    rows, counts = [], {"evaluated": 0, "cached": 0}
    for stage in pipe.recipe.evaluate.checkpoints.stages:
        pts = points(pipe, stage, arts)
        if len(pts) <= 2:
            log.warning("curves: %s keeps no checkpoint (set %s.keep_checkpoints): its curve has %d point(s)", stage, stage, len(pts))
        for p in pts:
            gen, graded = evaluate_point(pipe, cfg, p)
            counts["cached" if gen.cached else "evaluated"] += 1
            rows += rows_of(p, graded, gen.key)
    return rows, counts


def build_curves(pipe: Any, rows: list[dict[str, Any]], counts: dict[str, int], out: Path) -> dict[str, Any]:
    """The ``curves`` artifact from the evaluated points: curves.json / .csv / .png into ``out``, the tracker; the summary."""
    cfg = eval_config(pipe.recipe.evaluate)
    write_curves(rows, out, cfg)
    track(rows)
    return {"points": len({(r["stage"], r["step"]) for r in rows}), **counts, "benchmarks": list(cfg.benchmarks),
            "n_samples": cfg.n_samples, "rows": rows}


def write_curves(rows: list[dict[str, Any]], out: Path, cfg: EvaluateConfig) -> None:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    (out / CURVES_JSON).write_text(json.dumps(rows, indent=1))
    pd.DataFrame(rows).to_csv(out / CURVES_CSV, index=False)
    plot(rows, out / CURVES_PNG, f"{', '.join(cfg.benchmarks)}, n = {cfg.n_samples}")


def plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """pass@1 (%) and mean response length (tokens) against the step: one column per training stage, one line per
    benchmark (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    stages = list(dict.fromkeys(r["stage"] for r in rows))
    fig, axes = plt.subplots(2, len(stages), figsize=(4.8 * len(stages), 6.0), squeeze=False)
    for j, stage in enumerate(stages):
        mine = [r for r in rows if r["stage"] == stage]
        for bench in dict.fromkeys(r["benchmark"] for r in mine):
            pts = sorted((r["step"], r) for r in mine if r["benchmark"] == bench)
            xs = [s for s, _ in pts]
            style = {"linestyle": "--", "color": "black"} if bench == "average" else {}
            axes[0, j].plot(xs, [100 * (r["pass@1"] or 0.0) for _, r in pts], marker="o", label=bench, **style)
            axes[1, j].plot(xs, [r["mean_completion_tokens"] or 0.0 for _, r in pts], marker="o", label=bench, **style)
        axes[0, j].set_title(f"{stage}: pass@1", fontsize=10)
        axes[1, j].set_title(f"{stage}: mean response length", fontsize=10)
        axes[0, j].set_ylabel("pass@1 (%)")
        axes[1, j].set_ylabel("completion tokens")
        axes[1, j].set_xlabel("optimiser step")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        axes[0, j].legend(fontsize=7)
    fig.suptitle(f"evaluation over training ({title})" if title else "evaluation over training", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(rows: list[dict[str, Any]]) -> str:
    """The curve as a markdown table: one row per stage and step, a pass@1 and a length column per benchmark."""
    benches = list(dict.fromkeys(r["benchmark"] for r in rows))
    head = "| stage | step | " + " | ".join(f"{b} pass@1 (%) | {b} tokens" for b in benches) + " |"
    lines = [head, "|---|---:|" + "---:|---:|" * len(benches)]
    cells = {(r["stage"], r["step"], r["benchmark"]): r for r in rows}
    for stage, step in dict.fromkeys((r["stage"], r["step"]) for r in rows):
        vals = []
        for b in benches:
            r = cells.get((stage, step, b))
            vals += [f"{100 * r['pass@1']:.1f}" if r and r["pass@1"] is not None else "",
                     f"{r['mean_completion_tokens']:.0f}" if r and r["mean_completion_tokens"] is not None else ""]
        lines.append(f"| {stage} | {step} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def track(rows: list[dict[str, Any]]) -> None:
    """Send the curve to the ``curves`` node's tracker run (``run.report_to``; ``redi.tracking`` does nothing when off)."""
    from . import tracking

    for metrics, step in tracking.curve_metrics(rows, METRICS):
        tracking.log_metrics(metrics, step)

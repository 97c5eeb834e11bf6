"""Task ``curves``: evaluate the models the training stages kept and draw the curves (``redi.curves``).

Besides the artifact it publishes the curve to the run's Prefect artifacts (a stage with
``evaluate.checkpoints`` unset is skipped by the walker and never reaches this task):
  ``<run>-curves``        table: one row per stage, step and benchmark (pass@1, mean completion tokens)
  ``<run>-curves-plot``   markdown: the same table and ``curves.png`` inline (a data: URL; the UI has no file access)
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from ._common import stage_run_name

_MAX_INLINE_IMAGE = 2_000_000  # bytes; a larger plot is named by path only


@task(name="curves", cache_policy=NONE, task_run_name=stage_run_name("curves"))
def curves(recipe: dict[str, Any], sft: dict[str, Any], redi: dict[str, Any]) -> dict[str, Any]:
    from ._common import art, run_stage

    out = run_stage(recipe, "curves", lambda p: p.curves(art(sft), art(redi)))["curves"]
    publish_curves(recipe["run"]["name"], out)
    return out


def publish_curves(run: str, curves_artifact: dict[str, Any]) -> dict[str, str]:
    """Create the curve's table and markdown artifacts in the current Prefect run; returns {key: kind}."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from redi import curves as C

    from .report import artifact_key

    rows = curves_artifact["manifest"]["summary"]["rows"]
    table = [{k: r[k] for k in ("stage", "step", "benchmark", "pass@1", "mean_completion_tokens", "truncated_share")} for r in rows]
    made = {}
    key = artifact_key(run, "curves")
    create_table_artifact(table, key=key, description=f"Evaluation of the kept checkpoints of run {run}")
    made[key] = "table"
    png = Path(curves_artifact["path"]) / C.CURVES_PNG
    figure = (f"![{run}: pass@1 and response length over training](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"
              if png.is_file() and png.stat().st_size <= _MAX_INLINE_IMAGE else f"Plot: `{png}`")
    key = artifact_key(run, "curves-plot")
    create_markdown_artifact(f"## Run `{run}`: evaluation over training\n\n{C.markdown(rows)}\n\n{figure}\n\n"
                             f"Files: `{curves_artifact['path']}` ({C.CURVES_JSON}, {C.CURVES_CSV}, {C.CURVES_PNG})",
                             key=key, description=f"Curves over training of run {run}")
    made[key] = "markdown"
    return made

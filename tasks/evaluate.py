"""Task ``evaluate``: sample and grade one model of the run on the recipe's benchmarks.

Returns both nodes it produces, ``{"evaluate[<label>]": ..., "grade[<label>]": ...}``: the
``evaluate`` artifact holds every sample (and is where the time goes), ``grade`` the metrics under the
current grader (a copy when the evaluation already used it, else a re-grade of the saved samples).
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from ._common import stage_run_name


@task(name="evaluate", cache_policy=NONE, task_run_name=stage_run_name("evaluate"))
def evaluate(recipe: dict[str, Any], label: str, model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from ._common import art, run_stage

    return run_stage(recipe, "evaluate", lambda p: p.evaluate(label, art(model)), [("evaluate", label), ("grade", label)])

"""Task ``evaluate``: sample and grade one model of the run on the recipe's benchmarks.

Returns the ``grade`` artifact (metrics under the current grader); the ``evaluate`` artifact with
every sample is its upstream (``manifest["inputs"]["evaluate"]``).
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE


@task(name="evaluate", cache_policy=NONE, task_run_name="evaluate[{label}]")
def evaluate(recipe: dict[str, Any], label: str, model: dict[str, Any]) -> dict[str, Any]:
    from ._common import art, pipeline_for

    return pipeline_for(recipe, "evaluate").evaluate(label, art(model)).to_dict()

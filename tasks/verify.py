"""Task ``verify``: label every trace, filter, decontaminate, split into positives and pairs."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from ._common import stage_run_name


@task(name="verify", cache_policy=NONE, task_run_name=stage_run_name("verify"))
def verify(recipe: dict[str, Any], data: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    from ._common import art, run_stage

    return run_stage(recipe, "verify", lambda p: p.verify(art(data), art(model)))["verify"]

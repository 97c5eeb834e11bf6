"""Task ``sft``: stage 1, SFT on the positive traces (resumes from its checkpoint after a kill)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from ._common import stage_run_name


@task(name="sft", cache_policy=NONE, task_run_name=stage_run_name("sft"))
def sft(recipe: dict[str, Any], verify: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    from ._common import art, run_stage

    return run_stage(recipe, "sft", lambda p: p.sft(art(verify), art(model)))["sft"]

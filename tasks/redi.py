"""Task ``redi``: stage 2 from the SFT model with the REDI objective (or the DPO / SimPO baselines)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from ._common import stage_run_name


@task(name="redi", cache_policy=NONE, task_run_name=stage_run_name("redi"))
def stage2(recipe: dict[str, Any], verify: dict[str, Any], sft: dict[str, Any]) -> dict[str, Any]:
    from ._common import art, run_stage

    return run_stage(recipe, "redi", lambda p: p.stage2(art(verify), art(sft)))["redi"]

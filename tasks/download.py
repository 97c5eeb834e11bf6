"""Task ``download``: the teacher traces (Hub, local files or the offline synthetic teacher)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from ._common import stage_run_name


@task(name="download", cache_policy=NONE, task_run_name=stage_run_name("download"), retries=2, retry_delay_seconds=[10, 60])
def download(recipe: dict[str, Any]) -> dict[str, Any]:
    """Retried: a Hub download can fail transiently; a partial attempt leaves only a .tmp folder."""
    from ._common import run_stage

    return run_stage(recipe, "download", lambda p: p.download())["download"]

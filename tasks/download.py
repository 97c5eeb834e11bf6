"""Task ``download``: the teacher traces (Hub, local files or the offline synthetic teacher)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from ._common import retry_on_network_errors, stage_run_name


@task(name="download", cache_policy=NONE, task_run_name=stage_run_name("download"), retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_on_network_errors)
def download(recipe: dict[str, Any]) -> dict[str, Any]:
    """Retried on network errors only (a Hub download can fail transiently; bad data or a full disk fails at
    once); a partial attempt leaves only a .tmp folder."""
    from ._common import run_stage

    return run_stage(recipe, "download", lambda p: p.download())["download"]

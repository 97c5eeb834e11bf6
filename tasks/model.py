"""Task ``model``: the base model (built locally for ``tiny``, else loaded from the Hub and saved)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from ._common import retry_on_network_errors, stage_run_name


@task(name="model", cache_policy=NONE, task_run_name=stage_run_name("model"), retries=1, retry_delay_seconds=30,
      retry_condition_fn=retry_on_network_errors)
def base_model(recipe: dict[str, Any], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Retried once on a network error: loading a Hub model may fail transiently."""
    from ._common import art, run_stage

    return run_stage(recipe, "model", lambda p: p.base_model(art(data)))["model"]

"""Tasks of Hub publishing: write the folders of a push, upload them (``redi.publish``)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from ._common import retry_on_network_errors


@task(name="stage-push", cache_policy=NONE)
def stage_push(artifact_root: str, run: str, model: str, repo: str, out: str | None, only: list[str] | None,
               dataset_repo: str | None, details_repo: str | None, license: str | None, notes: str | None) -> dict[str, Any]:
    """One folder per repository under ``out`` and push.json (``redi.publish.stage``); nothing is uploaded."""
    from redi import publish

    from ._common import run_logs

    with run_logs():
        return publish.stage(artifact_root, run, model, repo, out, only, dataset_repo, details_repo, license, notes)


@task(name="upload-push", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_on_network_errors)
def upload_push(plan: dict[str, Any], private: bool) -> dict[str, str]:
    """Upload each staged folder to its repository (``redi.publish.upload``; the token is huggingface_hub's own).
    A retry uploads again: files the Hub already has unchanged are skipped by huggingface_hub."""
    from redi import publish

    from ._common import run_logs

    with run_logs():
        return publish.upload(plan, private=private)

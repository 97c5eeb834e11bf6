"""The ``redi-push`` flow: a registered run's model, training data and evaluation details to the Hub.

Thin over :mod:`redi.publish` (what ``redi push`` calls with ``--no-prefect``): a task writes one folder per
repository, a second uploads them unless ``dry_run``; the flow publishes a markdown artifact with the
repositories and folders. The run form is typed: the model label and the parts are dropdowns.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import documented
from redi.dag import MODEL_LABELS
from redi.interrupt import stoppable
from redi.losses import OBJECTIVES
from redi.publish import KINDS, PublishError, hub_token, repo_ids
from tasks.publish import stage_push, upload_push

PushModel = Literal[tuple(dict.fromkeys([*MODEL_LABELS, *OBJECTIVES]))]  # type: ignore[valid-type]
Part = Literal[KINDS]  # type: ignore[valid-type]

PUSH_HELP = {
    "run": "A registered run: a name with runs/NAME/latest.json under artifact_root (what a full run of a recipe registers).",
    "model": "Which model of the run: base, sft, redi (the stage-2 model), or the stage-2 objective's name (dpo, simpo, ...).",
    "repo": "Model repo id NAMESPACE/NAME; the dataset goes to NAME-data and the details to NAME-details unless set below.",
    "artifact_root": "The artifact store the run is registered in (a folder or a URL root).",
    "dry_run": "Write the folders that would be pushed (one per repository, under out) and push nothing.",
    "only": "Which parts to publish: model, dataset, details (default: all three).",
    "out": "Folder for the staged repositories (default: <artifact_root>/runs/RUN/publish/MODEL); empty or an earlier push folder.",
    "dataset_repo": "Dataset repo id for the positives and pairs (default: REPO-data).",
    "details_repo": "Dataset repo id for the per-sample evaluation details (default: REPO-details).",
    "license": "Hub license id of every repo (default: known for the demo's tiny/synthetic and the paper's sources).",
    "notes": "A markdown file with a '## ... departs from the paper' section for the model card (default: deployments/RUN/README.md).",
    "private": "Create the repositories private.",
}


@flow(name="redi-push", description="Publish a registered run to the Hugging Face Hub: model + card, data + card, evaluation details.")
@stoppable
@documented("Publish a registered run's model, positives/pairs and evaluation samples to the Hub (or, with dry_run, "
            "write the folders only).", "run", "model", "repo", "artifact_root", "dry_run", "only", "out", "dataset_repo",
            "details_repo", "license", "notes", "private", extra=PUSH_HELP)
def redi_push(run: str, model: PushModel, repo: str, artifact_root: str = "artifacts", dry_run: bool = False,
              only: list[Part] | None = None, out: str | None = None, dataset_repo: str | None = None,
              details_repo: str | None = None, license: str | None = None, notes: str | None = None,
              private: bool = False) -> dict[str, Any]:
    repo_ids(repo, only, dataset_repo, details_repo)  # bad ids and a missing token fail before any work
    if not dry_run:
        hub_token()
    plan = stage_push(artifact_root, run, model, repo, out, only, dataset_repo, details_repo, license, notes)
    plan["dry_run"] = dry_run
    plan["uploaded"] = {} if dry_run else upload_push(plan, private)
    lines = [f"## {'Dry run of a push' if dry_run else 'Pushed'}: run `{run}`, model `{plan['model']}`", "",
             "| part | repository | type | files | folder | commit |", "|---|---|---|---:|---|---|"]
    lines += [f"| {k} | `{p['repo_id']}` | {p['repo_type']} | {len(p['files'])} | `{p['folder']}` | {plan['uploaded'].get(k, '–')} |"
              for k, p in plan["parts"].items()]
    from tasks.report import artifact_key

    create_markdown_artifact("\n".join(lines), key=artifact_key(run, "push"), description="Hub publishing")
    get_run_logger().info("push: %s", "dry run, folders in " + plan["out"] if dry_run else plan["uploaded"])
    return plan


__all__ = ["PublishError", "redi_push"]

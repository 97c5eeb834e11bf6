"""Publish a registered run to the Hugging Face Hub: a model, its training data, its evaluation details.

``redi push`` and the ``redi-push`` flow call :func:`publish`. It reads a run registered by
``Pipeline.report`` (``<artifact_root>/runs/<name>/latest.json`` and ``recipe.yaml``, see :mod:`redi.runs`)
and writes one folder per repository under ``out``:

- ``model/``: the chosen model's files (``base``, ``sft``, ``redi``, or the stage-2 objective's name:
  ``dpo``, ``simpo``, ...), ``recipe.yaml`` and a model card (:func:`redi.cards.model_card`);
- ``dataset/``: ``positives.parquet`` and ``pairs.parquet`` of the run's verify artifact with a dataset card;
- ``details/``: every evaluation sample of the run's models, ``details/<model>/<benchmark>.parquet``, and
  ``results/<model>.json`` (metrics), with a card, as lighteval's ``details_*`` datasets;
- ``push.json`` beside them: which folder goes to which repository (not uploaded).

A dry run stops there. A real push then uploads exactly those folders through ``huggingface_hub``
(``HfApi.create_repo(exist_ok=True)`` and ``HfApi.upload_folder``, one commit per repository). The token
is ``huggingface_hub.get_token()`` (``HF_TOKEN`` or ``hf auth login``), never a recipe field; it is not
logged. Every input is checked before the first upload: the run, the label, the artifacts, the repo ids,
the license, the token, offline mode; each failure is a one-line :class:`PublishError` naming the fix.

Model weights are hard links to the artifact's files where the file system allows it (no copy of a
multi-GB checkpoint); do not edit files in a staged folder. Never imports Prefect.

Modules: this one (repo ids, token, the plan and the upload), :mod:`redi.publish_source` (the run lookup and
its validation), :mod:`redi.publish_parts` (the folder of each part and its card's inputs).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .publish_parts import licenses, recipe_departures, write_dataset, write_details, write_model
from .publish_source import PublishError, load_run

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("model", "dataset", "details")
"""The repositories a push can write, in upload order."""
REPO_TYPES = {"model": "model", "dataset": "dataset", "details": "dataset"}
SUFFIX = {"model": "", "dataset": "-data", "details": "-details"}
"""Default repo ids from ``--repo NS/NAME``: NS/NAME, NS/NAME-data, NS/NAME-details."""
PLAN_FILE = "push.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


# ------------------------------------------------------------------------------------------ checks
def check_repo_id(repo_id: str, what: str = "--repo") -> str:
    """``namespace/name`` as the Hub accepts it (letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``)."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id \
            or repo_id.endswith((".git", ".")):
        raise PublishError(f"{what} {repo_id!r} is not a Hub repo id: use NAMESPACE/NAME (your user or organisation, "
                           "then letters, digits, '-', '_' or '.'), e.g. my-user/redi-demo")
    return repo_id


def repo_ids(repo: str, only: list[str] | None = None, dataset_repo: str | None = None,
             details_repo: str | None = None) -> dict[str, str]:
    """The repo id of each published kind: ``repo`` + :data:`SUFFIX`, unless given explicitly."""
    kinds = list(only or KINDS)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise PublishError(f"--only: unknown part {', '.join(bad)}; use a comma-separated subset of {','.join(KINDS)}")
    check_repo_id(repo)
    explicit = {"dataset": dataset_repo, "details": details_repo}
    ids = {k: check_repo_id(explicit[k], f"--{k}-repo") if explicit.get(k) else repo + SUFFIX[k] for k in KINDS if k in kinds}
    for k, rid in ids.items():
        check_repo_id(rid, f"the {k} repo id")
    if len(set(zip(ids.values(), (REPO_TYPES[k] for k in ids), strict=True))) < len(ids):
        raise PublishError(f"two parts would go to the same repository ({ids}): give --dataset-repo / --details-repo distinct ids")
    return ids


def hub_token(token: str | None = None) -> str:
    """The token of a real push: ``token`` or huggingface_hub's (``HF_TOKEN``, ``hf auth login``); offline mode is an error."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset HF_HUB_OFFLINE (and run.offline only "
                           "affects runs), or add --dry-run to write the folders only")
    tok = token or get_token()
    if not tok:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access), "
                           "or add --dry-run to write the folders only")
    return tok


def prepare_out(out: Path) -> Path:
    """``out`` empty, or a previous push folder (it has push.json): its part folders are replaced."""
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not (out / PLAN_FILE).is_file():
        raise PublishError(f"--out {out} is not empty and is not an earlier push folder (no {PLAN_FILE}): choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    for k in KINDS:
        if (out / k).exists():
            shutil.rmtree(out / k)
    (out / PLAN_FILE).unlink(missing_ok=True)
    return out



# ------------------------------------------------------------------------------------------ entry points
def stage(artifact_root: str | os.PathLike[str], run: str, model: str, repo: str, out: str | os.PathLike[str] | None = None,
          only: list[str] | None = None, dataset_repo: str | None = None, details_repo: str | None = None,
          license: str | None = None, notes: str | None = None) -> dict[str, Any]:
    """Write the folders a push uploads (one per repository) under ``out`` and ``push.json``; upload nothing.

    ``out`` defaults to ``<artifact_root>/runs/<run>/publish/<model>``. Returns the plan: ``{"out", "run",
    "model", "parts": {kind: {"repo_id", "repo_type", "folder", "files", ...}}}`` (also in push.json)."""
    ids = repo_ids(repo, only, dataset_repo, details_repo)
    src = load_run(artifact_root, run, model, need_verify="dataset" in ids)
    lic = licenses(src.recipe, license, list(ids))
    departures = recipe_departures(src, notes) if "model" in ids else (None, None)
    if "details" in ids and not src.grades:
        raise PublishError(f"run {run!r} has no registered evaluation to publish as details: evaluate it "
                           "(`redi run RECIPE`), or leave the details out with --only model,dataset")
    out_dir = prepare_out(Path(out) if out else src.run_dir / "publish" / model)
    parts: dict[str, Any] = {}
    for kind, rid in ids.items():
        folder = out_dir / kind
        if kind == "model":
            info = write_model(src, folder, rid, ids, lic[kind], departures)
        elif kind == "dataset":
            info = write_dataset(src, folder, rid, ids, lic[kind])
        else:
            info = write_details(src, folder, rid, ids, lic[kind])
        parts[kind] = {"repo_id": rid, "repo_type": REPO_TYPES[kind], "folder": str(folder), **info}
        log.info("push: %s folder for %s (%s): %s, %d files", kind, rid, REPO_TYPES[kind], folder, len(info["files"]))
    plan = {"out": str(out_dir), "run": run, "model": src.name_of_model, "parts": parts}
    (out_dir / PLAN_FILE).write_text(json.dumps(plan, indent=2))
    return plan


def upload(plan: dict[str, Any], token: str | None = None, private: bool = False, api: Any = None,
           commit_message: str | None = None) -> dict[str, Any]:
    """Upload each folder of ``plan`` (from :func:`stage`) to its repository: ``create_repo(exist_ok=True)``
    then ``upload_folder``. Returns ``{kind: commit url}``."""
    from huggingface_hub import HfApi

    tok = hub_token(token)
    api = api or HfApi()
    urls = {}
    for kind, part in plan["parts"].items():
        api.create_repo(part["repo_id"], repo_type=part["repo_type"], private=private, exist_ok=True, token=tok)
        info = api.upload_folder(folder_path=part["folder"], repo_id=part["repo_id"], repo_type=part["repo_type"], token=tok,
                                 commit_message=commit_message or f"REDI run {plan['run']}: {kind} of {plan['model']}")
        urls[kind] = getattr(info, "commit_url", str(info))
        log.info("push: %s uploaded to %s (%s)", kind, part["repo_id"], urls[kind])
    return urls


def publish(artifact_root: str | os.PathLike[str], run: str, model: str, repo: str, out: str | os.PathLike[str] | None = None,
            dry_run: bool = False, only: list[str] | None = None, dataset_repo: str | None = None,
            details_repo: str | None = None, license: str | None = None, notes: str | None = None,
            private: bool = False, token: str | None = None, api: Any = None) -> dict[str, Any]:
    """:func:`stage`, then (unless ``dry_run``) :func:`upload` of the same folders. A real push checks the
    token and offline mode before writing anything."""
    repo_ids(repo, only, dataset_repo, details_repo)  # a malformed id fails before the token is asked for
    if not dry_run:
        token = hub_token(token)
    plan = stage(artifact_root, run, model, repo, out, only, dataset_repo, details_repo, license, notes)
    plan["dry_run"] = dry_run
    plan["uploaded"] = {} if dry_run else upload(plan, token, private, api)
    return plan

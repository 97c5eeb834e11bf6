"""Serve every REDI deployment from one process (no work pool or worker needed): ``redi serve``.

    prefect server start --host 127.0.0.1 &            # UI on http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python deployments/serve.py                        # or: redi serve

Deployments (flow/deployment):
  redi-pipeline/demo, redi-pipeline/redi-qwen2.5-math-1.5b     the whole DAG of each recipe (registers the run)
  redi-stage/{download,model,verify,sft,redi,curves,evaluate}  one stage of any recipe (dropdown), upstream from cache
  nightly-eval/nightly                                         cron 03:00 UTC (REDI_NIGHTLY_CRON) over registered runs
  redi-eval/adhoc                                              any model folder or Hub id
  redi-study/study-cpu                                         the CPU-scale study
  redi-push/push                                               a registered run's model, data and details to the Hub

The run form of the pipeline deployments is pre-filled with the recipe's resolved fields (edit any
of them, e.g. redi.alpha, before a run). Artifacts go to REDI_ARTIFACT_ROOT (default: ./artifacts
of the directory serve starts in, made absolute so every flow run uses the same store).

Before serving, ``check_scheduler`` proves that the installed SQLAlchemy lets Prefect's scheduler
create scheduled runs (``python deployments/serve.py --check-scheduler`` runs only that check).
Serving makes no network listener of its own; flow runs start in this process's subprocesses.
Run it from the repository root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make flows/ and tasks/ importable
    sys.path.insert(0, str(REPO))

RECIPES = {"demo": REPO / "deployments" / "demo" / "recipe.yaml",
           "redi-qwen2.5-math-1.5b": REPO / "deployments" / "redi-qwen2.5-math-1.5b" / "recipe.yaml"}
NIGHTLY_CRON = os.environ.get("REDI_NIGHTLY_CRON", "0 3 * * *")

_SCHEDULER_CHECK = """
import asyncio, datetime
from prefect.server import models, schemas
from prefect.server.database import provide_database_interface

async def main():
    db = provide_database_interface()
    await db.create_db()
    async with db.session_context(begin_transaction=True) as s:
        flow = await models.flows.create_flow(session=s, flow=schemas.core.Flow(name="scheduler-check"))
        every = schemas.schedules.IntervalSchedule(interval=datetime.timedelta(hours=1))
        dep = await models.deployments.create_deployment(session=s, deployment=schemas.core.Deployment(
            name="check", flow_id=flow.id, schedules=[schemas.core.DeploymentSchedule(schedule=every, active=True)]))
        ids = await models.deployments.schedule_runs(session=s, deployment_id=dep.id)
    assert len(ids) >= 1, f"the scheduler created {len(ids)} runs"
    print(f"scheduler check: {len(ids)} runs scheduled")

asyncio.run(main())
"""


def check_scheduler(timeout: float = 180) -> str:
    """Run the code path of Prefect's scheduler service (``schedule_runs``: a bulk insert of flow runs)
    against a throw-away SQLite database; raise RuntimeError with the reason when it fails.

    With SQLAlchemy 2.1 this insert fails ("Can't evaluate bulk DML statement"), so the server logs an
    error every loop and never creates a scheduled run: the nightly cron silently never fires.
    """
    import sqlalchemy

    with tempfile.TemporaryDirectory(prefix="redi-scheduler-check-") as home:
        env = dict(os.environ, PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/check.db")
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
        p = subprocess.run([sys.executable, "-c", _SCHEDULER_CHECK], env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"Prefect's scheduler cannot create runs with SQLAlchemy {sqlalchemy.__version__}: {last}. "
                           "Fix: pip install 'sqlalchemy[asyncio]>=2.0.30,<2.1' (pinned in pyproject.toml)")
    return p.stdout.strip()


def _prefilled(path: Path) -> dict:
    """The recipe's resolved fields, artifact_root made absolute (runs start in other working dirs)."""
    from redi.config import load_recipe

    r = load_recipe(path)
    r.run.artifact_root = str(Path(r.run.artifact_root).expanduser().resolve())
    return r.model_dump(mode="json", by_alias=True)


def build_deployments(artifact_root: str | None = None) -> list:
    from prefect.schedules import Cron

    from flows.nightly import nightly_eval, redi_eval
    from flows.pipeline import redi_pipeline
    from flows.publish import redi_push
    from flows.stages import STAGE_FLOWS
    from flows.study import redi_study
    from redi.dag import STAGES

    root = str(Path(artifact_root or os.environ.get("REDI_ARTIFACT_ROOT", "artifacts")).resolve())
    out = []
    for name, path in RECIPES.items():
        if path.exists():
            out.append(redi_pipeline.to_deployment(name, parameters={"recipe": _prefilled(path)}, tags=["redi"],
                                                   description=f"The whole DAG of {path.relative_to(REPO)}; registers the run "
                                                               "for nightly evaluation."))
    for stage in STAGES:
        out.append(STAGE_FLOWS[stage].to_deployment(
            stage, tags=["redi", "stage"],
            description=f"Stage `{stage}` of any recipe (pick it in the form); upstream from cache. "
                        + ("Records its result without changing what nightly evaluates, unless register_run is on."
                           if stage == "evaluate" else "")))
    out.append(nightly_eval.to_deployment("nightly", schedules=[Cron(NIGHTLY_CRON, timezone="UTC")],
                                          parameters={"artifact_root": root}, tags=["redi", "nightly"],
                                          description=f"Cron `{NIGHTLY_CRON}` (UTC): evaluate the latest models of every "
                                                      f"registered run under {root}."))
    out.append(redi_eval.to_deployment("adhoc", parameters={"recipe_path": str(RECIPES["demo"])}, tags=["redi", "eval"]))
    out.append(redi_study.to_deployment("study-cpu", parameters={"recipe_path": str(REPO / "deployments" / "study-cpu")},
                                        tags=["redi", "study"]))
    out.append(redi_push.to_deployment("push", parameters={"artifact_root": root}, tags=["redi", "publish"],
                                       description=f"Publish a run registered under {root} to the Hugging Face Hub "
                                                   "(dry_run: write the folders only). The token is the server's HF_TOKEN / login."))
    return out


def main(limit: int | None = None) -> None:
    from prefect import serve

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # one store for every flow run of this process (the runs inherit the environment)
    os.environ["REDI_ARTIFACT_ROOT"] = str(Path(os.environ.get("REDI_ARTIFACT_ROOT", "artifacts")).expanduser().resolve())
    try:
        print(check_scheduler(), flush=True)
    except RuntimeError as e:
        sys.exit(f"redi serve: {e}")
    serve(*build_deployments(), limit=limit)


if __name__ == "__main__":
    if "--check-scheduler" in sys.argv[1:]:
        try:
            print(check_scheduler())
        except RuntimeError as e:
            sys.exit(str(e))
    else:
        main()

"""The user stories against a real Prefect server on 127.0.0.1 and `redi serve` in a subprocess (slow tier).

1. Stage reruns of two different recipes through the API (the demo's `model` stage, the tiny test
   recipe's `evaluate` via recipe=custom): both complete, their logs carry the library's lines and the
   rerun does not change what nightly evaluates.
2. The nightly schedule fires by itself: the deployment is served with a cron that comes due every
   minute, the server's scheduler creates the run (auto_scheduled), the runner runs it, and it
   completes with its history artifacts; the server log must show no scheduler error (SQLAlchemy 2.1
   broke exactly this).
Everything is torn down.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest_orchestration import REPO, redi_argv, subprocess_env, write_recipe

pytestmark = [pytest.mark.server, pytest.mark.slow]

SCHEDULER_ERRORS = re.compile(r"schedul|bulk DML|InvalidRequestError", re.IGNORECASE)


def scheduler_errors(log: str) -> list[str]:
    """The server log's ERROR entries (header line + traceback) that come from the scheduler service or its
    bulk insert. Other errors are left to the other checks: on a busy 2-core machine the server's SQLite can
    log a transient "database is locked" in an unrelated background task."""
    entries, cur = [], None
    for line in log.splitlines():
        if re.match(r"\d\d:\d\d:\d\d\.\d+ \| ", line):
            cur = [line] if "| ERROR" in line else None
            if cur is not None:
                entries.append(cur)
        elif cur is not None:
            cur.append(line)
    return ["\n".join(e) for e in entries if SCHEDULER_ERRORS.search("\n".join(e))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "prefect server exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`prefect server start` (scheduler loop 5 s) + `redi serve` with the nightly cron due every minute."""
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = subprocess_env(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_SERVER_UI_API_URL=url,
                         PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5")
    env.pop("PREFECT_API_URL", None)
    server_log = tmp / "server.log"
    serve_log = tmp / "serve.log"
    with open(server_log, "w") as slog, open(serve_log, "w") as rlog:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=slog, stderr=subprocess.STDOUT, start_new_session=True)
        serve = None
        try:
            wait_healthy(url, server)
            artifacts = tmp / "artifacts"
            serve_env = subprocess_env(PREFECT_API_URL=url, REDI_ARTIFACT_ROOT=str(artifacts), REDI_NIGHTLY_CRON="* * * * *",
                                       PREFECT_HOME=str(tmp / "prefect-home-client"), OMP_NUM_THREADS="1")
            serve = subprocess.Popen(redi_argv("serve"), cwd=REPO, env=serve_env, stdout=rlog, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            yield {"url": url, "tmp": tmp, "artifacts": artifacts, "server_log": server_log, "serve_log": serve_log,
                   "serve": serve, "recipe": write_recipe(tmp / "recipe", {"run.artifact_root": str(artifacts)})}
        finally:
            if serve is not None:
                stop(serve)
            stop(server)


def _client(url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class Ctx:
        def __enter__(self):
            self._s = temporary_settings({PREFECT_API_URL: url})
            self._s.__enter__()
            self._c = get_client(sync_client=True)
            return self._c.__enter__()

        def __exit__(self, *exc):
            self._c.__exit__(*exc)
            self._s.__exit__(*exc)

    return Ctx()


def _tail(s: dict) -> str:
    return ("--- serve.log ---\n" + s["serve_log"].read_text()[-3000:] + "\n--- server.log ---\n"
            + s["server_log"].read_text()[-3000:])


def _wait_deployment(c, name: str, s: dict, timeout: float = 240):
    from prefect.exceptions import ObjectNotFound

    t0 = time.time()
    while True:
        try:
            return c.read_deployment_by_name(name)
        except ObjectNotFound:
            assert s["serve"].poll() is None, "redi serve exited\n" + _tail(s)
            assert time.time() - t0 < timeout, f"{name} not registered after {timeout}s\n" + _tail(s)
            time.sleep(2)


def _run(s: dict, name: str, parameters: dict, timeout: float = 900):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with _client(s["url"]) as c:
        _wait_deployment(c, name, s)
    with temporary_settings({PREFECT_API_URL: s["url"]}):
        run = run_deployment(name, parameters=parameters, timeout=timeout, poll_interval=2)
    assert run.state.type.value == "COMPLETED", f"{name}: {run.state}\n" + _tail(s)
    return run


def _artifacts(c, run_id) -> dict[str, object]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    return {a.key: a for a in c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))}


def _logs(c, run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return "\n".join(f"{r.name}: {r.message}" for r in c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))))


def test_stage_reruns_of_two_recipes_through_the_api(served):
    s = served
    # the demo recipe (the form's default) and the tiny test recipe (recipe=custom)
    demo = _run(s, "redi-stage/model", {"recipe": "demo"})
    tiny = _run(s, "redi-stage/evaluate", {"recipe": "custom", "recipe_path": str(s["recipe"]), "labels": ["base"],
                                           "evaluate": {"n_samples": 1}})
    time.sleep(3)  # logs reach the API in batches
    with _client(s["url"]) as c:
        demo_logs, tiny_logs = _logs(c, demo.id), _logs(c, tiny.id)
        arts = _artifacts(c, tiny.id)
        paper = c.read_deployment_by_name("redi-stage/evaluate").parameter_openapi_schema["properties"]["recipe"]["enum"]
    assert "redi-qwen2.5-math-1.5b" in paper
    assert "redi.tasks: model: not cached, building" in demo_logs and "/model/" in demo_logs, demo_logs[-2000:]
    assert (s["artifacts"] / "download").is_dir()  # the demo ran into the served store
    assert "redi.tasks: evaluate[base]: not cached, building" in tiny_logs and "redi.progress" in tiny_logs, tiny_logs[-2000:]
    assert {"tiny-dag", "tiny-metrics", "tiny-report"} <= set(arts)
    assert "| evaluate[base] | built |" in arts["tiny-dag"].data
    assert not (s["artifacts"] / "runs" / "tiny" / "latest.json").exists()  # a stage rerun does not register
    assert list((s["artifacts"] / "runs" / "tiny" / "stage-runs").glob("*/results.md"))


def test_cancel_from_the_ui_stops_a_long_training(served):
    """Cancel (what the UI's button does: the run goes to Cancelling) a `redi-stage/sft` run whose SFT would
    train for 100,000 steps: the runner SIGTERMs the flow-run process, the training thread stops at its next
    step and every process of the run is gone before the runner's SIGKILL (30 s after its SIGTERM) could
    have ended them; the run ends Cancelled and nothing is published for the stage."""
    import psutil
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    s = served
    with _client(s["url"]) as c:
        _wait_deployment(c, "redi-stage/sft", s)
    with temporary_settings({PREFECT_API_URL: s["url"]}):
        run = run_deployment("redi-stage/sft", timeout=0, parameters={
            "recipe": "custom", "recipe_path": str(s["recipe"]), "sft": {"max_steps": 100_000, "save_steps": 1}})
    sft = s["artifacts"] / "sft"
    t0 = time.time()
    while not any(sft.glob(".work-*/checkpoint-*")):  # training, past its first checkpoint
        assert time.time() - t0 < 300, "the SFT never started\n" + _tail(s)
        time.sleep(0.5)
    procs = psutil.Process(s["serve"].pid).children(recursive=True)
    assert procs, "no flow-run process under redi serve"
    with _client(s["url"]) as c:
        c.set_flow_run_state(run.id, Cancelling(), force=True)
        t_cancel = time.time()
        gone, alive = psutil.wait_procs(procs, timeout=90)
        took = time.time() - t_cancel
        assert not alive, [" ".join(p.cmdline()[:4]) for p in alive]
        while (state := c.read_flow_run(run.id).state).type != StateType.CANCELLED:
            assert time.time() - t_cancel < 120, f"{state}\n" + _tail(s)
            time.sleep(1)
    # the runner looks for cancellations every few seconds, then SIGTERM; a run that ignored it would live
    # on for the whole 30 s grace
    assert took < 25, f"{took:.0f} s from cancel to the last process of the run\n" + _tail(s)
    assert not any(sft.glob("*/manifest.json"))


def test_nightly_schedule_fires_by_itself(served):
    """Register the tiny run, then wait for a nightly run the server scheduled itself (cron every minute)."""
    s = served
    _run(s, "redi-stage/evaluate", {"recipe": "custom", "recipe_path": str(s["recipe"]), "labels": ["base"],
                                    "register_run": True})
    latest = json.loads((s["artifacts"] / "runs" / "tiny" / "latest.json").read_text())
    assert set(latest["models"]) == {"base"}
    registered_at = time.time()
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    done = None
    with _client(s["url"]) as c:
        dep = _wait_deployment(c, "nightly-eval/nightly", s)
        t0 = time.time()
        while done is None:
            runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            assert runs, "" if time.time() - t0 < 90 else "the scheduler created no nightly run in 90 s\n" + _tail(s)
            assert all(r.auto_scheduled for r in runs)  # nobody but the scheduler creates them here
            done = next((r for r in runs if r.state and r.state.is_completed() and r.start_time
                         and r.start_time.timestamp() > registered_at), None)
            failed = [r for r in runs if r.state and r.state.is_final() and not r.state.is_completed()]
            assert not failed, f"nightly run {failed[0].state}\n" + _tail(s)
            assert time.time() - t0 < 300, "no scheduled nightly run completed in 300 s\n" + _tail(s)
            if done is None:
                time.sleep(5)
        arts = _artifacts(c, done.id)
    assert {"nightly-tonight", "nightly-history", "nightly-history-md"} <= set(arts), sorted(arts)
    tonight = json.loads(arts["nightly-tonight"].data)
    assert [(r["run"], r["label"]) for r in tonight] == [("tiny", "base")] and tonight[0]["status"] in ("cached", "evaluated")
    bad = scheduler_errors(s["server_log"].read_text())
    assert not bad, "the server's scheduler logged errors:\n" + "\n\n".join(bad[:3])


def test_scheduler_errors_are_found_in_a_server_log():
    """The log check above catches the failure SQLAlchemy 2.1 caused (format of Prefect 3.7.7's server log)."""
    log = ("09:42:09.104 | INFO    | prefect.server - ok\n"
           "09:42:10.001 | ERROR   | docket.dependencies - schedule_deployments(...)\n"
           "Traceback (most recent call last):\n"
           "sqlalchemy.exc.InvalidRequestError: Can't evaluate bulk DML statement; please supply a bulk_dml decorated function\n"
           "09:42:11.000 | ERROR   | docket.dependencies - mark_deployments_ready(...)\n"
           "sqlite3.OperationalError: database is locked\n")
    (err,) = scheduler_errors(log)
    assert "bulk DML" in err and "database is locked" not in err

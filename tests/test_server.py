"""A real Prefect server on 127.0.0.1, the deployments served from a subprocess (deployments/serve.py),
one run triggered through the API: it completes and its UI artifacts exist. Everything is torn down."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest_orchestration import REPO, subprocess_env, write_recipe

pytestmark = [pytest.mark.server, pytest.mark.slow]


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
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def server(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = subprocess_env(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_UI_API_URL=url)
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        stop(proc)
        log.close()


def test_served_deployment_runs_through_the_api(server, tmp_path):
    env = subprocess_env(PREFECT_API_URL=server, REDI_ARTIFACT_ROOT=str(tmp_path / "artifacts"))
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "deployments/serve.py"], cwd=REPO, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        recipe = write_recipe(tmp_path)
        code = f"""
import json, sys
from prefect.deployments import run_deployment
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.exceptions import ObjectNotFound
from redi.config import load_recipe
rd = load_recipe({str(recipe)!r}).model_dump(mode="json", by_alias=True)
import time
t0 = time.time()
while True:  # wait until serve has registered the deployment
    try:
        run = run_deployment("redi-stage/evaluate", parameters={{"recipe": rd, "labels": ["base"]}}, timeout=600, poll_interval=2)
        break
    except ObjectNotFound:
        if time.time() - t0 > 180:
            raise
        time.sleep(2)
with get_client(sync_client=True) as c:
    arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
print(json.dumps({{"state": run.state.type.value, "id": str(run.id), "artifacts": {{a.key: a.type for a in arts}}}}))
"""
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:] + Path(tmp_path / "serve.log").read_text()[-3000:]
        res = json.loads(p.stdout.strip().splitlines()[-1])
        assert res["state"] == "COMPLETED", Path(tmp_path / "serve.log").read_text()[-3000:]
        assert {"tiny-dag", "tiny-metrics", "tiny-report"} <= set(res["artifacts"])
        assert (tmp_path / "artifacts" / "runs" / "tiny" / "latest.json").is_file()
    finally:
        stop(serve)
        log.close()

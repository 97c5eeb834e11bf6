"""Stages as cluster jobs: the work-pool job templates, the Dockerfiles, and (slow) one run whose stages go to two
process workers in separate working directories that share nothing but an s3 artifact root (moto's server).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
from conftest_orchestration import REPO, write_recipe

POOLS = REPO / "deployments" / "work-pools"
DOCKER = REPO / "deployments" / "docker"
PREFECT_TYPES = {"process": ("prefect", "process"), "docker": ("prefect-docker", "docker"),
                 "kubernetes": ("prefect-kubernetes", "kubernetes")}


def _prefect_default(kind: str) -> dict:
    """Prefect's own default base job template of a worker type (its bundled worker metadata, as
    `prefect work-pool get-default-base-job-template --type KIND` prints it)."""
    import prefect

    views = Path(prefect.__file__).parent / "server" / "api" / "collections_data" / "views"
    meta = json.loads((views / "aggregate-worker-metadata.json").read_text())
    coll, typ = PREFECT_TYPES[kind]
    return meta[coll][typ]["default_base_job_configuration"]


def _defaults(template: dict) -> dict:
    return {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}


@pytest.mark.parametrize("kind", sorted(PREFECT_TYPES))
def test_job_templates_are_valid_for_prefect(kind):
    import jsonschema
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values, find_placeholders

    t = json.loads((POOLS / f"{kind}.json").read_text())
    WorkPoolCreate(name=f"redi-{kind}", type=kind, base_job_template=t)  # the server's own validation
    jsonschema.Draft202012Validator.check_schema(t["variables"])
    jsonschema.validate(_defaults(t), t["variables"])  # every default fits its own schema
    base = _prefect_default(kind)
    # everything the worker type's configuration reads is still there, with the same types
    assert set(base["job_configuration"]) <= set(t["job_configuration"])
    for name, schema in base["variables"]["properties"].items():
        assert t["variables"]["properties"][name].get("type") == schema.get("type"), name
    used = {p.name for p in find_placeholders(json.dumps(t["job_configuration"]))}
    assert used <= set(t["variables"]["properties"]), used - set(t["variables"]["properties"])
    filled = apply_values(t["job_configuration"], _defaults(t))
    assert "{{" not in json.dumps(filled)
    assert filled["env"]["REDI_ARTIFACT_ROOT"].startswith("s3://")
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"} & set(filled["env"])  # credentials never in a template


def test_process_template_builds_the_workers_configuration(prefect_harness, tmp_path):
    from prefect.workers.process import ProcessJobConfiguration

    t = json.loads((POOLS / "process.json").read_text())
    cfg = asyncio.run(ProcessJobConfiguration.from_template_and_values(t, {"working_dir": str(tmp_path)}))
    assert cfg.working_dir == tmp_path and cfg.env["REDI_ARTIFACT_ROOT"].startswith("s3://")


def test_kubernetes_template_requests_gpus_and_mounts_the_store_secret():
    from prefect.utilities.templating import apply_values

    t = json.loads((POOLS / "kubernetes.json").read_text())
    job = apply_values(t["job_configuration"], _defaults(t) | {"gpus": 8, "store_secret": "s3-creds"})["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8  # an integer, as Kubernetes wants
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds", "optional": True}}]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory" and "/cache" in mounts
    assert job["kind"] == "Job" and pod["restartPolicy"] == "Never"


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_install_the_project_from_its_own_files(name):
    text = (DOCKER / name).read_text()
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    (wanted,) = re.findall(r'-e "\.\[([a-z0-9,]+)\]"', text)
    assert set(wanted.split(",")) <= extras
    assert ("cuda" if name.endswith("cuda") else "cpu") in wanted.split(",")
    for src in re.findall(r"^COPY (\S+) ", text, flags=re.M):
        assert (REPO / src).exists(), src
    ignored = (REPO / ".dockerignore").read_text().split()
    assert not {"redi", "flows", "tasks", "deployments", "pyproject.toml"} & set(ignored)
    if name.endswith("cuda"):
        assert re.search(r"^FROM vllm/vllm-openai:v0\.32\.0$", text, flags=re.M)  # the version the cuda extra pins
        assert "vllm==0.32.0" in (REPO / "pyproject.toml").read_text()


def test_cluster_refuses_a_relative_root_and_stage_refuses_other_keys(prefect_harness, tmp_path):
    import yaml

    from flows.cluster import redi_cluster
    from flows.pipeline import redi_stage
    from redi.config import RecipeError

    recipe = write_recipe(tmp_path)
    tree = yaml.safe_load(recipe.read_text())
    tree["run"]["artifact_root"] = "artifacts"  # the typed recipe is taken as given (a YAML's paths are made absolute)
    with pytest.raises(ValueError, match="relative"):
        redi_cluster(recipe=tree)
    with pytest.raises(RecipeError, match="download: this worker computes key"):
        redi_stage(stage="download", recipe_path=str(recipe), expect_keys={"download": "0" * 16})


# ------------------------------------------------------------------------------------------ two workers
def _wait(cond, what: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not cond():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


@pytest.mark.slow
def test_stages_of_one_run_on_two_process_workers(prefect_harness, tmp_path, monkeypatch):
    """A real Prefect server (the harness), two process work pools created from deployments/work-pools/process.json with
    the CLI, a worker for each in its own folder (own cache, own working directory), an s3 root on moto's server;
    redi-cluster sends download/model/verify/evaluate to one and sft/redi/report to the other."""
    pytest.importorskip("s3fs")
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.utilities.callables import parameter_schema
    from test_s3 import _bucket, _free_port, _start_moto, _use_endpoint

    from flows.cluster import redi_cluster
    from flows.pipeline import redi_stage

    port = _free_port()
    moto = _start_moto(port)
    procs: list[subprocess.Popen] = []
    try:
        _use_endpoint(monkeypatch, port)
        _bucket("cluster")
        root = "s3://cluster/root"
        api = PREFECT_API_URL.value()
        env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "1",
               "PREFECT_WORKER_PREFETCH_SECONDS": "0", "OMP_NUM_THREADS": "1"}
        env.pop("REDI_ARTIFACT_ROOT", None)
        prefect = [sys.executable, "-m", "prefect"]
        schema = parameter_schema(redi_stage).model_dump()
        folders = {}
        with get_client(sync_client=True) as client:
            flow_id = client.create_flow_from_name("redi-stage")
            for w in ("a", "b"):
                folders[w] = tmp_path / f"machine-{w}"
                folders[w].mkdir()
                subprocess.run([*prefect, "work-pool", "create", f"pool-{w}", "--type", "process",
                                "--base-job-template", str(POOLS / "process.json")], env=env, check=True,
                               capture_output=True, timeout=120)
                # no pull step and a module-path entrypoint (no colon): the installed project runs in the worker's own folder
                client.create_deployment(flow_id=flow_id, name=f"cluster-{w}", entrypoint="flows.pipeline.redi_stage",
                                         work_pool_name=f"pool-{w}", pull_steps=[], parameter_openapi_schema=schema,
                                         job_variables={"working_dir": str(folders[w]), "env": {"PYTHONUNBUFFERED": "1"}})
                procs.append(subprocess.Popen(
                    [*prefect, "worker", "start", "--pool", f"pool-{w}", "--type", "process", "--limit", "1"],
                    cwd=folders[w], env={**env, "REDI_CACHE_DIR": str(folders[w] / "cache")},
                    stdout=open(folders[w] / "worker.log", "w"), stderr=subprocess.STDOUT))
            _wait(lambda: all(client.read_workers_for_work_pool(f"pool-{w}") for w in "ab"), "workers to start")

        recipe = write_recipe(tmp_path / "dispatcher", {"run.artifact_root": root, "run.name": "cluster"})
        a, b = "redi-stage/cluster-a", "redi-stage/cluster-b"
        out = redi_cluster(recipe_path=str(recipe), poll_s=1.0,
                           deployments={"download": a, "model": a, "verify": a, "evaluate": a, "sft": b, "redi": b, "report": b})
        pools = {n: r["work_pool"] for n, r in out["nodes"].items()}
        assert pools == {"download": "pool-a", "model": "pool-a", "verify": "pool-a", "sft": "pool-b", "redi": "pool-b",
                         "evaluate[base]": "pool-a", "evaluate[sft]": "pool-a", "evaluate[redi]": "pool-a"}
        assert out["report"]["work_pool"] == "pool-b"
        import s3fs

        fs = s3fs.S3FileSystem()
        for node, r in out["nodes"].items():
            for name, key in r["keys"].items():
                stage = name.split("[")[0]
                assert fs.exists(f"cluster/root/{stage}/{key}/manifest.json"), (node, name)
        # each machine pulled what it read into its own cache; nothing else is shared
        for w in "ab":
            assert any((folders[w] / "cache").rglob("manifest.json")), w
        assert fs.exists("cluster/root/runs/cluster/latest.json") or any(
            "latest.json" in p for p in fs.find("cluster/root"))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        moto.kill()
        moto.wait()

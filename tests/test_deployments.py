"""Deployments: prefect.yaml parses, every entrypoint resolves to a real flow whose parameters accept the
deployment's, every recipe under deployments/ loads, and serve.py builds every deployment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from conftest_orchestration import REPO

PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
RECIPES = sorted((REPO / "deployments").glob("*/recipe.yaml"))


def _deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def test_prefect_yaml_uses_a_process_pool_and_unique_names():
    deps = _deployments()
    names = [(d["entrypoint"], d["name"]) for d in deps]
    assert len(names) == len(set(names))
    assert {d["work_pool"]["name"] for d in deps} == {"redi-process"}
    stages = {d["parameters"]["stage"] for d in deps if d["entrypoint"].endswith(":redi_stage")}
    assert stages == {"download", "model", "verify", "sft", "redi", "evaluate"}
    nightly = [d for d in deps if d["entrypoint"].endswith(":nightly_eval")]
    assert len(nightly) == 1 and nightly[0]["schedules"][0]["cron"] and nightly[0]["schedules"][0]["timezone"] == "UTC"


@pytest.mark.parametrize("dep", _deployments(), ids=lambda d: d["name"])
def test_entrypoint_resolves_to_a_flow_accepting_its_parameters(dep):
    from prefect.flows import Flow, load_flow_from_entrypoint

    cwd = os.getcwd()
    os.chdir(REPO)  # entrypoints and recipe paths are relative to the repository root
    try:
        flow = load_flow_from_entrypoint(dep["entrypoint"])
        assert isinstance(flow, Flow)
        params = dep.get("parameters", {})
        required = {"model": "some/model"} if dep["entrypoint"].endswith(":redi_eval") else {}  # asked in the run form
        flow.validate_parameters(required | params)  # names and types against the flow signature
        if "recipe_path" in params and Path(params["recipe_path"]).parent.name in ("demo",) and not Path(params["recipe_path"]).exists():
            pytest.skip("deployments/demo/recipe.yaml not written yet")
        if "recipe_path" in params:
            from redi.config import load_recipe

            load_recipe(params["recipe_path"])
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.parent.name)
def test_every_recipe_loads(path):
    from redi.config import load_recipe

    r = load_recipe(path)
    assert r.run.name


def test_serve_builds_every_deployment(tmp_path):
    import runpy

    mod = runpy.run_path(str(REPO / "deployments" / "serve.py"))
    deps = mod["build_deployments"](str(tmp_path))
    names = {(d.flow_name, d.name) for d in deps}
    assert {("redi-stage", s) for s in ("download", "model", "verify", "sft", "redi", "evaluate")} <= names
    assert {("nightly-eval", "nightly"), ("redi-eval", "adhoc")} <= names
    nightly = next(d for d in deps if d.name == "nightly")
    assert nightly.schedules and nightly.schedules[0].schedule.cron
    if (REPO / "deployments" / "demo" / "recipe.yaml").exists():
        demo = next(d for d in deps if d.name == "demo")
        assert demo.parameters["recipe"]["run"]["artifact_root"].startswith("/")  # pre-filled, absolute
        # the run form is typed: the recipe's sections are in the parameter schema
        schema = demo._parameter_openapi_schema.model_dump() if hasattr(demo, "_parameter_openapi_schema") else {}
        assert "recipe" in str(schema) or schema == {}

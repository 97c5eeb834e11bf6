"""Deployments: prefect.yaml parses, every entrypoint resolves to a real flow whose parameters accept the
deployment's, every recipe under deployments/ loads, and serve.py builds every deployment."""

from __future__ import annotations

import os

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
    from flows.stages import STAGE_FLOWS

    stages = {d["name"]: d["entrypoint"] for d in deps if d["entrypoint"].startswith("flows/stages.py:")}
    assert stages == {s: f"flows/stages.py:{fl.fn.__name__}" for s, fl in STAGE_FLOWS.items()}
    assert all(not d.get("parameters") for d in deps if d["name"] in stages)  # nothing pre-filled that could win
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
        required = {":redi_eval": {"model": "some/model"},  # asked in the run form
                    ":redi_push": {"run": "demo", "model": "redi", "repo": "me/redi-demo"}}.get(":" + dep["entrypoint"].split(":")[-1], {})
        flow.validate_parameters(required | params)  # names and types against the flow signature
        if "recipe_path" in params:  # a missing recipe fails here (RecipeError)
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
    assert (REPO / "deployments" / "demo" / "recipe.yaml").is_file()  # the demo deployment must exist
    demo = next(d for d in deps if d.name == "demo")
    assert demo.parameters["recipe"]["run"]["artifact_root"].startswith("/")  # pre-filled, absolute
    # the run form is typed: the recipe's sections are in the parameter schema
    schema = demo._parameter_openapi_schema.model_dump()
    assert "#/definitions/Recipe" in str(schema["properties"]["recipe"])
    assert set(schema["definitions"]["Recipe"]["properties"]) == {"run", "data", "model", "prompt", "verify", "sft", "redi", "evaluate"}


# ---------------------------------------------------------------------------------- the run forms
@pytest.fixture(scope="module")
def forms(prefect_harness, tmp_path_factory) -> dict[str, dict]:
    """Every served deployment registered with a real (temporary) API, read back: {flow/name: parameter schema}."""
    import runpy

    from prefect.client.orchestration import get_client

    deps = runpy.run_path(str(REPO / "deployments" / "serve.py"))["build_deployments"](str(tmp_path_factory.mktemp("forms")))
    out = {}
    with get_client(sync_client=True) as c:
        for d in deps:
            d.apply()
            api = c.read_deployment_by_name(f"{d.flow_name}/{d.name}")
            out[f"{d.flow_name}/{d.name}"] = {"schema": api.parameter_openapi_schema, "parameters": api.parameters}
    return out


def test_every_flow_parameter_has_help(forms):
    missing = [f"{dep}: {p}" for dep, f in forms.items() for p, spec in f["schema"]["properties"].items()
               if len(spec.get("description") or "") < 15]
    assert not missing, missing


def test_overrides_and_refresh_are_near_the_top_of_every_form(forms):
    for dep, f in forms.items():
        props = f["schema"]["properties"]
        for p in ("overrides", "refresh", "evaluate_overrides"):
            if p in props:
                assert props[p]["position"] <= 2, (dep, p, props[p]["position"])


def test_stage_forms_pick_any_recipe_and_show_the_stages_own_fields(forms):
    from flows.stages import CUSTOM, recipe_names

    assert {"demo", "redi-qwen2.5-math-1.5b"} <= set(recipe_names())
    for stage, section in (("download", "data"), ("model", "model"), ("verify", "verify"), ("sft", "sft"),
                           ("redi", "redi"), ("evaluate", "evaluate")):
        f = forms[f"redi-stage/{stage}"]
        props, defs = f["schema"]["properties"], f["schema"].get("definitions", {})
        assert "stage" not in props and f["parameters"] == {}  # the stage is fixed; nothing pre-filled
        assert props["recipe"]["enum"] == [*recipe_names(), CUSTOM] and props["recipe"]["default"] == "demo"
        assert "recipe" in props and "recipe_path" in props
        spec = props[section]  # the section is shown at once (an empty change set), not behind a None toggle
        assert "anyOf" not in spec and not any(v is not None for v in spec["default"].values()), spec
        ref = (spec.get("$ref") or next(a["$ref"] for a in spec["allOf"])).split("/")[-1]
        fields = defs[ref]["properties"]
        assert all(spec.get("default") is None for spec in fields.values())  # empty = keep the recipe's value
    ev = forms["redi-stage/evaluate"]["schema"]
    ev_fields = ev["definitions"]["EvaluateConfigChanges"]["properties"]
    assert {"n_samples", "benchmarks", "temperature", "max_new_tokens"} <= set(ev_fields)
    assert "Samples per problem" in ev_fields["n_samples"]["description"]
    assert {"labels", "register_run"} <= set(ev["properties"])
    # fields that name a registry entry are dropdowns of the registered names (empty = keep the recipe's)
    from redi.label_rules import LABEL_RULES
    from redi.losses import OBJECTIVES
    from redi.sources import SOURCES

    for stage, changes, field, names in (("verify", "VerifyConfigChanges", "label_rule", LABEL_RULES),
                                         ("download", "DataConfigChanges", "source", SOURCES),
                                         ("redi", "Stage2ConfigChanges", "loss", OBJECTIVES)):
        spec = forms[f"redi-stage/{stage}"]["schema"]["definitions"][changes]["properties"][field]
        assert {"type": "string", "enum": list(names)} in spec["anyOf"] and {"type": "null"} in spec["anyOf"], spec


def test_pipeline_forms_are_prefilled_with_their_recipe(forms):
    for name in ("demo", "redi-qwen2.5-math-1.5b"):
        params = forms[f"redi-pipeline/{name}"]["parameters"]
        assert set(params) == {"recipe"} and params["recipe"]["run"]["artifact_root"].startswith("/")


def test_stage_flows_refuse_contradictory_choices(tiny_recipe):
    from flows.stages import evaluate_stage, pick_recipe
    from redi.config import RecipeError

    assert pick_recipe("demo", None) == REPO / "deployments" / "demo" / "recipe.yaml"
    assert pick_recipe("custom", str(tiny_recipe)) == str(tiny_recipe)
    with pytest.raises(RecipeError, match="recipe=custom"):
        pick_recipe("demo", str(tiny_recipe))
    with pytest.raises(RecipeError, match="needs recipe_path"):
        pick_recipe("custom", None)
    with pytest.raises(RecipeError, match="evaluate.n_samples set both"):
        evaluate_stage.fn(recipe="custom", recipe_path=str(tiny_recipe), evaluate={"n_samples": 2},
                          overrides={"evaluate.n_samples": 3})
    from flows.pipeline import resolve_recipe

    with pytest.raises(RecipeError, match="not both"):
        resolve_recipe(str(tiny_recipe), {"run": {"name": "x"}})


def test_stage_section_changes_keep_the_recipes_other_fields(tiny_recipe):
    from flows.stages import EvaluateChanges, _dotted
    from redi.config import load_recipe

    ch = EvaluateChanges(n_samples=3, temperature=0.2)
    dotted = _dotted(ch.model_dump(mode="json", by_alias=True, exclude_none=True), "evaluate")
    assert dotted == {"evaluate.n_samples": 3, "evaluate.temperature": 0.2}
    r = load_recipe(tiny_recipe, dotted)
    assert (r.evaluate.n_samples, r.evaluate.max_new_tokens, r.evaluate.benchmarks) == (3, 32, ["demo_test"])


def test_scheduler_can_create_runs_with_the_installed_sqlalchemy():
    """Prefect's scheduler code path (a bulk insert of flow runs) on a throw-away database; SQLAlchemy 2.1 fails it."""
    import runpy

    out = runpy.run_path(str(REPO / "deployments" / "serve.py"))["check_scheduler"]()
    assert "runs scheduled" in out

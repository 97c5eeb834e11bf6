"""The flows end to end on a tiny recipe through a real (temporary) Prefect API.

Every stage is the real one (synthetic data, a width-32 model, the hf generation backend). The
assertions are about orchestration: every stage artifact exists and validates, the UI artifacts
exist, a rerun is all cache hits, a changed parameter reruns exactly the stages it determines.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest_orchestration import write_recipe

from redi.artifacts import validate  # noqa: E402

TRAIN_NODES = ["download", "model", "verify", "sft", "redi"]
GRADES = ["grade[base]", "grade[sft]", "grade[redi]"]
EVAL_NODES = [n for lab in ("base", "sft", "redi") for n in (f"evaluate[{lab}]", f"grade[{lab}]")]  # samples, then metrics


def _run(flow, **params):
    state = flow(return_state=True, **params)
    assert state.is_completed(), state
    return state.result(), state.state_details.flow_run_id


def _built(result) -> set[str]:
    return {r["stage"] for r in result["dag"] if r["status"] == "built"}


def _artifact_keys(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.type for a in arts}


@pytest.fixture(scope="module")
def first_run(prefect_harness, tmp_path_factory):
    from flows.pipeline import redi_pipeline

    folder = tmp_path_factory.mktemp("flows")
    recipe = write_recipe(folder)
    result, run_id = _run(redi_pipeline, recipe_path=str(recipe))
    return recipe, result, run_id


def test_full_run_writes_every_stage_and_ui_artifacts(first_run):
    recipe, result, run_id = first_run
    assert list(result["artifacts"]) == TRAIN_NODES + EVAL_NODES
    for name, art in result["artifacts"].items():
        validate(Path(art["path"]))  # complete, checksums match
        assert Path(art["path"]).parent.name == art["stage"], name
    rep = result["report"]
    assert Path(rep["run_dir"], "latest.json").is_file()
    assert {row["label"] for row in rep["table_rows"]} >= {"base", "sft", "redi"} or rep["table_rows"]
    keys = _artifact_keys(run_id)
    assert keys == {"tiny-dag": "markdown", "tiny-metrics": "table", "tiny-report": "markdown", "tiny-plot": "image"}


def test_second_run_is_all_cache_hits(first_run):
    from flows.pipeline import redi_pipeline

    recipe, first, _ = first_run
    again, _ = _run(redi_pipeline, recipe_path=str(recipe))
    assert _built(again) == set()
    assert {k: a["path"] for k, a in again["artifacts"].items()} == {k: a["path"] for k, a in first["artifacts"].items()}


def test_eval_parameter_reruns_only_evaluation(first_run):
    from flows.pipeline import redi_pipeline

    recipe, _, _ = first_run
    res, _ = _run(redi_pipeline, recipe_path=str(recipe), overrides={"evaluate.n_samples": 3})
    assert _built(res) == set(EVAL_NODES)


def test_alpha_reruns_only_redi_and_its_evaluation(first_run):
    from flows.pipeline import redi_pipeline

    recipe, _, _ = first_run
    res, _ = _run(redi_pipeline, recipe_path=str(recipe), overrides={"redi.alpha": 0.5})
    assert _built(res) == {"redi", "evaluate[redi]", "grade[redi]"}


def test_refresh_forces_the_chosen_stage_only(first_run):
    from flows.pipeline import redi_pipeline

    recipe, first, _ = first_run
    res, _ = _run(redi_pipeline, recipe_path=str(recipe), refresh=["sft"])
    assert _built(res) == {"sft"}  # same key: downstream keys are unchanged, so they stay cached
    assert res["artifacts"]["sft"]["path"] == first["artifacts"]["sft"]["path"]


def test_stage_flow_runs_only_upstream_of_the_stage(first_run):
    from flows.pipeline import redi_stage

    recipe, _, run_id = first_run
    res, _ = _run(redi_stage, stage="verify", recipe_path=str(recipe))
    assert list(res["artifacts"]) == ["download", "model", "verify"] and _built(res) == set()
    res, _ = _run(redi_stage, stage="evaluate", recipe_path=str(recipe), labels=["base"],
                 overrides={"evaluate.n_samples": 1, "run.name": "partial"})  # own name: latest.json of `tiny` keeps 3 models
    assert list(res["artifacts"]) == ["download", "model", "evaluate[base]", "grade[base]"]
    assert _built(res) == {"evaluate[base]", "grade[base]"}


def test_typed_recipe_parameter_overrides_and_validation(first_run):
    from flows.pipeline import resolve_recipe
    from redi.config import RecipeError, load_recipe

    recipe, _, _ = first_run
    r = load_recipe(recipe)
    r2 = resolve_recipe(None, r, {"redi.alpha": 1.0}, ["evaluate"])
    assert r2.redi.alpha == 1.0 and r2.run.refresh == ["evaluate"] and r2.sft == r.sft
    with pytest.raises(RecipeError, match="alpha"):
        resolve_recipe(str(recipe), None, {"redi.alpha": 3.0})


def test_nightly_eval_appends_history_and_publishes(first_run):
    from flows.nightly import nightly_eval

    recipe, first, _ = first_run
    root = str(Path(first["report"]["run_dir"]).parents[1])
    res, run_id = _run(nightly_eval, artifact_root=root, evaluate_overrides={"n_samples": 1}, runs=["tiny"])
    statuses = {(t["run"], t["label"]): t["status"] for t in res["tonight"]}
    assert set(statuses) == {("tiny", "base"), ("tiny", "sft"), ("tiny", "redi")}
    assert all(s in ("evaluated", "cached") for s in statuses.values()), statuses
    assert len(res["history"]["rows"]) >= 3
    keys = _artifact_keys(run_id)
    assert {"nightly-tonight", "nightly-history", "nightly-history-md"} <= set(keys)
    # a second night: nothing recomputed (same model, same protocol), one more history point per model
    res2, _ = _run(nightly_eval, artifact_root=root, evaluate_overrides={"n_samples": 1}, runs=["tiny"])
    assert {t["status"] for t in res2["tonight"]} == {"cached"}
    assert len(res2["history"]["rows"]) == len(res["history"]["rows"]) + 3


def test_nightly_skips_a_missing_model_instead_of_retraining(tmp_path, prefect_harness):
    import json

    from redi import registry

    run_dir = tmp_path / "artifacts" / "runs" / "ghost"
    run_dir.mkdir(parents=True)
    write_recipe(run_dir.parent.parent.parent, name="ghost.yaml")
    (run_dir / "recipe.yaml").write_text((tmp_path / "ghost.yaml").read_text())
    (run_dir / "latest.json").write_text(json.dumps({"run": "ghost", "models": {"sft": {"key": "0" * 16, "stage": "sft"}}}))
    res = registry.evaluate_registered(tmp_path / "artifacts")
    assert [(r.run, r.label, r.status) for r in res] == [("ghost", "sft", "skipped: model artifact missing or corrupt")]
    assert not (tmp_path / "artifacts" / "sft").exists()

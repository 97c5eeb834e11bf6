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
    assert keys == {"tiny-dag": "markdown", "tiny-metrics": "table", "tiny-report": "markdown"}


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


def test_curves_stage_flow_publishes_the_curve(first_run):
    """Stage curves (checkpoint evaluation) through the flow: the kept steps of a retrained redi evaluated, the
    curve's table and plot in the run's Prefect artifacts; a rerun is one cache hit."""
    import json

    from flows.stages import curves_stage

    recipe, _, _ = first_run
    over = {"redi.keep_checkpoints": 1, "run.name": "curves",
            "evaluate.checkpoints": {"benchmarks": ["demo_test"], "n_samples": 1, "stages": ["redi"], "max_problems": 2}}
    res, run_id = _run(curves_stage, recipe="custom", recipe_path=str(recipe), overrides=over)
    assert list(res["artifacts"]) == [*TRAIN_NODES, "curves"] and _built(res) == {"redi", "curves"}
    curve = res["artifacts"]["curves"]
    rows = json.loads((Path(curve["path"]) / "curves.json").read_text())
    assert [(r["stage"], r["step"]) for r in rows] == [("redi", 0), ("redi", 1), ("redi", 2)]
    assert _artifact_keys(run_id) == {"curves-curves": "table", "curves-curves-plot": "markdown", "curves-dag": "markdown"}
    res, _ = _run(curves_stage, recipe="custom", recipe_path=str(recipe), overrides=over)
    assert _built(res) == set()


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

    from redi import runs as run_registry

    run_dir = tmp_path / "artifacts" / "runs" / "ghost"
    run_dir.mkdir(parents=True)
    write_recipe(run_dir.parent.parent.parent, name="ghost.yaml")
    (run_dir / "recipe.yaml").write_text((tmp_path / "ghost.yaml").read_text())
    (run_dir / "latest.json").write_text(json.dumps({"run": "ghost", "models": {"sft": {"key": "0" * 16, "stage": "sft"}}}))
    res = run_registry.evaluate_registered(tmp_path / "artifacts")
    assert [(r.run, r.label, r.status) for r in res] == [("ghost", "sft", "skipped: model artifact missing or corrupt")]
    assert not (tmp_path / "artifacts" / "sft").exists()


def test_stage_rerun_with_overrides_does_not_change_the_registration(first_run):
    """What nightly evaluates (runs/<name>/recipe.yaml, latest.json) changes only with a full run or register_run."""
    import json

    import yaml

    from flows.pipeline import redi_pipeline, redi_stage
    from redi.results import ResultsStore

    recipe, first, _ = first_run
    run_dir = Path(first["report"]["run_dir"])
    registered = {f: (run_dir / f).read_bytes() for f in ("recipe.yaml", "latest.json", "results.md")}
    res, _ = _run(redi_stage, stage="evaluate", recipe_path=str(recipe), labels=["sft"], overrides={"evaluate.n_samples": 1})
    assert {f: (run_dir / f).read_bytes() for f in registered} == registered  # untouched
    own = Path(res["report"]["run_dir"])
    assert own.parent == run_dir / "stage-runs" and res["report"]["registered"] is False
    assert yaml.safe_load((own / "recipe.yaml").read_text())["evaluate"]["n_samples"] == 1
    assert (own / "results.md").is_file() and "sft" in (own / "results.md").read_text()
    store = ResultsStore(run_dir.parents[1] / "results").load(run="tiny", kind="stage")
    assert set(store["label"]) == {"sft"} and set(store["n_samples"].dropna()) == {1}
    # an explicit registration does rewrite it: this recipe, the evaluated model only (a different recipe)
    _run(redi_stage, stage="evaluate", recipe_path=str(recipe), labels=["sft"], overrides={"evaluate.n_samples": 1},
         register_run=True)
    latest = json.loads((run_dir / "latest.json").read_text())
    assert set(latest["models"]) == {"sft"} and yaml.safe_load((run_dir / "recipe.yaml").read_text())["evaluate"]["n_samples"] == 1
    # a full run registers its recipe and every model again (all from cache)
    again, _ = _run(redi_pipeline, recipe_path=str(recipe))
    assert _built(again) == set() and again["report"]["registered"] is True
    assert (run_dir / "recipe.yaml").read_bytes() == registered["recipe.yaml"]
    assert set(json.loads((run_dir / "latest.json").read_text())["models"]) == {"base", "sft", "redi"}


def test_run_logs_show_library_lines_progress_and_cache_status(first_run):
    """The library's log lines and tqdm progress reach the task runs' logs; task run names say cache hit or built."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    from flows.pipeline import redi_pipeline

    recipe, _, first_id = first_run
    _, hit_id = _run(redi_pipeline, recipe_path=str(recipe))
    _drain_logs()
    with get_client(sync_client=True) as c:
        def logs(run_id):
            return c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)

        def names(run_id):
            return {t.name for t in c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))}

        first_logs, hit_logs = logs(first_id), logs(hit_id)
        first_names, hit_names = names(first_id), names(hit_id)
    text = "\n".join(f"{r.name}: {r.message}" for r in first_logs)
    assert "redi.tasks: sft: not cached, building" in text
    assert "redi.pipeline: sft built:" in text
    assert any(r.name == "redi.progress" and "100%" in r.message for r in first_logs), text[-2000:]
    assert all(r.task_run_id is not None for r in first_logs if r.name.startswith("redi."))  # attached to their task
    assert {"sft [cache hit]", "evaluate[base] [cache hit]"} <= hit_names, hit_names
    assert any(n.startswith("sft [built ") for n in first_names), first_names
    assert "redi.pipeline: sft cache hit" in "\n".join(f"{r.name}: {r.message}" for r in hit_logs)


def test_dag_artifact_lists_evaluate_nodes_with_their_time(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    _, first, run_id = first_run
    with get_client(sync_client=True) as c:
        (dag,) = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
                                                                 key=ArtifactFilterKey(any_=["tiny-dag"])))
    rows = {r["stage"]: r for r in first["dag"]}
    assert rows["evaluate[base]"]["status"] == "built" and rows["evaluate[base]"]["seconds"] > 0
    assert rows["evaluate[base]"]["seconds"] >= rows["grade[base]"]["seconds"]  # generation is where the time goes
    assert "| evaluate[base] | built |" in dag.data and "s building" in dag.data


def _drain_logs() -> None:
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)


def test_cli_library_path_records_a_stage_rerun_without_registering(first_run):
    """`redi stage evaluate --no-prefect` (the library alone): same rule, and the rows include evaluate[*]."""
    from redi.cli import run_library
    from redi.config import load_recipe

    recipe, first, _ = first_run
    run_dir = Path(first["report"]["run_dir"])
    before = (run_dir / "latest.json").read_bytes()
    out = run_library(load_recipe(recipe, ["evaluate.n_samples=1"]), "evaluate", ["base"])
    assert (run_dir / "latest.json").read_bytes() == before and out["report"]["registered"] is False
    rows = {r["stage"]: r for r in out["dag"]}
    assert {"download", "model", "evaluate[base]", "grade[base]"} <= set(rows)
    assert all(isinstance(r["seconds"], float) for r in rows.values())


def test_library_lines_from_other_threads_reach_the_task_run(prefect_harness):
    """A library log line emitted from a worker thread (grading pools, engine threads) still lands in its task run."""
    import logging
    import threading

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from tasks._common import run_logs

    @task
    def work() -> None:
        with run_logs():
            t = threading.Thread(target=lambda: logging.getLogger("redi.threadcheck").info("from a worker thread"))
            t.start()
            t.join()

    @flow
    def threads_flow() -> None:
        work()

    state = threads_flow(return_state=True)
    _drain_logs()
    with get_client(sync_client=True) as c:
        logs = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    line = [r for r in logs if r.name == "redi.threadcheck"]
    assert [r.message for r in line] == ["from a worker thread"] and line[0].task_run_id is not None


def test_only_network_errors_are_retried():
    import errno

    import requests
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    from prefect.states import Failed

    from redi.artifacts import StorageError
    from redi.config import RecipeError
    from redi.data import DataError
    from tasks._common import is_network_error, retry_on_network_errors

    def resp(code):
        r = requests.Response()
        r.status_code = code
        return r

    def chained(outer, inner):
        try:
            raise inner
        except BaseException:
            try:
                raise outer from inner
            except BaseException as e:
                return e

    retried = [ConnectionError("reset"), TimeoutError("slow"), requests.ConnectionError("dns"), requests.ReadTimeout("t"),
               requests.HTTPError("503", response=resp(503)), requests.HTTPError("429", response=resp(429)),
               chained(RuntimeError("download failed"), requests.ConnectionError("reset"))]
    failed_at_once = [DataError("bad rows"), RecipeError("bad recipe"), StorageError("no space left in /x"),
                      OSError(errno.ENOSPC, "No space left on device", "/x/f"), requests.HTTPError("404", response=resp(404)),
                      LocalEntryNotFoundError("not cached"), OfflineModeIsEnabled("offline"), KeyError("foo"),
                      ValueError("bad"), chained(DataError("bad rows"), ConnectionError("reset")), RuntimeError("bug")]
    assert [is_network_error(e) for e in retried] == [True] * len(retried)
    assert [is_network_error(e) for e in failed_at_once] == [False] * len(failed_at_once)
    assert retry_on_network_errors(None, None, Failed(data=requests.ConnectionError("x")))
    assert not retry_on_network_errors(None, None, Failed(data=DataError("x")))


def test_download_task_retries_a_network_error_but_not_bad_data(prefect_harness, tmp_path, monkeypatch):
    """The real download task and its retry settings (delays set to 0): a DataError fails after one attempt,
    a ConnectionError is tried 1 + 2 times."""
    import yaml
    from prefect import flow

    from redi.data import DataError
    from redi.pipeline import Pipeline
    from tasks.download import download

    tree = yaml.safe_load(write_recipe(tmp_path).read_text())
    calls: list[str] = []
    task = download.with_options(retry_delay_seconds=0)

    @flow
    def one() -> None:
        task(tree)

    for exc, attempts in ((DataError("rows.jsonl: missing column 'answer'"), 1), (ConnectionError("connection reset"), 3)):
        calls.clear()

        def failing(self, *a, _exc=exc, **k):
            calls.append(type(_exc).__name__)
            raise _exc

        monkeypatch.setattr(Pipeline, "download", failing)
        state = one(return_state=True)
        assert state.is_failed() and len(calls) == attempts, (exc, calls)

"""Cache keys of the DAG: a change reruns exactly the stages it determines (computed without running anything)."""

from __future__ import annotations

import pytest

from redi.artifacts import ArtifactStore
from redi.config import load_recipe
from redi.pipeline import Pipeline

BASE = ["evaluate.benchmarks=[demo_test]", "verify.decontaminate=false"]


def _keys(tmp_path, *overrides: str) -> dict[str, str]:
    r = load_recipe(None, [*BASE, *overrides])
    p = Pipeline(r, ArtifactStore(tmp_path))
    return {n.name: n.key for n in p.plan()}


def _changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if a[k] != b[k]}


def test_eval_parameter_reruns_only_evaluation(tmp_path):
    a, b = _keys(tmp_path), _keys(tmp_path, "evaluate.n_samples=7")
    assert _changed(a, b) == {f"{s}[{m}]" for s in ("evaluate", "grade") for m in ("base", "sft", "redi")}


def test_alpha_reruns_redi_and_its_evaluation_not_sft(tmp_path):
    a, b = _keys(tmp_path), _keys(tmp_path, "redi.alpha=1.0")
    assert _changed(a, b) == {"redi", "evaluate[redi]", "grade[redi]"}


def test_sft_change_propagates_downstream_only(tmp_path):
    a, b = _keys(tmp_path), _keys(tmp_path, "sft.lr=1e-3")
    assert _changed(a, b) == {"sft", "redi", "evaluate[sft]", "grade[sft]", "evaluate[redi]", "grade[redi]"}


def test_data_change_reruns_everything(tmp_path):
    a, b = _keys(tmp_path), _keys(tmp_path, "data.synth.seed=5")
    assert _changed(a, b) == set(a)


def test_knobs_that_do_not_change_results_keep_every_key(tmp_path):
    a = _keys(tmp_path)
    b = _keys(tmp_path, "verify.workers=1", "evaluate.grade_workers=1", "sft.log_steps=9", "run.name=other")
    assert _changed(a, b) == set()


@pytest.mark.parametrize("stage", ["download", "verify", "sft", "redi", "evaluate"])
def test_refresh_is_per_stage(tmp_path, stage):
    p = Pipeline(load_recipe(None, [*BASE, f"run.refresh=[{stage}]"]), ArtifactStore(tmp_path))
    assert p.refreshing(stage)
    assert not any(p.refreshing(s) for s in ("download", "verify", "sft", "redi", "evaluate") if s != stage)


@pytest.mark.slow
def test_accelerate_launcher_builds_the_same_cached_sft_stage(tmp_path):
    """run.launcher=accelerate runs `accelerate launch -m redi.train` (2 gloo processes here) inside the store."""
    import copy

    from conftest_orchestration import TINY

    from redi.config import Recipe

    tree = copy.deepcopy(TINY)
    tree["run"].update(artifact_root=str(tmp_path), launcher="accelerate", num_processes=2)
    tree["sft"].update(global_batch=4, micro_batch=2)
    p = Pipeline(Recipe.model_validate(tree))
    art = p.sft()
    assert not art.cached and art.summary["steps"] == 3
    assert (art.dir / "model" / "model.safetensors").exists()
    assert p.store.lookup("sft", art.key) is not None


def test_offline_recipe_never_waits_on_the_network(tmp_path):
    """run.offline: a Hub source fails at once (here: decontamination benchmarks) even without HF_*_OFFLINE set."""
    import os
    import subprocess
    import sys
    import time

    code = (
        "import datasets, huggingface_hub\n"  # imported before the pipeline switches them offline
        "import logging\nlogging.basicConfig()\nlogging.getLogger('redi.pipeline').setLevel(logging.DEBUG)\n"
        "from redi.config import load_recipe\nfrom redi.pipeline import Pipeline\n"
        f"p = Pipeline(load_recipe(None, ['run.offline=true', 'run.artifact_root={tmp_path}']))\n"
        "print(len(p.decontam_problems()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "REDI_BENCHMARK_DIR")}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0" and "OfflineModeIsEnabled" in out.stderr  # each reason, at debug level
    assert out.stderr.count("benchmarks not available here, skipped") == 1  # one warning line for all of them
    assert time.time() - t0 < 60


@pytest.mark.parametrize("override", ["verify.length_filter=pairs_after_selection", "verify.problem_identity=row",
                                      "verify.label_rule=landmv_both_wrong", "verify.decontaminate=report"])
def test_selection_fields_rerun_verify_and_everything_trained_on_it(tmp_path, override):
    a, b = _keys(tmp_path), _keys(tmp_path, override)
    assert _changed(a, b) == {"verify", "sft", "redi"} | {f"{s}[{m}]" for s in ("evaluate", "grade") for m in ("sft", "redi")}


def test_decontamination_details_do_not_matter_when_it_is_off(tmp_path):
    assert _keys(tmp_path) == _keys(tmp_path, "verify.decontam_normalise=whitespace", "verify.decontam_benchmarks=[math500]")


# ---------------------------------------------------------------------------------- the DAG table and its walker
def test_plan_lists_the_dag_table_then_one_evaluation_per_label(tmp_path):
    from redi import dag

    names = list(_keys(tmp_path))
    r = load_recipe(None, BASE)
    assert dag.disabled(r) == {"curves"}  # off unless evaluate.checkpoints is set
    stages = [s for s in dag.TRAIN_STAGES if s != "curves"]
    assert names == [*stages, *(f"{s}[{lab}]" for lab in r.evaluate.models for s in ("evaluate", "grade"))]
    assert list(_keys(tmp_path, "evaluate.checkpoints={n_samples: 4}"))[:len(dag.TRAIN_STAGES)] == list(dag.TRAIN_STAGES)


@pytest.mark.parametrize("until, labels, stages", [
    ("download", ["base"], ["download"]),
    ("verify", ["base"], ["download", "model", "verify"]),
    ("redi", ["base"], ["download", "model", "verify", "sft", "redi"]),
    ("evaluate", ["base"], ["download", "model"]),
    ("evaluate", ["sft", "base"], ["download", "model", "verify", "sft"]),
    ("report", ["base"], ["download", "model", "verify", "sft", "redi", "curves"]),
    ("curves", [], ["download", "model", "verify", "sft", "redi", "curves"]),
])
def test_walker_builds_exactly_the_upstream_in_order(until, labels, stages):
    from redi import dag

    calls = []

    def step(node, upstream, label):
        assert upstream == [f"<{u}>" for u in node.upstream] if not node.per_label else upstream == [f"<{dag.LABEL_STAGE[label]}>"]
        calls.append(dag.node_name(node.name, label))
        return f"<{node.name}>"

    built, evaluated = dag.walk(until, labels, step)
    assert list(built) == stages
    wants_eval = until in ("evaluate", "report")
    assert list(evaluated) == (labels if wants_eval else [])
    assert calls == stages + ([f"evaluate[{lab}]" for lab in labels] if wants_eval else [])


def test_walker_refuses_an_unknown_stage_or_label():
    from redi import dag

    with pytest.raises(ValueError, match="unknown stage 'train'"):
        dag.walk("train", ["base"], lambda *a: None)
    with pytest.raises(ValueError, match="unknown model labels"):
        dag.walk("evaluate", ["dpo"], lambda *a: None)


def test_walker_skips_a_node_that_is_off_and_refuses_to_stop_at_it():
    from redi import dag

    built, _ = dag.walk("report", ["base"], lambda node, up, label: node.name, skip={"curves"})
    assert list(built) == ["download", "model", "verify", "sft", "redi"]
    with pytest.raises(ValueError, match="stage curves is off in this recipe: set evaluate.checkpoints"):
        dag.walk("curves", [], lambda *a: None, skip={"curves"})


def test_every_stage_has_a_builder_a_config_section_and_a_refresh_name():
    from redi import dag
    from redi.config import Recipe

    r = Recipe()
    for node in dag.NODES:
        assert callable(getattr(Pipeline, node.builder)), node
        assert hasattr(r, node.section), node
        assert set(node.upstream) <= set(dag.STAGES[:dag.STAGES.index(node.name)]), node  # upstream comes first
    assert load_recipe(None, [f"run.refresh=[{','.join(dag.STAGES)}]"]).run.refresh == list(dag.STAGES)


# ---------------------------------------------------------------------------------- objectives: one registry entry each
def test_results_are_labelled_by_the_objective_that_produced_them(tmp_path):
    for loss in ("redi", "dpo", "simpo"):
        p = Pipeline(load_recipe(None, [*BASE, f"redi.loss={loss}"]), ArtifactStore(tmp_path))
        assert [p.result_label(lab) for lab in ("base", "sft", "redi")] == ["base", "sft", loss]


def sft_on_chosen(batch, cfg):
    """A throwaway objective: length-normalised SFT on the chosen answer only (REDI with alpha = 0)."""
    return -batch["chosen_logps"] / batch["chosen_lengths"].to(batch["chosen_logps"].dtype).clamp(min=1.0)


def test_a_new_objective_is_one_registry_entry_and_runs_through_the_dag(tmp_path, monkeypatch):
    """The one-place extension: register an Objective, and the config, its cache key, the study's methods and
    stage `redi` of the DAG all take it (here on the tiny recipe, up to stage redi, nothing else edited)."""
    import copy

    from conftest_orchestration import TINY

    from redi import losses
    from redi.config import Recipe
    from redi.study import MethodSpec

    monkeypatch.setitem(losses.OBJECTIVES, "sft-chosen",
                        losses.Objective("sft-chosen", sft_on_chosen, search=("lr",), summary="SFT on y_w, per token"))
    tree = copy.deepcopy(TINY)
    tree["run"]["artifact_root"] = str(tmp_path)
    tree["redi"]["loss"] = "sft-chosen"
    r = Recipe.model_validate(tree)
    assert not {"alpha", "beta", "gamma", "neg_reweight_gamma", "precompute_ref"} & set(r.redi.hash_fields())
    assert MethodSpec(name="sftc", loss="sft-chosen", grid={"lr": [1e-4]}).points() == [{"lr": 1e-4}]
    with pytest.raises(ValueError, match="not searchable"):
        MethodSpec(name="sftc", loss="sft-chosen", grid={"alpha": [0.5]})
    p = Pipeline(r)
    out = p.run_until("redi")
    art = out["stages"]["redi"]
    assert list(out["stages"]) == ["download", "model", "verify", "sft", "redi"] and not out["grades"]
    assert art.summary["loss_type"] == "sft-chosen" and art.summary["steps"] == 2
    assert art.manifest["config"]["loss"] == "sft-chosen"
    assert p.result_label("redi") == "sft-chosen"


def test_an_unknown_objective_is_refused_naming_the_valid_ones():
    from redi.config import RecipeError

    with pytest.raises(RecipeError, match=r"redi\.loss.*unknown stage-2 loss 'ipo'; valid: dpo, redi, simpo"):
        load_recipe(None, ["redi.loss=ipo"])

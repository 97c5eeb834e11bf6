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
    assert p._refresh(stage)
    assert not any(p._refresh(s) for s in ("download", "verify", "sft", "redi", "evaluate") if s != stage)


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
        "from redi.config import load_recipe\nfrom redi.pipeline import Pipeline\n"
        f"p = Pipeline(load_recipe(None, ['run.offline=true', 'run.artifact_root={tmp_path}']))\n"
        "print(len(p.decontam_problems()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "REDI_BENCHMARK_DIR")}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0" and "OfflineModeIsEnabled" in out.stderr
    assert time.time() - t0 < 60


@pytest.mark.parametrize("override", ["verify.length_filter=pairs_after_selection", "verify.problem_identity=row",
                                      "verify.label_rule=landmv_both_wrong", "verify.decontaminate=report"])
def test_selection_fields_rerun_verify_and_everything_trained_on_it(tmp_path, override):
    a, b = _keys(tmp_path), _keys(tmp_path, override)
    assert _changed(a, b) == {"verify", "sft", "redi"} | {f"{s}[{m}]" for s in ("evaluate", "grade") for m in ("sft", "redi")}


def test_decontamination_details_do_not_matter_when_it_is_off(tmp_path):
    assert _keys(tmp_path) == _keys(tmp_path, "verify.decontam_normalise=whitespace", "verify.decontam_benchmarks=[math500]")

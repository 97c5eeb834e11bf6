"""Hostile input to the download stage (tests/_bad_rows.py): every good row kept, no bad value admitted,
every bad kind counted under its reason at its ``file:line`` / ``file:row`` / ``file:row group``."""

from __future__ import annotations

import json
import math
from collections import Counter

import pyarrow.parquet as pq
import pytest
from _bad_rows import write_bad_input

from redi.config.data import DataConfig
from redi.data import DataError, download


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    exp = write_bad_input(folder / "in")
    summary = download(DataConfig(source="local", local_path=str(folder / "in")), folder / "out", progress=False)
    rows = pq.read_table(folder / "out" / "traces.parquet").to_pylist()
    return exp, summary, rows


def test_enough_kinds_tried(hostile):
    exp, _, _ = hostile
    assert len(exp.bad_kinds) >= 34, len(exp.bad_kinds)
    assert len(exp.good) >= 40


def test_every_good_row_kept_with_its_values(hostile):
    exp, s, rows = hostile
    by_problem: dict[str, list[dict]] = {}
    for r in rows:
        by_problem.setdefault(r["problem"], []).append(r)
    assert set(by_problem) == set(exp.good), (set(exp.good) ^ set(by_problem))
    for problem, want in exp.good.items():
        got = by_problem[problem]
        assert {r["answer"] for r in got} == {want["answer"]}, problem
        assert [(r["trace"], r["label_math_verify"], r["label_llama"]) for r in got] == want["traces"], problem
    assert s["traces"] == len(rows) == sum(len(w["traces"]) for w in exp.good.values())


def test_no_bad_value_admitted(hostile):
    exp, _, rows = hostile
    assert not exp.lost & {r["problem"] for r in rows}
    for r in rows:
        assert not r["problem"].startswith("BAD")
        assert r["answer"] is None or r["answer"].strip().lower() not in ("nan", "inf", "-inf", "true", "false", "['4']")
        for k in ("label_math_verify", "label_llama", "reasoning_complete"):
            assert r[k] in (True, False, None)
        assert isinstance(r["trace"], str) and len(r["trace"]) < 2_000_000
        r["problem"].encode("utf-8")  # no lone surrogate reached the file


def test_every_bad_kind_counted_by_reason_and_located(hostile):
    exp, s, _ = hostile
    want = exp.reason_counts()

    def prefix(reason: str) -> str:
        hits = [p for p in want if reason.startswith(p)]
        assert hits, f"unexpected reason {reason!r}"
        return max(hits, key=len)

    got: Counter = Counter()
    for reason, n in s["bad_reasons"].items():
        got[prefix(reason)] += n
    assert got == want
    assert s["bad_rows"] == len(exp.bad)
    where = exp.by_location()
    assert s["bad_row_ids"], "no location reported"
    for entry in s["bad_row_ids"]:  # every location reported is a bad row of the kind its reason says
        assert entry["row"] in where, entry
        assert entry["reason"].startswith(where[entry["row"]][1]), (entry, where[entry["row"]])
    named = {u["where"] for u in s["unreadable"]}
    assert named == {"truncated.parquet", "text.parquet", "zero.parquet", "row_groups.parquet:row group 1"}
    assert all(u["error"] for u in s["unreadable"])


def test_summary_is_json(hostile):
    _, s, _ = hostile
    json.dumps(s, allow_nan=False)
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in s.values())


def test_a_lone_unreadable_file_fails_naming_it(tmp_path):
    f = tmp_path / "cut.parquet"
    f.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError) as e:
        download(DataConfig(source="local", local_path=str(f)), tmp_path / "o", progress=False)
    assert "cut.parquet" in str(e.value) and "\n" not in str(e.value)


def test_missing_column_named_when_nothing_is_usable(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"problem": "p", "generations": ["\\boxed{1}"]}) + "\n")
    with pytest.raises(DataError, match="missing column 'answer'"):
        download(DataConfig(source="local", local_path=str(f)), tmp_path / "o", progress=False)


# ------------------------------------------------------------------------------------------- the CLI


def _one_line_error(capsys, argv: list[str], rc: int, *words: str) -> str:
    from redi.cli import main

    assert main(argv) == rc
    err = capsys.readouterr().err  # progress bars and log lines may come before it
    lines = [line for line in err.splitlines() if line.startswith("redi: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_cli_user_errors_are_one_line_before_any_work(tmp_path, capsys):
    from conftest_orchestration import write_recipe

    recipe = write_recipe(tmp_path)
    _one_line_error(capsys, ["stage", "evaluate", str(recipe), "--labels", "base,foo", "--no-prefect"], 2, "'foo'", "base,sft,redi")
    _one_line_error(capsys, ["run", str(recipe), "--set", "evaluate.benchmarks=[math5000]", "--no-prefect"], 2,
                    "'math5000'", "math500", "evaluate.benchmark_paths")
    _one_line_error(capsys, ["run", str(recipe), "--set", "data.source=local", "--set", f"data.local_path={tmp_path}/gone.jsonl",
                             "--no-prefect"], 2, "gone.jsonl", "data.local_path")
    _one_line_error(capsys, ["eval", "--model", str(tmp_path / "no-model"), "--recipe", str(recipe), "--no-prefect"], 2, "no-model")
    _one_line_error(capsys, ["run", str(recipe), "--set", "model.base=/nonexistent/model", "--no-prefect"], 2,
                    "model.base '/nonexistent/model' does not exist", "Hub model id")
    (tmp_path / "not-a-model").mkdir()
    _one_line_error(capsys, ["run", str(recipe), "--set", f"model.base={tmp_path}/not-a-model", "--no-prefect"], 2,
                    "not a transformers model folder")
    _one_line_error(capsys, ["run", str(recipe), "--set", "run.launcher=accelerate", "--set",
                             "run.accelerate_config=deployments/accelerate/zero9.yaml", "--no-prefect"], 2,
                    "zero9.yaml", "no such file")
    assert not (tmp_path / "artifacts").exists()  # nothing was started


def test_cli_runtime_errors_are_one_line(tmp_path, capsys):
    from conftest_orchestration import write_recipe

    from redi.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "p", "generations": ["\\boxed{1}"]}) + "\n")
    local = {"data.source": "local", "data.local_path": str(bad), "evaluate.benchmarks": ["math500"]}
    recipe = write_recipe(tmp_path, local)
    _one_line_error(capsys, ["stage", "download", str(recipe), "--no-prefect"], 1, "missing column 'answer'")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    recipe = write_recipe(tmp_path, {"run.artifact_root": str(blocker / "artifacts")}, name="r2.yaml")
    _one_line_error(capsys, ["stage", "download", str(recipe), "--no-prefect"], 1, str(blocker))
    with pytest.raises(DataError):  # --debug: the exception itself, with its traceback
        main(["--debug", "stage", "download", str(write_recipe(tmp_path, local, name="r3.yaml")), "--no-prefect"])


# ------------------------------------------------------------------------------------------- stale cache


def _count_reads(monkeypatch) -> list:
    import redi.fingerprint as F

    reads: list = []
    real = F._sha256_file
    monkeypatch.setattr(F, "_sha256_file", lambda p: reads.append(p) or real(p))
    return reads


def test_a_changed_local_data_file_is_a_new_key_and_said_so(tmp_path, monkeypatch, caplog):
    """The issue's case: the file cut to fewer rows was a silent cache hit serving the old traces."""
    import logging
    import os

    from conftest_orchestration import write_recipe

    from redi.config import load_recipe
    from redi.pipeline import Pipeline

    monkeypatch.setenv("REDI_FINGERPRINT_CACHE", str(tmp_path / "fp.json"))
    reads = _count_reads(monkeypatch)
    rows = [{"problem": f"p{i}", "answer": str(i), "trace": f"\\boxed{{{i}}}"} for i in range(30)]
    f = tmp_path / "traces.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(write_recipe(tmp_path, {"data.source": "local", "data.local_path": str(f), "evaluate.benchmarks": ["math500"]}))
    p1 = Pipeline(recipe)
    k1 = p1.key("download")
    assert p1.download().summary["traces"] == 30 and len(reads) == 1
    assert Pipeline(recipe).key("download") == k1 and len(reads) == 1  # unchanged file: a cache hit reads no byte
    assert Pipeline(recipe).download().cached and len(reads) == 1
    st = f.stat()
    f.write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with caplog.at_level(logging.INFO, logger="redi.fingerprint"):
        p2 = Pipeline(recipe)
        assert p2.key("download") != k1
    assert any("traces.jsonl changed" in r.message for r in caplog.records)
    art = p2.download()
    assert not art.cached and art.summary["traces"] == 5


def test_local_model_folder_and_benchmark_file_are_fingerprinted(tmp_path, monkeypatch):
    from redi import benchmarks
    from redi.config import Recipe
    from redi.config.evaluate import EvaluateConfig
    from redi.pipeline import Pipeline

    monkeypatch.setenv("REDI_FINGERPRINT_CACHE", str(tmp_path / "fp.json"))
    reads = _count_reads(monkeypatch)
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    (model / ".cache").mkdir()
    (model / ".cache" / "lock").write_text("x")  # hidden: not part of the model
    recipe = Recipe.model_validate({"model": {"base": str(model)}, "run": {"artifact_root": str(tmp_path / "a")}})
    k1 = Pipeline(recipe).key("model")
    assert len(reads) == 2
    (model / ".cache" / "lock").write_text("y")
    assert Pipeline(recipe).key("model") == k1 and len(reads) == 2
    (model / "model.safetensors").write_bytes(b"\1" * 1000)
    assert Pipeline(recipe).key("model") != k1
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"id": "1", "problem": "p", "answer": "1"}) + "\n")
    cfg = EvaluateConfig(benchmarks=["mine"], benchmark_paths={"mine": str(bench)})
    fp = benchmarks.fingerprint("mine", cfg)
    n = len(reads)
    assert benchmarks.fingerprint("mine", cfg) == fp and len(reads) == n


def test_a_corrupt_datasets_folder_is_one_line(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"problem": "p", "answer": "1", "trace": "\\boxed{1}"}]).save_to_disk(str(tmp_path / "ds"))
    for f in (tmp_path / "ds").glob("*.arrow"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DataError) as e:
        download(DataConfig(source="local", local_path=str(tmp_path / "ds")), tmp_path / "o", progress=False)
    assert "ds" in str(e.value) and "save_to_disk" in str(e.value) and "\n" not in str(e.value)


def test_a_hub_stream_that_breaks_is_one_line(tmp_path, monkeypatch):
    import datasets

    def rows():
        yield {"problem": "p", "answer": "1", "trace": "\\boxed{1}"}
        raise ConnectionError("Connection reset by peer")

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows())
    monkeypatch.setattr("redi.sources.resolve_revision", lambda hub_id, rev: "abc")
    with pytest.raises(DataError) as e:
        download(DataConfig(source="hub", hub_id="open-r1/OpenR1-Math-220k"), tmp_path / "o", progress=False)
    assert "broke after 1 rows" in str(e.value) and "ConnectionError" in str(e.value) and "\n" not in str(e.value)

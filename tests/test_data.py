"""redi.data: the download stage on synthetic, local (jsonl/parquet/folder/datasets) and bad input; Hub offline."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from redi.config.data import DataConfig, SynthConfig
from redi.data import DataError, detect_schema, download
from redi.schema import TRACE_COLUMNS, stable_id

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
TINY_SYNTH = SynthConfig(n_train=50, n_val=5, n_test=7, traces_per_problem=3, seed=1)


def _local(path, **kw) -> DataConfig:
    return DataConfig(source="local", local_path=str(path), **kw)


def _table(out: Path) -> list[dict]:
    return pq.read_table(out / "traces.parquet").to_pylist()


def test_synthetic_download(tmp_path):
    s = download(DataConfig(synth=TINY_SYNTH), tmp_path / "a", progress=False)
    rows = _table(tmp_path / "a")
    assert s["traces"] == len(rows) == 150 and s["problems"] == 50 and s["bad_rows"] == 0
    assert list(rows[0]) == list(TRACE_COLUMNS)
    assert rows[0]["row_id"] == stable_id(rows[0]["problem_id"], 0) and rows[0]["problem_id"] == stable_id(rows[0]["problem"])
    test = [json.loads(x) for x in (tmp_path / "a" / "benchmarks" / "demo_test.jsonl").read_text().splitlines()]
    assert len(test) == 7 and set(test[0]) == {"id", "problem", "answer"}
    assert (tmp_path / "a" / "benchmarks" / "demo_val.jsonl").exists()
    download(DataConfig(synth=TINY_SYNTH), tmp_path / "b", progress=False)
    assert _table(tmp_path / "b") == rows  # deterministic
    assert (tmp_path / "a" / "benchmarks" / "demo_test.jsonl").read_bytes() == (tmp_path / "b" / "benchmarks" / "demo_test.jsonl").read_bytes()


def test_openr1_220k_sample(tmp_path):
    s = download(_local(SAMPLES / "openr1_math_220k.jsonl"), tmp_path, progress=False)
    rows = _table(tmp_path)
    assert s["schemas"] == {"openr1-220k": 3} and s["traces"] == 8 and s["local_path"].endswith("openr1_math_220k.jsonl")
    cut = [r for r in rows if r["finish_reason"] == "length"]
    assert len(cut) == 1 and cut[0]["reasoning_complete"] is False and cut[0]["label_math_verify"] is False
    assert cut[0]["label_llama"] is None  # correctness_llama null in that row: unknown, not False
    assert {r["source"] for r in rows} == {"olympiads", "cn_k12", "amc_aime"}
    assert [r["gen_index"] for r in rows if r["source"] == "amc_aime"] == [0, 1, 2, 3]
    assert rows[0]["source_uuid"] == "0a6b1c2d-0000-5000-8000-000000000001" and rows[0]["problem_is_valid"] is None


def test_openr1_raw_sample_uses_reparsed_label(tmp_path):
    s = download(_local(SAMPLES / "openr1_math_raw.jsonl"), tmp_path, progress=False)
    rows = _table(tmp_path)
    assert s["schemas"] == {"openr1-raw": 15} and s["traces"] == 33 and s["bad_rows"] == 1  # row 12: label lists too short
    r = [x for x in rows if x["problem"].startswith("What is $7")]
    assert [x["label_math_verify"] for x in r] == [False, True, False]  # math_verify_reparsed_answer, not math_verify_answer
    assert [x["label_llama"] for x in r] == [False, True, True]
    assert {x["problem_is_valid"] for x in rows} == {"Yes", "yes", "No"} and all(x["finish_reason"] is None for x in rows)


def test_parquet_folder_and_datasets_folder(tmp_path):
    rows = [json.loads(x) for x in (SAMPLES / "openr1_math_220k.jsonl").read_text().splitlines()]
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), folder / "a.parquet")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.jsonl").write_text(json.dumps(rows[2]) + "\n")
    s = download(_local(folder), tmp_path / "o1", progress=False)
    assert s["rows_read"] == 3 and s["traces"] == 8
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    s2 = download(_local(tmp_path / "ds"), tmp_path / "o2", progress=False)
    assert s2["traces"] == 8 and _table(tmp_path / "o2") == _table(tmp_path / "o1")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert download(_local(tmp_path / "dd"), tmp_path / "o3", progress=False)["traces"] == 8


def test_bad_rows_are_counted_and_good_rows_kept(tmp_path):
    good = json.loads((SAMPLES / "openr1_math_220k.jsonl").read_text().splitlines()[0])
    bad = [
        {**good, "answer": ""},
        {**good, "answer": None},
        {**good, "generations": None},
        {**good, "generations": "not a list"},
        {**good, "finish_reasons": ["stop"]},  # unequal lengths
        {"question": "x", "output": "y"},  # unknown schema
        {**good, "problem": "other problem", "generations": [None, 5, "<think>ok</think> \\boxed{4}"],
         "finish_reasons": ["stop"] * 3, "is_reasoning_complete": [True] * 3, "correctness_math_verify": [False, False, True],
         "correctness_llama": [False, False, True]},  # non-string traces: skipped, row kept
    ]
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [good, *bad]) + "\nnot json\n")
    s = download(_local(f), tmp_path / "o", progress=False)
    # the two rows without an answer are kept (answer None): the official LandMV scripts never read it
    assert s["rows_read"] == 9 and s["traces"] == 7 and s["bad_rows"] == 5 and s["non_string_traces_skipped"] == 2
    assert s["bad_reasons"]["generations is None or not a list"] == 2
    assert any(r.startswith("unequal lengths") for r in s["bad_reasons"])
    assert any(r.startswith("unknown schema") for r in s["bad_reasons"])
    assert [b["row"] for b in s["bad_row_ids"]][:2] == ["mixed.jsonl:4", "mixed.jsonl:5"]
    rows = _table(tmp_path / "o")
    kept = [r for r in rows if r["problem"] == "other problem"]
    assert [(r["gen_index"], r["source_row"], r["source_gen"]) for r in kept] == [(2, 7, 2)]  # source index kept
    same = [r for r in rows if r["problem"] == good["problem"]]  # rows 0-2 share the text: one problem_id, gens numbered on
    assert [(r["answer"], r["gen_index"], r["source_row"], r["source_gen"]) for r in same] == [
        (good["answer"], 0, 0, 0), (good["answer"], 1, 0, 1), (None, 2, 1, 0), (None, 3, 1, 1), (None, 4, 2, 0), (None, 5, 2, 1)]
    assert len({r["problem_id"] for r in same}) == 1


def test_nothing_usable_fails_clearly(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"question": "x", "output": "y"}) + "\n")
    with pytest.raises(DataError, match="no usable trace in 1 source rows"):
        download(_local(f), tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "traces.parquet").exists()


def test_missing_local_path_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        download(_local(tmp_path / "nope.parquet"), tmp_path / "o", progress=False)
    assert "\n" not in str(e.value) and "does not exist" in str(e.value) and "redi demo" in str(e.value)


def test_hub_unreachable_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = DataConfig(source="hub", hub_id="open-r1/OpenR1-Math-220k", hub_config="default")
    with pytest.raises(DataError) as e:
        download(cfg, tmp_path / "o", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "data.source=local" in msg and "redi demo" in msg


def test_max_rows_and_forced_schema(tmp_path):
    s = download(_local(SAMPLES / "openr1_math_220k.jsonl", max_rows=2), tmp_path / "a", progress=False)
    assert s["rows_read"] == 2 and s["problems"] == 2
    s = download(_local(SAMPLES / "openr1_math_220k.jsonl", schema="openr1-raw"), tmp_path / "b", progress=False)
    assert s["schemas"] == {"openr1-raw": 3}


def test_detect_schema():
    assert detect_schema({"problem": 1, "answer": 1, "generations": [], "finish_reasons": []}) == "openr1-220k"
    assert detect_schema({"problem": 1, "answer": 1, "generations": [], "correctness": {}}) == "openr1-raw"
    assert detect_schema({"problem": 1, "answer": 1, "trace": ""}) == "flat"
    assert detect_schema({"problem": 1, "generations": []}) is None


def test_flat_rows(tmp_path):
    f = tmp_path / "flat.jsonl"
    f.write_text("\n".join(json.dumps({"problem": "p", "answer": "1", "trace": f"\\boxed{{{i}}}", "label_math_verify": i == 1}) for i in range(3)))
    s = download(_local(f), tmp_path / "o", progress=False)
    rows = _table(tmp_path / "o")
    assert s["problems"] == 1 and [r["gen_index"] for r in rows] == [0, 1, 2]  # a repeated problem numbers on
    assert [r["label_math_verify"] for r in rows] == [False, True, False]


def _csv_rows(cfg, out_dir, info):
    """A throwaway source: flat rows (problem, answer, trace) from a CSV file at data.local_path."""
    import csv

    info["csv"] = cfg.local_path
    with open(cfg.local_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return ((f"csv:{i + 2}", r) for i, r in enumerate(rows))


def test_a_new_data_source_is_one_registry_entry_and_runs_through_the_dag(tmp_path, monkeypatch):
    """The one-place extension: register a DataSource, and the config (its choices, its required field, its
    key fields), the download stage, the download key (its local input) and the up-front check all take it."""
    import copy

    from conftest_orchestration import TINY

    from redi import sources
    from redi.config import Recipe
    from redi.pipeline import Pipeline, check_inputs

    def missing(cfg):
        if not Path(cfg.local_path).exists():
            raise DataError(f"data.local_path {cfg.local_path} does not exist")

    monkeypatch.setitem(sources.SOURCES, "csv", sources.DataSource(
        "csv", _csv_rows, "a CSV file of flat rows", fields=("local_path",), requires=("local_path",),
        key_inputs=lambda cfg: {"csv": sources.input_fingerprint(cfg.local_path)}, check=missing))
    assert "csv" in DataConfig.model_json_schema()["properties"]["source"]["enum"]
    with pytest.raises(ValueError, match="data.local_path is required when data.source is 'csv'"):
        DataConfig(source="csv")
    path = tmp_path / "traces.csv"
    path.write_text("problem,answer,trace\n" + "".join(f"What is {i}+1?,{i + 1},so \\boxed{{{i + 1}}}\n" for i in range(30)))
    cfg = DataConfig(source="csv", local_path=str(path))
    assert set(cfg.hash_fields()) == {"source", "local_path", "schema", "max_rows"}  # no synth, no hub fields
    tree = copy.deepcopy(TINY)
    tree["run"]["artifact_root"] = str(tmp_path / "a")
    tree["data"] = {"source": "csv", "local_path": str(path)}
    p = Pipeline(Recipe.model_validate(tree))
    art = p.run_until("download")["stages"]["download"]
    assert art.summary["traces"] == 30 and art.summary["csv"] == str(path) and art.summary["schemas"] == {"flat": 30}
    assert art.manifest["inputs"]["csv"] == sources.input_fingerprint(path)
    key = p.key("download")
    path.write_text(path.read_text().replace("What is 0+1", "What is 0 + 1"))
    assert Pipeline(p.recipe).key("download") != key  # the local input is in the key
    path.unlink()
    with pytest.raises(DataError, match="does not exist"):
        check_inputs(p.recipe)

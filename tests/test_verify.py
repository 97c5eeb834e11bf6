"""redi.verify: labels, filters (funnel), decontamination, positives/pairs, agreement, Dask = processes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from redi.config.data import DataConfig, SynthConfig
from redi.config.verify import VerifyConfig
from redi.data import download
from redi.grader import grade
from redi.schema import PAIR_COLUMNS, POSITIVE_COLUMNS, stable_id
from redi.verify import LabelRuleError, verify_and_split

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


@pytest.fixture(scope="module")
def synth_traces(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dl")
    download(DataConfig(synth=SynthConfig(n_train=80, n_val=2, n_test=2, traces_per_problem=4, seed=7, judge_noise=0.1)), out, progress=False)
    return out / "traces.parquet"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, synth_traces) -> Path:
    from redi.tinymodel import _training_texts, train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(list(_training_texts(synth_traces, 400)), 300).save_pretrained(str(d))
    return d


def _run(cfg, traces, tok, out, decontam=None):
    s = verify_and_split(cfg, traces, tok, out, decontam or {})
    return s, pd.read_parquet(out / "labelled.parquet"), pd.read_parquet(out / "positives.parquet"), pd.read_parquet(out / "pairs.parquet")


def test_synthetic_split(synth_traces, tok_dir, tmp_path):
    s, lab, pos, pairs = _run(VerifyConfig(workers=2), synth_traces, tok_dir, tmp_path / "a")
    assert list(pos.columns) == list(POSITIVE_COLUMNS) and list(pairs.columns) == list(PAIR_COLUMNS)
    assert s["traces"] == 320 and s["positives"] == len(pos) and s["pairs"] == len(pairs)
    assert pos["problem_id"].is_unique and len(pos) >= 70  # first correct trace per problem
    assert all(grade(c, a) for c, a in zip(pos["completion"], pos["answer"], strict=True))
    assert all(grade(c, a) and not grade(r, a) for c, r, a in zip(pairs["chosen"], pairs["rejected"], pairs["answer"], strict=True))
    p0 = pairs.iloc[0]
    assert p0["id"] == stable_id(p0["problem_id"], p0["chosen_index"], p0["rejected_index"])
    # the first correct trace of each problem: no kept correct trace before it
    kept = lab[(lab["filter_reason"] == "") & (lab["label"] == True)]  # noqa: E712
    assert dict(zip(pos["problem_id"], pos["id"], strict=True)) == {p: stable_id(p, g.min()) for p, g in kept.groupby("problem_id")["gen_index"]}
    steps = [f["traces"] for f in s["funnel"]]
    assert steps == sorted(steps, reverse=True) and steps[0] == 320
    assert s["filter_counts"]["incomplete"] == int((lab["finish_reason"] == "length").sum()) > 0
    assert s["agreement"]["agreement"] == 1.0 and (tmp_path / "a" / "agreement.md").exists()
    s2, _, pos2, pairs2 = _run(VerifyConfig(workers=1), synth_traces, tok_dir, tmp_path / "b")
    assert pos2.equals(pos) and pairs2.equals(pairs)  # deterministic, worker count does not matter


def test_more_pairs_and_all_positives(synth_traces, tok_dir, tmp_path):
    s1, *_ = _run(VerifyConfig(), synth_traces, tok_dir, tmp_path / "a")
    s3, _, pos, pairs = _run(VerifyConfig(pairs_per_problem=3, positives="all"), synth_traces, tok_dir, tmp_path / "b")
    assert s3["pairs"] > s1["pairs"] and s3["positives"] > s1["positives"]
    assert not pairs.duplicated(["problem_id", "chosen_index"]).any() and not pairs.duplicated(["problem_id", "rejected_index"]).any()


def test_label_rules(synth_traces, tok_dir, tmp_path):
    _, lab_d = _run(VerifyConfig(label_rule="dataset"), synth_traces, tok_dir, tmp_path / "d")[:2]
    assert (lab_d["label"].astype(bool) == lab_d["label_math_verify"]).all()
    s, lab, *_ = _run(VerifyConfig(label_rule="landmv"), synth_traces, tok_dir, tmp_path / "l")
    disagree = lab["label_llama"] != lab["label_math_verify"]
    assert disagree.sum() > 5 and (lab.loc[disagree, "label"] == False).all()  # noqa: E712 - official pairs rule: negative
    assert (lab.loc[~disagree, "label"] == lab.loc[~disagree, "label_math_verify"]).all()
    assert "unlabelled" not in s["filter_counts"]  # landmv labels every trace
    s, lab, *_ = _run(VerifyConfig(label_rule="landmv_both_wrong"), synth_traces, tok_dir, tmp_path / "b")
    assert lab.loc[disagree, "label"].isna().all()  # the verifier-signal ablation: no label when they disagree
    assert (lab.loc[~disagree, "label"] == lab.loc[~disagree, "label_math_verify"]).all()
    assert s["filter_counts"]["unlabelled"] >= int((disagree & (lab["finish_reason"] == "stop")).sum())


def test_a_new_label_rule_is_one_registry_entry_and_runs_through_the_dag(synth_traces, tok_dir, tmp_path, monkeypatch):
    """The one-place extension: register a LabelRule, and the config (its choices), the verify stage (its labels,
    its up-front column check) and the verify key all take it."""
    import copy

    from conftest_orchestration import TINY

    from redi import label_rules
    from redi.config import Recipe
    from redi.pipeline import Pipeline

    monkeypatch.setitem(label_rules.LABEL_RULES, "llama_only", label_rules.LabelRule(
        "llama_only", lambda ours, df: df["label_llama"].astype(object), "the Llama judge alone", needs=("label_llama",)))
    assert "llama_only" in VerifyConfig.model_json_schema()["properties"]["label_rule"]["enum"]
    s, lab, *_ = _run(VerifyConfig(label_rule="llama_only"), synth_traces, tok_dir, tmp_path / "o")
    assert s["label_rule"] == "llama_only" and (lab["label"] == lab["label_llama"]).all()
    assert (lab["label_llama"] != lab["label_math_verify"]).sum() > 5  # differs from the dataset's Math-Verify label
    tree = copy.deepcopy(TINY)
    tree["run"]["artifact_root"] = str(tmp_path / "a")
    keys = {}
    for rule in ("math_verify", "llama_only"):
        tree["verify"]["label_rule"] = rule
        keys[rule] = Pipeline(Recipe.model_validate(tree)).key("verify")
    assert keys["math_verify"] != keys["llama_only"]
    f = tmp_path / "flat.jsonl"
    f.write_text("\n".join(json.dumps({"problem": f"p{i}", "answer": "1", "trace": "\\boxed{1}"}) for i in range(3)))
    download(DataConfig(source="local", local_path=str(f)), tmp_path / "dl", progress=False)
    with pytest.raises(LabelRuleError, match="label_rule='llama_only' needs the dataset column 'label_llama'"):
        verify_and_split(VerifyConfig(label_rule="llama_only"), tmp_path / "dl" / "traces.parquet", tok_dir, tmp_path / "o2", {})


def test_landmv_rules_on_every_label_combination():
    """The two LandMV rules on (llama, math_verify) in {True, False, None}^2, as the official scripts decide them:
    clean_base_shuffled_dpo.py `bool(l) and bool(mr)` else negative; ablation_verifier_signal.py negative only
    if `not bool(l) and not bool(mr)` (a missing label counts as not-correct)."""
    import itertools

    from redi.verify import rule_landmv, rule_landmv_both_wrong

    combos = list(itertools.product([True, False, None], repeat=2))
    df = pd.DataFrame({"label_llama": [c[0] for c in combos], "label_math_verify": [c[1] for c in combos]}, dtype=object)
    ours = pd.Series([None] * len(df), dtype=object)
    assert rule_landmv(ours, df).tolist() == [bool(a) and bool(b) for a, b in combos]
    assert rule_landmv_both_wrong(ours, df).tolist() == [
        True if bool(a) and bool(b) else False if not bool(a) and not bool(b) else None for a, b in combos]
    assert rule_landmv(ours, df).tolist() == [True, False, False, False, False, False, False, False, False]
    assert rule_landmv_both_wrong(ours, df).tolist() == [True, None, None, None, False, False, None, False, False]


def test_landmv_refuses_without_llama_column(tok_dir, tmp_path):
    f = tmp_path / "flat.jsonl"
    f.write_text("\n".join(json.dumps({"problem": f"p{i}", "answer": "1", "trace": "\\boxed{1}", "label_math_verify": True}) for i in range(3)))
    download(DataConfig(source="local", local_path=str(f)), tmp_path / "dl", progress=False)
    with pytest.raises(LabelRuleError, match="label_llama"):
        verify_and_split(VerifyConfig(label_rule="landmv"), tmp_path / "dl" / "traces.parquet", tok_dir, tmp_path / "o", {})


def test_length_filters_and_decontamination(synth_traces, tok_dir, tmp_path):
    s, lab, *_ = _run(VerifyConfig(max_prompt_tokens=5), synth_traces, tok_dir, tmp_path / "p")
    assert s["positives"] == 0 and s["filter_counts"]["prompt_too_long"] == 320
    s, lab, *_ = _run(VerifyConfig(max_response_tokens=40, max_prompt_tokens=None), synth_traces, tok_dir, tmp_path / "r")
    assert 0 < s["filter_counts"]["response_too_long"] < 320
    assert (lab.loc[lab["filter_reason"] == "response_too_long", "response_tokens"] > 40).all()
    problems = pd.read_parquet(synth_traces)["problem"].drop_duplicates().tolist()
    bench = {"benchA": [problems[0].upper() + " (reworded)"], "benchB": [problems[1], "short text"]}
    s, lab, pos, _ = _run(VerifyConfig(), synth_traces, tok_dir, tmp_path / "c", bench)
    assert s["decontamination"]["problems_removed"] >= 2
    assert s["decontamination"]["per_benchmark"]["benchA"] >= 1 and s["decontamination"]["per_benchmark"]["benchB"] >= 1
    assert not set(problems[:2]) & set(pos["problem"])


def test_dask_labels_equal_processes(synth_traces, tok_dir, tmp_path):
    pytest.importorskip("dask.distributed")
    s_p, lab_p, *_ = _run(VerifyConfig(workers=2), synth_traces, tok_dir, tmp_path / "p")
    s_d, lab_d, pos_d, _ = _run(VerifyConfig(executor="dask", shard_size=64), synth_traces, tok_dir, tmp_path / "d")
    assert lab_d["label_ours"].tolist() == lab_p["label_ours"].tolist()
    assert s_d["grading"]["executor"] == "dask" and s_d["grading"]["done"] == 320
    assert lab_d["response_tokens"].tolist() == lab_p["response_tokens"].tolist()  # counted on the Dask workers too


@pytest.mark.slow  # ~30-90 s: three interpreters importing distributed, then 320 traces in 32-trace shards
def test_dask_cluster_of_two_worker_processes_gives_the_same_labels(synth_traces, tok_dir, tmp_path):
    """A real `dask scheduler` and two `dask worker` processes started here (as on separate machines): the verify
    stage at their address labels like the local pool, and both workers graded shards."""
    distributed = pytest.importorskip("dask.distributed")
    from _dask_cluster import dask_cluster

    with dask_cluster(tmp_path) as addr:
        s_p, lab_p, *_ = _run(VerifyConfig(workers=2), synth_traces, tok_dir, tmp_path / "p")
        s_d, lab_d, pos_d, _ = _run(VerifyConfig(executor="dask", dask_address=addr, shard_size=32), synth_traces, tok_dir,
                                    tmp_path / "d")
        assert lab_d["label_ours"].tolist() == lab_p["label_ours"].tolist()
        assert lab_d["response_tokens"].tolist() == lab_p["response_tokens"].tolist()
        assert s_d["grading"]["executor"] == "dask" and s_d["grading"]["done"] == 320
        with distributed.Client(addr) as c:
            worked = c.run(lambda dask_worker: dask_worker.state.transition_counter)
        assert len(worked) == 2 and all(n > 0 for n in worked.values()), worked


def test_workers_count_tokens_as_transformers_does(synth_traces, tok_dir, tmp_path):
    """The grading workers count each trace's tokens with tokenizer.json; the counts equal transformers' own."""
    from redi.tinymodel import load_tokenizer
    from redi.verify import prompt_lengths, response_lengths

    _, lab, *_ = _run(VerifyConfig(workers=2, max_response_tokens=10_000, max_prompt_tokens=10_000), synth_traces, tok_dir,
                      tmp_path / "w")
    tok = load_tokenizer(tok_dir)
    want = response_lengths(tok, pd.read_parquet(synth_traces)["trace"].tolist())
    assert lab["response_tokens"].tolist() == want and "<think>" in lab["trace"].iloc[0]
    assert lab["prompt_tokens"].tolist() == prompt_lengths(tok, lab["problem"].tolist())  # in this process, per problem


def test_token_counts_that_disagree_are_recounted(synth_traces, tok_dir, tmp_path, monkeypatch, caplog):
    """If tokenizer.json counts differently from the transformers tokenizer, every trace is recounted with the latter."""
    from redi import verify as verify_stage
    from redi.tinymodel import _training_texts, load_tokenizer, train_tokenizer

    other = tmp_path / "other"
    train_tokenizer(list(_training_texts(synth_traces, 50)), 120).save_pretrained(str(other))
    monkeypatch.setattr(verify_stage, "_tokenizer_json", lambda _: (other / "tokenizer.json").read_text())
    _, lab, *_ = _run(VerifyConfig(workers=1, max_response_tokens=10_000, max_prompt_tokens=10_000), synth_traces, tok_dir,
                      tmp_path / "m")
    assert "count tokens differently" in caplog.text and "count prompt tokens differently" in caplog.text
    tok = load_tokenizer(tok_dir)
    assert lab["response_tokens"].tolist() == verify_stage.response_lengths(tok, lab["trace"].tolist())
    assert lab["prompt_tokens"].tolist() == verify_stage.prompt_lengths(tok, lab["problem"].tolist())


def test_render_prompts_renders_the_template_once_only_when_that_is_exact(tok_dir):
    from redi.prompts import render_prompt
    from redi.tinymodel import load_tokenizer
    from redi.verify import render_prompts

    tok = load_tokenizer(tok_dir)
    problems = ["What is 2+2?", "  leading spaces\n", "{{ not jinja }}", "\\boxed{x} <|im_end|>"]
    assert render_prompts(tok, problems) == [render_prompt(tok, p) for p in problems]
    tok.chat_template = tok.chat_template.replace("message['content']", "(message['content'] | trim)")
    assert render_prompts(tok, problems) == [render_prompt(tok, p) for p in problems]  # trims: rendered per problem
    assert render_prompts(tok, problems)[1] != render_prompt(tok, "x").replace("x", problems[1], 1)


def _reference_reason(row, cfg, contaminated, prompt_tokens) -> str:
    """filter_reasons' rules, one row at a time (the specification the vectorised version must match)."""
    def null(v):
        return v is None or bool(pd.isna(v))

    if cfg.require_valid and not null(row["problem_is_valid"]) and str(row["problem_is_valid"]).strip().lower() != "yes":
        return "problem_invalid"
    if not null(row["source"]) and str(row["source"]).lower() in {s.lower() for s in cfg.exclude_sources}:
        return "excluded_source"
    if cfg.require_answer and (null(row["answer"]) or not str(row["answer"]).strip()):
        return "no_answer"
    if contaminated and cfg.decontaminate == "remove":
        return "contaminated"
    per_trace = cfg.length_filter == "traces_before_selection"
    if per_trace and cfg.max_prompt_tokens is not None and prompt_tokens > cfg.max_prompt_tokens:
        return "prompt_too_long"
    incomplete = (not null(row["reasoning_complete"]) and not bool(row["reasoning_complete"])) or (
        not null(row["finish_reason"]) and row["finish_reason"] != "stop")
    if cfg.require_complete and incomplete:
        return "incomplete"
    if per_trace and cfg.max_response_tokens is not None and row["response_tokens"] > cfg.max_response_tokens:
        return "response_too_long"
    return "unlabelled" if null(row["label"]) else ""


def test_filter_reasons_match_the_row_by_row_rules():
    import itertools

    import numpy as np

    from redi.verify import filter_reasons

    values = {"problem_is_valid": ["Yes", " yes ", "No", None, np.nan, pd.NA, True],
              "source": ["amc", "CN_K12", None, np.nan],
              "reasoning_complete": [True, False, None, np.nan, pd.NA],
              "finish_reason": ["stop", "length", None, np.nan],
              "answer": ["7", " ", None],
              "label": [True, False, None, np.nan]}
    rows = [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]
    df = pd.DataFrame(rows, dtype=object)
    df["problem_id"] = [f"p{i % 7}" for i in range(len(df))]
    df["response_tokens"] = [i % 50 for i in range(len(df))]
    info = pd.DataFrame({"contaminated": [i == 3 for i in range(7)], "prompt_tokens": [10 * i for i in range(7)]},
                        index=[f"p{i}" for i in range(7)])
    for cfg in (VerifyConfig(max_prompt_tokens=45, max_response_tokens=30),
                VerifyConfig(require_valid=False, require_complete=False, max_prompt_tokens=None, max_response_tokens=None),
                VerifyConfig(max_prompt_tokens=45, max_response_tokens=30, length_filter="pairs_after_selection",
                             require_answer=False, decontaminate="report")):
        got = filter_reasons(df, cfg, info).tolist()
        want = [_reference_reason(r, cfg, info.loc[r["problem_id"], "contaminated"], info.loc[r["problem_id"], "prompt_tokens"])
                for r in df.to_dict("records")]
        assert got == want


def test_verdict_keys_vectorised_like_one_by_one():
    import numpy as np

    from redi.verify import _verdict_key, _verdict_keys

    s = pd.Series([True, False, None, np.nan, pd.NA, 1, 0, 1.0, 0.0], dtype=object)
    assert _verdict_keys(s).tolist() == [_verdict_key(v) for v in s.tolist()]
    assert _verdict_keys(pd.Series([True, False, None], dtype="boolean")).tolist() == ["True", "False", "None"]


# ----------------------------------------------------------------------------- the official selection on the Raw fixture

QWEN_MATH_LIKE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Like Qwen2.5-Math's chat template (our own jinja): a default system turn when the messages have none."""

PAPER = dict(label_rule="landmv", problem_identity="row", require_answer=False, require_complete=False,
             length_filter="pairs_after_selection", max_prompt_tokens=1000, max_response_tokens=1000,
             decontaminate="report", decontam_normalise="whitespace")
"""The paper recipe's verify section, with token limits scaled to the fixture (its long texts are 5k and 12k
tokens, every other prompt or response under 200, system turn included: checked in the test)."""
BENCH = {"math500": ["Let the sum of all positive divisors of 36 be N. What is N?"]}
"""Row 14 of the fixture shares "let the sum of all positive divisors of" with it as the official check
normalises (lower-case, whitespace); row 15 only once punctuation is dropped ("divisors, of 36,")."""


@pytest.fixture(scope="module")
def raw_fixture(tmp_path_factory, tok_dir):
    """The Raw fixture downloaded, and the tiny tokenizer with a Qwen2.5-Math-like template."""
    from redi.tinymodel import load_tokenizer

    out = tmp_path_factory.mktemp("raw")
    summary = download(DataConfig(source="local", local_path=str(SAMPLES / "openr1_math_raw.jsonl")), out, progress=False)
    tok = load_tokenizer(tok_dir)
    tok.chat_template = QWEN_MATH_LIKE
    tok.save_pretrained(str(out / "tok"))
    return out / "traces.parquet", out / "tok", summary


def _picked(pos, pairs, lab):
    """{source row: chosen gen} and {source row: (chosen gen, rejected gen)} of a run, via labelled.parquet's problem_key."""
    row_of = dict(zip(lab["problem_key"], lab["source_row"], strict=True))
    return ({int(row_of[p]): int(i) for p, i in zip(pos["problem_id"], pos["id"].map(dict(zip(
                [stable_id(k, g) for k, g in zip(lab["problem_key"], lab["source_gen"], strict=True)], lab["source_gen"], strict=True))),
                strict=True)},
            {int(row_of[p]): (int(c), int(r)) for p, c, r in zip(pairs["problem_id"], pairs["chosen_index"], pairs["rejected_index"], strict=True)})


def test_raw_fixture_download_keeps_rows_and_reparsed_labels(raw_fixture):
    traces, _, s = raw_fixture
    t = pd.read_parquet(traces)
    # 16 rows; row 11 has label lists shorter than its generations: skipped (official: "mismatched lengths")
    assert s["rows_read"] == 16 and s["bad_rows"] == 1 and s["bad_row_ids"][0]["row"] == "openr1_math_raw.jsonl:12"
    assert len(t) == 33 and sorted(t["source_row"].unique()) == [r for r in range(16) if r != 11]
    r4 = t[t["source_row"] == 4]
    assert r4["label_math_verify"].tolist() == [False, True, True, False]  # math_verify_reparsed_answer (math_verify_answer: T T T F)
    assert t.loc[t["source_row"] == 6, "answer"].isna().all()  # empty gold kept, as None
    assert t.loc[t["source_row"] == 8, "label_llama"].isna().all()  # the whole Llama list is null
    assert t.loc[t["source_row"] == 7, "gen_index"].tolist() == [2, 3]  # same text as row 0: numbered on
    assert t.loc[t["source_row"] == 7, "source_gen"].tolist() == [0, 1]


def test_paper_recipe_selects_the_official_traces(raw_fixture, tmp_path):
    """The official scripts by hand on the 15 usable rows (row: its generations' (Llama, Math-Verify reparsed) labels):

    clean_base_shuffled_dpo.py: chosen = first gen with Llama AND MV, rejected = first gen without; rows 2
    (problem_is_valid No) and 1 (cn_k12) are filtered; the answer is never read (row 6 has none).
      0: (T,T) (F,F)                -> chosen 0, rejected 1
      3: (F,F) (T,T) (T,F)          -> 1, 0
      4: (T,F) (F,T) (T,T) (F,F)    -> 2, 0   (reparsed label; with math_verify_answer gen 0 would be chosen)
      5: (None,T) (T,T) (T,F)       -> 1, 0   (a null label counts as not correct)
      6: (F,F) (T,T)                -> 1, 0   (empty answer)
      7: (T,T) (F,F)                -> 0, 1   (same text as row 0: its own problem)
      8: Llama list null            -> nothing (official: row skipped; here every gen negative: no positive)
      9: (T,T) long, (F,F), (T,T)   -> 0, 1, then dropped: chosen > 1000 tokens
     10: long problem (T,T) (F,F)   -> 0, 1, then dropped: prompt > 1000 tokens
     12: all (F,F) -> nothing; 13: all (T,T) -> positive 0, no pair; 14: (T,T) (F,F) -> 0, 1; 15: (T,T) -> positive 0
    clean_base_shuffled.py: positive = the first LandMV gen, never length-filtered: rows 0 3 4 5 6 7 9 10 13 14 15.
    """
    traces, tok, src = raw_fixture
    s, lab, pos, pairs = _run(VerifyConfig(**PAPER), traces, tok, tmp_path / "o", BENCH)
    s2 = verify_and_split(VerifyConfig(**PAPER), traces, tok, tmp_path / "p", BENCH, prompt_protocol="paper-train", source=src)
    assert s2["positives"] == s["positives"] and s2["pairs"] == s["pairs"]
    positives, chosen = _picked(pos, pairs, lab)
    assert positives == {0: 0, 3: 1, 4: 2, 5: 1, 6: 1, 7: 0, 9: 0, 10: 0, 13: 0, 14: 0, 15: 0}
    assert chosen == {0: (0, 1), 3: (1, 0), 4: (2, 0), 5: (1, 0), 6: (1, 0), 7: (0, 1), 14: (0, 1)}
    assert s["selection"] == {"positives": 11, "pairs_selected": 9, "pairs_dropped": {"response_too_long": 1, "prompt_too_long": 1},
                              "pairs": 7, "length_filter": "pairs_after_selection"}
    # funnel: 33 traces of 15 row-problems; -1 trace (row 2 invalid), -2 (row 1 cn_k12); nothing else drops a trace
    assert [(f["step"], f["problems"], f["traces"]) for f in s["funnel"]] == [
        ("input", 15, 33), ("after problem_invalid", 14, 32)] + [(f"after {st}", 13, 30) for st in
        ("excluded_source", "no_answer", "contaminated", "prompt_too_long", "incomplete", "response_too_long", "unlabelled")]
    # decontamination is a report: row 14 flagged (whitespace normalisation), kept, and counted among the selected
    d = s["decontamination"]
    assert (d["mode"], d["problems_flagged"], d["problems_removed"], d["positives_flagged"], d["pairs_flagged"]) == ("report", 1, 0, 1, 1)
    # the official figures apply to the full Raw data only, and the report says so
    assert s["official"]["positives"] == 77_629 and s["official"]["pairs_before_length_filter"] == 53_175
    assert not s["official"]["comparable"] and "origin is unknown" in s["official"]["note"]
    assert not s2["official"]["comparable"] and "openr1_math_raw.jsonl" in s2["official"]["note"]
    md = (tmp_path / "p" / "funnel.md").read_text()
    assert "| positives (SFT, first correct trace per problem) | 11 | 77,629 |" in md and "| pairs before the length filter | 9 | 53,175 |" in md
    assert "Report only: nothing was removed" in md


def test_official_lengths_are_counted_as_the_length_study_does(raw_fixture, tmp_path):
    """study_length_distribution.py: prompt_len = tokens(chat template of [user], no generation prompt) + 1;
    chosen_len / rejected_len = tokens(chat template of [assistant] alone, default system turn included) + 1."""
    from redi.tinymodel import load_tokenizer
    from redi.verify import official_response_lengths, prompt_lengths, response_lengths

    traces, tok_path, _ = raw_fixture
    tok = load_tokenizer(tok_path)
    t = pd.read_parquet(traces)
    rendered = lambda msgs: len(tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"])  # noqa: E731
    want_p = [rendered([{"role": "user", "content": p}]) + 1 for p in t["problem"]]
    assert prompt_lengths(tok, t["problem"].tolist(), protocol="paper-train", official=True) == want_p
    odd = ["\n\nstarts with blank lines", " leading space", "plain \\boxed{1}", "ends with newline\n"]
    texts = t["trace"].tolist() + odd
    want_r = [rendered([{"role": "assistant", "content": x}]) + 1 for x in texts]
    assert official_response_lengths(tok, texts, response_lengths(tok, texts)) == want_r
    # the fixture's margins: only row 10's prompt and row 9's first trace pass 1000 tokens
    long_p = {int(r) for r, n in zip(t["source_row"], want_p, strict=True) if n > 1000}
    long_r = {(int(r), int(g)) for r, g, n in zip(t["source_row"], t["source_gen"], want_r[: len(t)], strict=True) if n > 1000}
    assert long_p == {10} and long_r == {(9, 0)} and max(n for n in want_p if n <= 1000) < 200 and max(n for n in want_r if n <= 1000) < 200


def test_both_wrong_variant_on_the_fixture(raw_fixture, tmp_path):
    """ablation_verifier_signal.py's labels: rejected = first gen that NEITHER verifier calls correct.
      0 -> 0, 1;  3: (F,F) (T,T) (T,F) -> 1, 0;  4: gens 0 and 1 disagree (no label) -> 2, 3;
      5: (None,T) and (T,F) one-sided (no label) -> positive 1, no pair;  6 -> 1, 0;  7 -> 0, 1;
      8: (None,T) no label, (None,F) negative -> nothing;  9, 10 selected then dropped;  14 -> 0, 1.
    Unlabelled: 3/2, 4/0, 4/1, 5/0, 5/2, 8/0 = 6 traces."""
    traces, tok, _ = raw_fixture
    s, lab, pos, pairs = _run(VerifyConfig(**{**PAPER, "label_rule": "landmv_both_wrong"}), traces, tok, tmp_path / "o", BENCH)
    positives, chosen = _picked(pos, pairs, lab)
    assert positives == {0: 0, 3: 1, 4: 2, 5: 1, 6: 1, 7: 0, 9: 0, 10: 0, 13: 0, 14: 0, 15: 0}
    assert chosen == {0: (0, 1), 3: (1, 0), 4: (2, 3), 6: (1, 0), 7: (0, 1), 14: (0, 1)}
    assert s["selection"]["pairs_selected"] == 8 and s["pairs"] == 6
    assert s["filter_counts"] == {"problem_invalid": 1, "excluded_source": 2, "unlabelled": 6}
    assert s["funnel"][-1] == {"step": "after unlabelled", "traces": 24, "problems": 13}


def test_our_defaults_on_the_fixture(raw_fixture, tmp_path):
    """Text identity, a gold required, trace-level length filters, contaminated problems removed (punctuation):
    rows 0 and 7 are one problem (gens 0-1 and 2-3); row 6 (no answer) and rows 14, 15 (contaminated) drop out;
    row 10's traces drop (prompt), row 9's first trace drops (response), so its next correct one (gen 2) is chosen."""
    traces, tok, _ = raw_fixture
    cfg = VerifyConfig(**{**PAPER, "problem_identity": "text", "require_answer": True, "length_filter": "traces_before_selection",
                          "decontaminate": "remove", "decontam_normalise": "punctuation"})
    s, lab, pos, pairs = _run(cfg, traces, tok, tmp_path / "o", BENCH)
    by_text = {p: (c, r) for p, c, r in zip(pairs["problem"], pairs["chosen_index"], pairs["rejected_index"], strict=True)}
    assert by_text == {"Compute $3^4 - 4^3$.": (0, 1), "What is $7 \\times 8$?": (1, 0),
                       "Find the remainder when $2^{10}$ is divided by $7$.": (2, 0), "How many edges does a cube have?": (1, 0),
                       "What is $5 + 7$?": (2, 1)}
    assert len(pos) == 6 and s["filter_counts"] == {"problem_invalid": 1, "excluded_source": 2, "no_answer": 2, "contaminated": 3,
                                                     "prompt_too_long": 2, "response_too_long": 1}
    assert s["decontamination"]["problems_removed"] == 2 and s["funnel"][-1] == {"step": "after unlabelled", "traces": 22, "problems": 8}
    assert s["official"]["ours"]["pairs_before_length_filter"] is None and "settings differ" in s["official"]["note"]


def test_the_official_shuffle_changes_no_selection(raw_fixture, tmp_path):
    """The official scripts shuffle the Raw rows (datasets' shuffle(seed=42): a permutation of rows) before their
    loop; a generation's index within its row is untouched, so the same traces are picked in any row order."""
    import numpy as np

    traces, tok, _ = raw_fixture
    lines = (SAMPLES / "openr1_math_raw.jsonl").read_text().splitlines()
    perm = np.random.default_rng(42).permutation(len(lines))
    f = tmp_path / "shuffled.jsonl"
    f.write_text("\n".join(lines[i] for i in perm) + "\n")
    download(DataConfig(source="local", local_path=str(f)), tmp_path / "dl", progress=False)

    def picked(path, out):
        _, lab, pos, pairs = _run(VerifyConfig(**PAPER), path, tok, out, BENCH)
        return (sorted(zip(pos["problem"], pos["completion"], strict=True)),
                sorted(zip(pairs["problem"], pairs["chosen_index"], pairs["rejected_index"], strict=True)))

    assert picked(tmp_path / "dl" / "traces.parquet", tmp_path / "a") == picked(traces, tmp_path / "b")


def test_funnel_report_compares_with_the_official_figures_only_on_the_full_raw_data():
    from redi.selection import RAW_ROWS, funnel_report

    summary = {"selection": {"positives": 77_629, "pairs_selected": 53_170, "pairs_dropped": {"prompt_too_long": 3}, "pairs": 53_167,
                             "length_filter": "pairs_after_selection"},
               "decontamination": {"ngram": 8, "normalise": "whitespace", "checked_benchmarks": ["math500"], "problems_flagged": 2,
                                   "per_benchmark": {"math500": 2}, "positives_flagged": 2, "pairs_flagged": 1},
               "funnel": [{"step": "input", "traces": 10, "problems": 5}]}
    full = {"hub_id": "open-r1/OpenR1-Math-Raw", "hub_split": "train", "rows_read": RAW_ROWS, "max_rows": None}
    off, md = funnel_report(summary, VerifyConfig(**PAPER), "paper-train", full)
    assert off["comparable"] and off["match"] == {"positives": True, "pairs_before_length_filter": False}
    assert "should equal the official ones" in md and "| pairs before the length filter | 53,170 | 53,175 |" in md
    off, _ = funnel_report(summary, VerifyConfig(**PAPER), "paper-train", {**full, "max_rows": 1000, "rows_read": 1000})
    assert not off["comparable"] and "read 1000 rows" in off["note"] and "match" not in off
    off, _ = funnel_report(summary, VerifyConfig(**{**PAPER, "label_rule": "landmv_both_wrong"}), "paper-train", full)
    assert not off["comparable"] and "label_rule='landmv_both_wrong'" in off["note"]
    dup = {**full, "bad_rows": 3, "bad_reasons": {"duplicate row (same problem, answer and traces as an earlier row)": 2,
                                                   "no generations": 1}}
    off, md = funnel_report(summary, VerifyConfig(**PAPER), "paper-train", dup)
    assert off["comparable"] and off["duplicate_rows_dropped"] == 2 and "2 exact duplicate rows were dropped" in off["note"]
    assert "516,499 source rows read, 3 unusable (duplicate row" in md and "no generations: 1" in md


def test_row_identity_needs_the_source_rows_and_says_how_to_get_them():
    from redi.selection import apply_identity

    df = pd.DataFrame({"problem_id": ["a", "a"], "gen_index": [0, 1], "source_row": [None, None], "source_gen": [None, None]},
                      dtype=object)
    assert apply_identity(df.copy(), VerifyConfig()).equals(df)  # text identity: as downloaded
    with pytest.raises(ValueError, match="refresh download"):
        apply_identity(df, VerifyConfig(problem_identity="row"))
    df = pd.DataFrame({"problem_id": ["a", "a", "a"], "gen_index": [0, 1, 2], "source_row": [3, 3, 9], "source_gen": [0, 1, 0]})
    out = apply_identity(df, VerifyConfig(problem_identity="row"))
    assert out["problem_id"].tolist() == [stable_id("a", "row", 3)] * 2 + [stable_id("a", "row", 9)]
    assert out["gen_index"].tolist() == [0, 1, 0]

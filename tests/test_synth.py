"""redi.synth: determinism, exact answers, error kinds, disjoint held-out splits, grader agreement."""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import pytest

from redi import synth
from redi.config.data import SynthConfig
from redi.gradepool import grade_many
from redi.grader import grade, last_boxed

SMALL = SynthConfig(n_train=300, n_val=40, n_test=60, traces_per_problem=4, seed=3)


@pytest.fixture(scope="module")
def small():
    return synth.generate(SMALL)


def test_byte_identical_for_a_seed(small):
    again = synth.generate(SMALL)
    assert json.dumps(small, sort_keys=True) == json.dumps(again, sort_keys=True)
    other = synth.generate(SMALL.model_copy(update={"seed": 4}))
    assert json.dumps(other[0][:5]) != json.dumps(small[0][:5])


def test_held_out_problems_never_in_train(small):
    train, val, test = small
    texts = [r["problem"] for r in train]
    assert len(set(texts)) == len(texts) == 300
    assert len(val) == 40 and len(test) == 60
    held = {r["problem"] for r in val} | {r["problem"] for r in test}
    assert len(held) == 100 and not held & set(texts)
    assert set(val[0]) == {"id", "problem", "answer"}


def test_openr1_schema_and_alignment(small):
    want = {"problem", "solution", "answer", "problem_type", "question_type", "source", "uuid", "is_reasoning_complete",
            "generations", "correctness_math_verify", "correctness_llama", "finish_reasons", "correctness_count", "messages",
            "problem_is_valid"}
    for r in small[0]:
        assert set(r) == want and r["source"] == "synthetic" and r["problem_is_valid"] == "yes"
        n = len(r["generations"])
        assert n == 4 and all(len(r[k]) == n for k in ("is_reasoning_complete", "correctness_math_verify", "correctness_llama", "finish_reasons"))
        assert r["correctness_count"] == sum(r["correctness_math_verify"])


def _word_answer(text: str) -> Fraction:
    """Recompute a word problem's answer from its text alone (independent of the generator's bookkeeping)."""
    import re

    sents = text.split(". ")
    x = Fraction(int(re.search(r"has (\d+)", sents[0]).group(1)))
    for s in sents[1:]:
        if m := re.search(r"buys (\d) boxes of (\d)", s):
            x += int(m[1]) * int(m[2])
        elif m := re.search(r"sells (\d) bags of (\d)", s):
            x -= int(m[1]) * int(m[2])
        elif m := re.search(r"gives away (\d)", s):
            x -= int(m[1])
        elif m := re.search(r"finds (\d) more", s):
            x += int(m[1])
        elif m := re.search(r"into (\d) equal", s):
            x /= int(m[1])
        elif "doubles" in s:
            x *= 2
    return x


def test_answers_are_exact_and_values_bounded(small):
    import re

    for r in small[0]:
        if r["problem_type"] == "Algebra":
            a, sign, b, c = re.search(r"(\d)x ([+-]) (\d+) = (\d+)", r["problem"]).groups()
            x = Fraction(int(c) - int(b) if sign == "+" else int(c) + int(b), int(a))
        else:
            x = _word_answer(r["problem"])
        assert x.denominator == 1 and str(x.numerator) == r["answer"]
        ok = next(g for g, c in zip(r["generations"], r["correctness_math_verify"], strict=True) if c) if any(r["correctness_math_verify"]) else None
        if ok and r["problem_type"] != "Algebra":
            vals = [int(v) for v in re.findall(r"= (-?\d+)\n", ok)]
            assert all(1 <= v <= SMALL.max_value for v in vals) and 2 <= len(vals) <= 4


def test_error_kinds_present_and_labels_true():
    rng = random.Random(0)
    p = synth.word_problem(rng, 3, 99)
    seen = {}
    for kind in ["correct", *synth.ERROR_WEIGHTS]:
        t = synth.make_trace(p, kind, rng, equiv_rate=0.0)
        seen[kind] = t
        value = last_boxed(t["text"])
        assert t["correct"] == (value is not None and Fraction(value) == p.answer)
    assert seen["correct"]["correct"] and seen["correct"]["finish"] == "stop"
    assert seen["truncated"]["finish"] == "length" and "\\boxed" not in seen["truncated"]["text"] and "</think>" not in seen["truncated"]["text"]


def test_error_distribution_matches_config():
    cfg = SynthConfig(n_train=1500, n_val=0, n_test=0, seed=1)
    train, _, _ = synth.generate(cfg)
    flags = [c for r in train for c in r["correctness_math_verify"]]
    wrong = 1 - sum(flags) / len(flags)
    assert abs(wrong - cfg.error_rate) < 0.04  # cancelling slips are labelled correct, so slightly below
    cut = sum(f == "length" for r in train for f in r["finish_reasons"]) / len(flags)
    assert abs(cut - cfg.error_rate * synth.ERROR_WEIGHTS["truncated"] / sum(synth.ERROR_WEIGHTS.values())) < 0.02
    judge = sum(a != b for r in train for a, b in zip(r["correctness_math_verify"], r["correctness_llama"], strict=True)) / len(flags)
    assert 0.01 < judge < 0.06


def test_equivalent_forms_need_the_grader():
    rng = random.Random(5)
    p = synth.algebra_problem(rng, 99)
    forms = {synth.equivalent_form(p.answer, "algebra", rng) for _ in range(40)}
    assert len(forms) == 3 and str(p.answer) not in forms
    assert all(grade(f"\\boxed{{{f}}}", str(p.answer)) for f in forms)


def test_grader_agrees_with_synthetic_truth(small):
    items, truth = [], []
    for r in small[0][:150]:
        for g, c in zip(r["generations"], r["correctness_math_verify"], strict=True):
            items.append((g, r["answer"]))
            truth.append(c)
    assert grade_many(items, workers=2, progress=False) == truth


# ----------------------------------------------------------------------------- style: terse / realistic

TERSE_SHA256 = {  # sha256 of json.dumps(synth.generate(cfg), sort_keys=True), computed before synth.style existed
    7: "3bc9f34429ef9444bcfd745e6cf03b7fb39895becef53a56bd3925233eecd059",  # n_train=20, n_val=3, n_test=3
    0: "94321803fd599a1263e51a2cdc1bcf5aa41fa15efd05155cd817203f36c2a520",  # n_train=50, n_val=5, n_test=5, 8 traces
}
REAL = SynthConfig(n_train=150, n_val=10, n_test=10, traces_per_problem=4, max_steps=3, seed=3, style="realistic")
OPENR1_COLUMNS = {"problem", "solution", "answer", "problem_type", "question_type", "source", "uuid", "is_reasoning_complete",
                  "generations", "correctness_math_verify", "correctness_llama", "finish_reasons", "correctness_count",
                  "messages", "problem_is_valid"}


def _sha(cfg: SynthConfig) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(synth.generate(cfg), sort_keys=True).encode()).hexdigest()


def test_terse_is_byte_identical_to_the_teacher_before_styles():
    assert _sha(SynthConfig(n_train=20, n_val=3, n_test=3, seed=7)) == TERSE_SHA256[7]
    assert _sha(SynthConfig(n_train=50, n_val=5, n_test=5, traces_per_problem=8, seed=0, style="terse")) == TERSE_SHA256[0]


def test_style_config_is_strict_and_terse_keys_unchanged():
    from pydantic import ValidationError

    from redi.config.data import DataConfig

    with pytest.raises(ValidationError, match="style"):
        SynthConfig(style="verbose")
    assert "style" not in DataConfig().hash_fields()["synth"]  # demo/study keys as before the field existed
    assert DataConfig(synth={"style": "realistic"}).hash_fields()["synth"]["style"] == "realistic"


@pytest.fixture(scope="module")
def realistic():
    return synth.generate(REAL)


def test_realistic_rows_are_openr1_rows_of_the_same_problems(realistic):
    train, val, test = realistic
    terse = synth.generate(REAL.model_copy(update={"style": "terse"}))
    assert [r["problem"] for r in train] == [r["problem"] for r in terse[0]]
    assert (val, test) == (terse[1], terse[2])
    for r in train:
        assert set(r) == OPENR1_COLUMNS and len(r["generations"]) == 4
        assert all(len(r[k]) == 4 for k in ("is_reasoning_complete", "correctness_math_verify", "correctness_llama", "finish_reasons"))
        assert r["correctness_count"] == sum(r["correctness_math_verify"])
        for g, done, fin in zip(r["generations"], r["is_reasoning_complete"], r["finish_reasons"], strict=True):
            assert g.startswith("<think>\n")
            if fin == "length":
                assert not done and "\\boxed" not in g and "</think>" not in g
            else:
                assert done and fin == "stop" and g.count("</think>") == 1 and last_boxed(g.split("</think>")[1]) is not None


def test_realistic_is_deterministic_per_seed(realistic):
    assert json.dumps(synth.generate(REAL), sort_keys=True) == json.dumps(realistic, sort_keys=True)
    other = synth.generate(REAL.model_copy(update={"seed": 4}))
    assert json.dumps(other[0][:5]) != json.dumps(realistic[0][:5])


def test_realistic_traces_grade_as_labelled(realistic):
    items, truth = [], []
    for r in realistic[0]:
        for g, c in zip(r["generations"], r["correctness_math_verify"], strict=True):
            items.append((g, r["answer"]))
            truth.append(c)
    assert 0.2 < 1 - sum(truth) / len(truth) < REAL.error_rate + 0.03  # a few slips are caught and fixed
    assert grade_many(items, workers=2, progress=False) == truth


def test_realistic_pairs_diverge_like_real_samples(realistic):
    """Within 10 points of the real medians (Qwen2.5-Math CoT: REDI pair 47.5 %, two right samples 12.7 %);
    the terse teacher's pairs are near copies."""
    from redi.divergence import openr1_problems, pair_divergence

    d = pair_divergence(openr1_problems(realistic[0]))
    assert d.first_wrong.problems >= 60 and d.second_right.problems >= 60
    assert 0.375 <= d.first_wrong.median <= 0.575, d.first_wrong.fmt()
    assert 0.027 <= d.second_right.median <= 0.227, d.second_right.fmt()
    terse = pair_divergence(openr1_problems(synth.generate(REAL.model_copy(update={"style": "terse"}))[0]))
    assert terse.first_wrong.median < 0.1 and terse.second_right.median < 0.02


def test_realistic_variety_within_a_problem(realistic):
    """Right traces of a problem share its habit but are not copies; strategies and detours all occur."""
    texts = [g for r in realistic[0] for g in r["generations"]]
    distinct_right = [len({g for g, c in zip(r["generations"], r["correctness_math_verify"], strict=True) if c}) for r in realistic[0]]
    assert sum(n > 1 for n in distinct_right) > 0.4 * len(distinct_right)
    for marker in ("As one expression", "The events, in order", "gains first", "Maybe I can guess", "Wait, let me", "Checking backwards",
                   "Let me check by substituting"):
        assert any(marker in t for t in texts), marker


def test_early_errors_carry_to_the_boxed_answer():
    """A slip, misconception or sign error changes every later intermediate and the final answer; most hit early steps."""
    from redi import synth_realistic as sr

    rng = random.Random(11)
    first_bad = []
    for _ in range(300):
        p = synth.word_problem(rng, 3, 99)
        right = sr.walk(p, "correct", rng)
        assert right[-1].y == p.answer
        for kind in ("slip", "misconception", "sign"):
            done = sr.walk(p, kind, rng)
            diff = [a.y != b.y for a, b in zip(done, right, strict=True)]
            if not any(diff):  # the wrong rule happens to give the right value here (2 doubled = 2 + 2)
                continue
            i = diff.index(True)
            assert all(diff[i:]) and done[-1].y != p.answer, (kind, p.text)
            first_bad.append(i)
    assert first_bad.count(0) > first_bad.count(2) * 1.5


def test_a_caught_slip_is_fixed_and_labelled_right():
    """A detour that notices a slip redoes the step; the trace then boxes the right answer and is labelled right."""
    from redi import synth_realistic as sr

    rng = random.Random(2)
    fixed = []
    for _ in range(400):
        p = synth.word_problem(rng, 3, 99)
        t = sr.make_trace(p, "slip", {}, rng, 0.0)
        if "arithmetic slip" in t["text"]:
            fixed.append((t, p.answer))
    assert len(fixed) > 20
    assert all(t["correct"] and t["finish"] == "stop" and Fraction(last_boxed(t["text"])) == a for t, a in fixed)


# ----------------------------------------------------------------------------- pair divergence

REAL_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "qwen25math_cot_samples" / "test.jsonl"


def test_unmatched_share_on_literals():
    from redi.divergence import Summary, problem_shares, unmatched_share

    assert unmatched_share("abcd", "abxd") == pytest.approx(0.25)  # blocks "ab" + "d": 3 of 4 matched
    assert unmatched_share("abcd", "abcdefgh") == pytest.approx(0.5)  # measured on the compared sample's length
    assert unmatched_share("abc", "xyz") == 1.0 and unmatched_share("abc", "") == 0.0
    # first right = "abcd"; wrong samples in order, the None-labelled one skipped; the first right is not compared with itself
    wrong, right = problem_shares(["zz", "abcd", "abxd", "q", "abcd"], [False, True, None, False, True])
    assert wrong == [1.0, 1.0] and right == [0.0]
    assert problem_shares(["a", "b"], [False, None]) == ([], [])
    with pytest.raises(ValueError, match="one label per sample"):
        problem_shares(["a", "b"], [True])
    s = Summary.of([0.1, 0.2, 0.3, 0.4, 0.5], 3)
    assert (s.n, s.problems, s.median, s.q1, s.q3) == (5, 3, 0.3, 0.2, 0.4)


@pytest.mark.skipif(not REAL_SAMPLES.exists(), reason=f"real samples not found at {REAL_SAMPLES} (optional data)")
def test_real_samples_give_the_quoted_figures():
    """The real figures the synthetic teacher is tuned against (one pair per problem: 105 comparisons, ~4 s)."""
    from redi.divergence import jsonl_problems, pair_divergence

    d = pair_divergence(jsonl_problems(REAL_SAMPLES), pooled=False)
    assert (d.first_wrong.problems, d.second_right.problems) == (10, 95)
    assert d.first_wrong.median == pytest.approx(0.475, abs=0.005) and d.second_right.median == pytest.approx(0.127, abs=0.005)
    assert d.wrong_vs_right is None


def test_divergence_of_a_download_artifact_matches_the_rows(tmp_path):
    """Any teacher is measured from its traces.parquet; for the synthetic one that gives the rows' figures."""
    from redi.config.data import DataConfig
    from redi.data import download
    from redi.divergence import openr1_problems, pair_divergence, traces_problems

    cfg = DataConfig(synth=REAL.model_copy(update={"n_train": 40, "n_val": 0, "n_test": 0}))
    download(cfg, tmp_path, progress=False)
    from_rows = pair_divergence(openr1_problems(synth.generate(cfg.synth)[0]))
    assert pair_divergence(traces_problems(tmp_path / "traces.parquet")) == from_rows
    assert from_rows.first_wrong.n > 10

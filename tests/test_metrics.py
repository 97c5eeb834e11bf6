"""redi.metrics on hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from redi.metrics import (
    benchmark_metrics,
    length_stats,
    macro_average,
    majority_correct,
    normalize_answer,
    pass1_sem,
    pass_at_k,
)

T, F = True, False


def test_pass_at_k_hand_values():
    assert pass_at_k(3, 1, 1) == pytest.approx(1 / 3)
    assert pass_at_k(3, 1, 2) == pytest.approx(1 - 1 / 3)  # 1 - C(2,2)/C(3,2)
    assert pass_at_k(3, 2, 2) == 1.0  # n - c < k
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(16, 4, 4) == pytest.approx(1 - math.comb(12, 4) / math.comb(16, 4))
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


def test_pass1_sem_matches_paper_formula_ddof0():
    c = np.array([[1, 0, 1], [0, 0, 1]], dtype=float)
    p1, sem, per_index = pass1_sem(c)
    assert p1 == 0.5
    assert per_index == [0.5, 0.0, 1.0]
    # std (ddof=0) of [0.5, 0, 1] = sqrt(1/6); / sqrt(3)
    assert sem == pytest.approx(math.sqrt(1 / 6) / math.sqrt(3))
    assert pass1_sem(np.array([[1.0], [0.0]]))[1] == 0.0


def test_benchmark_metrics_hand_computed():
    verdicts = [[T, F, T], [F, None, T]]
    answers = [["4", "5", "4"], ["7", None, "\\dfrac{1}{2}"]]
    finish = [["stop", "stop", "length"], ["stop", "length", "stop"]]
    m = benchmark_metrics(verdicts, answers, finish, maj_ks=[1, 2])
    assert m["n_total"] == 6 and m["n_correct"] == 3
    assert m["pass@1"] == 0.5
    assert m["pass@2"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert m["pass@3"] == 1.0
    assert m["maj@1"] == 0.5  # first samples: T, F
    assert m["maj@2"] == 0.5  # p1 tie 4/5 -> "4" (T); p2 "7" alone votes (F)
    assert m["maj@3"] == 0.5  # p1 "4" x2 (T); p2 tie 7 / 1/2 -> "7" (F)
    assert m["n_no_answer"] == 1 and m["no_answer_share"] == pytest.approx(1 / 6)
    assert m["n_truncated"] == 2 and m["truncated_share"] == pytest.approx(2 / 6)
    assert m["n_ungraded"] == 1 and m["ungraded_share"] == pytest.approx(1 / 6)


def test_ungraded_stays_in_denominator():
    m = benchmark_metrics([[None, None], [T, T]], [["1", "1"], ["2", "2"]], [["stop"] * 2] * 2)
    assert m["pass@1"] == 0.5 and m["n_total"] == 4


def test_majority_ties_and_no_answers():
    assert majority_correct([None, None], [T, T]) is False
    assert majority_correct(["a", "b", "b"], [T, F, F]) is False
    assert majority_correct(["a", "b", "a"], [T, F, F]) is True
    assert majority_correct(["\\frac{1}{2}", " \\dfrac{1}{2} ", "3"], [F, T, T]) is False  # first of group


def test_shapes_must_match():
    with pytest.raises(ValueError, match="same"):
        benchmark_metrics([[T, F], [T]], [["1", "2"], ["1"]], [["stop"] * 2, ["stop"]])
    with pytest.raises(ValueError, match="empty"):
        benchmark_metrics([], [], [])


def test_normalize():
    assert normalize_answer(" \\left( 1, 2 \\right) ") == "(1,2)"
    assert normalize_answer("\\text{Monday}") == "Monday"
    assert normalize_answer("5.") == "5"
    assert normalize_answer("  ") is None


def test_macro_average():
    a = benchmark_metrics([[T, F], [T, T]], [["1", "2"]] * 2, [["stop"] * 2] * 2)  # per-index [1, .5]
    b = benchmark_metrics([[F, F]], [["1", "1"]], [["stop"] * 2])  # per-index [0, 0]
    avg = macro_average({"a": a, "b": b})
    assert avg["pass@1"] == pytest.approx((0.75 + 0.0) / 2)
    assert avg["pass@2"] == pytest.approx((1.0 + 0.0) / 2)
    # per-index averaged: [0.5, 0.25] -> std 0.125 / sqrt(2)
    assert avg["pass@1_sem"] == pytest.approx(0.125 / math.sqrt(2))
    assert avg["n_benchmarks"] == 2


def test_length_stats_hand_computed():
    toks = [10, 20, 30, 40, 100]
    m = length_stats(toks, ["stop", "stop", "stop", "stop", "length"])
    assert m["completion_tokens_mean"] == 40.0 and m["completion_tokens_p50"] == 30.0
    assert m["completion_tokens_p90"] == pytest.approx(76.0)  # linear: 40 + 0.6 * (100 - 40)
    assert m["truncated_share"] == 0.2
    with pytest.raises(ValueError, match="token counts but"):
        length_stats([1, 2], ["stop"])
    with pytest.raises(ValueError, match="empty"):
        length_stats([], [])


def test_macro_average_of_lengths_takes_means_not_percentiles():
    a = {**benchmark_metrics([[T]], [["1"]], [["stop"]]), **length_stats([10], ["stop"])}
    b = {**benchmark_metrics([[F]], [["2"]], [["length"]]), **length_stats([30], ["length"])}
    avg = macro_average({"a": a, "b": b})
    assert avg["completion_tokens_mean"] == 20.0 and avg["truncated_share"] == 0.5
    assert "completion_tokens_p90" not in avg  # a mean of p90s is no p90

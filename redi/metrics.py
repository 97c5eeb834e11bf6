"""Evaluation metrics: pure functions of per-sample verdicts, extracted answers and finish reasons.

Inputs are per benchmark, one row per problem and one column per sample index (``(P, n)``).

- **pass@1** = mean correctness over all P x n samples. Its **SEM** follows the paper and its official
  code (``rllm/verl/verl/trainer/main_generation.py``: ``np.std(np.mean(scores, axis=0)) / sqrt(n)``):
  score the benchmark once per sample index j (s_j = mean over problems of sample j), then
  ``SEM = std(s_1..s_n) / sqrt(n)`` with **ddof=0** (numpy's default, which that code uses). We keep
  ddof=0 so our error bars are comparable with the paper's Table 1; ddof=1 (the unbiased variance)
  would be larger by ``sqrt(n / (n - 1))`` (3 % at n=16, 15 % at n=4). With n=1 the SEM is 0.
- **pass@k** for every k <= n: the unbiased estimator of Chen et al. (2021),
  ``1 - C(n-c, k) / C(n, k)`` per problem (c = correct samples of that problem), averaged over problems.
  pass@n is "any sample correct" (the paper's pass@16).
- **maj@k**: majority vote over the extracted answers of the FIRST k samples of each problem (sample
  index order, so it is deterministic). Answers are equal when their normalised strings
  (:func:`normalize_answer`) are equal; samples with no extractable answer do not vote; ties go to the
  answer seen first. The vote is correct when the winning group's first sample was graded correct.
  A problem where no sample has an answer counts as wrong.
- **no_answer**: share of samples with no extractable final answer (``redi.grader.last_boxed`` finds no
  ``\\boxed{}``; the extraction is the grader's own, done by ``redi.evaluate``).
- **truncated**: share of samples that hit the token limit (finish reason ``length``).
- **response length** (:func:`length_stats`): mean, median (p50) and 90th percentile (p90, linear
  interpolation, numpy's default) of the completion tokens over all P x n samples, beside the truncated
  share. The paper reports mean response length; the percentiles show whether a change in the mean is a
  shift of the whole distribution or a tail of samples running into the token limit.
- **ungraded**: share of samples the grader could not judge (verdict None: grader timeout or gold
  that does not parse). They stay in every denominator and count as wrong.

Averages are macro averages over benchmarks (each benchmark weighs the same, as the paper's "Avg"
column). The average's SEM uses the per-sample-index scores averaged over benchmarks when every
benchmark has the same n.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

SEM_DDOF = 0
"""ddof of the std in the pass@1 SEM: 0, as the paper's official evaluation code (np.std default)."""


# ---------------------------------------------------------------- answer normalisation (voting only)


_NORM_DROP = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\$|\s+")


def normalize_answer(ans: str | None) -> str | None:
    """Exact-string normalisation for majority voting: drop spaces, ``$``, ``\\left``/``\\right`` and thin
    spaces, map ``\\dfrac``/``\\tfrac`` to ``\\frac``, strip a trailing period and a ``\\text{...}`` wrapper."""
    if ans is None:
        return None
    s = ans.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _NORM_DROP.sub("", s).rstrip(".")
    m = re.fullmatch(r"\\text\{(.*)\}", s)
    s = m.group(1) if m else s
    return s or None


# ---------------------------------------------------------------- pure metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k)."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"correct count c={c} outside [0, n={n}]")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass1_sem(correct: np.ndarray) -> tuple[float, float, list[float]]:
    """(pass@1, SEM, per-sample-index scores) of a (P, n) 0/1 matrix (paper's SEM, ddof=0)."""
    per_index = correct.mean(axis=0)  # (n,)
    n = correct.shape[1]
    sem = float(np.std(per_index, ddof=SEM_DDOF) / math.sqrt(n)) if n > 1 else 0.0
    return float(correct.mean()), sem, [float(x) for x in per_index]


def majority_correct(answers: Sequence[str | None], verdicts: Sequence[bool]) -> bool:
    """Is the majority answer (normalised exact string; first-seen wins ties) graded correct?"""
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(answers):
        key = normalize_answer(a)
        if key is not None:
            groups.setdefault(key, []).append(i)
    if not groups:
        return False
    best = max(groups.values(), key=len)  # dict order = first seen, max keeps the first of equals
    return bool(verdicts[best[0]])


def _as_matrix(rows: Sequence[Sequence], what: str) -> list[list]:
    if not rows:
        raise ValueError(f"no problems to score ({what} is empty)")
    n = len(rows[0])
    if n == 0 or any(len(r) != n for r in rows):
        raise ValueError(f"every problem needs the same, non-zero number of samples ({what})")
    return [list(r) for r in rows]


def benchmark_metrics(
    verdicts: Sequence[Sequence[bool | None]],
    answers: Sequence[Sequence[str | None]],
    finish_reasons: Sequence[Sequence[str | None]],
    maj_ks: Sequence[int] = (),
) -> dict:
    """Every metric of one benchmark from (P, n) verdicts (None = ungraded, counts wrong), answers, finish reasons.

    pass@k is reported for every k <= n; maj@k for each k in `maj_ks` (<= n) and for k = n.
    """
    v = _as_matrix(verdicts, "verdicts")
    a = _as_matrix(answers, "answers")
    f = _as_matrix(finish_reasons, "finish_reasons")
    n_prob, n = len(v), len(v[0])
    if (len(a), len(a[0])) != (n_prob, n) or (len(f), len(f[0])) != (n_prob, n):
        raise ValueError("verdicts, answers and finish_reasons must have the same (problems, samples) shape")
    correct = np.array([[x is True for x in row] for row in v], dtype=float)
    p1, sem, per_index = pass1_sem(correct)
    counts = correct.sum(axis=1).astype(int)
    out: dict = {
        "n_problems": n_prob,
        "n_samples": n,
        "n_total": n_prob * n,
        "n_correct": int(correct.sum()),
        "pass@1": p1,
        "pass@1_sem": sem,
        "pass@1_per_index": per_index,
    }
    for k in range(2, n + 1):
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in counts]))
    for k in sorted({k for k in maj_ks if 1 <= k <= n} | {n}):
        out[f"maj@{k}"] = float(np.mean([majority_correct(a[i][:k], correct[i, :k]) for i in range(n_prob)]))
    out.update(_shares("no_answer", sum(normalize_answer(x) is None for row in a for x in row), n_prob * n))
    out.update(_shares("truncated", sum(x == "length" for row in f for x in row), n_prob * n))
    out.update(_shares("ungraded", sum(x is None for row in v for x in row), n_prob * n))
    return out


def length_stats(completion_tokens: Sequence[int], finish_reasons: Sequence[str | None]) -> dict:
    """Response-length statistics of one benchmark (or one model's samples): mean, p50, p90 of the completion
    tokens and the share that hit the token limit (finish reason ``length``)."""
    if len(completion_tokens) != len(finish_reasons):
        raise ValueError(f"{len(completion_tokens)} token counts but {len(finish_reasons)} finish reasons")
    if not len(completion_tokens):
        raise ValueError("no samples to measure (completion_tokens is empty)")
    t = np.asarray(completion_tokens, dtype=float)
    return {"completion_tokens_mean": float(t.mean()), "completion_tokens_p50": float(np.percentile(t, 50)),
            "completion_tokens_p90": float(np.percentile(t, 90)),
            "truncated_share": sum(r == "length" for r in finish_reasons) / len(t)}


def _shares(name: str, count: int, total: int) -> dict:
    return {f"n_{name}": int(count), f"{name}_share": count / total if total else 0.0}


def macro_average(per_benchmark: dict[str, dict]) -> dict:
    """Unweighted mean over benchmarks of every rate metric they all have (the paper's "Avg" column).

    The SEM of the averaged pass@1 uses per-sample-index scores averaged across benchmarks (needs equal n);
    otherwise it is the root-mean-square of the benchmark SEMs divided by the number of benchmarks.
    """
    if not per_benchmark:
        return {}
    mets = list(per_benchmark.values())
    rate_keys = [k for k in mets[0] if (k.startswith(("pass@", "maj@", "completion_tokens_mean")) or k.endswith("_share"))
                 and not k.endswith(("_sem", "_per_index"))]
    common = [k for k in rate_keys if all(k in m for m in mets)]
    out: dict = {k: float(np.mean([m[k] for m in mets])) for k in common}
    out["n_benchmarks"] = len(mets)
    ns = {m["n_samples"] for m in mets}
    if len(ns) == 1:
        per_index = np.mean([m["pass@1_per_index"] for m in mets], axis=0)
        n = len(per_index)
        out["pass@1_sem"] = float(np.std(per_index, ddof=SEM_DDOF) / math.sqrt(n)) if n > 1 else 0.0
    else:
        out["pass@1_sem"] = float(math.sqrt(sum(m["pass@1_sem"] ** 2 for m in mets)) / len(mets))
    return out

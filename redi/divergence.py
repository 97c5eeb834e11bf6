"""How different a problem's samples are from each other: the pair-divergence measurement.

For each problem with at least one right sample, every wrong sample is compared with the problem's
first right sample (``wrong_vs_right``), and every later right sample with the first right one
(``right_vs_right``). The measure is the **unmatched share** of the compared sample:
``1 - matched characters / len(other)``, where the matched characters are the sum of the matching
blocks of ``difflib.SequenceMatcher(None, first_right, other, autojunk=False)``. 0 means every
character of ``other`` lies in a block shared with the first right sample (a one-character edit
of it); 1 means nothing in common.

Two summaries of each (median and quartiles): one pair per problem (the first wrong, or the
second right, sample against the first right one), and every compared sample pooled (not averaged
per problem first). REDI's pairs are (first correct, first incorrect) traces of a problem
(docs/data.md); this measures how much of a negative the positive already explains, which the
paper's data (long, exploratory R1 traces) and a templated synthetic teacher differ on.
"""

from __future__ import annotations

import difflib
import json
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


def unmatched_share(first_right: str, other: str) -> float:
    """``1 - matched characters / len(other)`` against `first_right` (0.0 for an empty `other`)."""
    if not other:
        return 0.0
    sm = difflib.SequenceMatcher(None, first_right, other, autojunk=False)
    matched = sum(b.size for b in sm.get_matching_blocks())
    return 1.0 - matched / len(other)


def problem_shares(samples: Sequence[str], correct: Sequence[bool | None], first_only: bool = False) -> tuple[list[float], list[float]]:
    """(wrong-vs-first-right shares, right-vs-first-right shares) of one problem's samples, in sample order.

    A problem without a right sample gives nothing; a sample labelled ``None`` (not judged) is skipped.
    `first_only`: the first wrong and the second right sample only (the comparisons are the slow part).
    """
    if len(samples) != len(correct):
        raise ValueError(f"divergence: {len(samples)} samples but {len(correct)} labels; give one label per sample")
    first = next((i for i, c in enumerate(correct) if c is True), None)
    if first is None:
        return [], []
    ref = samples[first]
    wrong = [s for s, c in zip(samples, correct, strict=True) if c is False]
    right = [s for i, (s, c) in enumerate(zip(samples, correct, strict=True)) if c is True and i != first]
    if first_only:
        wrong, right = wrong[:1], right[:1]
    return [unmatched_share(ref, s) for s in wrong], [unmatched_share(ref, s) for s in right]


@dataclass(frozen=True)
class Summary:
    """Median and quartiles of pooled shares, over `n` compared samples from `problems` problems."""

    n: int
    problems: int
    median: float
    q1: float
    q3: float

    @classmethod
    def of(cls, shares: list[float], problems: int) -> Summary:
        if not shares:
            return cls(0, problems, float("nan"), float("nan"), float("nan"))
        if len(shares) == 1:
            return cls(1, problems, shares[0], shares[0], shares[0])
        q1, med, q3 = statistics.quantiles(shares, n=4, method="inclusive")
        return cls(len(shares), problems, med, q1, q3)

    def fmt(self) -> str:
        """``47.1 % [IQR 35.2-58.0], 17 samples / 10 problems``."""
        if not self.n:
            return f"- (no pairs; {self.problems} problems)"
        return f"{100 * self.median:.1f} % [IQR {100 * self.q1:.1f}-{100 * self.q3:.1f}], {self.n} samples / {self.problems} problems"


@dataclass(frozen=True)
class PairDivergence:
    """Summaries of a set of problems: one pair per problem, and every sample pooled.

    ``first_wrong``: the first wrong sample against the first right one (REDI's pair; the figures the
    study quotes); ``second_right``: the second right sample against the first. ``wrong_vs_right`` and
    ``right_vs_right`` pool every wrong / every later right sample of each problem (None: not measured).
    """

    first_wrong: Summary
    second_right: Summary
    wrong_vs_right: Summary | None
    right_vs_right: Summary | None


def pair_divergence(problems: Iterable[tuple[Sequence[str], Sequence[bool | None]]], pooled: bool = True) -> PairDivergence:
    """Pair divergence of problems given as ``(samples, labels)``; a summary's `problems` counts those that contribute.

    `pooled=False` measures one pair of each kind per problem only (for 100 real problems x 8: 105
    comparisons instead of 672).
    """
    wrong: list[list[float]] = []
    right: list[list[float]] = []
    for samples, correct in problems:
        w, r = problem_shares(samples, correct, first_only=not pooled)
        if w:
            wrong.append(w)
        if r:
            right.append(r)
    pooled_wrong = Summary.of([x for w in wrong for x in w], len(wrong)) if pooled else None
    pooled_right = Summary.of([x for r in right for x in r], len(right)) if pooled else None
    return PairDivergence(Summary.of([w[0] for w in wrong], len(wrong)), Summary.of([r[0] for r in right], len(right)),
                          pooled_wrong, pooled_right)


def openr1_problems(rows: Iterable[dict]) -> Iterator[tuple[list[str], list[bool]]]:
    """``(generations, correctness_math_verify)`` of Open-R1-schema rows (the synthetic teacher's output)."""
    for r in rows:
        yield r["generations"], r["correctness_math_verify"]


def jsonl_problems(path: str | Path) -> Iterator[tuple[list[str], list[bool]]]:
    """``(generations, labels)`` of a jsonl file of labelled samples: ``correctness`` (Qwen2.5-Math's
    sampled-CoT files) or ``correctness_math_verify`` (Open-R1) per row."""
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            labels = row.get("correctness", row.get("correctness_math_verify"))
            if "generations" not in row or labels is None:
                raise ValueError(f"{path}:{n}: a row needs `generations` and `correctness` (or `correctness_math_verify`)")
            yield row["generations"], labels


def traces_problems(path: str | Path, label: str = "label_math_verify") -> Iterator[tuple[list[str], list[bool | None]]]:
    """``(traces, labels)`` per problem of a download artifact's ``traces.parquet`` (any source, the
    ``generate`` teacher's included), in ``gen_index`` order; `label` names the label column."""
    import pandas as pd

    df = pd.read_parquet(path, columns=["problem_id", "gen_index", "trace", label])
    for _, g in df.sort_values(["problem_id", "gen_index"]).groupby("problem_id", sort=False):
        yield g["trace"].tolist(), [None if pd.isna(v) else bool(v) for v in g[label]]

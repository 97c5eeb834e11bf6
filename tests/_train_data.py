"""Small R1-style arithmetic traces for the training tests (until/independent of redi.synth).

Helpers shared by test_tinymodel.py and test_train.py (owned by the training stages' owner).
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from redi.schema import stable_id


def _problem(rng: random.Random) -> tuple[str, list[tuple[str, int]], int]:
    """A 2-3 step word problem, its steps ("a + b = c", value) and the answer."""
    v = rng.randint(2, 30)
    text = [f"Tom has {v} apples."]
    steps = []
    for _ in range(rng.randint(2, 3)):
        op = rng.choice(["buy", "give"]) if v > 9 else "buy"
        if op == "buy":
            b, c = rng.randint(1, 4), rng.randint(2, 5)
            text.append(f"He buys {b} boxes of {c} apples.")
            steps.append((f"{v} + {b}*{c} = {v + b * c}", v + b * c))
            v = v + b * c
        else:
            d = rng.randint(1, min(9, v - 1))
            text.append(f"He gives away {d} apples.")
            steps.append((f"{v} - {d} = {v - d}", v - d))
            v = v - d
    text.append("How many apples does he have now?")
    return " ".join(text), steps, v


def trace_text(steps: list[tuple[str, int]], answer: int) -> str:
    body = "\n".join(f"step {i + 1}: {s}" for i, (s, _) in enumerate(steps))
    return f"<think>\n{body}\n</think>\nThe answer is \\boxed{{{answer}}}."


def make_traces(n_problems: int = 60, per_problem: int = 2, seed: int = 0) -> pd.DataFrame:
    """TRACE_COLUMNS-like rows: gen 0 correct, gen 1 a wrong final answer (+1 slip)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_problems):
        problem, steps, ans = _problem(rng)
        pid = stable_id(problem)
        for g in range(per_problem):
            wrong = g % 2 == 1
            a = ans + rng.choice([1, 2, -1, 10]) if wrong else ans
            rows.append({"problem_id": pid, "row_id": stable_id(pid, g), "gen_index": g, "problem": problem,
                         "answer": str(ans), "source": "fixture", "trace": trace_text(steps, a), "wrong": wrong})
    return pd.DataFrame(rows)


def write_fixture(d: Path, n_problems: int = 60, seed: int = 0) -> dict[str, Path]:
    """traces.parquet, positives.parquet (POSITIVE_COLUMNS) and pairs.parquet (PAIR_COLUMNS) in d."""
    d.mkdir(parents=True, exist_ok=True)
    df = make_traces(n_problems, seed=seed)
    df.drop(columns=["wrong"]).to_parquet(d / "traces.parquet")
    pos = df[~df.wrong]
    pd.DataFrame({"id": pos.row_id, "problem_id": pos.problem_id, "problem": pos.problem,
                  "completion": pos.trace, "answer": pos.answer}).to_parquet(d / "positives.parquet")
    neg = df[df.wrong].set_index("problem_id")
    pairs = pd.DataFrame({"id": [stable_id(p, 0, 1) for p in pos.problem_id], "problem_id": pos.problem_id.values,
                          "problem": pos.problem.values, "chosen": pos.trace.values,
                          "rejected": neg.loc[pos.problem_id.values, "trace"].values, "answer": pos.answer.values,
                          "chosen_index": 0, "rejected_index": 1})
    pairs.to_parquet(d / "pairs.parquet")
    return {"traces": d / "traces.parquet", "positives": d / "positives.parquet", "pairs": d / "pairs.parquet"}

"""The offline synthetic teacher: Open-R1-schema rows for problems with exactly-known answers.

Two learnable families (sized for a tiny model on a CPU; docs/training.md, demo sizing):

- ``word``: 2-4 step word problems. Start value 2-30, every correct intermediate value in
  [1, max_value], second operands single-digit. Steps: buy b boxes of c, sell b bags of c, give
  away d, find d more, split into 2 or 3 equal piles and keep one, double.
- ``algebra``: one linear equation ``a x + b = c`` / ``a x - b = c`` (a 2-9, x 1-12), solved in two
  steps (isolate, divide).

Each problem gets ``traces_per_problem`` R1-style traces
``<think>\\nstep 1: 12 + 3 * 4 = 24\\n...\\n</think>\\nThe answer is \\boxed{19}.``. A trace is wrong with
probability ``error_rate``; the kind of error is drawn from ``ERROR_WEIGHTS``:

- ``slip``: one step's result off by +-1/+-2/+-10, carried forward;
- ``misconception``: one step done with a typical wrong rule (x + b + c for "b boxes of c",
  x - k for "split into k piles", x + 2 for "double", moving a constant without flipping its sign,
  dividing before subtracting), carried forward — the informative negatives;
- ``wrong_final``: every step right except the last (a slip, or boxing the value before the last step);
- ``sign``: one step's + and - swapped, carried forward;
- ``truncated``: cut mid-step, no ``</think>``, no boxed answer (finish_reason "length").

A share ``equiv_form_rate`` of correct traces box the answer in another but equivalent form
(``\\frac{84}{2}``, ``42.0``, ``x = 42``), so a string-matching grader would mislabel them.

Labels in the rows: ``correctness_math_verify`` is the truth (final value == gold; truncated =
False), so an error that cancels out is labelled correct, as a real verifier would. The simulated
Llama judge (``correctness_llama``) flips the truth with probability ``judge_noise``, so the
``landmv`` rule differs from ``math_verify`` as in the paper's data.

``style: realistic`` writes the same problems' traces with varied wording, strategies, detours and
early errors instead (:mod:`redi.synth_realistic`); ``terse`` (the default) is the format above.

Deterministic: ``random.Random(seed)`` drives everything; the same config gives byte-identical rows.
Val/test problems carry no traces and never share a problem text with a training problem.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from .config.data import SynthConfig
from .schema import stable_id

logger = logging.getLogger(__name__)

ERROR_WEIGHTS: dict[str, float] = {"slip": 0.25, "misconception": 0.15, "wrong_final": 0.22, "sign": 0.19, "truncated": 0.19}
"""Relative shares of the error kinds among wrong traces (pilot: slip 12.5%, final 9%, sign 6.7%, cut 7% of all)."""

NAMES = ["Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben"]
ITEMS = ["marbles", "apples", "stickers", "coins", "cards", "shells"]


@dataclass(frozen=True)
class Step:
    """One reasoning step: text in the problem, and how a solver (right or wrong) computes it."""

    phrase: str  # problem sentence
    op: str  # "+", "-", "*", "/"
    operand: Fraction  # the right-hand number written in the trace
    shown: str  # how the operand is written in the trace (e.g. "3 * 4")
    wrong_rule: Callable[[Fraction], tuple[str, str, Fraction]] | None = None  # misconception: (op, shown, value)

    def apply(self, x: Fraction, op: str | None = None) -> Fraction:
        o = op or self.op
        return {"+": x + self.operand, "-": x - self.operand, "*": x * self.operand, "/": x / self.operand}[o]


@dataclass(frozen=True)
class Problem:
    """A problem with its exact answer and the steps that reach it from ``start``."""

    family: str
    text: str
    start: Fraction
    steps: tuple[Step, ...]
    answer: Fraction
    first_line: str  # trace line before the steps, "{op}" = the first step's operation as done ("" for word problems)


def fmt(v: Fraction) -> str:
    """Exact value as the trace writes it: integer, else a decimal rounded to 2 places."""
    if v.denominator == 1:
        return str(v.numerator)
    return f"{float(v):.2f}".rstrip("0").rstrip(".")


# ----------------------------------------------------------------------------- problems


def _word_step(rng: random.Random, x: int, max_value: int, item: str) -> tuple[Step, int] | None:
    kind = rng.choice(["buy", "sell", "give", "find", "split", "double"])
    b, c = rng.randint(2, 9), rng.randint(2, 9)
    d = rng.randint(1, 9)
    if kind == "buy" and x + b * c <= max_value:
        rule = lambda v, b=b, c=c: ("+", f"{b} + {c}", v + b + c)  # noqa: E731 - adds instead of multiplying
        return Step(f"buys {b} boxes of {c} {item} each", "+", Fraction(b * c), f"{b} * {c}", rule), x + b * c
    if kind == "sell" and x - b * c >= 1:
        rule = lambda v, b=b, c=c: ("-", f"{b} - {c}", v - b - c)  # noqa: E731 - subtracts b and c
        return Step(f"sells {b} bags of {c} {item} each", "-", Fraction(b * c), f"{b} * {c}", rule), x - b * c
    if kind == "give" and x - d >= 1:
        return Step(f"gives away {d} {item}", "-", Fraction(d), str(d)), x - d
    if kind == "find" and x + d <= max_value:
        return Step(f"finds {d} more {item}", "+", Fraction(d), str(d)), x + d
    if kind == "split":
        k = rng.choice([2, 3])
        if x % k == 0 and x // k >= 1:
            rule = lambda v, k=k: ("-", str(k), v - k)  # noqa: E731 - subtracts the number of piles
            return Step(f"splits the {item} into {k} equal piles and keeps one pile", "/", Fraction(k), str(k), rule), x // k
    if kind == "double" and 2 * x <= max_value:
        rule = lambda v: ("+", "2", v + 2)  # noqa: E731 - adds 2 instead of doubling
        return Step(f"doubles the {item}", "*", Fraction(2), "2", rule), 2 * x
    return None


def word_problem(rng: random.Random, n_steps: int, max_value: int) -> Problem:
    """A word problem of exactly n_steps steps with every intermediate value in [1, max_value]."""
    while True:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        x0 = rng.randint(2, min(30, max_value))
        x, steps = x0, []
        for _ in range(50 * n_steps):
            got = _word_step(rng, x, max_value, item)
            if got:
                steps.append(got[0])
                x = got[1]
                if len(steps) == n_steps:
                    break
        if len(steps) == n_steps:
            break
    sentences = [f"{name} has {x0} {item}."] + [f"Then {name} {s.phrase}." for s in steps]
    text = " ".join(sentences) + f" How many {item} does {name} have now?"
    return Problem("word", text, Fraction(x0), tuple(steps), Fraction(x), "")


def algebra_problem(rng: random.Random, max_value: int) -> Problem:
    """``a x + b = c`` or ``a x - b = c`` with integer x, solved by isolating then dividing."""
    while True:
        a, xv, b = rng.randint(2, 9), rng.randint(1, 12), rng.randint(1, 30)
        sign = rng.choice(["+", "-"])
        c = a * xv + b if sign == "+" else a * xv - b
        if 1 <= c <= max_value:
            break
    # misconception: the constant moves across "=" without its sign flipping
    keep = lambda v, b=b, s=sign: (s, str(b), v + b if s == "+" else v - b)  # noqa: E731
    iso = Step("isolate", "-" if sign == "+" else "+", Fraction(b), str(b), keep)
    div = Step("divide", "/", Fraction(a), str(a))
    text = f"Solve for x: {a}x {sign} {b} = {c}. What is x?"
    return Problem("algebra", text, Fraction(c), (iso, div), Fraction(xv), f"{a}x = {c} {{op}} {b}")


def make_problem(rng: random.Random, cfg: SynthConfig) -> Problem:
    if rng.random() < cfg.algebra_share:
        return algebra_problem(rng, cfg.max_value)
    return word_problem(rng, rng.randint(cfg.min_steps, cfg.max_steps), cfg.max_value)


# ----------------------------------------------------------------------------- traces


def _line(i: int, x: Fraction, op: str, shown: str, y: Fraction) -> str:
    return f"step {i}: {fmt(x)} {op} {shown} = {fmt(y)}"


def _flip(op: str) -> str:
    return {"+": "-", "-": "+", "*": "/", "/": "*"}[op]


def _bad_step(p: Problem, kind: str, rng: random.Random) -> int:
    """Which step an error kind corrupts (-1: none)."""
    n = len(p.steps)
    if kind == "misconception":
        return rng.choice([i for i, s in enumerate(p.steps) if s.wrong_rule] or [rng.randrange(n)])
    if kind == "sign":
        return rng.choice([i for i, s in enumerate(p.steps) if s.op in "+-"] or [rng.randrange(n)])
    return {"slip": rng.randrange(n), "wrong_final": n - 1}.get(kind, -1)


def _corrupt(s: Step, x: Fraction, kind: str, rng: random.Random) -> tuple[str, str, Fraction]:
    """(op, shown operand, result) of step `s` done wrongly in the way `kind` says."""
    if kind == "misconception" and s.wrong_rule:
        return s.wrong_rule(x)
    if kind == "sign" and s.op in "+-":
        op = _flip(s.op)
        return op, s.shown, s.apply(x, op)
    y = s.apply(x)  # slip (also the fallback): off by a typical amount, never below zero
    return s.op, s.shown, y + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if y + d >= 0])


def solve(p: Problem, kind: str, rng: random.Random) -> tuple[list[str], Fraction]:
    """The step lines and final value of one trace of `kind` (``correct`` or an error kind).

    Errors are carried forward: later steps apply the right operation to the wrong value.
    ``wrong_final`` either slips on the last step or (40%) stops before it and boxes that value.
    """
    bad = _bad_step(p, kind, rng)
    early_stop = kind == "wrong_final" and len(p.steps) > 1 and rng.random() < 0.4
    steps = p.steps[:-1] if early_stop else p.steps
    x, lines = p.start, []
    for i, s in enumerate(steps):
        op, shown, y = _corrupt(s, x, kind, rng) if i == bad else (s.op, s.shown, s.apply(x))
        if i == 0 and p.first_line:
            lines.append(p.first_line.format(op=op))
        lines.append(_line(i + 1, x, op, shown, y))
        x = y
    return lines, x


def equivalent_form(v: Fraction, family: str, rng: random.Random) -> str:
    """The answer written in another but equivalent form."""
    forms = [f"\\frac{{{2 * v.numerator}}}{{{2 * v.denominator}}}", f"{fmt(v)}.0" if v.denominator == 1 else fmt(v)]
    if family == "algebra":
        forms.append(f"x = {fmt(v)}")
    return rng.choice(forms)


def make_trace(p: Problem, kind: str, rng: random.Random, equiv_rate: float) -> dict:
    """One generation with its finish reason, completeness and truth label."""
    lines, value = solve(p, "correct" if kind == "truncated" else kind, rng)
    if kind == "truncated":
        cut = rng.randrange(len(lines))
        partial = lines[cut].split("=")[0].rstrip() if rng.random() < 0.7 else lines[cut]
        text = "<think>\n" + "\n".join(lines[:cut] + [partial])
        return {"text": text, "finish": "length", "complete": False, "correct": False}
    correct = value == p.answer
    boxed = equivalent_form(value, p.family, rng) if correct and rng.random() < equiv_rate else fmt(value)
    text = "<think>\n" + "\n".join(lines) + "\n</think>\nThe answer is \\boxed{" + boxed + "}."
    return {"text": text, "finish": "stop", "complete": True, "correct": correct}


def _kind(rng: random.Random, error_rate: float) -> str:
    if rng.random() >= error_rate:
        return "correct"
    kinds, weights = zip(*ERROR_WEIGHTS.items(), strict=True)
    return rng.choices(kinds, weights)[0]


def _uuid(*parts: object) -> str:
    return str(uuid.UUID(stable_id(*parts, n=32)))


def openr1_row(p: Problem, traces: list[dict], judge: list[bool], seed: int) -> dict:
    """A row in the OpenR1-Math-220k schema (plus problem_is_valid, as OpenR1-Math-Raw has)."""
    first_ok = next((t["text"] for t in traces if t["correct"]), None)
    return {
        "problem": p.text,
        "solution": f"The answer is ${fmt(p.answer)}$.",
        "answer": fmt(p.answer),
        "problem_type": "Algebra" if p.family == "algebra" else "Arithmetic",
        "question_type": "math-word-problem",
        "source": "synthetic",
        "uuid": _uuid("synth", seed, p.text),
        "is_reasoning_complete": [t["complete"] for t in traces],
        "generations": [t["text"] for t in traces],
        "correctness_math_verify": [t["correct"] for t in traces],
        "correctness_llama": judge,
        "finish_reasons": [t["finish"] for t in traces],
        "correctness_count": sum(t["correct"] for t in traces),
        "messages": [] if first_ok is None else [{"role": "user", "content": p.text}, {"role": "assistant", "content": first_ok}],
        "problem_is_valid": "yes",
    }


def unique_problems(cfg: SynthConfig, rng: random.Random) -> list[Problem]:
    """n_train + n_val + n_test problems with pairwise distinct texts, in generation order."""
    want = cfg.n_train + cfg.n_val + cfg.n_test
    seen: dict[str, Problem] = {}
    tries = 0
    while len(seen) < want:
        p = make_problem(rng, cfg)
        seen.setdefault(p.text, p)
        tries += 1
        if tries > 50 * want + 1000:
            raise ValueError(f"synth: only {len(seen)} distinct problems after {tries} draws; lower n_train/n_val/n_test or widen max_value/max_steps")
    return list(seen.values())


def generate(cfg: SynthConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """(train rows in the OpenR1-Math-220k schema, val benchmark rows, test benchmark rows).

    Benchmark rows are ``{id, problem, answer}``. Problem texts never repeat across the three.
    """
    rng = random.Random(cfg.seed)
    probs = unique_problems(cfg, rng)
    train_p, val_p, test_p = probs[: cfg.n_train], probs[cfg.n_train : cfg.n_train + cfg.n_val], probs[cfg.n_train + cfg.n_val :]
    train = []
    for p in train_p:
        if cfg.style == "realistic":
            from . import synth_realistic

            habit: dict[str, int] = {}
            traces = [synth_realistic.make_trace(p, _kind(rng, cfg.error_rate), habit, rng, cfg.equiv_form_rate) for _ in range(cfg.traces_per_problem)]
        else:
            traces = [make_trace(p, _kind(rng, cfg.error_rate), rng, cfg.equiv_form_rate) for _ in range(cfg.traces_per_problem)]
        judge = [t["correct"] != (rng.random() < cfg.judge_noise) for t in traces]
        train.append(openr1_row(p, traces, judge, cfg.seed))

    def bench(ps: list[Problem], split: str) -> list[dict]:
        return [{"id": f"demo_{split}-{i}", "problem": p.text, "answer": fmt(p.answer)} for i, p in enumerate(ps)]

    return train, bench(val_p, "val"), bench(test_p, "test")

"""The synthetic teacher's ``realistic`` style: traces with the variety of sampled model outputs.

The problems, error kinds, labels and row schema are :mod:`redi.synth`'s; only the traces differ.
``terse`` (``redi.synth.make_trace``) writes one fixed line per step, so a wrong trace shares ~95 %
of its characters with a right one of the same problem. Sampled traces do not: two right samples of
a real model differ in wording, and a wrong one has usually gone down another path
(docs/study.md, "How the synthetic teacher's pairs compare with real ones"). This style draws:

- **a per-problem habit**: for every choice (opening, strategy, step order, the wording of each
  step's lead, calculation and running-total sentence, verification, closing), the answer the
  teacher gives a problem by default, so its right samples agree on most of them, as a model's
  samples at temperature ~0.7 do;
- **per trace**: each choice departs from the habit with probability ``DRIFT_RIGHT`` in a right
  trace and ``DRIFT_WRONG`` in a wrong one (a wrong sample has usually taken another route: the
  modelled cause, not a measured one); exploratory detours (``wait, let me check``, an inverse
  check, second thoughts about the rule), which may catch a slip and fix it (the trace is then
  labelled right, as its final answer is);
- **strategies**: word problems as a running count, as one expression evaluated step by step, by
  restating the events first, or gains and losses first (a different step order; additive
  problems only); equations by isolating then dividing, by moving the constant, or by a
  guess-and-check start before solving;
- **errors placed early more often** (step ``i`` of ``n`` with weight ``n - i``), carried forward,
  so a wrong intermediate changes every later number and the final ``\\boxed`` answer; a
  re-verification then goes over the wrong numbers (and may claim a false check), as real
  wrong traces do.

The final answer is always in ``\\boxed{}`` (truncated traces: none, cut mid-thought), so
:mod:`redi.grader` grades these traces as it grades any other. Deterministic per seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from fractions import Fraction

from .synth import Problem, Step, equivalent_form, fmt

DRIFT_RIGHT = 0.15
"""Chance that a right trace departs from the problem's habit on any one choice."""
DRIFT_WRONG = 0.8
"""Chance that a wrong trace departs from the problem's habit on any one choice."""
DETOUR_RIGHT = 0.1
"""Chance of an exploratory detour after a step of a right trace."""
DETOUR_WRONG = 0.4
"""Chance of an exploratory detour after a step of a wrong trace."""
CATCH_SLIP = 0.5
"""Chance that a detour right after a slipped step notices and fixes the slip."""


@dataclass
class Voice:
    """The choices of one trace: the problem's habit, departed from with probability ``drift``."""

    habit: dict[str, int]
    rng: random.Random
    drift: float
    picks: dict[str, int] = field(default_factory=dict)

    def pick(self, slot: str, options: list[str] | int) -> int:
        n = options if isinstance(options, int) else len(options)
        if slot not in self.picks:
            default = self.habit.setdefault(slot, self.rng.randrange(n))
            self.picks[slot] = self.rng.randrange(n) if self.rng.random() < self.drift else default
        return self.picks[slot] % n

    def say(self, slot: str, options: list[str], **kw: object) -> str:
        """The option picked for `slot`, formatted with `kw` (given none: as written)."""
        chosen = options[self.pick(slot, options)]
        return chosen.format(**kw) if kw else chosen

    def chance(self, p: float) -> bool:
        return self.rng.random() < p


@dataclass(frozen=True)
class Done:
    """One step as the solver did it: from ``x`` by ``op`` with ``shown`` (maybe a product) to ``y``."""

    step: Step
    x: Fraction
    op: str
    shown: str
    y: Fraction
    slipped: bool = False  # the result is off although op and operand are right

    @property
    def amount(self) -> Fraction:
        """The value of ``shown`` (``3 * 4`` -> 12)."""
        return _value(self.shown)

    @property
    def compound(self) -> bool:
        return " " in self.shown


def _value(shown: str) -> Fraction:
    m = re.fullmatch(r"(\d+) ([*+]) (\d+)", shown)
    if not m:
        return Fraction(shown)
    a, b = int(m[1]), int(m[3])
    return Fraction(a * b if m[2] == "*" else a + b)


def _apply(op: str, x: Fraction, v: Fraction) -> Fraction:
    return {"+": x + v, "-": x - v, "*": x * v, "/": x / v}[op]


def _bad_index(p: Problem, kind: str, rng: random.Random) -> int:
    """Which step `kind` corrupts (-1: none); earlier steps more often (weight n - i)."""
    n = len(p.steps)
    if kind == "wrong_final":
        return n - 1
    if kind == "misconception":
        cand = [i for i, s in enumerate(p.steps) if s.wrong_rule] or list(range(n))
    elif kind == "sign":
        cand = [i for i, s in enumerate(p.steps) if s.op in "+-"] or list(range(n))
    elif kind == "slip":
        cand = list(range(n))
    else:
        return -1
    return rng.choices(cand, [n - i for i in cand])[0]


def walk(p: Problem, kind: str, rng: random.Random) -> list[Done]:
    """The steps of one trace of `kind`, errors carried forward (later steps right on a wrong value).

    ``wrong_final`` slips on the last step or (40 %) stops before it.
    """
    bad = _bad_index(p, kind, rng)
    steps = p.steps[:-1] if kind == "wrong_final" and len(p.steps) > 1 and rng.random() < 0.4 else p.steps
    x, out = p.start, []
    for i, s in enumerate(steps):
        if i != bad:
            d = Done(s, x, s.op, s.shown, s.apply(x))
        elif kind == "misconception" and s.wrong_rule:
            op, shown, y = s.wrong_rule(x)
            if op == "-" and " - " in shown:  # "x - b - c" written as taking away b + c
                shown = shown.replace(" - ", " + ")
            d = Done(s, x, op, shown, y)
        elif kind == "sign" and s.op in "+-":
            op = "-" if s.op == "+" else "+"
            d = Done(s, x, op, s.shown, _apply(op, x, _value(s.shown)))
        else:
            y = s.apply(x)
            d = Done(s, x, s.op, s.shown, y + rng.choice([v for v in (-10, -2, -1, 1, 2, 10) if y + v >= 0]), slipped=True)
        out.append(d)
        x = d.y
    return out


def _redo(steps: list[Done], i: int) -> list[Done]:
    """`steps` with step i's slip fixed and every later step recomputed from the right value."""
    out = list(steps[:i])
    x = steps[i].x
    for d in steps[i:]:
        y = _apply(d.op, x, d.amount)
        out.append(Done(d.step, x, d.op, d.shown, y))
        x = y
    return out


# ----------------------------------------------------------------------------- word problems

_EVENT = re.compile(r"^(buys|sells|gives|finds|splits|doubles)")


def _names(p: Problem) -> tuple[str, str]:
    m = re.match(r"(\w+) has \d+ (\w+)\.", p.text)
    if not m:
        raise ValueError(f"synth realistic: cannot read the name and item of {p.text!r}")
    return m[1], m[2]


LEADS = {
    "buys": ["{name} buys {b} boxes with {c} {item} in each.", "Next, {b} boxes of {c} are bought.",
             "Then come {b} boxes, {c} {item} per box.", "Buying {b} boxes of {c} {item}:"],
    "sells": ["{name} sells {b} bags of {c} {item} each.", "Then {b} bags with {c} in each are sold.",
              "Selling {b} bags of {c}:", "Next, {name} gets rid of {b} bags, {c} {item} per bag."],
    "gives": ["{name} gives away {n}.", "Then {n} {item} are given away.", "Giving away {n} {item}:", "Next, {n} fewer."],
    "finds": ["{name} finds {n} more.", "Then {n} more {item} are found.", "Finding {n} more:", "Next, {n} extra {item} turn up."],
    "splits": ["The {item} are split into {n} equal piles and {name} keeps one.", "Next, {n} equal piles, keeping just one.",
               "Splitting into {n} piles and keeping one pile:", "Then {name} divides them into {n} equal groups and keeps a single group."],
    "doubles": ["{name} doubles the {item}.", "Then the number doubles.", "Doubling:", "Next, the {item} are doubled."],
}
CALC_COMPOUND = ["That's {shown} = {amt}, so {x} {op} {amt} = {y}.", "{shown} = {amt}. {x} {op} {amt} = {y}.",
                 "So the count goes from {x} to {x} {op} {term} = {y}.", "That is {amt} {item} {dir}, which gives {x} {op} {amt} = {y}."]
CALC_SIMPLE = ["So {x} {op} {amt} = {y}.", "{x} {op} {amt} = {y}.", "Now we have {x} {op} {amt} = {y} {item}.", "That makes {x} {op} {amt}, which is {y}."]
TOTAL = ["", "", "Now {name} has {y}.", "Running total: {y}."]
OPENINGS = ["Okay, so {name} starts with {x0} {item}. Let me go through the changes one at a time.",
            "Let me figure out how many {item} {name} ends up with. At the beginning there are {x0}.",
            "We start from {x0} {item}. I'll keep a running count.",
            "First, restate: {name} has {x0} {item}, then {k} changes.",
            "Alright. Start: {x0} {item}."]
CLOSINGS = ["So {name} has \\boxed{{{a}}} {item} now.", "The answer is \\boxed{{{a}}}.", "**Answer:** \\boxed{{{a}}}",
            "Therefore, {name} ends up with \\boxed{{{a}}} {item}."]
SUMMARIES = ["", "{name} starts with {x0} {item} and after the {k} changes has {a}.", "Going event by event: {chain}."]


def _opsym(v: Voice, op: str) -> str:
    if op == "*":
        return ["*", "×", "\\times"][v.pick("times", 3)]
    if op == "/":
        return ["/", "÷"][v.pick("divide", 2)]
    return op


def _step_words(d: Done, i: int, v: Voice, name: str, item: str) -> list[str]:
    ev = _EVENT.match(d.step.phrase)[1]  # type: ignore[index]
    nums = [int(t) for t in re.findall(r"\d+", d.step.phrase)]
    b, c = (nums + [0, 0])[:2]
    n = nums[0] if nums else 2
    shown = d.shown.replace("*", _opsym(v, "*"))
    term = f"({shown})" if d.op != "+" and "+" in shown else shown  # x - (b + c), as the solver meant it
    kw = {"name": name, "item": item, "b": b, "c": c, "n": n, "x": fmt(d.x), "y": fmt(d.y), "op": _opsym(v, d.op),
          "shown": shown, "term": term, "amt": fmt(d.amount), "dir": "more" if d.op == "+" else "fewer"}
    lines = [v.say(f"lead{i}", LEADS[ev], **kw)]
    lines.append(v.say(f"calc{i}", CALC_COMPOUND if d.compound else CALC_SIMPLE, **kw))
    total = v.say(f"total{i}", TOTAL, **kw)
    return [" ".join(lines)] + ([total] if total else [])


def _detour(d: Done, v: Voice) -> tuple[list[str], bool]:
    """An exploratory aside after step `d`: (lines, whether it caught and fixed a slip)."""
    x, y, amt = fmt(d.x), fmt(d.y), fmt(d.amount)
    if d.slipped and v.chance(CATCH_SLIP):
        right = fmt(_apply(d.op, d.x, d.amount))
        return [f"Wait, let me check that. {x} {d.op} {amt} is {right}, not {y}. I made an arithmetic slip; redo from {right}."], True
    inv = {"+": "-", "-": "+", "*": "/", "/": "*"}[d.op]
    options = [f"Wait, let me double-check that: {x} {d.op} {amt} = {y}. Yes, that's right.",
               f"Hmm, let me verify by undoing it: {y} {inv} {amt} should give back {x}. It does.",
               f"Let me reread that part: {d.step.phrase}. Okay.",
               "Hold on, should this step be a different operation? No, I think that's how it works here."]
    if d.compound:
        other = d.shown.translate(str.maketrans("*+", "+*"))
        options.append(f"Hmm, is it {other} or {d.shown}? Each one holds the same number, so I'll go with {d.shown} = {amt}.")
    return [options[v.rng.randrange(len(options))]], False


def _expression(p: Problem, steps: list[Done]) -> str:
    e = fmt(p.start)
    for i, d in enumerate(steps):
        term = f"({d.shown})" if d.compound and d.op in "*/" else d.shown
        e = f"{e} {d.op} {term}"
        if i < len(steps) - 1 and d.op in "+-" and steps[i + 1].op in "*/":
            e = f"({e})"
    return e


def _gains_first(steps: list[Done], p: Problem) -> list[Done] | None:
    """Additive problems: the steps with gains before losses, if every count stays >= 0 (else None)."""
    if any(d.op not in "+-" for d in steps):
        return None
    order = [d for d in steps if d.op == "+"] + [d for d in steps if d.op == "-"]
    if order == steps:
        return None
    x, out = p.start, []
    for d in order:
        y = x + (d.y - d.x)  # keeps a slip's offset
        out.append(Done(d.step, x, d.op, d.shown, y, d.slipped))
        x = y
    return out


def word_trace(p: Problem, steps: list[Done], v: Voice, wrong: bool) -> tuple[list[str], list[str], Fraction]:
    """(thinking lines, closing lines, final value) of a word problem."""
    name, item = _names(p)
    k = len(p.steps)
    lines = [v.say("open", OPENINGS, name=name, item=item, x0=fmt(p.start), k=k)]
    strategy = v.pick("strategy", 4)
    if strategy == 3 and (reordered := _gains_first(steps, p)):
        steps = reordered
        lines.append("Adding and taking away can go in any order, so gains first, then losses.")
    if strategy == 1:
        lines.append(f"As one expression, the count is {_expression(p, steps)}. Let me evaluate it piece by piece.")
    if strategy == 2:
        lines.append("The events, in order: " + "; ".join(d.step.phrase for d in steps) + ".")
    detour_p = DETOUR_WRONG if wrong else DETOUR_RIGHT
    i = 0
    while i < len(steps):
        d = steps[i]
        lines += _step_words(d, i, v, name, item)
        if v.chance(detour_p):
            aside, fixed = _detour(d, v)
            lines += aside
            if fixed:
                steps = _redo(steps, i)
                lines.append(f"So {fmt(steps[i].x)} {steps[i].op} {fmt(steps[i].amount)} = {fmt(steps[i].y)}.")
        i += 1
    final = steps[-1].y
    chain = " → ".join([fmt(p.start)] + [fmt(d.y) for d in steps])
    check = v.pick("verify", 4)
    if check == 1:
        lines.append(f"Let me go over it once more: {chain}. Same result.")
    elif check == 2:
        back = ", ".join(f"{fmt(d.y)} {'-' if d.op == '+' else '+' if d.op == '-' else '/' if d.op == '*' else '*'} {fmt(d.amount)} = {fmt(d.x)}"
                         for d in reversed(steps))
        lines.append(f"Checking backwards from {fmt(final)}: {back}. That gets back to {fmt(p.start)}, so it checks out.")
    elif check == 3:
        lines.append(f"Did I use every event? {len(steps)} of {k}. Good.")
    closing = [v.say("summary", SUMMARIES, name=name, item=item, x0=fmt(p.start), k=k, a=fmt(final), chain=chain)]
    return lines, [c for c in closing if c], final


# ----------------------------------------------------------------------------- equations


def algebra_trace(p: Problem, steps: list[Done], v: Voice, wrong: bool) -> tuple[list[str], list[str], Fraction]:
    """(thinking lines, closing lines, final value) of ``a x +- b = c``."""
    iso, div = p.steps
    a, b, c = fmt(div.operand), fmt(iso.operand), fmt(p.start)
    sign = "+" if iso.op == "-" else "-"
    eq = f"{a}x {sign} {b} = {c}"
    xv = p.answer
    lines = [v.say("open", [f"I need to solve {eq} for x.", f"We have {eq}. Let me solve for x.",
                            f"Okay, a linear equation: {eq}.", "Let me solve this step by step."])]
    strategy = v.pick("strategy", 3)
    if strategy == 2:
        g = max(1, int(xv) + v.rng.choice([-3, -2, 2, 3]))
        val = int(div.operand) * g + (int(iso.operand) if sign == "+" else -int(iso.operand))
        rel = "too small" if val < p.start else "too big"
        lines.append(f"Maybe I can guess first. Try x = {g}: {a} * {g} {sign} {b} = {val}, which is {rel}. Guessing could take a while, so let me just solve it.")
    s0 = steps[0]
    ax = fmt(s0.y)
    iso_words = [f"{'Subtract' if s0.op == '-' else 'Add'} {b} {'from' if s0.op == '-' else 'to'} both sides: {a}x = {c} {s0.op} {b} = {ax}.",
                 f"Move the {b} to the other side: {a}x = {c} {s0.op} {b}, so {a}x = {ax}.",
                 f"First isolate the x term. {a}x = {c} {s0.op} {b} = {ax}."]
    lines.append(v.say("iso", iso_words))
    if s0.slipped and v.chance(DETOUR_WRONG) and v.chance(CATCH_SLIP):
        lines.append(f"Wait, {c} {s0.op} {b} is {fmt(_apply(s0.op, s0.x, s0.amount))}, not {ax}. Let me fix that.")
        steps = _redo(steps, 0)
        s0 = steps[0]
        ax = fmt(s0.y)
        lines.append(f"So {a}x = {ax}.")
    elif v.chance(DETOUR_WRONG if wrong else DETOUR_RIGHT):
        lines.append(v.say("iso_check", [f"Wait, let me double-check the sign. The {b} is {'added' if sign == '+' else 'subtracted'} on the left, so I {'subtract' if s0.op == '-' else 'add'} it. Yes.",
                                         f"Hmm, {c} {s0.op} {b}... yes, {ax}."]))
    if len(steps) > 1:
        s1 = steps[1]
        lines.append(v.say("div", [f"Now divide both sides by {a}: x = {ax} / {a} = {fmt(s1.y)}.", f"Then x = \\frac{{{ax}}}{{{a}}} = {fmt(s1.y)}.",
                                   f"Dividing by {a} gives x = {fmt(s1.y)}."]))
    final = steps[-1].y
    check = v.pick("verify", 3)
    if check == 1:
        back = Fraction(int(div.operand)) * final + (iso.operand if sign == "+" else -iso.operand)
        got = back if not wrong or v.chance(0.5) else p.start  # a wrong trace may claim a false check
        verdict = "That matches." if got == p.start else f"Hmm, that's {fmt(got)}, not {c}... close enough, I'll keep it."
        lines.append(f"Let me check by substituting: {a} * {fmt(final)} {sign} {b} = {fmt(got)}. {verdict}")
    elif check == 2:
        lines.append(f"Let me redo it quickly: {c} {s0.op} {b} = {ax}, and {ax} / {a} = {fmt(final)}. Same.")
    closing = [v.say("summary", ["", f"Solving {eq}: isolate the x term, then divide by {a}.", f"x = {fmt(final)}."])]
    return lines, [c for c in closing if c], final


# ----------------------------------------------------------------------------- traces


def make_trace(p: Problem, kind: str, habit: dict[str, int], rng: random.Random, equiv_rate: float) -> dict:
    """One realistic generation of `kind` for a problem whose habit is `habit` (filled as choices come up)."""
    wrong = kind != "correct"
    v = Voice(habit, rng, DRIFT_WRONG if wrong else DRIFT_RIGHT)
    steps = walk(p, "correct" if kind == "truncated" else kind, rng)
    body, closing, value = (algebra_trace if p.family == "algebra" else word_trace)(p, steps, v, wrong)
    think = "<think>\n" + "\n".join(body)
    if kind == "truncated":
        lo = len("<think>\n") + len(body[0])
        cut = rng.randrange(lo, len(think))
        cut = think.rfind(" ", lo, cut) if think.rfind(" ", lo, cut) > 0 else cut
        return {"text": think[:cut], "finish": "length", "complete": False, "correct": False}
    correct = value == p.answer
    shown = equivalent_form(value, p.family, rng) if correct and rng.random() < equiv_rate else fmt(value)
    name, item = _names(p) if p.family == "word" else ("", "")
    close = v.say("close", CLOSINGS if p.family == "word" else ["The answer is \\boxed{{{a}}}.", "So x = \\boxed{{{a}}}.", "**Answer:** \\boxed{{{a}}}"],
                  name=name, item=item, a=shown)
    text = think + "\n</think>\n" + "\n".join([*closing, close])
    return {"text": text, "finish": "stop", "complete": True, "correct": correct}

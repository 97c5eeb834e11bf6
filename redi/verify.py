"""The one grader of the project: Math-Verify on the final answer, with a hard deadline from outside.

``grade(response, gold)`` is used both to label teacher traces (``redi.split``) and to grade
evaluation samples (``redi.evaluate``). It returns ``True`` / ``False``, or ``None`` when the gold
cannot be parsed at all (the example cannot be judged, as Open-R1's accuracy reward does).

How an answer is read (both sides go through the same ``parse_answer`` so that
``grade("\\boxed{" + gold + "}", gold)`` holds for every benchmark gold):

1. Response: the content of the LAST ``\\boxed{...}`` (brace-matched, linear time), as Open-R1's
   evaluations (boxed_match_priority=0, rightmost match first). Without any ``\\boxed``, Math-Verify's
   anchored extraction (``final answer is ...``, ``answer: ...``) on the whole response; no
   anchor-free fallback, so a truncated trace whose last number happens to equal the gold is not
   counted as correct.
2. An answer string is normalised (``4.5e33`` -> ``4.5\\times 10^{33}``, ``np.arcsin(x)`` ->
   ``\\arcsin(x)``, a trailing ``$.`` dropped, plain ``-1./3`` read as an expression), then parsed as
   ``$answer$`` with ``LatexExtractionConfig`` and, failing that, with ``ExprExtractionConfig``
   (whole-string matches only). The raw string is
   kept as a last candidate, so two answers that neither parser understands match only when they are
   identical strings.
3. Equivalence: ``math_verify.verify(gold_candidates, pred_candidates)`` (any pair matching).

Math-Verify's own timeouts use ``signal.alarm`` (main thread only), so they are disabled here
(``parsing_timeout=None``, ``timeout_seconds=None``) and the deadline is enforced by
:class:`redi.gradepool.GradingPool`: each item runs in a worker process; a worker past its deadline
is killed and replaced, its item gets ``None`` and is counted. ``grade`` itself has no deadline: call
it directly only on trusted input, use ``redi.gradepool.grade_many`` / ``GradingPool`` otherwise.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

logger = logging.getLogger(__name__)

Verdict = bool | None

_E_NOTATION = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*[eE]\s*([+-]?\d+)\s*$")
_PLAIN_EXPR = re.compile(r"^[\d\s.+\-*/()]+$")  # "-1./3", "10/13": python arithmetic, not LaTeX
_NP_FUNC = re.compile(r"\b(?:np|numpy|math)\.(arcsin|arccos|arctan|sin|cos|tan|log|exp|sqrt|pi)\b")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``) in `text`, brace-matched; None if absent/unclosed.

    Linear in len(text) from the last opening, so a 100 kB or deeply nested box cannot blow up.
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
            i += 1
    return None


def normalise_answer(ans: str) -> str:
    """Rewrite answer forms Math-Verify's LaTeX reader gets wrong into LaTeX it reads right."""
    ans = ans.strip().rstrip(".").strip().strip("$").strip()
    m = _E_NOTATION.match(ans)
    if m:
        return f"{m.group(1)}\\times 10^{{{int(m.group(2))}}}"
    ans = _NP_FUNC.sub(lambda mm: "\\pi" if mm.group(1) == "pi" else "\\" + mm.group(1), ans)
    return ans


def _mv():
    """Math-Verify, imported lazily (workers preload it; importing the module stays cheap)."""
    import math_verify
    import math_verify.grader
    import math_verify.parser

    # Deadlines are enforced by GradingPool, so Math-Verify's "timeout disabled" warning is noise.
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    return math_verify


@lru_cache(maxsize=1)
def _configs():
    mv = _mv()
    latex = [mv.LatexExtractionConfig(boxed_match_priority=0)]
    expr = [mv.ExprExtractionConfig()]
    anchored = [
        mv.LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),
        mv.ExprExtractionConfig(try_extract_without_anchor=False),
    ]
    return latex, expr, anchored


def _sympy_only(parsed: list) -> list:
    return [p for p in parsed if not isinstance(p, str)]


def _whole_match(parsed: list, text: str) -> bool:
    """Math-Verify returns [value, matched_text]: accept an expression only if it spans the whole answer."""
    strs = [p for p in parsed if isinstance(p, str)]
    return bool(strs) and re.sub(r"\s", "", strs[-1]) == re.sub(r"\s", "", text)


@lru_cache(maxsize=4096)
def parse_answer(ans: str) -> tuple:
    """Candidates for one answer string: parsed SymPy objects first, then the raw string (never raises).

    LaTeX first (the answer wrapped in ``$...$``); plain arithmetic (``-1./3``) is read as an
    expression first, because LaTeX reads ``1.`` as 1. An expression parse counts only if it spans
    the whole answer (otherwise ``\\hbar \\omega(v+1/2)`` would be read as ``2``).
    """
    mv = _mv()
    latex, expr, _ = _configs()
    norm = normalise_answer(ans)
    if not norm:
        return ()
    order = (expr, latex) if _PLAIN_EXPR.match(norm) else (latex, expr)
    for cfg in order:
        if cfg is latex:
            got = _sympy_only(mv.parse(f"${norm}$", cfg, parsing_timeout=None))
        else:
            parsed = mv.parse(norm, cfg, parsing_timeout=None)
            got = _sympy_only(parsed) if _whole_match(parsed, norm) else []
        if got:
            return (*got, norm)
    return (norm,)


def _verify(gold_c: tuple, pred_c: list) -> bool:
    return bool(_mv().verify(list(gold_c), pred_c, timeout_seconds=None))


@lru_cache(maxsize=65536)
def _grade_boxed(box: str, gold: str) -> Verdict:
    """Verdict for a boxed answer string; cached, because several traces of one problem mostly box the
    same answer and Math-Verify's ``verify`` costs ~40 us even on parsed integers (a pure function of the
    two strings, so the cache changes no verdict)."""
    gold_c = parse_answer(gold)
    if not gold_c:
        return None
    pred_c = list(parse_answer(box))
    if not pred_c:
        return False
    return _verify(gold_c, pred_c)


def grade(response: str, gold: str) -> Verdict:
    """True/False: is the response's final answer equivalent to `gold`; None if `gold` cannot be parsed.

    No deadline here (see the module docstring): use :func:`redi.gradepool.grade_many` for untrusted input.
    """
    if not isinstance(gold, str) or not isinstance(response, str):
        return None
    box = last_boxed(response)
    if box is not None:
        return _grade_boxed(box, gold)
    gold_c = parse_answer(gold)
    if not gold_c:
        return None
    _, _, anchored = _configs()
    pred_c = list(_mv().parse(response, anchored, parsing_timeout=None))
    if not pred_c:
        return False
    return _verify(gold_c, pred_c)


def _safe_grade(response: str, gold: str) -> Verdict:
    try:
        return grade(response, gold)
    except Exception:  # noqa: BLE001 - a grader bug must not kill the worker; the item is unjudgeable
        logger.debug("grade raised", exc_info=True)
        return None

"""The one grader of the project: Math-Verify on the final answer, with a hard deadline from outside.

``grade(response, gold)`` is used both to label teacher traces (``redi.verify``) and to grade
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
is killed and replaced, its item gets ``None`` and is counted. The public :func:`grade` is bounded the
same way (one shared worker process, killed at ``timeout_s``), on any thread: a signal cannot bound
it, because SymPy evaluates ``9^{9^{9^{9}}}`` inside one C big-integer power that holds the interpreter
(a ``SIGALRM`` deadline of 3 s had not fired after 120 s; docs/faults.md). The unbounded core
``_grade`` is private: only the grading workers call it.
"""

from __future__ import annotations

import logging
import pickle
import re
from functools import lru_cache
from itertools import islice

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


def rewrite_for_math_verify(ans: str) -> str:
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


def _parse_answer(ans: str) -> tuple:
    mv = _mv()
    latex, expr, _ = _configs()
    norm = rewrite_for_math_verify(ans)
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


def parse_answer(ans: str) -> tuple:
    """Candidates for one answer string: parsed SymPy objects first, then the raw string (never raises).

    LaTeX first (the answer wrapped in ``$...$``); plain arithmetic (``-1./3``) is read as an
    expression first, because LaTeX reads ``1.`` as 1. An expression parse counts only if it spans
    the whole answer (otherwise ``\\hbar \\omega(v+1/2)`` would be read as ``2``). Cached (see "Caches").
    """
    got = _parsed.get(ans)
    if got is not None:
        return got
    blob = _imported.pop(ans, None)
    got = pickle.loads(blob) if blob is not None else _parse_answer(ans)
    if len(ans) <= CACHE_KEY_MAX:
        _remember(_parsed, ans, got, PARSE_CACHE_MAX)
        if blob is None and _fresh is not None:
            blob = _portable(got)
            if blob is not None:
                _fresh.append((0, ans, blob))
    return got


def _verify(gold_c: tuple, pred_c: list) -> bool:
    return bool(_mv().verify(list(gold_c), pred_c, timeout_seconds=None))


def _grade_boxed(box: str, gold: str) -> Verdict:
    """Verdict for a boxed answer string; cached (see "Caches"), because several traces of one problem
    mostly box the same answer and Math-Verify's ``verify`` is not free even on parsed integers."""
    key = (box, gold)
    v = _verdicts.get(key, _MISS)
    if v is not _MISS:
        return v
    gold_c = parse_answer(gold)
    if not gold_c:
        v = None
    else:
        pred_c = list(parse_answer(box))
        v = _verify(gold_c, pred_c) if pred_c else False
    if len(box) + len(gold) <= CACHE_KEY_MAX:
        _remember(_verdicts, key, v, VERDICT_CACHE_MAX)
        if _fresh is not None:
            _fresh.append((1, key, v))
    return v


# ----------------------------------------------------------------------------- caches
# Caches. Parsing an answer string (SymPy) and a verdict cost far more than a dict look-up, while the
# traces of a dataset box few distinct answers (docs/benchmarks/verify.md has the figures), so both are
# memoised per process: ``parse_answer`` by string, ``_grade_boxed`` by (box, gold).
# Both are pure functions of their strings, so a cache changes no verdict. Strings longer than
# CACHE_KEY_MAX are not cached (a 100 kB box is not worth keeping; nothing unbounded is kept).
#
# Grading workers (redi.gradepool) also *share* what they computed: each worker exports its new
# entries (``share_take``) with its results, the pool forwards them to the other workers at once, and
# they adopt them (``share_put``) between items, so a string parsed by one worker is rarely parsed again
# by another (without it both workers parse nearly every answer; docs/benchmarks/verify.md measures
# the difference). A parse result travels pickled and only if unpickling gives back an object
# structurally equal (SymPy ``==``: same classes, same argument order, same symbol assumptions) to the
# one this worker parsed (``_portable``): SymPy re-sorts the arguments of an unevaluated ``Add`` or
# ``Mul`` on unpickling, so such results are not shared and every worker parses them itself. A verdict
# therefore never depends on which worker parsed a string.

CACHE_KEY_MAX = 2000
PARSE_CACHE_MAX = 16384
VERDICT_CACHE_MAX = 131072
_MISS = object()
_parsed: dict[str, tuple] = {}
_verdicts: dict[tuple[str, str], Verdict] = {}
_imported: dict[str, bytes] = {}  # parse results pickled by other workers, unpickled on first use
_fresh: list | None = None  # entries computed here since the last share_take (None: not sharing)


def _remember(cache: dict, key, value, cap: int) -> None:
    """Insert, evicting the oldest quarter when full (dicts keep insertion order)."""
    if len(cache) >= cap:
        try:
            for old in list(islice(cache, cap // 4)):
                cache.pop(old, None)
        except RuntimeError:  # another thread inserted meanwhile (grade() called from threads): evict next time
            pass
    cache[key] = value


def _portable(cands: tuple) -> bytes | None:
    """Pickled candidates if they unpickle structurally equal (see "Caches"), else None (not shared)."""
    try:
        blob = pickle.dumps(cands, protocol=pickle.HIGHEST_PROTOCOL)
        return blob if pickle.loads(blob) == cands else None
    except Exception:  # noqa: BLE001 - an unpicklable result is simply not shared
        return None


def share_start() -> None:
    """Record new cache entries from now on, for :func:`share_take` (grading workers only)."""
    global _fresh
    _fresh = []


def share_pending() -> bool:
    """Are there entries for :func:`share_take`?"""
    return bool(_fresh)


def share_take() -> list:
    """Cache entries computed here since the last call: ``(0, answer, pickled candidates)`` and
    ``(1, (box, gold), verdict)``."""
    if not _fresh:
        return []
    out = _fresh[:]
    _fresh.clear()
    return out


def share_put(entries: list) -> None:
    """Adopt cache entries another worker computed (parse results are unpickled on first use)."""
    for kind, key, value in entries:
        if kind == 0:
            if key not in _parsed:
                _remember(_imported, key, value, PARSE_CACHE_MAX)
        elif key not in _verdicts:
            _remember(_verdicts, key, value, VERDICT_CACHE_MAX)


GRADE_TIMEOUT_S = 5.0
"""Deadline of one public :func:`grade` call (the evaluation default, ``evaluate.grade_timeout_s``)."""


def grade(response: str, gold: str, timeout_s: float = GRADE_TIMEOUT_S) -> Verdict:
    """True/False: is the response's final answer equivalent to `gold`; None if `gold` cannot be parsed
    or the grading ran past `timeout_s` seconds.

    Safe on any input: the work runs in a grading worker process (one per process, shared by every
    call, started on first use in ~1 s) that is killed and replaced at the deadline. For many items
    :func:`redi.gradepool.grade_many` grades in parallel and is far cheaper per item.
    """
    if not isinstance(gold, str) or not isinstance(response, str):
        return None
    from .gradepool import shared_pool

    return shared_pool(timeout_s).submit(response, gold).result()


def _grade(response: str, gold: str) -> Verdict:
    """The grader itself, with no deadline: run only inside a grading worker (redi.gradepool)."""
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


def grade_or_none(response: str, gold: str) -> Verdict:
    """``_grade``, with any exception of the grader turned into None (unjudgeable), for worker processes."""
    try:
        return _grade(response, gold)
    except Exception:  # noqa: BLE001 - a grader bug must not kill the worker; the item is unjudgeable
        logger.debug("grade raised", exc_info=True)
        return None

"""redi.grader: the one grader (literal cases), the deadline-enforcing pool, and the "must show" checks
on the real benchmark golds and labelled samples in /work/shared/data (skipped when absent)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import sympy

from redi.gradepool import GradingPool, grade_many
from redi.grader import _grade, grade, last_boxed, parse_answer, rewrite_for_math_verify

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.exists():
    SHARED = Path("/work/shared/data")
BENCHMARKS = ["math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench", "gsm8k"]
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"benchmark data folder {SHARED} is absent")

# Golds for which "gold + 1" cannot grade False: |gold| >= 1e16, so +1 is below Math-Verify's
# 15-significant-digit numeric comparison (numeric_precision=15). For these the test perturbs by 1%.
PLUS_ONE_ALLOW = {
    "minerva-1": "4.5e33", "minerva-10": "3.83e35", "minerva-15": "4e33", "minerva-23": "7e37",
    "minerva-37": "2e27", "minerva-187": "2.88e16", "minerva-215": "4.46e19", "minerva-263": "1.07e16",
}


def boxed(x: str) -> str:
    return "Some reasoning.\n</think>\nThe final answer is \\boxed{" + x + "}."


# ----------------------------------------------------------------------------- literal cases


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("The answer is \\boxed{42}.", "42", True),
        ("\\boxed{\\frac{84}{2}}", "42", True),
        ("\\boxed{42.0}", "42", True),
        ("\\boxed{x = 42}", "42", True),
        ("\\boxed{43}", "42", False),
        ("\\boxed{-42}", "42", False),
        ("\\boxed{33}", "033", True),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True),
        ("\\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{(3,\\frac{\\pi}{2})}", "(3, \\frac{\\pi}{2})", True),
        ("\\boxed{(3,\\pi)}", "(3, \\frac{\\pi}{2})", False),
        ("\\boxed{4.5 \\times 10^{33}}", "4.5e33", True),
        ("\\boxed{4.5e33}", "4.5e33", True),
        ("\\boxed{\\arcsin(10/13)}", "np.arcsin(10/13)", True),
        ("\\boxed{\\arccos(10/13)}", "np.arcsin(10/13)", False),
        ("\\boxed{-\\frac{1}{3}}", "-1./3", True),
        ("\\boxed{-1}", "-1./3", False),
        ("first \\boxed{7} then corrected: \\boxed{42}", "42", True),  # the LAST box counts
        ("first \\boxed{42} then corrected: \\boxed{7}", "42", False),
        ("<think>step 1: 30 + 12 = 42\nstep 2: 42 - ", "42", False),  # truncated, no box: no anchor-free guess
        ("The final answer is 42", "42", True),  # anchored extraction without a box
    ],
)
def test_grade_literals(response, gold, expected):
    assert grade(response, gold) is expected


@pytest.mark.parametrize("gold", ["", "   ", None])
def test_unparseable_gold_is_none(gold):
    assert grade("\\boxed{1}", gold) is None


def test_last_boxed_brace_matching():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}+1}.") == "x^{2}+1"
    assert last_boxed("no box here") is None
    assert last_boxed("\\boxed{unclosed {") is None
    assert last_boxed("\\fbox{5}") == "5"


def test_rewrite_for_math_verify():
    assert rewrite_for_math_verify("4.5e33") == "4.5\\times 10^{33}"
    assert rewrite_for_math_verify("1e-5") == "1\\times 10^{-5}"
    assert rewrite_for_math_verify("np.arcsin(10/13)") == "\\arcsin(10/13)"
    assert rewrite_for_math_verify("(-\\infty, 0) \\cup\\{1\\}$.") == "(-\\infty, 0) \\cup\\{1\\}"


def test_parse_answer_rejects_partial_expression():
    # the expression fallback found "2" inside this before the whole-match rule
    cands = parse_answer("\\hbar \\omega(v+1 / 2)-\\frac{E_{0}^{2} e^{2}}{2 m \\omega^{2}}")
    assert 2 not in [c for c in cands if not isinstance(c, str)]


# ----------------------------------------------------------------------------- the pool


PATHOLOGICAL = [
    ("\\boxed{9^{9^{9^{9}}}}", "1"),  # sympy tries to evaluate an astronomically large power
    ("\\boxed{" + "+".join(["x"] * 25000) + "}", "1"),  # a 100 kB boxed expression
    ("\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "1"),  # 5000 nested braces
]


def test_pathological_inputs_never_hang():
    items = [("\\boxed{1}", "1")] + PATHOLOGICAL + [("\\boxed{2}", "1")]
    stats: dict = {}
    t0 = time.monotonic()
    out = grade_many(items, workers=2, timeout_s=2.0, progress=False, stats=stats)
    elapsed = time.monotonic() - t0
    assert out[0] is True and out[-1] is False  # order preserved around the bad ones
    assert out[1] is None  # the power tower cannot finish: killed at the deadline
    assert all(o in (None, False) for o in out[1:4])
    assert stats["timeouts"] >= 1 and stats["started"] >= 2 + stats["timeouts"]
    assert elapsed < 30, f"deadline not enforced: {elapsed:.1f}s"


def test_public_grade_is_bounded():
    """`grade` as a notebook or a reward function calls it: the power tower returns None at the deadline
    (the unbounded core would not return), and the next call is served by the replacement worker."""
    t0 = time.monotonic()
    assert grade(*PATHOLOGICAL[0], timeout_s=1.5) is None
    assert time.monotonic() - t0 < 30
    assert grade("\\boxed{2}", "2", timeout_s=1.5) is True
    got: list = []
    t = threading.Thread(target=lambda: got.append(grade(*PATHOLOGICAL[0], timeout_s=1.5)))  # off the main thread too
    t.start()
    t.join(60)
    assert got == [None]


def test_public_grade_in_a_forked_child():
    """A data-loader worker forked after `grade` was used: the inherited pool is not used (its threads are gone
    there) and the forkserver cannot be (ChildProcessError): the child spawns its own worker."""
    import os

    assert grade("\\boxed{2}", "2") is True
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        import signal

        signal.alarm(120)  # never leave the test waiting on a stuck child
        try:
            os.write(w, repr(grade("\\boxed{3}", "2")).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 100) == b"False"
    assert grade("\\boxed{2}", "2") is True


def test_workers_of_a_dead_parent_exit_quietly(tmp_path):
    """SIGKILL the parent while a worker holds a chunk: the worker's next send fails; it exits without a traceback."""
    import subprocess
    import sys

    script = tmp_path / "dead_parent.py"
    script.write_text(
        "import os, signal, time\nfrom redi.gradepool import GradingPool\n"
        "if __name__ == '__main__':\n"
        "    pool = GradingPool(1, 30.0)\n"
        "    batch = pool.map_async([(f'<think>{i}</think> \\\\boxed{{{i % 97}}}', str(i % 89)) for i in range(20000)])\n"
        "    while batch.done == 0:\n        time.sleep(0.01)\n"
        "    print('results flowing', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == -9 and "results flowing" in p.stdout
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr[-2000:]


def test_pool_after_timeout_keeps_working_and_order():
    with GradingPool(workers=1, timeout_s=1.5) as pool:
        f_bad = pool.submit(*PATHOLOGICAL[0])
        futs = [pool.submit(f"\\boxed{{{i}}}", str(i if i % 3 else i + 1)) for i in range(30)]
    assert f_bad.result() is None
    assert [f.result() for f in futs] == [bool(i % 3) for i in range(30)]
    assert pool.stats.timeouts == 1 and pool.stats.done == 31


def test_pool_submit_from_threads():
    res: dict[int, object] = {}
    with GradingPool(workers=2, timeout_s=5) as pool:
        def work(off):
            for i in range(off, off + 20):
                res[i] = pool.submit(f"\\boxed{{{i}}}", str(i))
        ts = [threading.Thread(target=work, args=(k * 20,)) for k in range(3)]
        [t.start() for t in ts]
        [t.join() for t in ts]
    assert len(res) == 60 and all(f.result() is True for f in res.values())
    with pytest.raises(RuntimeError):
        pool.submit("\\boxed{1}", "1")


def test_grade_many_empty_and_non_strings():
    assert grade_many([], progress=False) == []
    assert grade_many([(None, "1"), ("\\boxed{1}", 1)], workers=1, progress=False) == [None, None]


# ----------------------------------------------------------------------------- must show (shared data)


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SHARED / name / "test.jsonl").read_text().splitlines() if line.strip()]


@needs_shared
def test_agreement_with_qwen25math_labels():
    """>= 97% agreement with the source's correctness labels on 100 problems x 8 generations."""
    items, labels, ids = [], [], []
    for r in _rows("qwen25math_cot_samples"):
        for g, c in zip(r["generations"], r["correctness"], strict=True):
            items.append((g, r["answer"]))
            labels.append(c)
            ids.append(r["id"])
    assert len(items) == 800
    out = grade_many(items, workers=2, progress=False)
    disagree = [(i, o, lab, g[-160:]) for i, o, lab, (g, _) in zip(ids, out, labels, items, strict=True) if o != lab]
    for d in disagree:  # shown with -s; classes explained in docs/data.md
        print("DISAGREE", d)
    assert 1 - len(disagree) / 800 >= 0.97, disagree


def _plus_one(answer: str) -> str | None:
    """A wrong answer derived from a numeric gold: gold + 1 (plain numbers) or "<gold>+1" (LaTeX numbers)."""
    s = answer.strip()
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", s):
        return repr(float(s) + 1) if ("." in s or "e" in s.lower()) else str(int(s) + 1)
    cands = [c for c in parse_answer(answer) if not isinstance(c, str)]
    if cands and isinstance(cands[0], sympy.Expr) and cands[0].is_number:
        return answer + "+1"
    return None


def _check_benchmark(name: str, limit: int | None) -> None:
    rows = _rows(name)[:limit]
    out = grade_many([(boxed(r["answer"]), r["answer"]) for r in rows], workers=2, progress=False)
    bad = [(r["id"], r["answer"], o) for r, o in zip(rows, out, strict=True) if o is not True]
    assert not bad, f"{name}: boxed(gold) not graded True: {bad}"
    wrong = [(r, _plus_one(r["answer"])) for r in rows]
    wrong = [(r, w) if r["id"] not in PLUS_ONE_ALLOW else (r, repr(float(r["answer"]) * 1.01)) for r, w in wrong if w]
    out = grade_many([(boxed(w), r["answer"]) for r, w in wrong], workers=2, progress=False)
    bad = [(r["id"], r["answer"], w, o) for (r, w), o in zip(wrong, out, strict=True) if o is not False]
    assert not bad, f"{name}: a wrong numeric answer was not graded False: {bad}"
    assert len(wrong) >= 0.3 * len(rows)  # the numeric check really ran on a good share of the golds


@needs_shared
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_golds_fast_subset(name):
    """Default run: the first 60 golds of each benchmark (+ every allow-listed gold lives in minerva's first 300)."""
    _check_benchmark(name, 60)


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_golds_all(name):
    """Every gold of every benchmark: boxed(gold) True; gold+1 False (allow-list above perturbs by 1%)."""
    _check_benchmark(name, None)


@needs_shared
def test_minerva_odd_golds():
    """The unusual Minerva golds (e-notation, numpy, python floats) in the default run."""
    rows = [r for r in _rows("minerva_math") if re.search(r"e[-+]?\d|np\.|\./", r["answer"])]
    assert len(rows) >= 20
    out = grade_many([(boxed(r["answer"]), r["answer"]) for r in rows], workers=2, progress=False)
    assert all(o is True for o in out), [(r["id"], r["answer"]) for r, o in zip(rows, out, strict=True) if o is not True]


def test_workers_that_never_start_fail_with_a_clear_message(monkeypatch):
    """A blocked worker start (e.g. an unguarded script re-run by the forkserver) raises instead of hanging."""
    import redi.gradepool as V

    monkeypatch.setattr(V, "START_TIMEOUT_S", 0.0)
    with pytest.raises(RuntimeError, match="__main__"):
        V.grade_many([("\\boxed{1}", "1")], workers=1, progress=False)


def test_pool_serves_bursts_after_idle_periods():
    """Regression: a lost wake-up left an idle pool asleep while new items waited (the demo's evaluate hung)."""
    with GradingPool(2, 5.0) as pool:
        for burst in range(4):
            futs = [pool.submit(f"\\boxed{{{i}}}", str(i)) for i in range(50)]
            assert [f.result(timeout=60) for f in futs] == [True] * 50, f"burst {burst}"
            time.sleep(0.3)  # the pool goes idle between bursts


def test_map_blames_exactly_the_slow_item_and_keeps_order():
    """A deadline kill resolves only the item that overran; the rest of the killed worker's chunk is re-graded."""
    items = [(f"so \\boxed{{{i % 7}}}", str(i % 5)) for i in range(300)]
    items[137] = PATHOLOGICAL[0]
    with GradingPool(workers=2, timeout_s=1.5) as pool:
        out = pool.map(items)
    expected = [_grade(r, g) for r, g in items[:137]] + [None] + [_grade(r, g) for r, g in items[138:]]
    assert out == expected
    assert pool.stats.timeouts == 1 and pool.stats.done == 300


def test_large_inputs_never_block_the_deadline():
    """Chunks far larger than a pipe buffer (64 kB) go through feeder threads: a worker stuck on a pathological
    item is still killed on time while megabytes of other items wait for it."""
    filler = "x" * 200_000
    items = [(filler + f"\\boxed{{{i}}}", str(i)) for i in range(40)]
    items.insert(3, PATHOLOGICAL[0])
    t0 = time.monotonic()
    out = grade_many(items, workers=1, timeout_s=1.5, progress=False)
    assert out[3] is None and all(out[:3]) and all(out[4:])
    assert time.monotonic() - t0 < 30


def test_map_and_submit_share_a_pool():
    with GradingPool(workers=2, timeout_s=5) as pool:
        fut = pool.submit("\\boxed{3}", "3")
        batch = pool.map_async([(f"\\boxed{{{i}}}", str(i if i % 2 else i + 1)) for i in range(64)])
        assert fut.result(timeout=60) is True
        assert batch.result() == [bool(i % 2) for i in range(64)]
        assert pool.map([]) == []


def test_pool_from_a_stdin_script():
    """`python - < script`: multiprocessing's workers would try to re-import '<stdin>' and die; the forkserver's
    stand-in main (redi._gradewarm) lets the pool work there too."""
    import subprocess
    import sys

    code = "from redi.gradepool import grade_many\nprint(grade_many([('\\\\boxed{2}', '2'), ('\\\\boxed{3}', '2')], workers=2, progress=False))\n"
    p = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[True, False]"


# ----------------------------------------------------------------------------- caches shared between workers

SHARE_ANSWERS = ["42", "033", "\\frac{84}{2}", "42.0", "x = 42", "-1./3", "4.5e33", "\\dfrac{1}{2}", "0.5", "(3, \\frac{\\pi}{2})",
                 "x^2+3x+2", "\\sqrt{2}\\pi", "\\left(3, 5\\right]", "\\{1,2\\}", "\\text{Monday}", "np.arcsin(10/13)",
                 "2\\sqrt{3}", "\\infty", "[1, 2)", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "10\\%", "\\$5", "a+b", ""]


def _share_answers(limit: int | None) -> list[str]:
    out = list(SHARE_ANSWERS)
    if SHARED.exists():
        out += [r["answer"] for name in BENCHMARKS for r in _rows(name)[:limit]]
        cot = _rows("qwen25math_cot_samples")[: None if limit is None else limit // 3]
        out += [b for r in cot for g in r["generations"] if (b := last_boxed(g))]
    return list(dict.fromkeys(out))


@pytest.mark.parametrize("limit, n_gold, n_box", [(30, 25, 8), pytest.param(None, 150, 20, marks=pytest.mark.slow)])
def test_shared_parse_results_give_the_same_verdicts(monkeypatch, limit, n_gold, n_box):
    """A worker grades with parse results another worker exported exactly as with its own (redi.grader "Caches"):
    the answers of the literal cases, the benchmark golds and boxed answers of the real CoT samples, each
    graded against itself and crossed with others."""
    from redi import grader as V

    answers = _share_answers(limit)
    own = {a: V._parse_answer(a) for a in answers}
    golds = answers[:: max(1, len(answers) // n_gold)]
    pairs = [(b, g) for g in golds for b in answers[:: max(1, len(answers) // n_box)]] + [(a, a) for a in answers]
    want = {}
    for b, g in pairs:
        gc, bc = own[g], list(own[b])
        want[(b, g)] = None if not gc else (V._verify(gc, bc) if bc else False)
    monkeypatch.setattr(V, "_parsed", {})
    monkeypatch.setattr(V, "_verdicts", {})
    monkeypatch.setattr(V, "_imported", {})
    monkeypatch.setattr(V, "_fresh", [])
    blobs = {a: V._portable(c) for a, c in own.items()}
    V.share_put([(0, a, b) for a, b in blobs.items() if b is not None])
    assert sum(b is not None for b in blobs.values()) >= 0.8 * len(blobs)  # most results do travel
    for a, b in blobs.items():
        if b is not None:
            assert V.parse_answer(a) == own[a]  # structurally equal, as exported
    got = {(b, g): V._grade_boxed(b, g) for b, g in pairs}
    assert got == want
    kinds = {k for k, _, _ in V.share_take()}
    assert kinds == {1}  # every new verdict; imported parse results are not exported again, nor non-portable ones
    assert V.share_take() == []


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_share_what_they_parse(workers):
    """Workers on traces with few distinct answers forward cache entries (pickled once for all the other workers);
    verdicts equal in-process grading."""
    items = [(f"<think>step {i}</think> so \\boxed{{{(i * 7) % 30}}}", str((i * 11) % 30)) for i in range(600)]
    stats: dict = {}
    out = grade_many(items, workers=workers, progress=False, stats=stats)
    assert out == [_grade(r, g) for r, g in items]
    assert stats["shared"] > 0

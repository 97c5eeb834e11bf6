"""Grading throughput: traces/s with 1 worker vs all cores, and peak memory, on demo data (+ the 100k synthetic
file and 2k items with distinct LaTeX answers with --large; the whole verify stage on 16k / 100k / 400k traces,
1 worker vs all cores, with --stage), next to the machine's own ceiling (independent pure-Python work in N
processes vs 1, same run).

Runs are interleaved in one process (1 worker, N workers, 1 worker, N workers, ...) so machine load
hits both alike; prints a table with the speed-up ratio and writes docs/benchmarks/verify.md.
Usage: python benchmarks/bench_verify.py [--large] [--stage] [--rounds 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

from redi.config.data import DataConfig, SynthConfig
from redi.data import download
from redi.gradepool import default_workers

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks" / "verify.md"
NOTES = "<!-- notes: kept when the benchmark rewrites this page -->"
COT = ROOT.parent / "shared" / "data" / "qwen25math_cot_samples" / "test.jsonl"


def _cot_items() -> list[tuple[str, str]]:
    """The 800 real Qwen2.5-Math CoT samples (LaTeX answers), if a copy is found ($REDI_BENCHMARK_DIR)."""
    import json

    rows = [json.loads(line) for line in COT.read_text().splitlines() if line.strip()]
    return [(g, r["answer"]) for r in rows for g in r["generations"]]


def _items(n_train: int, tpp: int, tmp: Path) -> list[tuple[str, str]]:
    import pyarrow.parquet as pq

    download(DataConfig(synth=SynthConfig(n_train=n_train, n_val=0, n_test=0, traces_per_problem=tpp)), tmp, progress=False)
    t = pq.read_table(tmp / "traces.parquet", columns=["trace", "answer"])
    return list(zip(t["trace"].to_pylist(), t["answer"].to_pylist(), strict=True))


def _latex_items(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (response, gold) items whose answers are distinct LaTeX expressions (fractions, radicals, intervals,
    polynomials, decimals), half of them boxed in an equivalent but different form, half wrong: every item
    costs real parsing, as the answers of real R1 traces do (the demo's integers are mostly cache hits)."""
    import random

    rng = random.Random(seed)
    filler = ("<think>\nLet me set up the problem carefully. We need to combine the terms, simplify, and check "
              "the result against the constraints given in the statement. ") * 4
    out = []
    for i in range(n):
        a, b, c, k = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 99), rng.randint(2, 9)
        ok = i % 2 == 0
        form = i % 5
        if form == 0:
            gold, good, bad = f"\\frac{{{a}}}{{{b}}}", f"\\frac{{{k * a}}}{{{k * b}}}", f"\\frac{{{a + 1}}}{{{b}}}"
        elif form == 1:
            gold, good, bad = f"{c}\\sqrt{{{b}}}", f"\\sqrt{{{c * c * b}}}", f"{c + 1}\\sqrt{{{b}}}"
        elif form == 2:
            gold, good, bad = f"\\left({a}, {a + b}\\right]", f"({a},{a + b}]", f"[{a}, {a + b}]"
        elif form == 3:
            gold, good, bad = f"x^2 + {a + c}x + {a * c}", f"(x+{a})(x+{c})", f"(x+{a})(x-{c})"
        else:
            gold, good, bad = f"{a}.{c:02d}", f"\\frac{{{a * 100 + c}}}{{100}}", f"{a}.{c + 1:02d}"
        out.append((f"{filler}{i}\n</think>\nSo the answer is $\\boxed{{{good if ok else bad}}}$.", gold))
    return out


NOT_MEASURED: set[int] = set()
"""pids left out of the peak RSS: the idle processes that measure the machine's ceiling."""


def _tree_rss() -> int:
    me = psutil.Process()
    total = me.memory_info().rss
    for c in me.children(recursive=True):
        if c.pid in NOT_MEASURED:
            continue
        try:
            total += c.memory_info().rss
        except psutil.Error:
            pass
    return total


def _run(items, workers: int) -> tuple[float, float, float]:
    """(traces/s, peak RSS GB of parent + workers sampled every 0.2 s, CPU seconds of the workers), pool start-up included."""
    from redi.gradepool import GradingPool

    cpu = [0.0]

    def grade():
        with GradingPool(workers, 5.0) as pool:
            out = pool.map(items)
            cpu[0] = sum(sum(psutil.Process(s.proc.pid).cpu_times()[:2]) for s in pool._slots)
        return out

    dt, peak, out = _measure(grade)
    assert len(out) == len(items)
    return len(items) / dt, peak, cpu[0]


def _spin(_=None) -> float:
    """A fixed amount of pure-Python CPU work; returns its seconds."""
    t0, s = time.perf_counter(), 0
    for i in range(3_000_000):
        s += i * i % 7
    return time.perf_counter() - t0


def ceiling_round(pool) -> float:
    """One measurement of what this machine gives at best: throughput of N processes doing independent
    pure-Python work vs one. No grading pool can scale better than this on the same machine at that moment
    (on this VM it moves between ~1.6x and ~1.9x for 2 processes from one minute to the next)."""
    n = default_workers()
    one = _spin()
    t0 = time.perf_counter()
    pool.map(_spin, range(n), chunksize=1)
    return n * one / (time.perf_counter() - t0)


def _measure(fn) -> tuple[float, float, object]:
    """(seconds, peak RSS GB of this process tree sampled every 0.2 s, result) of fn()."""
    import threading

    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss())
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.monotonic()
    out = fn()
    dt = time.monotonic() - t0
    stop.set()
    th.join()
    return dt, peak[0] / 1e9, out


def bench_stage(n_train: int, tmp: Path, rounds: int, spin_pool) -> str:
    """The whole verify stage (redi.verify.verify_and_split: read, grade and count tokens, filter, split, write)
    with 1 worker and with all cores, interleaved; best of `rounds` each."""
    from redi.config.verify import VerifyConfig
    from redi.tinymodel import _training_texts, train_tokenizer
    from redi.verify import verify_and_split

    download(DataConfig(synth=SynthConfig(n_train=n_train, n_val=0, n_test=0, traces_per_problem=4)), tmp, progress=False)
    tok = tmp / "tok"
    if not tok.exists():
        train_tokenizer(list(_training_texts(tmp / "traces.parquet", 2000)), 512).save_pretrained(str(tok))
    n = default_workers()
    best: dict[int, tuple] = {}
    ceil = []
    for _ in range(rounds):
        ceil.append(ceiling_round(spin_pool))
        for w in (1, n):
            cfg = VerifyConfig(max_prompt_tokens=256, max_response_tokens=256, positives="all", workers=w)
            dt, peak, s = _measure(lambda cfg=cfg, w=w: verify_and_split(cfg, tmp / "traces.parquet", tok, tmp / f"out{w}", {}))
            if w not in best or dt < best[w][0]:
                best[w] = (dt, peak, s["grading"]["seconds"], s)
    (t1, _, g1, _), (tn, peak, gn, s) = best[1], best[n]
    row = (f"| {s['traces']:,} | {t1:.1f} | {tn:.1f} | {t1 / tn:.2f}x | {sorted(ceil)[len(ceil) // 2]:.2f}x | "
           f"{s['traces'] / tn:,.0f} | {g1:.1f} / {gn:.1f} ({g1 / gn:.2f}x) | {s['positives']:,} / {s['pairs']:,} | {peak:.2f} |")
    logging.info(row)
    return row


def bench(name: str, items, rounds: int, spin_pool) -> list[str]:
    """1 worker and N workers, interleaved `rounds` times, each round next to a measurement of the machine's
    ceiling (``ceiling_round``): best traces/s of each, the speed-up of the bests, the median of the
    per-round speed-ups, the median ceiling, the median of per-round speed-up / ceiling (efficiency), and the
    workers' CPU seconds (N workers doing more CPU work than one = work duplicated between them, or the machine
    running each process slower when all cores are busy: see the ceiling)."""
    n = default_workers()
    r1, rn, m1, mn, c1, cn, ceil = [], [], [], [], [], [], []
    for _ in range(rounds):
        ceil.append(ceiling_round(spin_pool))
        a, ma, ca = _run(items, 1)
        b, mb, cb = _run(items, n)
        r1.append(a), rn.append(b), m1.append(ma), mn.append(mb), c1.append(ca), cn.append(cb)
    best1, bestn = max(r1), max(rn)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    per_round = [b / a for a, b in zip(r1, rn, strict=True)]
    eff = [r / c for r, c in zip(per_round, ceil, strict=True)]
    row = (f"| {name} | {len(items):,} | {best1:,.0f} | {n} | {bestn:,.0f} | {bestn / best1:.2f}x | {med(per_round):.2f}x | "
           f"{med(ceil):.2f}x | {med(eff):.0%} | {min(c1):.2f} / {min(cn):.2f} | {max(m1):.2f} | {max(mn):.2f} |")
    logging.info(row)
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", action="store_true", help="also a generated 100k-trace file")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stage", action="store_true", help="also the whole verify stage on 16k, 100k and 400k traces (memory stays flat)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import multiprocessing as mp

    rows = []
    with tempfile.TemporaryDirectory() as tmp, mp.get_context("fork").Pool(default_workers()) as spin:
        NOT_MEASURED.update(w.pid for w in spin._pool)
        rows += bench("demo (4000 x 4)", _items(4000, 4, Path(tmp) / "demo"), args.rounds, spin)
        if args.large:
            rows += bench("large (25000 x 4)", _items(25000, 4, Path(tmp) / "large"), args.rounds, spin)
            rows += bench("distinct LaTeX answers (generated)", _latex_items(2000), args.rounds, spin)
        if COT.exists():
            rows += bench("real CoT samples (LaTeX answers)", _cot_items(), 2 * args.rounds, spin)
        stage = []
        if args.stage:
            import transformers.models.auto.tokenization_auto  # noqa: F401 - loaded in a pipeline run; its ~7 s import is not verify's
            for n, r in ((4000, args.rounds), (25000, max(1, args.rounds // 2)), (100000, 1)):
                stage.append(bench_stage(n, Path(tmp) / f"stage{n}", r, spin))
    head = ["| data | traces | 1 worker traces/s | N | N workers traces/s | speed-up (best) | speed-up (median) | "
            "machine ceiling (median) | efficiency (median) | worker CPU s (1 / N) | peak RSS GB (1) | peak RSS GB (N) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    table = ("\n".join(head + rows) + f"\n\nMachine ceiling: {default_workers()} processes of independent pure-Python work vs 1, "
             "measured in every round next to the pool runs; efficiency = speed-up / ceiling of the same round. "
             f"Load average at the end: {os.getloadavg()[0]:.1f}")
    if stage:
        table += ("\n\nThe whole verify stage (`--stage`: read; grade and count tokens in the workers; filter, split, "
                  "write), 1 worker vs all cores, best of the rounds (16k: --rounds, 100k: half, 400k: one); "
                  "transformers imported beforehand, as in a pipeline run:\n\n"
                  f"| traces | 1 worker s | {default_workers()} workers s | speed-up | machine ceiling (median) | "
                  f"traces/s ({default_workers()} workers) | pass 1 s (grade + count, 1 / N) | positives / pairs | peak RSS GB (N) |\n"
                  "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(stage))
    print(table)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    notes = DOC.read_text().split(NOTES, 1)[1] if DOC.exists() and NOTES in DOC.read_text() else ""
    DOC.write_text("# Grading throughput (redi.gradepool.GradingPool)\n\n"
                   f"`python benchmarks/bench_verify.py {' '.join(sys.argv[1:])}`: 1 worker and all cores interleaved in one "
                   "process, pool start-up included; best traces/s of the rounds, and the median of the per-round "
                   "speed-ups; worker CPU = the workers' CPU seconds (best round); peak RSS = parent + worker "
                   "processes.\n\n" + table + "\n\n" + NOTES + notes)


if __name__ == "__main__":
    main()

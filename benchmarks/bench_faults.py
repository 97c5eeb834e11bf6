"""What the fault handling costs, each against the obvious alternative in the same run (docs/faults.md).

1. Content fingerprints (redi.fingerprint): a cache hit (one stat per file) vs hashing the bytes again,
   on one big file and on a folder of small files.
2. The public grader (redi.grader.grade, bounded by a worker process) vs the unbounded in-process core
   (redi.grader._grade) on the same items; and the time to give up on ``9^{9^{9^{9}}}``.
3. The hostile download input of tests/_bad_rows.py: kinds, rows kept, time.

Usage: python benchmarks/bench_faults.py [--mb 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench_fingerprint(tmp: Path, mb: int) -> list[str]:
    import redi.fingerprint as F

    os.environ[F.ENV_CACHE] = str(tmp / "fp.json")
    big = tmp / "big.bin"
    with big.open("wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    folder = tmp / "folder"
    folder.mkdir()
    for i in range(500):
        (folder / f"part-{i:04d}.jsonl").write_bytes(os.urandom(20_000))
    rows = []
    for name, path in ((f"one file, {mb} MiB", big), ("folder, 500 files x 20 kB", folder)):
        t0 = time.perf_counter()
        fp = F.fingerprint(path)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert F.fingerprint(path) == fp
        hit = time.perf_counter() - t0
        rows.append(f"| {name} | {cold * 1000:.0f} ms | {hit * 1000:.1f} ms | {cold / hit:.0f}x |")
    return ["| input | hash the bytes | cache hit | ratio |", "|---|---:|---:|---:|", *rows]


def bench_grade() -> list[str]:
    from redi.grader import _grade, grade

    items = [(f"<think>step {i}</think> so \\boxed{{\\frac{{{i}}}{{{i % 7 + 1}}}}}", f"{i}/{i % 7 + 1}") for i in range(300)]
    t0 = time.perf_counter()
    first = grade(*items[0])
    t_first = time.perf_counter() - t0

    def per_call(fn) -> float:
        t0 = time.perf_counter()
        out.append([fn(r, g) for r, g in items])
        return (time.perf_counter() - t0) / len(items)

    out: list = []
    t_b_cold, t_b_warm = per_call(grade), per_call(grade)  # the worker's caches warm on the first pass
    t_i_cold, t_i_warm = per_call(_grade), per_call(_grade)  # this process's caches, the same way
    assert first is True and out[0] == out[1] == out[2] == out[3]
    t0 = time.perf_counter()
    tower = grade("\\boxed{9^{9^{9^{9}}}}", "1", timeout_s=5.0)
    t_tower = time.perf_counter() - t0
    return ["| call | time |", "|---|---:|",
            f"| first `grade` of a process (starts the worker) | {t_first * 1000:.0f} ms |",
            f"| `grade` (bounded, worker process), 300 new fraction answers, per call | {t_b_cold * 1000:.2f} ms |",
            f"| `_grade` (unbounded, in-process), the same 300, per call | {t_i_cold * 1000:.2f} ms |",
            f"| `grade` again (worker caches warm), per call | {t_b_warm * 1000:.3f} ms |",
            f"| `_grade` again (caches warm), per call | {t_i_warm * 1000:.3f} ms |",
            f"| `grade(\"\\\\boxed{{9^{{9^{{9^{{9}}}}}}}}\", \"1\")`, timeout_s=5 | {t_tower:.1f} s -> {tower} |"]


def bench_hostile(tmp: Path) -> list[str]:
    sys.path.insert(0, str(REPO / "tests"))
    from _bad_rows import write_bad_input

    from redi.config.data import DataConfig
    from redi.data import download

    exp = write_bad_input(tmp / "hostile")
    t0 = time.perf_counter()
    s = download(DataConfig(source="local", local_path=str(tmp / "hostile")), tmp / "out", progress=False)
    dt = time.perf_counter() - t0
    good_traces = sum(len(g["traces"]) for g in exp.good.values())
    return [f"- bad kinds: {len(exp.bad_kinds)} ({len(exp.bad)} bad rows / files / row groups); quirks (valid, kept): {len(exp.quirks)}",
            f"- good rows kept: {s['problems']} of {len(exp.good)} ({s['traces']} of {good_traces} traces); bad rows counted: {s['bad_rows']}",
            f"- unreadable, named: {', '.join(u['where'] for u in s['unreadable'])}; good rows inside them (lost): {len(exp.lost)}",
            f"- download of the {s['rows_read']} items: {dt * 1000:.0f} ms"]


def main() -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        out = ["## Fingerprints", "", *bench_fingerprint(tmp, args.mb), "", "## Grader", "", *bench_grade(), "",
               "## Hostile download input", "", *bench_hostile(tmp)]
    print("\n".join(out))


if __name__ == "__main__":
    main()

"""Peak RSS of the download stage on generated local files of 50k and 500k traces: memory must stay flat.

Each run is a fresh child process (so peaks do not mix); prints the table with the 500k/50k ratio and
writes docs/benchmarks/download_memory.md. Usage: python benchmarks/bench_download_memory.py [--small]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "download_memory.md"
TRACE = "<think>\n" + "step {i}: 12 + 3 * 4 = 24\n" * 30 + "</think>\nThe answer is \\boxed{{{a}}}."


def make_file(path: Path, n_traces: int, per_problem: int = 4) -> None:
    """An OpenR1-Math-220k-schema jsonl with n_traces traces (~800 bytes each), written streaming."""
    with path.open("w") as f:
        for p in range(n_traces // per_problem):
            gens = [TRACE.format(i=p, a=p + k) for k in range(per_problem)]
            f.write(json.dumps({"problem": f"Problem number {p}: what is {p} + 0?", "answer": str(p), "source": "olympiads",
                                "uuid": str(p), "generations": gens, "finish_reasons": ["stop"] * per_problem,
                                "is_reasoning_complete": [True] * per_problem, "correctness_math_verify": [k == 0 for k in range(per_problem)],
                                "correctness_llama": [k == 0 for k in range(per_problem)], "problem_type": "x", "question_type": "x",
                                "correctness_count": 1, "messages": []}) + "\n")


def _child(path: str, out: str, q) -> None:
    from redi.config.data import DataConfig
    from redi.data import download

    t0 = time.monotonic()
    s = download(DataConfig(source="local", local_path=path), Path(out), progress=False)
    q.put((s["traces"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, time.monotonic() - t0))


def measure(path: Path, out: Path) -> tuple[int, float, float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(str(path), str(out), q))
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="5k and 50k instead of 50k and 500k (quick check)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sizes = (5_000, 50_000) if args.small else (50_000, 500_000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            f = Path(tmp) / f"in{n}.jsonl"
            make_file(f, n)
            traces, gb, secs = measure(f, Path(tmp) / f"out{n}")
            rows.append((n, traces, f.stat().st_size / 1e6, gb, secs))
            logging.info("%d traces: peak RSS %.3f GB, %.1f s", traces, gb, secs)
    lines = ["| traces | input MB | peak RSS GB | seconds | traces/s |", "|---|---|---|---|---|"]
    lines += [f"| {t:,} | {mb:,.0f} | {gb:.3f} | {s:.1f} | {t / s:,.0f} |" for _, t, mb, gb, s in rows]
    ratio = rows[1][3] / rows[0][3]
    lines.append(f"\nPeak RSS ratio {rows[1][1]:,} / {rows[0][1]:,} traces: **{ratio:.2f}x** for {rows[1][1] / rows[0][1]:.0f}x the rows.")
    table = "\n".join(lines)
    print(table)
    if not args.small:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text("# Download stage memory (streaming normaliser)\n\n`python benchmarks/bench_download_memory.py`: each size "
                       "in a fresh process (spawn), peak RSS = ru_maxrss of that process, input = an OpenR1-Math-220k-schema jsonl "
                       "(4 traces per problem).\n\n" + table + "\n")


if __name__ == "__main__":
    main()

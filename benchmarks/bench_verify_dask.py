"""The verify stage on a 2-worker Dask cluster vs the local process pool, on 100k traces (ratio in one run).

    .venv/bin/python benchmarks/bench_verify_dask.py                  # 100k traces (25,000 problems x 4), 3 rounds
    .venv/bin/python benchmarks/bench_verify_dask.py --problems 1000 --rounds 1   # a quick check

The benchmark starts a real ``dask scheduler`` and two ``dask worker`` processes (one thread each, as on two
machines, but here on the same 2 cores) and runs the whole verify stage (``redi.verify.verify_and_split``:
read, grade and count tokens, filter, split, write) on the same traces with ``verify.executor: processes``
(2 local grading workers) and ``verify.executor: dask`` at the scheduler's address, alternated ``--rounds``
times (the machine is shared, so alternatives are interleaved). Both must give the same labels (checked
on every round). Prints a table and writes docs/benchmarks/verify_dask.md.

What it shows: the cost of going through a cluster (shipping shards to the workers, the scheduler's
bookkeeping, the workers' own grading pools) against the pool on the same cores. On a real cluster the
workers bring their own cores; here they share the pool's two, so the ratio is the overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _dask_cluster import dask_cluster  # noqa: E402 - the tests' real cluster (scheduler + worker processes)

DOC = ROOT / "docs" / "benchmarks" / "verify_dask.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=25000, help="synthetic problems (x 4 traces each)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=2000, help="verify.shard_size for the Dask run (the default)")
    ap.add_argument("--out", type=Path, default=DOC)
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import transformers.models.auto.tokenization_auto  # noqa: F401 - imported in a pipeline run before verify

    from redi.config.data import DataConfig, SynthConfig
    from redi.config.verify import VerifyConfig
    from redi.data import download
    from redi.tinymodel import _training_texts, train_tokenizer
    from redi.verify import verify_and_split

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        download(DataConfig(synth=SynthConfig(n_train=args.problems, n_val=0, n_test=0, traces_per_problem=4)), tmp,
                 progress=False)
        tok = tmp / "tok"
        train_tokenizer(list(_training_texts(tmp / "traces.parquet", 2000)), 512).save_pretrained(str(tok))
        t0 = time.monotonic()
        with dask_cluster(tmp) as addr:
            startup = time.monotonic() - t0
            cfgs = {"local pool (2 processes)": VerifyConfig(max_prompt_tokens=256, max_response_tokens=256,
                                                            positives="all", workers=2),
                    "Dask, 2 workers": VerifyConfig(max_prompt_tokens=256, max_response_tokens=256, positives="all",
                                                    executor="dask", dask_address=addr, shard_size=args.shard_size)}
            secs: dict[str, list[float]] = {k: [] for k in cfgs}
            summary: dict[str, dict] = {}
            for r in range(args.rounds):
                labels = {}
                for name, cfg in (cfgs.items() if r % 2 == 0 else reversed(cfgs.items())):
                    out = tmp / f"out-{r}-{len(labels)}"
                    t0 = time.monotonic()
                    s = verify_and_split(cfg, tmp / "traces.parquet", tok, out, {})
                    secs[name].append(time.monotonic() - t0)
                    summary[name] = s
                    labels[name] = pq.read_table(out / "labelled.parquet", columns=["label_ours"]).column(0).to_pylist()
                    print(f"round {r + 1}: {name}: {secs[name][-1]:.1f} s", flush=True)
                a, b = labels.values()
                if a != b:
                    raise SystemExit(f"round {r + 1}: the Dask cluster's labels differ from the local pool's")
    n = summary["Dask, 2 workers"]["traces"]
    med = {k: statistics.median(v) for k, v in secs.items()}
    pool, dask = med["local pool (2 processes)"], med["Dask, 2 workers"]
    lines = [
        "# Verify stage: 2-worker Dask cluster vs the local process pool (`benchmarks/bench_verify_dask.py`)",
        "",
        f"`python benchmarks/bench_verify_dask.py {' '.join(sys.argv[1:])}`".rstrip() + f", {time.strftime('%Y-%m-%d %H:%M')} UTC, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end. {n:,} synthetic traces "
        f"({args.problems:,} problems x 4); the whole verify stage, alternated {args.rounds} times; identical labels "
        f"on every round. Dask: a `dask scheduler` and two `dask worker` processes (1 thread each) started by the "
        f"benchmark on 127.0.0.1 ({startup:.1f} s to start, not counted), `shard_size` {args.shard_size}.",
        "",
        "| executor | " + " | ".join(f"round {i + 1} s" for i in range(args.rounds)) + " | median s | traces/s | vs local pool |",
        "|---|" + "---:|" * (args.rounds + 3),
    ]
    for k, v in secs.items():
        lines.append(f"| {k} | " + " | ".join(f"{x:.1f}" for x in v) + f" | {med[k]:.1f} | {n / med[k]:,.0f} | "
                     f"{med[k] / pool:.2f}x |")
    lines += ["", f"Dask / local pool wall time: **{dask / pool:.2f}x** on the same 2 cores. The cluster's workers here "
              "share the pool's cores, so parity is the best this machine can show: the ratio is the cost of the cluster "
              "path (shards shipped to the workers, the scheduler's bookkeeping, each worker's grading process), not a "
              "speed-up; on a real cluster each worker brings its own cores (docs/scaling.md). The first round includes "
              "each worker starting its grading process (kept across shards and runs).", "",
              "Before each Dask worker kept one grading process across shards (a pool started per shard), the same "
              "benchmark measured 3.53x (local pool 5.5 s, Dask 19.4 s, median of 3, same session).", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

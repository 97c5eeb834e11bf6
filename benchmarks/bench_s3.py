"""A DAG with its artifact root on a local S3 server (moto) vs a local folder: wall-time ratio in one run.

    .venv/bin/python benchmarks/bench_s3.py                 # the tiny recipe of the tests (every stage, seconds)
    .venv/bin/python benchmarks/bench_s3.py --demo --reps 1 # the demo recipe (minutes per run)
    .venv/bin/python benchmarks/bench_s3.py --demo --set sft.max_steps=300 --set data.synth.n_train=1000 --reps 1

Measured in ONE process, alternatives interleaved (the machine is shared and noisy), after a throwaway
cold run that pays the imports:
1. cold full run (``Pipeline.run``: every node built, registered, reported) into a fresh local folder vs into
   a fresh prefix of a moto standalone server on 127.0.0.1 (fresh local cache): the s3 run also uploads
   every artifact, reads manifests, mirrors checkpoints and the registration;
2. fully cached rerun, same machine (warm cache): a manifest read per node vs local checksum stamps;
3. fully cached rerun from an empty cache (another machine): every artifact downloaded and verified.
The moto server runs on the same cores as the pipeline (a real store would not), so its CPU is billed to
the s3 side. Prints a table and writes docs/benchmarks/s3.md (``--demo``: docs/benchmarks/s3_demo.md).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_moto() -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


class StoreClock:
    """Wall seconds spent inside redi.storage.Remote calls (outermost calls only): the store's own cost,
    which the machine's noise does not blur the way a difference of two wall times is blurred."""

    def __init__(self) -> None:
        from redi import storage

        self.seconds, self.calls, self._depth = 0.0, 0, 0
        for name in ("check", "read_manifest", "download", "upload", "commit", "listdir", "find", "remove",
                     "publish", "remove_stale", "pull", "pull_tree", "push_tree"):
            setattr(storage.Remote, name, self._wrap(getattr(storage.Remote, name)))

    def _wrap(self, fn):
        def timed(*a, **k):
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - t0
                    self.calls += 1
        return timed


def tiny_tree() -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest_orchestration import TINY  # the recipe every orchestration test runs

    return copy.deepcopy(TINY)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", action="store_true", help="the demo recipe instead of the tests' tiny one")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe overrides (KEY=VALUE)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="default docs/benchmarks/s3.md (--demo: s3_demo.md)")
    args = ap.parse_args()
    args.out = args.out or str(REPO / "docs" / "benchmarks" / ("s3_demo.md" if args.demo else "s3.md"))
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    proc, port = start_moto()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    import s3fs
    import yaml

    from redi.config import load_recipe
    from redi.pipeline import Pipeline

    s3fs.S3FileSystem().mkdir("bench")
    base = REPO / "redi" / "recipes" / "demo.yaml" if args.demo else None
    if base is None:
        (work / "tiny.yaml").write_text(yaml.safe_dump(tiny_tree(), sort_keys=False))
        base = work / "tiny.yaml"

    def recipe(root: str, cache: Path):
        return load_recipe(base, [*args.overrides, f"run.artifact_root={root}", f"run.cache_dir={cache}"])

    clock = StoreClock()
    store_s: list[tuple[float, int]] = []  # (seconds in store calls, calls) of each s3 cold run

    def timed(root: str, cache: Path, cold: bool = False) -> float:
        s0, c0 = clock.seconds, clock.calls
        t0 = time.perf_counter()
        Pipeline(recipe(root, cache)).run()
        if cold and root.startswith("s3://"):
            store_s.append((clock.seconds - s0, clock.calls - c0))
        return time.perf_counter() - t0

    def stop(*_):  # SIGTERM: still stop the server (the finally below)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        # imports and one-time initialisation, billed to nobody (the tiny recipe: seconds)
        (work / "warm.yaml").write_text(yaml.safe_dump(tiny_tree(), sort_keys=False))
        t0 = time.perf_counter()
        Pipeline(load_recipe(work / "warm.yaml", [f"run.artifact_root={work / 'warmup'}"])).run()
        print(f"warm-up (tiny, local) {time.perf_counter() - t0:.1f}s", flush=True)
        rows: dict[str, list[float]] = {k: [] for k in ("local cold", "s3 cold", "local cached", "s3 cached (warm cache)",
                                                          "s3 cached (empty cache)")}
        for i in range(args.reps):
            local, url = str(work / f"local{i}"), f"s3://bench/run{i}"
            order = [("local", local), ("s3", url)] if i % 2 == 0 else [("s3", url), ("local", local)]
            for kind, root in order:
                rows[f"{kind} cold"].append(timed(root, work / f"c{kind}{i}", cold=True))
            for kind, root in order:
                name = "local cached" if kind == "local" else "s3 cached (warm cache)"
                rows[name].append(timed(root, work / f"c{kind}{i}"))
            rows["s3 cached (empty cache)"].append(timed(url, work / f"c-fresh{i}"))
            print(f"rep {i + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in rows.items()), flush=True)
        fs = s3fs.S3FileSystem()
        stored = sum(fs.du("bench/run0", total=False).values())
    finally:
        proc.kill()

    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = {"cold": med["s3 cold"] / med["local cold"], "cached": med["s3 cached (warm cache)"] / med["local cached"],
             "fresh": med["s3 cached (empty cache)"] / med["local cached"]}
    what = "demo recipe (redi/recipes/demo.yaml)" if args.demo else "tiny recipe (tests/conftest_orchestration.TINY)"
    if args.overrides:
        what += " with " + " ".join(f"`{o}`" for o in args.overrides)
    lines = [
        f"# Artifact root on S3 (moto on 127.0.0.1) vs a local folder: {what}",
        "",
        f"`python benchmarks/bench_s3.py{' --demo' if args.demo else ''}{''.join(' --set ' + o for o in args.overrides)} "
        f"--reps {args.reps}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the end) shared with the moto server itself; "
        f"{stored / 1e6:.1f} MB of objects per run on the store. Median of {args.reps} (each rep interleaves both roots).",
        "",
        "| run | " + " | ".join(f"rep {i + 1}" for i in range(args.reps)) + " | median s |",
        "|---|" + "---:|" * (args.reps + 1),
        *(f"| {k} | " + " | ".join(f"{x:.1f}" for x in v) + f" | {med[k]:.1f} |" for k, v in rows.items()),
        "",
        f"- cold full run, s3 / local: **{ratio['cold']:.2f}x** (goal <= 1.15x)",
        f"- time inside store calls during the s3 cold runs (check, manifest reads, uploads, conditional writes, "
        f"listings, mirrored runs/ and results/): {', '.join(f'{t:.1f} s in {n} calls' for t, n in store_s)}; "
        f"median {statistics.median(t for t, _ in store_s):.1f} s = "
        f"{100 * statistics.median(t for t, _ in store_s) / med['local cold']:.1f}% of the local cold run",
        f"- cached rerun, s3 with a warm cache / local: {ratio['cached']:.2f}x",
        f"- cached rerun, s3 from an empty cache (another machine: every artifact downloaded and verified) / local cached: "
        f"{ratio['fresh']:.2f}x",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

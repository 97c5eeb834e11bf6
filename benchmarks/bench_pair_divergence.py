"""Pair divergence of real samples beside the synthetic teacher's two styles, with trace tokens and cost.

(i) real: Qwen2.5-Math's 100 MATH problems x 8 sampled CoT answers with labels
(``<benchmark dir>/qwen25math_cot_samples/test.jsonl``; skipped when absent); (ii) ``synth.style: terse``
and (iii) ``realistic``, each on the demo recipe's data (deployments/demo). For each: the unmatched share
(redi.divergence) of the first wrong sample against the first right one (REDI's pair) and of the second
right one against the first, then every sample pooled; median [IQR].

Per style also: the download stage at the demo's size (seconds, file size), and trace tokens under the
demo's tokenizer (the model stage's BPE, trained on that style's traces): mean, median, p90, and the
share over the demo's ``verify.max_response_tokens``.

Any other teacher (a Hub or local source, the ``generate`` stage) is measured from its download
artifact with ``--traces PATH/traces.parquet`` (labels: ``label_math_verify``).

Writes docs/benchmarks/pair_divergence.md (not with --traces). Usage:
python benchmarks/bench_pair_divergence.py [--problems 400] [--benchmark-dir DIR] [--traces FILE ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from redi.config.recipe import load_recipe
from redi.data import download
from redi.divergence import PairDivergence, jsonl_problems, openr1_problems, pair_divergence, traces_problems
from redi.synth import generate
from redi.tinymodel import build_tiny, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks" / "pair_divergence.md"
REAL = "qwen25math_cot_samples/test.jsonl"


def real_file(benchmark_dir: str | None) -> Path:
    base = benchmark_dir or os.environ.get("REDI_BENCHMARK_DIR") or str(ROOT.parent / "shared" / "data")
    return Path(base) / REAL


def style_figures(style: str, problems: int) -> dict:
    """Divergence on the demo data's first `problems` problems; download time and tokens at the demo's size."""
    recipe = load_recipe(ROOT / "deployments" / "demo", [f"data.synth.style={style}"])
    rows, _, _ = generate(recipe.data.synth)
    div = pair_divergence(openr1_problems(rows[:problems]))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        summary = download(recipe.data, Path(tmp) / "data", progress=False)
        seconds = time.monotonic() - t0
        build_tiny(recipe.model, Path(tmp) / "model", Path(tmp) / "data" / "traces.parquet")
        tok = load_tokenizer(Path(tmp) / "model")
        traces = pd.read_parquet(Path(tmp) / "data" / "traces.parquet", columns=["trace"])["trace"].tolist()
    lens = [len(ids) for ids in tok(traces, add_special_tokens=False)["input_ids"]]
    limit = recipe.verify.max_response_tokens
    return {"div": div, "seconds": seconds, "mb": summary["file_bytes"] / 1e6, "traces": summary["traces"],
            "tok_mean": statistics.mean(lens), "tok_median": statistics.median(lens),
            "tok_p90": statistics.quantiles(lens, n=10)[-1], "tok_max": max(lens), "over": sum(n > limit for n in lens) / len(lens), "limit": limit,
            "chars": statistics.mean(len(t) for t in traces)}


def table(rows: dict[str, PairDivergence]) -> list[str]:
    out = ["| samples | first wrong vs first right (REDI pair) | second right vs first right | every wrong vs first right | every later right vs first right |",
           "|---|---|---|---|---|"]
    for name, d in rows.items():
        pooled = [s.fmt() if s else "-" for s in (d.wrong_vs_right, d.right_vs_right)]
        out.append(f"| {name} | {d.first_wrong.fmt()} | {d.second_right.fmt()} | {pooled[0]} | {pooled[1]} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=400, help="demo problems measured per style (divergence)")
    ap.add_argument("--benchmark-dir", default=None, help="folder holding qwen25math_cot_samples/ (default: $REDI_BENCHMARK_DIR, else ../shared/data)")
    ap.add_argument("--traces", nargs="*", default=[], help="traces.parquet of other teachers' download artifacts, measured alone")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    divs: dict[str, PairDivergence] = {}
    if args.traces:
        for t in args.traces:
            divs[t] = pair_divergence(traces_problems(t))
        print("\n".join(table(divs)))
        return
    path = real_file(args.benchmark_dir)
    if path.exists():
        t0 = time.monotonic()
        divs["real: Qwen2.5-Math CoT, 100 MATH problems x 8"] = pair_divergence(jsonl_problems(path))
        print(f"real samples measured in {time.monotonic() - t0:.0f} s")
    else:
        print(f"real samples skipped: {path} not found (pass --benchmark-dir or set REDI_BENCHMARK_DIR)")
    figs = {}
    for style in ("terse", "realistic"):
        figs[style] = style_figures(style, args.problems)
        divs[f"synthetic `{style}`, demo data, first {args.problems} problems x 4"] = figs[style]["div"]
    lines = ["# Pair divergence: real samples and the synthetic teacher", "",
             "Written by `benchmarks/bench_pair_divergence.py` (redi.divergence: unmatched share = 1 - matched characters /",
             "len(compared sample), `difflib.SequenceMatcher(None, first_right, sample, autojunk=False)`; median [IQR]).", "",
             *table(divs), "",
             f"| style | trace chars (mean) | trace tokens, demo tokenizer: mean / median / p90 / max | over {figs['terse']['limit']} tokens | download stage, demo size | parquet |",
             "|---|---|---|---|---|---|"]
    for style, f in figs.items():
        lines.append(f"| {style} | {f['chars']:.0f} | {f['tok_mean']:.0f} / {f['tok_median']:.0f} / {f['tok_p90']:.0f} / {f['tok_max']} | {100 * f['over']:.1f} % "
                     f"| {f['seconds']:.1f} s ({f['traces']} traces) | {f['mb']:.1f} MB |")
    text = "\n".join(lines) + "\n"
    print(text)
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

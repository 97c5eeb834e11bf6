"""The results store every evaluation appends to, and the views made from it (table, bar chart, history).

Store: a folder of Parquet part files (a Parquet dataset), local by default. ``append_metrics`` writes one
new part file atomically (temp file + ``os.replace``), so concurrent writers never corrupt each other and
a killed writer leaves no half row; ``load`` concatenates the parts. One row per (evaluation, benchmark),
plus a row ``benchmark == "average"`` with the macro average. Rates are fractions (0-1); views show %.

Row columns: :data:`COLUMNS` (+ ``metrics_json``, the benchmark's full metrics, every pass@k / maj@k).

Views (no Prefect import here; the Prefect layer turns ``Table.rows`` into a table artifact):
- :func:`comparison_table`: models x benchmarks, pass@1 ± SEM in %, like the paper's Table 1 (markdown, a
  numeric frame for CSV, and rows as a list of dicts): the paper's five benchmarks first in its column order,
  their mean ("avg5", the paper's Avg) when all five are there, then the extras and our macro average over
  every benchmark evaluated ("average"); with ``paper=True`` the paper's own numbers (:data:`PAPER_RESULTS`)
  as a row "paper: <model>" under our base / sft / redi rows;
- :func:`bar_chart`: grouped bars models x benchmarks with SEM error bars (PNG);
- :func:`history_plot`: a metric over time per model, one panel per benchmark (nightly runs, PNG).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .benchmarks import REGISTRY, paper_benchmarks

log = logging.getLogger(__name__)

AVERAGE = "average"
COLUMNS: dict[str, str] = {
    "time": "evaluation time, seconds since the epoch (UTC)",
    "run": "run name (recipe run.name)",
    "label": "model label within the run (base / sft / redi / any name)",
    "model_key": "content hash of the evaluated model artifact",
    "recipe_hash": "hash of the full resolved recipe",
    "eval_key": "key of the evaluation artifact the metrics come from",
    "kind": "pipeline / stage / nightly / eval (who appended the row; stage = a stage rerun, not registered)",
    "benchmark": "benchmark name, or 'average' (macro average over the evaluation's benchmarks)",
    "pass@1": "mean correctness over n samples",
    "pass@1_sem": "std of the n per-sample-index scores / sqrt(n) (ddof 0, as the paper's code)",
    "pass@n": "unbiased pass@k at k = n (any sample correct)",
    "maj@n": "majority vote over the n samples",
    "no_answer_share": "samples without an extractable answer",
    "truncated_share": "samples that hit the token limit",
    "completion_tokens_mean": "mean completion tokens per sample (response length)",
    "completion_tokens_p50": "median completion tokens (none in the average row: a mean of medians is no median)",
    "completion_tokens_p90": "90th percentile of completion tokens (none in the average row)",
    "ungraded_share": "samples the grader could not judge (timeouts; counted wrong)",
    "n_problems": "problems evaluated",
    "n_samples": "samples per problem (n)",
    "temperature": "sampling temperature",
    "top_p": "nucleus sampling",
    "max_new_tokens": "generated-token limit",
}
_LABEL_ORDER = ["base", "sft", "redi"]  # the paper's row order; other labels follow by first evaluation time
PAPER_BENCHMARKS = paper_benchmarks()
"""The paper's table columns in its order: MATH-500, AIME24, AMC23 (= our ``amc``, rllm's 83), Minerva, OlympiadBench
(the ``redi.benchmarks`` entries with ``paper`` numbers)."""
PAPER_AVG = "avg5"
PAPER_PROTOCOL = "paper-final"
"""The evaluation protocol of the paper's final table: the pipeline shows the paper's numbers beside runs evaluated with it."""
PAPER_MODELS: dict[str, tuple[str, float]] = {
    "base": ("Qwen2.5-Math-1.5B", 28.1), "sft": ("Qwen-SFT-1.5B-5ep", 45.8), "redi": ("Qwen-REDI-1.5B", 49.5)}
"""The paper's final table (arXiv 2505.24850 v1; pass@1 over 16 samples, %): per run label, the model's name and
its Avg; the per-benchmark numbers are the benchmarks' (``BenchmarkSpec.paper``)."""
PAPER_RESULTS: dict[str, tuple[str, tuple[float, ...]]] = {
    label: (name, (*(REGISTRY[b].paper[label] for b in PAPER_BENCHMARKS), avg))
    for label, (name, avg) in PAPER_MODELS.items()}
"""Per run label, the model's name and its values on :data:`PAPER_BENCHMARKS` then their average."""


@dataclass
class Table:
    """A comparison table: ``frame`` (numeric, % and SEM columns, for CSV), ``markdown``, ``rows`` (list of dicts)."""

    frame: pd.DataFrame
    markdown: str
    rows: list[dict]


def rows_from_metrics(metrics: dict, *, run: str, label: str, model_key: str = "", recipe_hash: str = "", eval_key: str = "",
                      protocol: dict | None = None, kind: str = "eval", when: float | None = None) -> list[dict]:
    """Store rows for one evaluation's metrics.json (per benchmark + average)."""
    proto = {**(metrics.get("protocol") or {}), **(protocol or {})}
    when = time.time() if when is None else when
    per = dict(metrics.get("benchmarks", {}))
    if metrics.get("average"):
        per[AVERAGE] = metrics["average"]
    rows = []
    for bench, m in per.items():
        n = m.get("n_samples") or proto.get("n_samples")
        rows.append({
            "time": when, "run": run, "label": label, "model_key": model_key, "recipe_hash": recipe_hash, "eval_key": eval_key,
            "kind": kind, "benchmark": bench, "pass@1": m.get("pass@1"), "pass@1_sem": m.get("pass@1_sem"),
            "pass@n": m.get(f"pass@{n}") if n else None, "maj@n": m.get(f"maj@{n}") if n else None,
            "no_answer_share": m.get("no_answer_share"), "truncated_share": m.get("truncated_share"),
            "ungraded_share": m.get("ungraded_share"), "n_problems": m.get("n_problems"), "n_samples": n,
            **{k: m.get(k) for k in ("completion_tokens_mean", "completion_tokens_p50", "completion_tokens_p90")},
            "temperature": proto.get("temperature"), "top_p": proto.get("top_p"), "max_new_tokens": proto.get("max_new_tokens"),
            "metrics_json": json.dumps({k: v for k, v in m.items() if not k.endswith("_per_index")}, default=str),
        })
    return rows


class ResultsStore:
    """A Parquet dataset folder of evaluation results (append = one new part file, read = concat)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def append_rows(self, rows: list[dict]) -> Path | None:
        """Write rows as one new part file, atomically."""
        if not rows:
            return None
        self.path.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns()}-{os.getpid()}.parquet"
        tmp = self.path / f".tmp-{name}"
        pd.DataFrame(rows).to_parquet(tmp, index=False)
        os.replace(tmp, self.path / name)
        log.info("results: %d rows appended to %s", len(rows), self.path / name)
        return self.path / name

    def append_metrics(self, *, run: str, label: str, model_key: str, recipe_hash: str, eval_key: str, metrics: dict,
                       protocol: dict | None = None, kind: str = "eval", when: float | None = None) -> Path | None:
        """Append one evaluation (its metrics.json dict): a row per benchmark and one for the average."""
        return self.append_rows(rows_from_metrics(metrics, run=run, label=label, model_key=model_key, recipe_hash=recipe_hash,
                                                  eval_key=eval_key, protocol=protocol, kind=kind, when=when))

    def load(self, run: str | None = None, latest_only: bool = False, kind: str | None = None, label: str | None = None) -> pd.DataFrame:
        """Every row (sorted by time), optionally filtered; ``latest_only`` keeps each (run, label)'s latest evaluation."""
        parts = sorted(self.path.glob("part-*.parquet")) if self.path.exists() else []
        if not parts:
            return pd.DataFrame(columns=[*COLUMNS, "metrics_json"])
        df = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True).sort_values("time", kind="stable")
        for col, val in (("run", run), ("kind", kind), ("label", label)):
            if val is not None:
                df = df[df[col] == val]
        if latest_only and not df.empty:
            last = df.groupby(["run", "label"])["time"].transform("max")
            df = df[df["time"] == last]
        return df.reset_index(drop=True)


# ---------------------------------------------------------------- views


def _latest_cells(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, benchmark): the latest; `model` = label, or run/label when several runs are shown."""
    first = df.groupby(["run", "label"])["time"].transform("min")
    rank = df["label"].map({lab: i for i, lab in enumerate(_LABEL_ORDER)}).fillna(len(_LABEL_ORDER))
    df = df.assign(_rank=rank, _first=first).sort_values(["_rank", "_first", "run", "time"], kind="stable")
    df = df.groupby(["run", "label", "benchmark"], as_index=False, sort=False).last().drop(columns=["_rank", "_first"])
    many = df["run"].nunique() > 1
    return df.assign(model=[f"{r}/{lab}" if many else lab for r, lab in zip(df["run"], df["label"], strict=True)])


def _bench_cols(names: list[str]) -> list[str]:
    """Registered benchmarks in registry order (``redi.benchmarks.REGISTRY``), then the others sorted, then the average."""
    known = [b for b in REGISTRY if b in names]
    return known + sorted(b for b in names if b not in known and b != AVERAGE) + ([AVERAGE] if AVERAGE in names else [])


def _with_avg5(benches: list[str], val: pd.DataFrame, sem: pd.DataFrame | None, force: bool) -> tuple[list[str], pd.DataFrame, pd.DataFrame | None]:
    """Insert the paper's Avg (mean of its five benchmarks, no SEM) after them, when all five are there or ``force``."""
    if not (force or all(b in benches for b in PAPER_BENCHMARKS)):
        return benches, val, sem
    at = max((benches.index(b) for b in PAPER_BENCHMARKS if b in benches), default=-1) + 1
    cols = [*benches[:at], PAPER_AVG, *benches[at:]]
    val = val.assign(**{PAPER_AVG: val.reindex(columns=list(PAPER_BENCHMARKS)).astype(float).mean(axis=1, skipna=False)})
    return cols, val.reindex(columns=cols), None if sem is None else sem.assign(**{PAPER_AVG: float("nan")}).reindex(columns=cols)


def _col_name(b: str) -> str:
    return {AVERAGE: "Avg", PAPER_AVG: "Avg (paper's 5)"}.get(b, b)


def _fmt(v: Any, sem: Any) -> str:
    if v is None or pd.isna(v):
        return "–"
    return f"{100 * v:.1f} ± {100 * sem:.1f}" if sem is not None and not pd.isna(sem) else f"{100 * v:.1f}"


def comparison_table(df: pd.DataFrame, metric: str = "pass@1", paper: bool = False) -> Table:
    """Models x benchmarks (latest evaluation of each), `metric` in % with its SEM for pass@1 (paper Table 1).

    ``paper``: under each of our base / sft / redi rows, the paper's numbers for that model ("paper: <name>",
    pass@1 only; "–" where the paper has none). Comparable only when the evaluation followed the paper's
    protocol (the pipeline sets it when ``evaluate.prompt_protocol`` is a paper one)."""
    if df.empty:
        return Table(pd.DataFrame(), "(no results)", [])
    paper = paper and metric == "pass@1"
    cells = _latest_cells(df)
    models = list(dict.fromkeys(cells["model"]))
    benches = _bench_cols(list(dict.fromkeys(cells["benchmark"])))
    val = cells.pivot(index="model", columns="benchmark", values=metric).reindex(index=models, columns=benches)
    sem = cells.pivot(index="model", columns="benchmark", values="pass@1_sem").reindex(index=models, columns=benches) if metric == "pass@1" else None
    benches, val, sem = _with_avg5(benches, val, sem, paper)
    frame = (100 * val.astype(float)).round(2)
    if sem is not None:
        frame = pd.concat([frame, (100 * sem.astype(float)).round(2).add_suffix(" sem")], axis=1)
    who = cells.drop_duplicates("model").set_index("model")[["run", "label"]]
    rows, lines, paper_frame = [], [], []
    names = [_col_name(b) for b in benches]
    lines.append(f"| Model ({metric}, %) | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(benches))
    for m in models:
        txt = [_fmt(val.at[m, b], sem.at[m, b] if sem is not None else None) for b in benches]
        lines.append(f"| {m} | " + " | ".join(txt) + " |")
        rows.append({"model": m, "run": who.at[m, "run"], "label": who.at[m, "label"], **dict(zip(names, txt, strict=True))})
        if paper and who.at[m, "label"] in PAPER_RESULTS:
            name, nums = PAPER_RESULTS[who.at[m, "label"]]
            ref = dict(zip([*PAPER_BENCHMARKS, PAPER_AVG], nums, strict=True))
            ptxt = [f"{ref[b]:.1f}" if b in ref else "–" for b in benches]
            lines.append(f"| paper: {name} | " + " | ".join(ptxt) + " |")
            rows.append({"model": f"paper: {name}", "run": "paper", "label": who.at[m, "label"], **dict(zip(names, ptxt, strict=True))})
            paper_frame.append(pd.Series({b: ref.get(b) for b in benches}, name=f"paper: {name}", dtype=float))
    if paper_frame:
        frame = pd.concat([frame, pd.DataFrame(paper_frame)])
    lengths = length_table(cells, models, benches) if metric == "pass@1" else None
    if lengths is not None:
        frame = pd.concat([frame, lengths.frame], axis=1)
    n = cells["n_samples"].dropna()
    note = f"\n\n{metric} over {int(n.iloc[0])} samples per problem; ± = SEM over sample indices." if len(n) and n.nunique() == 1 else ""
    if PAPER_AVG in benches:
        note += "\n\nAvg (paper's 5) = mean of math500, aime24, amc, minerva_math, olympiadbench (the paper's Avg); Avg = every benchmark evaluated."
    if paper_frame:
        note += "\n\npaper: the paper's final table (arXiv 2505.24850 v1, pass@1 over 16 samples; its AMC23 column is our amc)."
    return Table(frame, "\n".join(lines) + note + (f"\n\n{lengths.markdown}" if lengths is not None else ""), rows)


def length_table(cells: pd.DataFrame, models: list[str], benches: list[str]) -> Table | None:
    """Response length per model and benchmark: "mean / p90 tokens, truncated %" (markdown) and numeric
    ``<benchmark> tokens mean|p90`` and ``<benchmark> truncated %`` columns (CSV). None when no row has lengths
    (results recorded before they were measured)."""
    if "completion_tokens_mean" not in cells or cells["completion_tokens_mean"].isna().all():
        return None
    benches = [b for b in benches if b in set(cells["benchmark"])]

    def pivot(col: str) -> pd.DataFrame:
        return cells.pivot(index="model", columns="benchmark", values=col).reindex(index=models, columns=benches).astype(float)

    mean, p90, cut = pivot("completion_tokens_mean"), pivot("completion_tokens_p90"), pivot("truncated_share")
    frame = pd.concat([mean.round(1).add_suffix(" tokens mean"), p90.round(1).add_suffix(" tokens p90"),
                       (100 * cut).round(2).add_suffix(" truncated %")], axis=1)

    def cell(m: str, b: str) -> str:
        if pd.isna(mean.at[m, b]):
            return "–"
        p = "" if pd.isna(p90.at[m, b]) else f" / {p90.at[m, b]:.0f}"
        return f"{mean.at[m, b]:.0f}{p} ({100 * cut.at[m, b]:.0f}%)"

    names = [_col_name(b) for b in benches]
    lines = ["| Model (response tokens: mean / p90 (truncated)) | " + " | ".join(names) + " |", "|---|" + "---|" * len(benches)]
    rows = []
    for m in models:
        txt = [cell(m, b) for b in benches]
        lines.append(f"| {m} | " + " | ".join(txt) + " |")
        rows.append({"model": m, **dict(zip(names, txt, strict=True))})
    note = "\n\nCompletion tokens per sample; the Avg column is the mean over benchmarks (no p90: a mean of p90s is none)."
    return Table(frame, "\n".join(lines) + note, rows)


def table_rows(df: pd.DataFrame, metric: str = "pass@1", paper: bool = False) -> list[dict]:
    """The comparison table as a list of dicts (for a Prefect table artifact)."""
    return comparison_table(df, metric, paper).rows


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(df: pd.DataFrame, path: str | Path, metric: str = "pass@1") -> Path:
    """Grouped bars: benchmarks on the x axis, one bar per model, SEM error bars for pass@1 (PNG)."""
    plt = _plt()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * max(1, df["benchmark"].nunique()) + 2), 3.6))
    if not df.empty:
        cells = _latest_cells(df)
        models = list(dict.fromkeys(cells["model"]))
        benches = _bench_cols(list(dict.fromkeys(cells["benchmark"])))
        width = 0.8 / len(models)
        for i, m in enumerate(models):
            c = cells[cells["model"] == m].set_index("benchmark").reindex(benches)
            err = 100 * c["pass@1_sem"].astype(float) if metric == "pass@1" else None
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(benches))]
            ax.bar(xs, 100 * c[metric].astype(float), width, yerr=err, capsize=2, label=m)
        ax.set_xticks(range(len(benches)), [_col_name(b) for b in benches], rotation=20, fontsize=8)
        ax.legend(fontsize=7)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} by benchmark (latest evaluation per model)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def history_plot(df: pd.DataFrame, path: str | Path, metric: str = "pass@1", benchmarks: list[str] | None = None) -> Path:
    """`metric` (%) over time, one line per run/model, one panel per benchmark (nightly runs; PNG)."""
    plt = _plt()
    path = Path(path)
    fig = history_figure(df, metric, benchmarks)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def history_figure(df: pd.DataFrame, metric: str = "pass@1", benchmarks: list[str] | None = None):
    """The figure of :func:`history_plot` (drawn, not saved).

    The time axis is UTC with date ticks (date and hour:minute when the evaluations span under two days);
    a lone evaluation gets a day either side, so the axis never zooms to microseconds."""
    import matplotlib.dates as mdates

    plt = _plt()
    benches = _bench_cols(list(dict.fromkeys(df["benchmark"]))) if not df.empty else []
    benches = [b for b in benches if benchmarks is None or b in benchmarks] or [AVERAGE]
    fig, axes = plt.subplots(1, len(benches), figsize=(3.6 * len(benches) + 1, 3.4), squeeze=False)
    times = pd.to_datetime(df["time"], unit="s") if len(df) else pd.Series([], dtype="datetime64[ns]")
    for ax, b in zip(axes[0], benches, strict=True):
        sub = df[df["benchmark"] == b]
        for (run, label), g in sub.groupby(["run", "label"]):
            g = g.sort_values("time")
            ax.plot(pd.to_datetime(g["time"], unit="s"), 100 * g[metric].astype(float), marker="o", ms=4, label=f"{run}/{label}")
        ax.set_title("Avg" if b == AVERAGE else b, fontsize=9)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))  # from 0; at least 0-1 % when every score is 0
        fmt = "%Y-%m-%d"
        if len(times):
            lo, hi = times.min(), times.max()
            if hi - lo < pd.Timedelta(minutes=1):  # one evaluation (or one burst): a day either side
                pad = pd.Timedelta(days=1)
            elif hi - lo < pd.Timedelta(days=2):  # several the same day: hours and minutes
                pad, fmt = max((hi - lo) * 0.1, pd.Timedelta(minutes=30)), "%m-%d %H:%M"
            else:
                pad = (hi - lo) * 0.05
            ax.set_xlim(lo - pad, hi + pad)
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=2, maxticks=5))
        ax.xaxis.set_major_formatter(mdates.DateFormatter(fmt))
        ax.tick_params(axis="x", labelsize=7, rotation=25)
        ax.set_xlabel("evaluation time (UTC)", fontsize=8)
        ax.grid(alpha=0.3)
    if len(df):
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.canvas.draw()
    return fig

"""The ``evaluate`` stage: sample every benchmark through one engine, grade every sample, compute metrics.

``evaluate_model(cfg, model_dir, out_dir, extra_paths, label, work)`` writes

- ``out_dir/samples.parquet``: one row per sample (:data:`SAMPLE_FILE_COLUMNS`), in benchmark, problem and
  sample order, so grading can be redone without generating (``regrade``, its own cached step in the pipeline);
- ``out_dir/metrics.json``: per-benchmark metrics (``redi.metrics``), their macro average, the protocol,
  skipped benchmarks, grading counters and timings. The returned summary is the same dict.

Order of work: the model folder and its tokenizer/chat template are checked first (no engine is started
for a bad path), then every benchmark is loaded (a benchmark that cannot be loaded is skipped and reported
when ``cfg.skip_missing``), then ONE generator (vLLM with ``data_parallel_size`` engines, or transformers)
runs all benchmarks as one stream of problems. Grading overlaps generation: each finished problem's samples
are submitted to a ``redi.gradepool.GradingPool`` (worker processes, hard per-sample deadline) while the
engines generate the rest.

Resume: with ``work`` (the stage's work folder, kept by ``ArtifactStore.build`` across a killed attempt),
each finished problem is appended to ``work/generation.jsonl`` as it arrives (:class:`GenerationLog`); a
rerun grades those samples again and generates only the rest, and draws the same samples as an
uninterrupted run (per-problem seeds). Lost by a kill: only the problems in flight.

Nothing leaves the denominator: a grader timeout or crash gives verdict None (counted as wrong and
reported as ``ungraded`` plus the pool's timeout/crash counters), a sample that hit the token limit is
``truncated``, a prompt too long for the context yields empty truncated samples.

Departure from the paper: the paper's final tables were graded with the rllm/DeepScaleR grader; we grade
with the project's Math-Verify grader (as open-r1 and the paper's intermediate evaluations do).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from . import benchmarks as B
from . import generate as G
from . import interrupt
from . import metrics as M
from .config.evaluate import EvaluateConfig
from .schema import stable_id

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.parquet"
METRICS_FILE = "metrics.json"
PROGRESS_FILE = "generation.jsonl"
LENGTHS_PLOT = "lengths.png"
ENGINE_LOG = "engine.log"  # the vLLM engines' stdout/stderr (redi.generate.open_generator)

SAMPLE_FILE_COLUMNS: dict[str, str] = {
    **G.SAMPLE_COLUMNS,
    "gold": "the benchmark's gold answer",
    "extracted": "the sample's final answer (last \\boxed{}, redi.grader.last_boxed) or None",
    "verdict": "redi.grader.grade: True / False / None (grader timeout, crash or unparseable gold: counts as wrong)",
}


# ---------------------------------------------------------------- benchmarks


def load_benchmarks(cfg: EvaluateConfig, extra_paths: dict[str, Path] | None) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """({name: rows} that loaded, {name: reason} skipped). Raises when nothing loads or skip_missing is off."""
    loaded, skipped = {}, {}
    for name in dict.fromkeys(cfg.benchmarks):
        try:
            loaded[name] = B.load_benchmark(name, cfg, extra_paths or {})
        except B.BenchmarkError as e:
            if not cfg.skip_missing:
                raise
            log.warning("benchmark %s skipped: %s", name, e)
            skipped[name] = str(e)
    if not loaded:
        raise B.BenchmarkError("no benchmark could be loaded:\n" + "\n".join(f"  {k}: {v}" for k, v in skipped.items()))
    return loaded, skipped


# ---------------------------------------------------------------- metrics from a samples table


def _matrix(g: pd.DataFrame, col: str) -> list[list]:
    return [grp.sort_values("sample_index")[col].tolist() for _, grp in g.groupby("problem_id", sort=False)]


def benchmark_table_metrics(df: pd.DataFrame, cfg: EvaluateConfig) -> dict:
    """Metrics of one benchmark's samples; every problem must have exactly cfg.n_samples samples."""
    n = cfg.n_samples
    sizes = df.groupby("problem_id", sort=False).size()
    bad = sizes[sizes != n]
    if len(bad):
        raise ValueError(f"{len(bad)} problems do not have {n} samples (e.g. {bad.index[0]!r}: {bad.iloc[0]}); refusing to drop any")
    verdicts = [[None if pd.isna(v) else bool(v) for v in row] for row in _matrix(df, "verdict")]
    answers = [[None if pd.isna(a) else a for a in row] for row in _matrix(df, "extracted")]
    m = M.benchmark_metrics(verdicts, answers, _matrix(df, "finish_reason"), maj_ks=cfg.pass_k)
    lengths = M.length_stats(df["completion_tokens"].tolist(), df["finish_reason"].tolist())
    m.update(lengths)
    m["mean_completion_tokens"] = lengths["completion_tokens_mean"]  # the name earlier metrics.json files carry
    return m


def compute_metrics(samples: pd.DataFrame, cfg: EvaluateConfig) -> dict[str, Any]:
    """{"benchmarks": {name: metrics}, "average": macro average} from a graded samples table."""
    per = {name: benchmark_table_metrics(g, cfg) for name, g in samples.groupby("benchmark", sort=False)}
    return {"benchmarks": per, "average": M.macro_average(per)}


def protocol(cfg: EvaluateConfig) -> dict:
    """The sampling protocol recorded with every result."""
    return {"n_samples": cfg.n_samples, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.new_tokens(),
            "backend": cfg.backend, "dtype": cfg.dtype, "seed": cfg.seed, "prompt_protocol": cfg.protocol().name}


# ---------------------------------------------------------------- grading


def _extract(text: str) -> str | None:
    from .grader import last_boxed

    return last_boxed(text) if isinstance(text, str) else None


def grade_table(samples: pd.DataFrame, cfg: EvaluateConfig, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Grade every row of a samples table (text, gold) with redi.gradepool.grade_many; returns (table, pool stats)."""
    from .gradepool import grade_many

    stats: dict = {}
    verdicts = grade_many(list(zip(samples["text"], samples["gold"], strict=True)), workers=cfg.grade_workers,
                          timeout_s=cfg.grade_timeout_s, progress=progress, desc="grading", stats=stats)
    out = samples.copy()
    out["verdict"] = pd.array(verdicts, dtype="boolean")
    out["extracted"] = [_extract(t) for t in out["text"]]
    return out, stats


def _grading_summary(stats: dict) -> dict:
    return {k: stats.get(k, 0) for k in ("timeouts", "crashes", "done")} | {"timeout_examples": stats.get("timeout_examples", [])[:3]}


def write_outputs(out_dir: Path, samples: pd.DataFrame, summary: dict) -> dict:
    """samples.parquet + metrics.json (the summary) + lengths.png (response-length histogram) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = list(SAMPLE_FILE_COLUMNS)
    samples[cols].to_parquet(out_dir / SAMPLES_FILE, index=False)
    (out_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2, sort_keys=False, default=str))
    length_histogram(samples, out_dir / LENGTHS_PLOT, summary.get("label") or "", summary.get("protocol", {}).get("max_new_tokens"))
    return summary


def length_histogram(samples: pd.DataFrame, path: Path, label: str = "", limit: int | None = None) -> Path:
    """One model's completion lengths: a histogram per benchmark (one panel each, shared bins), samples that
    hit the token limit stacked in red, the mean and p90 marked (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(samples.groupby("benchmark", sort=False))
    top = max(int(samples["completion_tokens"].max() or 0), limit or 0, 1)
    bins = np.linspace(0, top, min(40, top) + 1)
    fig, axes = plt.subplots(len(groups), 1, figsize=(6.4, 1.2 + 1.7 * len(groups)), squeeze=False, sharex=True)
    for ax, (bench, g) in zip(axes[:, 0], groups, strict=True):
        cut = g["finish_reason"] == "length"
        ax.hist([g.loc[~cut, "completion_tokens"], g.loc[cut, "completion_tokens"]], bins=bins, stacked=True,
                color=["#4c72b0", "#c44e52"], label=["stopped (EOS)", "truncated (token limit)"])
        stats = M.length_stats(g["completion_tokens"].tolist(), g["finish_reason"].tolist())
        for key, style in (("completion_tokens_mean", "-"), ("completion_tokens_p90", "--")):
            ax.axvline(stats[key], color="black", linestyle=style, linewidth=1)
        ax.set_title(f"{bench}: mean {stats['completion_tokens_mean']:.0f}, p50 {stats['completion_tokens_p50']:.0f}, "
                     f"p90 {stats['completion_tokens_p90']:.0f} tokens, {100 * stats['truncated_share']:.0f}% truncated", fontsize=9)
        ax.set_ylabel("samples")
    axes[0, 0].legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("completion tokens (solid line: mean, dashed: p90)")
    fig.suptitle(f"response length{f' of {label}' if label else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def regrade(samples_path: Path, cfg: EvaluateConfig, out_dir: Path) -> dict:
    """Grade a saved samples.parquet again (no generation); writes samples.parquet + metrics.json to out_dir."""
    t0 = time.time()
    samples = pd.read_parquet(samples_path)
    missing = [c for c in ("benchmark", "problem_id", "sample_index", "text", "gold", "finish_reason", "completion_tokens") if c not in samples]
    if missing:
        raise ValueError(f"{samples_path}: not a samples table, missing columns {missing}")
    graded, stats = grade_table(samples, cfg)
    summary = {**compute_metrics(graded, cfg), "protocol": protocol(cfg), "grading": _grading_summary(stats),
               "n_samples_total": len(graded), "regraded_from": str(samples_path),
               "timings": {"grading_s": round(time.time() - t0, 2)}}
    log.info("regraded %d samples from %s: average pass@1 %.4f", len(graded), samples_path, summary["average"].get("pass@1", float("nan")))
    return write_outputs(Path(out_dir), graded, summary)


# ---------------------------------------------------------------- the stage


class GenerationLog:
    """Generation progress of one evaluation: every finished problem's samples, one JSON line each in
    ``<work>/generation.jsonl``, appended and flushed the moment the engine returns them.

    The work folder is the stage's (``ArtifactStore.build`` keeps it across a killed attempt, deletes it
    after success). A rerun reads it back and does not generate those problems again. A line is reused only
    when its key (the sampling protocol, model folder, benchmark, problem id, prompt token ids and seed)
    matches a current request; a line cut short by a kill is dropped. Since each problem samples with its
    own seed (vLLM) or its batch is regenerated whole (transformers), the resumed run's samples are the
    uninterrupted run's.
    """

    def __init__(self, work: Path | None, cfg: EvaluateConfig, model_dir: Path):
        self.path = Path(work) / PROGRESS_FILE if work is not None else None
        batching = {"hf_batch_size": cfg.hf_batch_size} if cfg.backend == "hf" else {}
        self._proto = stable_id(json.dumps({**protocol(cfg), **batching, "max_model_len": cfg.max_model_len,
                                            "model_dir": str(model_dir)}, sort_keys=True))
        self._keys: dict[tuple[str, str], str] = {}
        self._f: Any = None

    def key(self, r: G.Request) -> str:
        return stable_id(self._proto, r.benchmark, r.problem_id, ",".join(map(str, r.prompt_ids)), r.seed)

    def load(self, requests: list[G.Request]) -> dict[tuple[str, str], list[dict]]:
        """{(benchmark, problem id): samples} saved by an earlier attempt for these requests."""
        self._keys = {(r.benchmark, r.problem_id): self.key(r) for r in requests}
        if self.path is None or not self.path.exists():
            return {}
        wanted, saved, end = set(self._keys.values()), {}, 0
        with open(self.path, "rb") as f:  # streamed: the file holds every finished sample's text
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a kill cut this last line
                end += len(line)
                try:
                    d = json.loads(line)
                    if d["key"] in wanted:
                        saved[d["key"]] = d["samples"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        if end < self.path.stat().st_size:  # drop the cut line so appends start on a fresh line
            with open(self.path, "r+b") as f:
                f.truncate(end)
        return {p: saved[k] for p, k in self._keys.items() if k in saved}

    def append(self, samples: list[dict]) -> None:
        """Save finished problems (all n samples of each problem arrive in one list)."""
        if self.path is None or not samples:
            return
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        per: dict[tuple[str, str], list[dict]] = {}
        for s in samples:
            per.setdefault((s["benchmark"], s["problem_id"]), []).append({k: s[k] for k in G.SAMPLE_COLUMNS})
        self._f.write("".join(json.dumps({"key": self._keys[p], "samples": rows}) + "\n" for p, rows in per.items()))
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _generate_and_grade(gen: G.Generator | None, pool: Any, flat: list[G.Request], resumed: dict, golds: dict, cfg: EvaluateConfig,
                        label: str, progress: GenerationLog) -> tuple[list[dict], dict, dict]:
    """All benchmarks as one stream through the generator; problems saved by an earlier attempt are graded,
    not generated; each finished problem is saved and submitted to the grading pool at once. Rows come
    back in request order (benchmark, problem, sample index) whatever order the engines finished in."""
    from tqdm.auto import tqdm

    order = {(r.benchmark, r.problem_id): i for i, r in enumerate(flat)}
    left: dict[str, int] = {}
    for r in flat:
        left[r.benchmark] = left.get(r.benchmark, 0) + ((r.benchmark, r.problem_id) not in resumed)
    rows, futures, t_done = [], [], {}
    done0 = vars(pool.stats).copy()
    bar = tqdm(total=len(flat) * cfg.n_samples, desc=f"evaluate {label}", unit="sample", mininterval=2.0, smoothing=0.1)

    def take(chunk: list[dict]) -> None:
        for s in chunk:
            s["gold"] = golds[(s["benchmark"], s["problem_id"])]
            futures.append(pool.submit(s["text"], s["gold"]))
        rows.extend(chunk)
        bar.update(len(chunk))

    take([dict(s) for samples in resumed.values() for s in samples])
    t0 = time.time()
    for chunk in gen.generate(flat, skip=frozenset(resumed)) if gen is not None else ():
        progress.append(chunk)
        take(chunk)
        for name in {s["benchmark"] for s in chunk}:
            left[name] -= len({s["problem_id"] for s in chunk if s["benchmark"] == name})
            if left[name] == 0:
                t_done[name] = round(time.time() - t0, 2)
                log.info("%s: last problem generated after %.1f s", name, t_done[name])
    bar.close()
    t_wait = time.time()
    for s, f in zip(rows, tqdm(futures, desc="grading (rest)", unit="sample", mininterval=2.0), strict=True):
        interrupt.check("grading")
        s["verdict"] = f.result()
    now = vars(pool.stats)
    stats = {k: now[k] - done0[k] for k in ("done", "timeouts", "crashes")} | {"timeout_examples": now["timeout_examples"][:3]}
    stats["wait_after_generation_s"] = round(time.time() - t_wait, 2)
    stats["resumed_problems"] = len(resumed)
    stats["generated_problems"] = len(flat) - len(resumed)
    rows.sort(key=lambda s: (order[(s["benchmark"], s["problem_id"])], s["sample_index"]))
    return rows, t_done, stats


def evaluate_model(cfg: EvaluateConfig, model_dir: Path, out_dir: Path, extra_paths: dict[str, Path] | None, label: str,
                   work: Path | None = None) -> dict:
    """Stage entry point (see the module docstring). Returns the metrics summary (also metrics.json).

    ``work``: the stage's work folder; generation progress is saved there and reused by a rerun
    (:class:`GenerationLog`). None: nothing is saved. The vLLM engines' own output (INFO lines, library
    warnings) goes to ``engine.log`` in ``work`` (else ``out_dir``), not to the console."""
    t0 = time.time()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tokenizer = G.load_eval_tokenizer(model_dir)  # missing folder / chat template: error before any engine
    loaded, skipped = load_benchmarks(cfg, extra_paths)
    requests = {name: G.build_requests(tokenizer, name, rows, cfg) for name, rows in loaded.items()}
    golds = {(name, r["id"]): r["answer"] for name, rows in loaded.items() for r in rows}
    from .gradepool import GradingPool

    flat = [r for reqs in requests.values() for r in reqs]
    progress = GenerationLog(work, cfg, model_dir)
    resumed = progress.load(flat)
    if resumed:
        log.info("%s: %d of %d problems reused from %s, %d to generate", label, len(resumed), len(flat), progress.path,
                 len(flat) - len(resumed))
    t_start = time.time()
    # The grading workers start (and import Math-Verify) while the engine starts: both are ready together.
    # No engine at all when an earlier attempt generated everything.
    def engine() -> Any:
        if len(resumed) == len(flat):
            return contextlib.nullcontext()
        return G.open_generator(cfg, model_dir, tokenizer, log_path=Path(work or out_dir) / ENGINE_LOG)

    with GradingPool(cfg.grade_workers, cfg.grade_timeout_s) as pool, engine() as gen:
        startup = time.time() - t_start
        t_run = time.time()
        try:
            rows, t_gen, stats = _generate_and_grade(gen, pool, flat, resumed, golds, cfg, label, progress)
        finally:
            progress.close()
        run_s = time.time() - t_run
    samples = pd.DataFrame(rows)
    samples["verdict"] = pd.array(samples["verdict"].tolist(), dtype="boolean")
    samples["extracted"] = [_extract(t) for t in samples["text"]]
    if stats.get("timeouts") or stats.get("crashes"):
        log.warning("grading: %d timeouts, %d worker crashes (verdict None, counted wrong)", stats["timeouts"], stats["crashes"])
    summary = {
        **compute_metrics(samples, cfg), "label": label, "model_dir": str(model_dir), "protocol": protocol(cfg),
        "skipped": skipped, "grading": _grading_summary(stats), "n_samples_total": len(samples),
        "timings": {"engine_startup_s": round(startup, 2), "generate_and_grade_s": round(run_s, 2),
                    "grading_wait_after_generation_s": stats["wait_after_generation_s"], "per_benchmark_last_problem_s": t_gen,
                    "resumed_problems": stats["resumed_problems"], "generated_problems": stats["generated_problems"],
                    "samples_per_s": round(len(samples) / run_s, 3) if run_s else None, "total_s": round(time.time() - t0, 2)},
    }
    if work is not None and (Path(work) / ENGINE_LOG).exists():  # the work folder goes after success: keep the log
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(work) / ENGINE_LOG, Path(out_dir) / ENGINE_LOG)
    log.info("evaluate %s: %d samples, average pass@1 %.4f (%.1f samples/s)", label, len(samples),
             summary["average"].get("pass@1", float("nan")), summary["timings"]["samples_per_s"] or 0)
    return write_outputs(out_dir, samples, summary)

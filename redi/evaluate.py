"""The ``evaluate`` stage: sample every benchmark through one engine, grade every sample, compute metrics.

``evaluate_model(cfg, model_dir, out_dir, extra_paths, label)`` writes

- ``out_dir/samples.parquet``: one row per sample (:data:`SAMPLE_FILE_COLUMNS`), so grading can be redone
  without generating (``regrade``, its own cached step in the pipeline);
- ``out_dir/metrics.json``: per-benchmark metrics (``redi.metrics``), their macro average, the protocol,
  skipped benchmarks, grading counters and timings. The returned summary is the same dict.

Order of work: the model folder and its tokenizer/chat template are checked first (no engine is started
for a bad path), then every benchmark is loaded (a benchmark that cannot be loaded is skipped and reported
when ``cfg.skip_missing``), then ONE generator (vLLM or transformers) runs all benchmarks. Grading overlaps
generation: each finished chunk of samples is submitted to a ``redi.gradepool.GradingPool`` (worker processes,
hard per-sample deadline) while the engine process generates the next chunk.

Nothing leaves the denominator: a grader timeout or crash gives verdict None (counted as wrong and
reported as ``ungraded`` plus the pool's timeout/crash counters), a sample that hit the token limit is
``truncated``, a prompt too long for the context yields empty truncated samples.

Departure from the paper: the paper's final tables were graded with the rllm/DeepScaleR grader; we grade
with the project's Math-Verify grader (as open-r1 and the paper's intermediate evaluations do).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from . import benchmarks as B
from . import generate as G
from . import metrics as M
from .config.evaluate import EvaluateConfig

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.parquet"
METRICS_FILE = "metrics.json"

SAMPLE_FILE_COLUMNS: dict[str, str] = {
    **G.SAMPLE_COLUMNS,
    "gold": "the benchmark's gold answer",
    "extracted": "the sample's final answer (last \\boxed{}, redi.verify.last_boxed) or None",
    "verdict": "redi.verify.grade: True / False / None (grader timeout, crash or unparseable gold: counts as wrong)",
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
    m["mean_completion_tokens"] = float(df["completion_tokens"].mean())
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
    from .verify import last_boxed

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
    """samples.parquet + metrics.json (the summary) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = list(SAMPLE_FILE_COLUMNS)
    samples[cols].to_parquet(out_dir / SAMPLES_FILE, index=False)
    (out_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2, sort_keys=False, default=str))
    return summary


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


def _generate_and_grade(gen: G.Generator, pool: Any, requests: dict[str, list[G.Request]], golds: dict, cfg: EvaluateConfig,
                        label: str) -> tuple[list[dict], dict, dict]:
    """Every benchmark through one generator; each finished chunk is submitted to the grading pool at once."""
    from tqdm.auto import tqdm

    total = sum(len(r) for r in requests.values()) * cfg.n_samples
    rows, futures, t_gen = [], [], {}
    done0 = vars(pool.stats).copy()
    bar = tqdm(total=total, desc=f"evaluate {label}", unit="sample", mininterval=2.0, smoothing=0.1)
    for name, reqs in requests.items():
        t0 = time.time()
        for chunk in gen.generate(reqs):
            for s in chunk:
                s["gold"] = golds[(name, s["problem_id"])]
                futures.append(pool.submit(s["text"], s["gold"]))
            rows += chunk
            bar.update(len(chunk))
        t_gen[name] = round(time.time() - t0, 2)
        log.info("%s: generated %d samples in %.1f s", name, len(reqs) * cfg.n_samples, t_gen[name])
    bar.close()
    t_wait = time.time()
    for s, f in zip(rows, tqdm(futures, desc="grading (rest)", unit="sample", mininterval=2.0), strict=True):
        s["verdict"] = f.result()
    now = vars(pool.stats)
    stats = {k: now[k] - done0[k] for k in ("done", "timeouts", "crashes")} | {"timeout_examples": now["timeout_examples"][:3]}
    stats["wait_after_generation_s"] = round(time.time() - t_wait, 2)
    return rows, t_gen, stats


def evaluate_model(cfg: EvaluateConfig, model_dir: Path, out_dir: Path, extra_paths: dict[str, Path] | None, label: str) -> dict:
    """Stage entry point (see the module docstring). Returns the metrics summary (also metrics.json)."""
    t0 = time.time()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tokenizer = G.load_eval_tokenizer(model_dir)  # missing folder / chat template: error before any engine
    loaded, skipped = load_benchmarks(cfg, extra_paths)
    requests = {name: G.build_requests(tokenizer, name, rows, cfg) for name, rows in loaded.items()}
    golds = {(name, r["id"]): r["answer"] for name, rows in loaded.items() for r in rows}
    from .gradepool import GradingPool

    t_start = time.time()
    # The grading workers start (and import Math-Verify) while the engine starts: both are ready together.
    with GradingPool(cfg.grade_workers, cfg.grade_timeout_s) as pool, G.open_generator(cfg, model_dir, tokenizer) as gen:
        startup = time.time() - t_start
        t_run = time.time()
        rows, t_gen, stats = _generate_and_grade(gen, pool, requests, golds, cfg, label)
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
                    "grading_wait_after_generation_s": stats["wait_after_generation_s"], "per_benchmark_generate_s": t_gen,
                    "samples_per_s": round(len(samples) / run_s, 3) if run_s else None, "total_s": round(time.time() - t0, 2)},
    }
    log.info("evaluate %s: %d samples, average pass@1 %.4f (%.1f samples/s)", label, len(samples),
             summary["average"].get("pass@1", float("nan")), summary["timings"]["samples_per_s"] or 0)
    return write_outputs(out_dir, samples, summary)

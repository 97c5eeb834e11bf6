"""Stage ``verify``: label every trace, filter as in the paper, write positives (SFT) and pairs (stage 2).

Order of the filters (a trace is dropped at the first that fails; counts after each step go into
the summary's ``funnel``): problem_is_valid -> excluded sources -> decontamination -> prompt length
-> reasoning complete / finish reason -> response length -> a label exists.

Departures from the paper / official code, on purpose:

- Length limits are applied per trace before pairing, so a too-long first correct trace is replaced
  by the next correct one; the official code picks the first pair and then drops it if too long.
- ``landmv`` follows the official code: correct = Llama AND Math-Verify true, incorrect = both false;
  a trace on which the two disagree gets no label (the paper's text says "otherwise negative").
- Traces whose completeness is unknown (OpenR1-Math-Raw has no finish reasons) are kept.

Labels are computed by :func:`redi.verify.grade_many` (worker processes, hard per-trace deadline),
locally or fanned out in shards over a Dask cluster (``executor="dask"``); both give the same labels.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config.verify import VerifyConfig
from .decontam import Decontaminator
from .schema import PAIR_COLUMNS, POSITIVE_COLUMNS, stable_id

logger = logging.getLogger(__name__)

LIGHT_COLUMNS = ["problem_id", "row_id", "gen_index", "answer", "source", "problem_is_valid", "finish_reason",
                 "reasoning_complete", "label_math_verify", "label_llama"]


class LabelRuleError(ValueError):
    """The chosen label rule needs a column the data does not have."""


# ----------------------------------------------------------------------------- label rules


def rule_math_verify(ours: pd.Series, df: pd.DataFrame) -> pd.Series:
    """MATH_VERIFY: our own grade (redi.verify.grade) of the trace's final answer against the gold."""
    return ours


def rule_dataset(ours: pd.Series, df: pd.DataFrame) -> pd.Series:
    """DATASET: the dataset's own Math-Verify label (correctness_math_verify / math_verify_reparsed_answer)."""
    _require(df, "label_math_verify", "dataset")
    return df["label_math_verify"].astype(object)


def rule_landmv(ours: pd.Series, df: pd.DataFrame) -> pd.Series:
    """LANDMV (paper, official code): True if the Llama judge AND Math-Verify say correct, False if both say
    wrong, None when they disagree or either is unknown (such traces are neither positives nor negatives)."""
    _require(df, "label_llama", "landmv")
    _require(df, "label_math_verify", "landmv")
    both = [(bool(a) if a == b else None) if not _null(a) and not _null(b) else None
            for a, b in zip(df["label_llama"].tolist(), df["label_math_verify"].tolist(), strict=True)]
    return pd.Series(both, index=df.index, dtype=object)


LABEL_RULES: dict[str, Callable[[pd.Series, pd.DataFrame], pd.Series]] = {
    "math_verify": rule_math_verify, "dataset": rule_dataset, "landmv": rule_landmv}
"""The named positive-label rules; VerifyConfig.label_rule picks one."""


def _require(df: pd.DataFrame, col: str, rule: str) -> None:
    if col not in df or df[col].isna().all():
        raise LabelRuleError(f"label_rule={rule!r} needs the dataset column {col!r}, which is missing or empty in these traces "
                             "(the synthetic source and OpenR1 sets have it; use label_rule=math_verify otherwise)")


# ----------------------------------------------------------------------------- grading


def _grade_shard(items: list[tuple[str, str]], timeout_s: float) -> tuple[list, dict]:
    """One shard on one machine: a 1-process GradingPool (hard deadlines) -> (verdicts, pool stats)."""
    from .verify import grade_many

    stats: dict = {}
    return grade_many(items, workers=1, timeout_s=timeout_s, progress=False, stats=stats), stats


def _dask_client(address: str | None):
    import dask
    from dask.distributed import Client, LocalCluster

    if address:
        return Client(address), None
    # Grading workers are child processes: dask's worker processes must not be daemonic.
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None)
    return Client(cluster), cluster


def grade_dask(items: Sequence[tuple[str, str]], cfg: VerifyConfig) -> tuple[list, dict]:
    """Fan shards of `items` out over a Dask cluster (cfg.dask_address or a local 2-worker one); order kept."""
    from tqdm.auto import tqdm

    shards = [list(items[i : i + cfg.shard_size]) for i in range(0, len(items), cfg.shard_size)]
    client, cluster = _dask_client(cfg.dask_address)
    try:
        futs = client.map(_grade_shard, shards, timeout_s=cfg.timeout_s, pure=False)
        results = [f.result() for f in tqdm(futs, desc="grading (dask)", unit="shard")]
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    stats: Counter = Counter()
    for _, s in results:
        stats.update({k: v for k, v in s.items() if isinstance(v, int)})
    return [v for verdicts, _ in results for v in verdicts], dict(stats)


def grade_traces(items: Sequence[tuple[str, str]], cfg: VerifyConfig) -> tuple[list, dict]:
    """Labels of (trace, gold) items with redi.verify, in processes or over Dask (same labels)."""
    if cfg.executor == "dask":
        return grade_dask(items, cfg)
    from .verify import grade_many

    stats: dict = {}
    out = grade_many(items, workers=cfg.workers, timeout_s=cfg.timeout_s, desc="grading traces", stats=stats)
    return out, {k: v for k, v in stats.items() if isinstance(v, int)}


# ----------------------------------------------------------------------------- token lengths


def _token_lengths(tokenizer, texts: list[str], batch: int = 512) -> list[int]:
    out: list[int] = []
    for i in range(0, len(texts), batch):
        out += [len(ids) for ids in tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]]
    return out


def prompt_lengths(tokenizer, problems: list[str]) -> list[int]:
    """Tokens of the full prompt (chat template + Open-R1 suffix + generation prompt), as training sees it."""
    from .prompts import render_prompt

    return _token_lengths(tokenizer, [render_prompt(tokenizer, p) for p in problems])


def response_lengths(tokenizer, traces: list[str]) -> list[int]:
    """Tokens of each trace + 1 for the EOS (<|im_end|>), as the official code counts."""
    return [n + 1 for n in _token_lengths(tokenizer, traces)]


# ----------------------------------------------------------------------------- filters


def _null(v) -> bool:
    """None, NaN or pandas NA (parquet nulls come back as any of these)."""
    return v is None or bool(pd.isna(v))


def _is_incomplete(row) -> bool:
    """Known to be incomplete: reasoning_complete False, or a finish reason other than 'stop' (unknown = kept)."""
    if not _null(row.reasoning_complete) and not bool(row.reasoning_complete):
        return True
    return not _null(row.finish_reason) and row.finish_reason != "stop"


def filter_reasons(df: pd.DataFrame, cfg: VerifyConfig, problem_info: pd.DataFrame) -> pd.Series:
    """The first filter each trace fails ('' = kept), in the order of the module docstring."""
    info = problem_info.loc[df["problem_id"]].reset_index(drop=True)
    excluded = {s.lower() for s in cfg.exclude_sources}
    reasons = []
    for row, inf in zip(df.itertuples(index=False), info.itertuples(index=False), strict=True):
        valid = row.problem_is_valid
        if cfg.require_valid and not _null(valid) and str(valid).strip().lower() != "yes":
            reasons.append("problem_invalid")
        elif not _null(row.source) and str(row.source).lower() in excluded:
            reasons.append("excluded_source")
        elif inf.contaminated:
            reasons.append("contaminated")
        elif cfg.max_prompt_tokens is not None and inf.prompt_tokens > cfg.max_prompt_tokens:
            reasons.append("prompt_too_long")
        elif cfg.require_complete and _is_incomplete(row):
            reasons.append("incomplete")
        elif cfg.max_response_tokens is not None and row.response_tokens > cfg.max_response_tokens:
            reasons.append("response_too_long")
        elif _null(row.label):
            reasons.append("unlabelled")
        else:
            reasons.append("")
    return pd.Series(reasons, index=df.index)


FILTER_ORDER = ["problem_invalid", "excluded_source", "contaminated", "prompt_too_long", "incomplete", "response_too_long", "unlabelled"]


def funnel(df: pd.DataFrame) -> list[dict]:
    """Traces and problems left after each filter step."""
    left, out = df, [{"step": "input", "traces": len(df), "problems": df["problem_id"].nunique()}]
    for step in FILTER_ORDER:
        left = left[left["filter_reason"] != step]
        out.append({"step": f"after {step}", "traces": len(left), "problems": left["problem_id"].nunique()})
    return out


# ----------------------------------------------------------------------------- selection


def select(df: pd.DataFrame, cfg: VerifyConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(positives, pairs) from the kept traces, as DataFrames with POSITIVE_COLUMNS / PAIR_COLUMNS.

    Positives: the first correct trace of each problem (paper) or all. Pairs: the k-th correct with
    the k-th incorrect trace, k < pairs_per_problem (k = 0 is the paper's first-correct/first-incorrect).
    """
    kept = df[df["filter_reason"] == ""].sort_values(["problem_id", "gen_index"], kind="stable")
    good = kept[kept["label"] == True].copy()  # noqa: E712 - object column (True/False/None)
    bad = kept[kept["label"] == False].copy()  # noqa: E712
    good["k"] = good.groupby("problem_id").cumcount()
    bad["k"] = bad.groupby("problem_id").cumcount()
    pos = good if cfg.positives == "all" else good[good["k"] == 0]
    positives = pd.DataFrame({
        "id": [stable_id(p, int(i)) for p, i in zip(pos["problem_id"], pos["gen_index"], strict=True)],
        "problem_id": pos["problem_id"].to_numpy(), "problem": pos["problem"].to_numpy(),
        "completion": pos["trace"].to_numpy(), "answer": pos["answer"].to_numpy()})
    m = good[good["k"] < cfg.pairs_per_problem].merge(bad[["problem_id", "k", "gen_index", "trace"]], on=["problem_id", "k"], suffixes=("", "_r"))
    pairs = pd.DataFrame({
        "id": [stable_id(p, int(c), int(r)) for p, c, r in zip(m["problem_id"], m["gen_index"], m["gen_index_r"], strict=True)],
        "problem_id": m["problem_id"].to_numpy(), "problem": m["problem"].to_numpy(), "chosen": m["trace"].to_numpy(),
        "rejected": m["trace_r"].to_numpy(), "answer": m["answer"].to_numpy(),
        "chosen_index": m["gen_index"].astype("int64").to_numpy(), "rejected_index": m["gen_index_r"].astype("int64").to_numpy()})
    assert list(positives.columns) == list(POSITIVE_COLUMNS) and list(pairs.columns) == list(PAIR_COLUMNS)
    return positives, pairs


# ----------------------------------------------------------------------------- agreement


def agreement(ours: pd.Series, theirs: pd.Series, df: pd.DataFrame, n_examples: int = 8) -> tuple[dict, str]:
    """Confusion matrix of our labels vs the dataset's Math-Verify labels, and a markdown report."""
    def key(v):
        return "None" if v is None or pd.isna(v) else str(bool(v))

    cm = Counter((key(a), key(b)) for a, b in zip(ours.tolist(), theirs.tolist(), strict=True))
    both = sum(n for (a, b), n in cm.items() if a != "None" and b != "None")
    same = cm[("True", "True")] + cm[("False", "False")]
    summary = {"confusion": {f"ours={a},dataset={b}": n for (a, b), n in sorted(cm.items())},
               "comparable": both, "agree": same, "agreement": round(same / both, 4) if both else None}
    lines = ["# Label agreement: redi.verify.grade vs the dataset's Math-Verify label", "",
             f"Comparable traces (both labels known): {both}; agreement: {summary['agreement']}", "",
             "| ours \\ dataset | True | False | None |", "|---|---|---|---|"]
    for a in ("True", "False", "None"):
        lines.append(f"| {a} | " + " | ".join(str(cm[(a, b)]) for b in ("True", "False", "None")) + " |")
    mask = [(key(a) != key(b)) and key(b) != "None" for a, b in zip(ours.tolist(), theirs.tolist(), strict=True)]
    ex = df.loc[mask].head(n_examples)
    if len(ex):
        lines += ["", "## Examples of disagreements", "", "| row_id | gold | ours | dataset | end of trace |", "|---|---|---|---|---|"]
        for _, r in ex.iterrows():
            tail = str(r["trace"])[-120:].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['row_id']} | {r['answer']} | {key(r['label_ours'])} | {key(r['label_math_verify'])} | {tail} |")
    return summary, "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- entry point


def _problem_info(df: pd.DataFrame, tokenizer, cfg: VerifyConfig, decontam_problems: dict[str, list[str]]) -> tuple[pd.DataFrame, dict]:
    probs = df.drop_duplicates("problem_id")[["problem_id", "problem"]]
    dec = Decontaminator(decontam_problems if cfg.decontaminate else {}, cfg.decontam_ngram)
    hits = [dec.hits(p) for p in probs["problem"]] if dec.index else [[] for _ in range(len(probs))]
    per_bench = Counter(b for h in hits for b in h)
    plen = prompt_lengths(tokenizer, probs["problem"].tolist()) if cfg.max_prompt_tokens is not None else [0] * len(probs)
    info = pd.DataFrame({"contaminated": [bool(h) for h in hits], "prompt_tokens": plen}, index=probs["problem_id"].values)
    dsum = {"checked_benchmarks": sorted(decontam_problems) if cfg.decontaminate else [], "problems_removed": int(sum(bool(h) for h in hits)),
            "per_benchmark": dict(per_bench)}
    return info, dsum


def verify_and_split(cfg: VerifyConfig, traces_path: Path, tokenizer_dir: Path, out_dir: Path,
                     decontam_problems: dict[str, list[str]]) -> dict:
    """Label, filter and split ``traces_path``; write labelled/positives/pairs parquet and agreement.md.

    Returns the summary: counts at every filter step (``funnel``), label counts, grading stats,
    decontamination per benchmark, agreement with the dataset's labels, timings.
    """
    from .tinymodel import load_tokenizer

    t0 = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = pq.read_table(traces_path).to_pandas()
    if df.empty:
        raise ValueError(f"{traces_path} holds no traces")
    if cfg.label_rule != "math_verify":
        LABEL_RULES[cfg.label_rule](pd.Series([None] * len(df), dtype=object), df)  # refuse before grading
    with ThreadPoolExecutor(1) as ex:  # importing transformers (~5-15 s) overlaps with grading in other processes
        tok_future = ex.submit(load_tokenizer, tokenizer_dir)
        t_grade = time.monotonic()
        ours, gstats = grade_traces(list(zip(df["trace"].tolist(), df["answer"].tolist(), strict=True)), cfg)
        t_grade = time.monotonic() - t_grade
        tok = tok_future.result()
    df["label_ours"] = pd.Series(ours, dtype=object)
    df["label"] = LABEL_RULES[cfg.label_rule](df["label_ours"], df)
    df["response_tokens"] = response_lengths(tok, df["trace"].tolist()) if cfg.max_response_tokens is not None else 0
    info, dsum = _problem_info(df, tok, cfg, decontam_problems)
    df["prompt_tokens"] = info.loc[df["problem_id"], "prompt_tokens"].to_numpy()
    df["filter_reason"] = filter_reasons(df, cfg, info)
    pos, pairs = select(df, cfg)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), out_dir / "labelled.parquet", compression="zstd")
    pos.to_parquet(out_dir / "positives.parquet", index=False)
    pairs.to_parquet(out_dir / "pairs.parquet", index=False)
    agree, md = agreement(df["label_ours"], df["label_math_verify"], df)
    (out_dir / "agreement.md").write_text(md)
    summary = {
        "label_rule": cfg.label_rule, "traces": len(df), "problems": int(df["problem_id"].nunique()),
        "funnel": funnel(df), "filter_counts": {k: int(v) for k, v in Counter(df["filter_reason"]).items() if k},
        "labels": {str(k): int(v) for k, v in Counter(map(str, df["label"].tolist())).items()},
        "grading": {**gstats, "seconds": round(t_grade, 2), "traces_per_s": round(len(df) / max(t_grade, 1e-9), 1), "executor": cfg.executor},
        "decontamination": dsum, "positives": len(pos), "pairs": len(pairs),
        "agreement": agree, "seconds": round(time.monotonic() - t0, 2),
    }
    logger.info("verify: %d traces -> %d positives, %d pairs (%s)", len(df), len(pos), len(pairs), cfg.label_rule)
    return summary

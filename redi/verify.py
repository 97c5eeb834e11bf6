"""Stage ``verify``: label every trace, filter, write positives (SFT) and pairs (stage 2), and a funnel report.

What is selected, and how it follows the official REDI scripts, is :mod:`redi.label_rules` (the label rules)
and :mod:`redi.selection` (problem identity, filters, positives and pairs, the funnel report). This module runs the stage: grading,
token counts (the official length study's counting included: :func:`prompt_lengths`,
:func:`official_response_lengths`, :func:`pair_length_drops`), reading and writing. The token counting is
:mod:`redi.lengths`, the batch grader :mod:`redi.tracegrader`; this module holds the streaming passes.

Labels are computed by :class:`redi.gradepool.GradingPool` (worker processes, hard per-trace deadline),
locally or fanned out in shards over a Dask cluster (``executor="dask"``); both give the same labels.
The same workers count each trace's tokens (the other per-trace work of this stage, costlier than
grading a short trace: docs/benchmarks/verify.md) with the tokenizer's ``tokenizer.json``; the counts are checked
against the transformers tokenizer on a sample and recounted with it on any difference.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import interrupt
from .config.verify import VerifyConfig
from .decontam import Decontaminator
from .label_rules import (  # noqa: F401 - re-exported: redi.verify is the stage's public face
    LABEL_RULES,
    LabelRuleError,
    rule_dataset,
    rule_landmv,
    rule_landmv_both_wrong,
    rule_math_verify,
)
from .lengths import (  # noqa: F401 - re-exported: redi.verify is the stage's public face
    SAMPLE_CHECK,
    official_response_lengths,
    pair_length_drops,
    prompt_lengths,
    render_prompt,
    render_prompts,
    response_lengths,
)
from .prompts import DEFAULT_PROTOCOL
from .selection import (  # noqa: F401 - re-exported: redi.verify is the stage's public face
    FILTER_ORDER,
    OFFICIAL_FIGURES,
    apply_identity,
    assemble,
    filter_reasons,
    funnel,
    funnel_report,
    select,
)
from .tracegrader import Grader

logger = logging.getLogger(__name__)

LIGHT_COLUMNS = ["problem_id", "row_id", "gen_index", "answer", "source", "problem_is_valid", "finish_reason",
                 "reasoning_complete", "label_math_verify", "label_llama", "source_row", "source_gen"]


# ----------------------------------------------------------------------------- agreement


def _verdict_key(v) -> str:
    return "None" if v is None or pd.isna(v) else str(bool(v))


def _verdict_keys(s: pd.Series) -> np.ndarray:
    """``_verdict_key`` of every value, vectorised: "True" / "False" / "None" (None, NaN, NA)."""
    known = s.notna().to_numpy()
    out = np.full(len(s), "None", dtype=object)
    out[known] = np.where(s[known].astype(bool).to_numpy(), "True", "False")
    return out


def disagreements(ours: pd.Series, theirs: pd.Series) -> pd.Series:
    """Mask of rows where our label and the dataset's known label differ."""
    a, b = _verdict_keys(ours), _verdict_keys(theirs)
    return pd.Series((a != b) & (b != "None"), index=ours.index)


def agreement(ours: pd.Series, theirs: pd.Series, examples: pd.DataFrame) -> tuple[dict, str]:
    """Confusion matrix of our labels vs the dataset's Math-Verify labels, and a markdown report.

    ``examples``: disagreeing rows to show (row_id, answer, label_ours, label_math_verify, trace)."""
    key = _verdict_key
    cm = Counter(zip(_verdict_keys(ours).tolist(), _verdict_keys(theirs).tolist(), strict=True))
    both = sum(n for (a, b), n in cm.items() if a != "None" and b != "None")
    same = cm[("True", "True")] + cm[("False", "False")]
    summary = {"confusion": {f"ours={a},dataset={b}": n for (a, b), n in sorted(cm.items())},
               "comparable": both, "agree": same, "agreement": round(same / both, 4) if both else None}
    lines = ["# Label agreement: redi.grader.grade vs the dataset's Math-Verify label", "",
             f"Comparable traces (both labels known): {both}; agreement: {summary['agreement']}", "",
             "| ours \\ dataset | True | False | None |", "|---|---|---|---|"]
    for a in ("True", "False", "None"):
        lines.append(f"| {a} | " + " | ".join(str(cm[(a, b)]) for b in ("True", "False", "None")) + " |")
    if len(examples):
        lines += ["", "## Examples of disagreements", "", "| row_id | gold | ours | dataset | end of trace |", "|---|---|---|---|---|"]
        for _, r in examples.iterrows():
            tail = str(r["trace"])[-120:].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['row_id']} | {r['answer']} | {key(r['label_ours'])} | {key(r['label_math_verify'])} | {tail} |")
    return summary, "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- entry point


def _problem_info(probs: pd.DataFrame, tokenizer, cfg: VerifyConfig, decontam_problems: dict[str, list[str]],
                  count: Callable[[list[str]], list[int]] | None = None,
                  protocol: str = DEFAULT_PROTOCOL) -> tuple[pd.DataFrame, dict]:
    """Per problem (``probs``: problem_id, problem; one row each): contaminated?, prompt tokens (``count``: see
    :func:`prompt_lengths`)."""
    on = cfg.decontaminate != "off"
    dec = Decontaminator(decontam_problems if on else {}, cfg.decontam_ngram, cfg.decontam_normalise)
    hits = [dec.hits(p) for p in probs["problem"]] if dec.index else [[] for _ in range(len(probs))]
    per_bench = Counter(b for h in hits for b in h)
    official = cfg.length_filter == "pairs_after_selection"
    plen = (prompt_lengths(tokenizer, probs["problem"].tolist(), count, protocol, official) if cfg.max_prompt_tokens is not None
            else [0] * len(probs))
    info = pd.DataFrame({"contaminated": [bool(h) for h in hits], "prompt_tokens": plen}, index=probs["problem_id"].values)
    flagged = int(sum(bool(h) for h in hits))
    dsum = {"mode": cfg.decontaminate, "normalise": cfg.decontam_normalise, "ngram": cfg.decontam_ngram,
            "checked_benchmarks": sorted(decontam_problems) if on else [], "problems_flagged": flagged,
            "problems_removed": flagged if cfg.decontaminate == "remove" else 0, "per_benchmark": dict(per_bench)}
    return info, dsum


READ_ROWS = 16384
"""Traces read, graded and written per batch: memory holds two such batches of texts, never the file."""
ADDED = {"problem_key": pa.string(), "label_ours": pa.bool_(), "label": pa.bool_(), "response_tokens": pa.int64(),
         "prompt_tokens": pa.int64(), "filter_reason": pa.string()}
"""Columns verify adds to each trace in labelled.parquet, with their types (``problem_key``: the problem as this
run identifies it, :func:`apply_identity`; it is the ``problem_id`` of positives and pairs)."""


def _batches(path: Path, columns: list[str] | None = None):
    """(first row, pyarrow RecordBatch) of traces.parquet, READ_ROWS at a time."""
    pos = 0
    for rb in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS, columns=columns):
        yield pos, rb
        pos += rb.num_rows


def _light(rb: pa.RecordBatch, pos: int, cfg: VerifyConfig) -> pd.DataFrame:
    """The small columns of a batch (everything but texts) with each row's position in the file, problems
    identified as ``cfg.problem_identity`` says (:func:`apply_identity`)."""
    names = [c for c in LIGHT_COLUMNS if c in rb.schema.names]
    df = rb.select(names).to_pandas()
    for c in LIGHT_COLUMNS:
        if c not in df:
            df[c] = None
    df["_pos"] = range(pos, pos + rb.num_rows)
    return apply_identity(df, cfg)


def _check_rule(cfg: VerifyConfig, traces_path: Path) -> None:
    """Refuse a label rule whose columns are missing or empty, before any grading."""
    rule = LABEL_RULES[cfg.label_rule]
    if not rule.needs:
        return
    names = pq.ParquetFile(traces_path).schema_arrow.names
    needed = [c for c in rule.needs if c in names]
    sample = pq.read_table(traces_path, columns=needed).to_pandas() if needed else pd.DataFrame()
    rule(pd.Series([None] * len(sample), dtype=object), sample)


def verify_and_split(cfg: VerifyConfig, traces_path: Path, tokenizer_dir: Path, out_dir: Path,
                     decontam_problems: dict[str, list[str]], prompt_protocol: str = DEFAULT_PROTOCOL,
                     source: dict | None = None) -> dict:
    """Label, filter and split ``traces_path``; write labelled/positives/pairs parquet, agreement.md and funnel.md.

    ``source``: the download stage's summary (where the traces came from), for the funnel report's comparison
    with the official figures.

    Streams: pass 1 reads the traces in batches of READ_ROWS, grades each while the next is read and
    tokenised, and keeps only the small columns; pass 2 reads them again to write labelled.parquet batch
    by batch and to pick the texts of the selected positives and pairs. Memory holds the small columns of
    every trace, the problem texts and two batches of traces, never the whole file.

    Returns the summary: counts at every filter step (``funnel``), label counts, grading stats,
    decontamination per benchmark, agreement with the dataset's labels, timings.
    """
    from tqdm.auto import tqdm

    from .tinymodel import load_tokenizer

    t0 = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = pq.ParquetFile(traces_path)
    n_rows, names = meta.metadata.num_rows, meta.schema_arrow.names
    if n_rows == 0:
        raise ValueError(f"{traces_path} holds no traces")
    _check_rule(cfg, traces_path)

    # pass 1: grade and count tokens (workers) while reading the next batch (here)
    counting = cfg.max_response_tokens is not None or cfg.max_prompt_tokens is not None
    tok_json = _tokenizer_json(tokenizer_dir) if counting else None
    lights, problems, sample = [], {}, []
    t_grade = time.monotonic()
    with ThreadPoolExecutor(1) as ex, Grader(cfg, tok_json) as grader, tqdm(total=n_rows, desc="grading traces", unit="trace",
                                                                            mininterval=1.0) as bar:
        # Loading the transformers tokenizer overlaps with grading when transformers is imported already (as in a
        # pipeline run); otherwise the import (seconds of CPU, holding the GIL) would starve the pool's scheduler
        # threads (docs/benchmarks/verify.md), so it waits for the end of pass 1 unless the tokens must be
        # counted here.
        early = "transformers" in sys.modules or (tok_json is None and cfg.max_response_tokens is not None)
        tok_future = ex.submit(load_tokenizer, tokenizer_dir) if early else None

        @functools.cache
        def tokenizer():
            return tok_future.result() if tok_future is not None else load_tokenizer(tokenizer_dir)

        prev = None
        for pos, rb in _batches(traces_path, [c for c in names if c in {"problem", "trace", *LIGHT_COLUMNS}]):
            cols = rb.schema.names
            traces, answers = rb.column(cols.index("trace")).to_pylist(), rb.column(cols.index("answer")).to_pylist()
            handle = grader.submit(list(zip(traces, answers, strict=True)))
            light = _light(rb, pos, cfg)
            if cfg.max_response_tokens is None:
                light["response_tokens"] = 0
            elif tok_json is None:  # no tokenizer.json to hand to the workers: count here
                light["response_tokens"] = response_lengths(tokenizer(), traces)
            if not sample:
                sample = traces[:SAMPLE_CHECK]
            first = ~light["problem_id"].duplicated().to_numpy()
            ptexts = rb.column(cols.index("problem")).filter(pa.array(first)).to_pylist()
            for pid, text in zip(light["problem_id"].to_numpy()[first], ptexts, strict=True):
                problems.setdefault(pid, text)
            if prev is not None:
                _finish(grader, *prev, bar, tokenizer)
            prev = (light, handle, traces if tok_json is not None else None)
            lights.append(light)
            del traces, answers, rb
        _finish(grader, *prev, bar, tokenizer)
        t_grade = time.monotonic() - t_grade
        tok = tokenizer()
        if tok_json is not None:
            _check_counts(tok, sample, lights[0]["response_tokens"].tolist()[: len(sample)], traces_path, lights)
        probs = pd.DataFrame({"problem_id": list(problems), "problem": list(problems.values())})
        info, dsum = _problem_info(probs, tok, cfg, decontam_problems, grader.count if tok_json is not None else None,
                                   prompt_protocol)
    df = pd.concat(lights, ignore_index=True)
    df["problem_key"] = df["problem_id"]
    df["label"] = LABEL_RULES[cfg.label_rule](df["label_ours"], df)
    df["prompt_tokens"] = info.loc[df["problem_id"], "prompt_tokens"].to_numpy()
    df["filter_reason"] = filter_reasons(df, cfg, info)
    pos_rows, pair_rows = select(df, cfg)
    dis = df.loc[disagreements(df["label_ours"], df["label_math_verify"])].head(8)

    # pass 2: labelled.parquet, and the texts of what was selected
    needed = set(pos_rows["_pos"]) | set(pair_rows["_pos"]) | set(pair_rows["_pos_r"]) | set(dis["_pos"])
    texts = _write_labelled(traces_path, df, out_dir / "labelled.parquet", needed, n_rows)
    n_selected = len(pair_rows)
    drops = Counter()
    if cfg.length_filter == "pairs_after_selection" and (cfg.max_prompt_tokens is not None or cfg.max_response_tokens is not None):
        why = pair_length_drops(pair_rows, df, info, cfg, tok, texts)
        drops = Counter(w for w in why if w)
        pair_rows = pair_rows[(why == "").to_numpy()].reset_index(drop=True)
    pos, pairs = assemble(pos_rows, pair_rows, texts)
    pos.to_parquet(out_dir / "positives.parquet", index=False)
    pairs.to_parquet(out_dir / "pairs.parquet", index=False)
    examples = dis.assign(trace=[texts[int(i)][1] for i in dis["_pos"]])
    agree, md = agreement(df["label_ours"], df["label_math_verify"], examples)
    (out_dir / "agreement.md").write_text(md)
    summary = {
        "label_rule": cfg.label_rule, "traces": len(df), "problems": int(df["problem_id"].nunique()),
        "funnel": funnel(df), "filter_counts": {k: int(v) for k, v in Counter(df["filter_reason"]).items() if k},
        "labels": {str(k): int(v) for k, v in Counter(map(str, df["label"].tolist())).items()},
        "grading": {**dict(grader.stats), "seconds": round(t_grade, 2), "traces_per_s": round(len(df) / max(t_grade, 1e-9), 1),
                    "executor": cfg.executor},
        "decontamination": {**dsum, "positives_flagged": int(info.loc[pos["problem_id"], "contaminated"].sum()),
                            "pairs_flagged": int(info.loc[pairs["problem_id"], "contaminated"].sum())},
        "positives": len(pos), "pairs": len(pairs),
        "selection": {"positives": len(pos), "pairs_selected": n_selected, "pairs_dropped": dict(drops), "pairs": len(pairs),
                      "length_filter": cfg.length_filter},
        "agreement": agree, "seconds": round(time.monotonic() - t0, 2),
    }
    summary["official"], text = funnel_report(summary, cfg, prompt_protocol, source)
    (out_dir / "funnel.md").write_text(text)
    logger.info("verify: %d traces -> %d positives, %d pairs (%s)", len(df), len(pos), len(pairs), cfg.label_rule)
    return summary


def _finish(grader: Grader, light: pd.DataFrame, handle, traces: list | None, bar, tokenizer: Callable) -> None:
    """Wait for a batch's results (advancing the progress bar); store its labels (and token counts, when the
    workers counted them: ``traces`` given; ``tokenizer()`` counts those the workers could not) in its light table."""
    base = bar.n
    if not isinstance(handle, list):  # a local pool's Batch counts its items as they come back (dask: per batch)
        while not handle.wait(0.5):
            interrupt.check("verify")
            bar.update(base + handle.done - bar.n)
    results = grader.result(handle)
    if traces is None:
        verdicts = results
    else:
        verdicts = [r[0] for r in results]
        lengths = [None if r[1] is None else r[1] + 1 for r in results]  # + EOS, as response_lengths
        missing = [i for i, n in enumerate(lengths) if n is None]  # killed at the deadline: count them here
        for i, n in zip(missing, response_lengths(tokenizer(), [traces[i] for i in missing]) if missing else [], strict=True):
            lengths[i] = n
        light["response_tokens"] = lengths
    light["label_ours"] = pd.Series(verdicts, index=light.index, dtype=object)
    bar.update(base + len(light) - bar.n)



def _tokenizer_json(tokenizer_dir) -> str | None:
    """The folder's ``tokenizer.json`` (a fast tokenizer the workers can load without transformers), or None."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    return path.read_text() if path.is_file() else None


def _check_counts(tok, sample: list, counted: list[int], traces_path: Path, lights: list[pd.DataFrame]) -> None:
    """The workers count tokens with the bare ``tokenizer.json``; if transformers' tokenizer (the one training
    uses) counts a sample differently (say, special tokens known only to tokenizer_config.json), recount every
    trace with it here, with a warning: slower, never wrong."""
    if response_lengths(tok, sample) == counted:
        return
    logger.warning("verify: tokenizer.json and the transformers tokenizer count tokens differently; recounting every "
                   "trace with the transformers tokenizer in this process")
    for light, (_, rb) in zip(lights, _batches(traces_path, ["trace"]), strict=True):
        light["response_tokens"] = response_lengths(tok, rb.column(0).to_pylist())


def _write_labelled(traces_path: Path, df: pd.DataFrame, out: Path, needed: set[int], n_rows: int) -> dict[int, tuple[str, str]]:
    """Every trace with verify's columns (ADDED) to ``out``, batch by batch; returns {row: (problem, trace)} of `needed`."""
    from tqdm.auto import tqdm

    texts: dict[int, tuple[str, str]] = {}
    writer = None
    try:
        for pos, rb in tqdm(_batches(traces_path), desc="writing labelled traces", unit="batch",
                            total=-(-n_rows // READ_ROWS), mininterval=1.0):
            part = df.iloc[pos : pos + rb.num_rows]
            table = pa.Table.from_batches([rb])
            for name, typ in ADDED.items():
                table = table.append_column(pa.field(name, typ), pa.Array.from_pandas(part[name], type=typ))
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema, compression="zstd")
            writer.write_table(table)
            want = [p for p in range(pos, pos + rb.num_rows) if p in needed]
            if want:
                cols = rb.schema.names
                problem, trace = rb.column(cols.index("problem")), rb.column(cols.index("trace"))
                for p in want:
                    texts[p] = (problem[p - pos].as_py(), trace[p - pos].as_py())
    finally:
        if writer is not None:
            writer.close()
    return texts

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

Labels are computed by :class:`redi.gradepool.GradingPool` (worker processes, hard per-trace deadline),
locally or fanned out in shards over a Dask cluster (``executor="dask"``); both give the same labels.
The same workers count each trace's tokens (the other per-trace work of this stage, ~75 us per short
synthetic trace, more than grading it) with the tokenizer's ``tokenizer.json``; the counts are checked
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


def _grade_shard(items: list[tuple[str, str]], timeout_s: float, tokenizer_json: str | None = None) -> tuple[list, dict]:
    """One shard on one machine: a 1-process GradingPool (hard deadlines) -> (results, pool stats)."""
    from .gradepool import grade_many

    stats: dict = {}
    return grade_many(items, workers=1, timeout_s=timeout_s, progress=False, stats=stats, tokenizer_json=tokenizer_json), stats


def _dask_client(address: str | None):
    import dask
    from dask.distributed import Client, LocalCluster

    if address:
        return Client(address), None
    # Grading workers are child processes: dask's worker processes must not be daemonic.
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None)
    return Client(cluster), cluster


class Grader:
    """Labels (trace, gold) items batch by batch with redi.verify, in a local process pool or sharded over a
    Dask cluster (same labels). ``submit`` queues a batch and returns at once, so the next batch is read
    while this one is graded; ``result`` waits for it. With ``tokenizer_json`` the same workers also count
    each trace's tokens and results are ``(verdict, tokens)``. Use as a context manager."""

    def __init__(self, cfg: VerifyConfig, tokenizer_json: str | None = None):
        self.cfg = cfg
        self.stats: Counter = Counter()
        self._pool = self._client = self._cluster = None
        self._tok = tokenizer_json
        self._extra = 0  # items of count(): not traces
        if cfg.executor == "dask":
            self._client, self._cluster = _dask_client(cfg.dask_address)
            if tokenizer_json is not None:  # sent to every Dask worker once, not with every shard
                self._tok = self._client.scatter(tokenizer_json, broadcast=True)
        else:
            from .gradepool import GradingPool

            self._pool = GradingPool(cfg.workers, cfg.timeout_s, tokenizer_json)

    def submit(self, items: list[tuple[str, str]]):
        if self._pool is not None:
            return self._pool.map_async(items)
        shards = [items[i : i + self.cfg.shard_size] for i in range(0, len(items), self.cfg.shard_size)]
        return self._client.map(_grade_shard, shards, timeout_s=self.cfg.timeout_s, tokenizer_json=self._tok, pure=False)

    def count(self, texts: list[str]) -> list[int | None]:
        """Tokens of each text, counted by the workers (needs ``tokenizer_json``; None: killed at the deadline);
        these items are not counted in ``stats``."""
        from tqdm.auto import tqdm

        self._extra += len(texts)
        handle = self.submit([(t, None) for t in texts])  # no gold: nothing to grade
        if self._pool is not None:  # a local pool's Batch counts its items as they come back
            with tqdm(total=len(texts), desc="counting prompt tokens", unit="prompt", mininterval=1.0) as bar:
                while not handle.wait(0.5):
                    bar.update(handle.done - bar.n)
                bar.update(handle.done - bar.n)
        return [n for _, n in self.result(handle)]

    def result(self, handle) -> list:
        if self._pool is not None:
            return handle.result()
        out = []
        for verdicts, st in (f.result() for f in handle):
            out += verdicts
            self.stats.update({k: v for k, v in st.items() if isinstance(v, int)})
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self.stats.update({k: v for k, v in vars(self._pool.stats).items() if isinstance(v, int)})
        self.stats["done"] -= self._extra
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- token lengths


def _token_lengths(tokenizer, texts: list[str], batch: int = 512) -> list[int]:
    out: list[int] = []
    for i in range(0, len(texts), batch):
        out += [len(ids) for ids in tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]]
    return out


def render_prompts(tokenizer, problems: list[str]) -> list[str]:
    """``redi.prompts.render_prompt`` of every problem, rendering the chat template once when it inserts the
    problem verbatim (checked with two probes that start with whitespace, so a template that trims is caught,
    and on the first 32 problems); otherwise once per problem (jinja, ~50 us each)."""
    from .prompts import render_prompt

    a, b = " \n\x00probe\x00", "\t\x00other probe\x00 "
    ra, rb = render_prompt(tokenizer, a), render_prompt(tokenizer, b)
    if ra.count(a) == 1 and rb == ra.replace(a, b):
        pre, post = ra.split(a)
        out = [pre + p + post for p in problems]
        if all(out[i] == render_prompt(tokenizer, p) for i, p in enumerate(problems[:32])):
            return out
    return [render_prompt(tokenizer, p) for p in problems]


def prompt_lengths(tokenizer, problems: list[str], count: Callable[[list[str]], list[int]] | None = None) -> list[int]:
    """Tokens of the full prompt (chat template + Open-R1 suffix + generation prompt), as training sees it.

    ``count``: counts tokens elsewhere (the grading workers, :meth:`Grader.count`); its counts of the first
    SAMPLE_CHECK prompts are checked against ``tokenizer``'s, and on any difference all are counted here."""
    texts = render_prompts(tokenizer, problems)
    if count is None:
        return _token_lengths(tokenizer, texts)
    got = count(texts)
    missing = [i for i, n in enumerate(got) if n is None]  # killed at the deadline: count them here
    for i, n in zip(missing, _token_lengths(tokenizer, [texts[i] for i in missing]), strict=True):
        got[i] = n
    if got[:SAMPLE_CHECK] == _token_lengths(tokenizer, texts[:SAMPLE_CHECK]):
        return got
    logger.warning("verify: tokenizer.json and the transformers tokenizer count prompt tokens differently; counting "
                   "them with the transformers tokenizer in this process")
    return _token_lengths(tokenizer, texts)


def response_lengths(tokenizer, traces: list[str]) -> list[int]:
    """Tokens of each trace + 1 for the EOS (<|im_end|>), as the official code counts."""
    return [n + 1 for n in _token_lengths(tokenizer, traces)]


# ----------------------------------------------------------------------------- filters


def _null(v) -> bool:
    """None, NaN or pandas NA (parquet nulls come back as any of these)."""
    return v is None or bool(pd.isna(v))


def filter_reasons(df: pd.DataFrame, cfg: VerifyConfig, problem_info: pd.DataFrame) -> pd.Series:
    """The first filter each trace fails ('' = kept), in the order of the module docstring (vectorised)."""
    info = problem_info.loc[df["problem_id"]].reset_index(drop=True)
    idx = df.index

    def col(name: str) -> pd.Series:
        return df[name] if name in df else pd.Series([None] * len(df), index=idx, dtype=object)

    excluded = {s.lower() for s in cfg.exclude_sources}
    valid, source = col("problem_is_valid"), col("source")
    complete, finish = col("reasoning_complete"), col("finish_reason")
    known = lambda s: s.notna().to_numpy()  # noqa: E731 - None, NaN and pd.NA are all unknown
    text = lambda s: s.astype(str).str.strip().str.lower().to_numpy()  # noqa: E731
    false = lambda s: s.map(lambda v: not _null(v) and not bool(v)).to_numpy(dtype=bool)  # noqa: E731
    conds = [
        cfg.require_valid & known(valid) & (text(valid) != "yes"),
        known(source) & np.isin(text(source), list(excluded)),
        info["contaminated"].to_numpy(dtype=bool),
        np.zeros(len(df), bool) if cfg.max_prompt_tokens is None else (info["prompt_tokens"].to_numpy() > cfg.max_prompt_tokens),
        cfg.require_complete & ((known(complete) & false(complete)) | (known(finish) & (finish.astype(str).to_numpy() != "stop"))),
        np.zeros(len(df), bool) if cfg.max_response_tokens is None
        else (df["response_tokens"].to_numpy(dtype=np.int64) > cfg.max_response_tokens),
        ~known(df["label"]),
    ]
    return pd.Series(np.select(conds, FILTER_ORDER, default=""), index=idx, dtype=object)


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
    """Which traces become positives and pairs, from the kept rows of the light table (no texts needed).

    Positives: the first correct trace of each problem (paper) or all. Pairs: the k-th correct with the
    k-th incorrect trace, k < pairs_per_problem (k = 0 is the paper's first-correct/first-incorrect).
    Returns (positives: problem_id, gen_index, answer, _pos), (pairs: ..., gen_index_r, _pos_r); ``_pos``
    is the trace's row in traces.parquet.
    """
    kept = df[df["filter_reason"] == ""].sort_values(["problem_id", "gen_index"], kind="stable")
    cols = ["problem_id", "gen_index", "answer", "_pos"]
    good = kept.loc[kept["label"] == True, cols].copy()  # noqa: E712 - object column (True/False/None)
    bad = kept.loc[kept["label"] == False, cols].copy()  # noqa: E712
    good["k"] = good.groupby("problem_id").cumcount()
    bad["k"] = bad.groupby("problem_id").cumcount()
    pos = good if cfg.positives == "all" else good[good["k"] == 0]
    pairs = good[good["k"] < cfg.pairs_per_problem].merge(bad[["problem_id", "k", "gen_index", "_pos"]], on=["problem_id", "k"],
                                                          suffixes=("", "_r"))
    return pos.reset_index(drop=True), pairs.reset_index(drop=True)


def assemble(pos: pd.DataFrame, pairs: pd.DataFrame, texts: dict[int, tuple[str, str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The positives and pairs tables (POSITIVE_COLUMNS / PAIR_COLUMNS) from :func:`select`'s rows and
    ``texts`` = {row in traces.parquet: (problem, trace)}."""
    positives = pd.DataFrame({
        "id": [stable_id(p, int(i)) for p, i in zip(pos["problem_id"], pos["gen_index"], strict=True)],
        "problem_id": pos["problem_id"].to_numpy(), "problem": [texts[int(i)][0] for i in pos["_pos"]],
        "completion": [texts[int(i)][1] for i in pos["_pos"]], "answer": pos["answer"].to_numpy()})
    m = pairs
    out = pd.DataFrame({
        "id": [stable_id(p, int(c), int(r)) for p, c, r in zip(m["problem_id"], m["gen_index"], m["gen_index_r"], strict=True)],
        "problem_id": m["problem_id"].to_numpy(), "problem": [texts[int(i)][0] for i in m["_pos"]],
        "chosen": [texts[int(i)][1] for i in m["_pos"]], "rejected": [texts[int(i)][1] for i in m["_pos_r"]],
        "answer": m["answer"].to_numpy(),
        "chosen_index": m["gen_index"].astype("int64").to_numpy(), "rejected_index": m["gen_index_r"].astype("int64").to_numpy()})
    assert list(positives.columns) == list(POSITIVE_COLUMNS) and list(out.columns) == list(PAIR_COLUMNS)
    return positives, out


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
    lines = ["# Label agreement: redi.verify.grade vs the dataset's Math-Verify label", "",
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
                  count: Callable[[list[str]], list[int]] | None = None) -> tuple[pd.DataFrame, dict]:
    """Per problem (``probs``: problem_id, problem; one row each): contaminated?, prompt tokens (``count``: see
    :func:`prompt_lengths`)."""
    dec = Decontaminator(decontam_problems if cfg.decontaminate else {}, cfg.decontam_ngram)
    hits = [dec.hits(p) for p in probs["problem"]] if dec.index else [[] for _ in range(len(probs))]
    per_bench = Counter(b for h in hits for b in h)
    plen = prompt_lengths(tokenizer, probs["problem"].tolist(), count) if cfg.max_prompt_tokens is not None else [0] * len(probs)
    info = pd.DataFrame({"contaminated": [bool(h) for h in hits], "prompt_tokens": plen}, index=probs["problem_id"].values)
    dsum = {"checked_benchmarks": sorted(decontam_problems) if cfg.decontaminate else [], "problems_removed": int(sum(bool(h) for h in hits)),
            "per_benchmark": dict(per_bench)}
    return info, dsum


READ_ROWS = 16384
"""Traces read, graded and written per batch: memory holds two such batches of texts, never the file."""
ADDED = {"label_ours": pa.bool_(), "label": pa.bool_(), "response_tokens": pa.int64(), "prompt_tokens": pa.int64(),
         "filter_reason": pa.string()}
"""Columns verify adds to each trace in labelled.parquet, with their types."""


def _batches(path: Path, columns: list[str] | None = None):
    """(first row, pyarrow RecordBatch) of traces.parquet, READ_ROWS at a time."""
    pos = 0
    for rb in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS, columns=columns):
        yield pos, rb
        pos += rb.num_rows


def _light(rb: pa.RecordBatch, pos: int) -> pd.DataFrame:
    """The small columns of a batch (everything but texts) with each row's position in the file."""
    names = [c for c in LIGHT_COLUMNS if c in rb.schema.names]
    df = rb.select(names).to_pandas()
    for c in LIGHT_COLUMNS:
        if c not in df:
            df[c] = None
    df["_pos"] = range(pos, pos + rb.num_rows)
    return df


def _check_rule(cfg: VerifyConfig, traces_path: Path) -> None:
    """Refuse a label rule whose columns are missing or empty, before any grading."""
    if cfg.label_rule == "math_verify":
        return
    names = pq.ParquetFile(traces_path).schema_arrow.names
    needed = [c for c in ("label_llama", "label_math_verify") if c in names]
    sample = pq.read_table(traces_path, columns=needed).to_pandas() if needed else pd.DataFrame()
    LABEL_RULES[cfg.label_rule](pd.Series([None] * len(sample), dtype=object), sample)


def verify_and_split(cfg: VerifyConfig, traces_path: Path, tokenizer_dir: Path, out_dir: Path,
                     decontam_problems: dict[str, list[str]]) -> dict:
    """Label, filter and split ``traces_path``; write labelled/positives/pairs parquet and agreement.md.

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
        # pipeline run); otherwise the import (~7 s of CPU, holding the GIL) would starve the pool's scheduler
        # threads (a 100k-trace pass 1 took 13-14 s instead of ~2 s), so it waits for the end of pass 1 unless
        # the tokens must be counted here.
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
            light = _light(rb, pos)
            if cfg.max_response_tokens is None:
                light["response_tokens"] = 0
            elif tok_json is None:  # no tokenizer.json to hand to the workers: count here
                light["response_tokens"] = response_lengths(tokenizer(), traces)
            if not sample:
                sample = traces[:SAMPLE_CHECK]
            pb = rb.select(["problem_id", "problem"]).to_pandas().drop_duplicates("problem_id")
            for pid, text in zip(pb["problem_id"], pb["problem"], strict=True):
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
        info, dsum = _problem_info(probs, tok, cfg, decontam_problems, grader.count if tok_json is not None else None)
    df = pd.concat(lights, ignore_index=True)
    df["label"] = LABEL_RULES[cfg.label_rule](df["label_ours"], df)
    df["prompt_tokens"] = info.loc[df["problem_id"], "prompt_tokens"].to_numpy()
    df["filter_reason"] = filter_reasons(df, cfg, info)
    pos_rows, pair_rows = select(df, cfg)
    dis = df.loc[disagreements(df["label_ours"], df["label_math_verify"])].head(8)

    # pass 2: labelled.parquet, and the texts of what was selected
    needed = set(pos_rows["_pos"]) | set(pair_rows["_pos"]) | set(pair_rows["_pos_r"]) | set(dis["_pos"])
    texts = _write_labelled(traces_path, df, out_dir / "labelled.parquet", needed, n_rows)
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
        "decontamination": dsum, "positives": len(pos), "pairs": len(pairs),
        "agreement": agree, "seconds": round(time.monotonic() - t0, 2),
    }
    logger.info("verify: %d traces -> %d positives, %d pairs (%s)", len(df), len(pos), len(pairs), cfg.label_rule)
    return summary


def _finish(grader: Grader, light: pd.DataFrame, handle, traces: list | None, bar, tokenizer: Callable) -> None:
    """Wait for a batch's results (advancing the progress bar); store its labels (and token counts, when the
    workers counted them: ``traces`` given; ``tokenizer()`` counts those the workers could not) in its light table."""
    base = bar.n
    if not isinstance(handle, list):  # a local pool's Batch counts its items as they come back (dask: per batch)
        while not handle.wait(0.5):
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


SAMPLE_CHECK = 256
"""Traces whose worker token counts are checked against the transformers tokenizer's own."""


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

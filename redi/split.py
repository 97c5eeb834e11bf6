"""Stage ``verify``: label every trace, filter, write positives (SFT) and pairs (stage 2), and a funnel report.

Order of the trace filters (a trace is dropped at the first that fails; counts after each step go into
the summary's ``funnel``): problem_is_valid -> excluded sources -> no gold answer (``require_answer``)
-> decontamination (``decontaminate: remove``) -> prompt length -> reasoning complete / finish reason ->
response length -> a label exists. The two length steps are trace filters only under
``length_filter: traces_before_selection``; under ``pairs_after_selection`` they drop selected pairs.

The official REDI behaviour (``Tim-Siu/reinforcement-distillation`` @ dda07d2, ``experiments_trl/``),
selected field by field (the paper recipe sets all of them; docs/data.md argues each one):

- ``label_rule: landmv`` = ``data_preprocess/clean_base_shuffled_dpo.py`` (pairs) and
  ``clean_base_shuffled.py`` (positives): correct iff Llama AND Math-Verify (reparsed) say correct, every
  other trace incorrect. ``landmv_both_wrong`` = ``ablation_verifier_signal.py`` (incorrect = neither says correct).
- ``problem_identity: row``, ``require_answer: false``: one Raw row is one problem, ``answer`` is not read.
  The official scripts shuffle the rows (seed 42) before the loop; that permutes problems only, never the
  generations inside a row, so it changes no selection (the output order only, which training reshuffles).
- ``length_filter: pairs_after_selection`` = ``study_length_distribution.py``: first pick, then drop pairs
  whose prompt (> 800) or chosen / rejected (> 19,000) is too long, counted with the chat template + 1;
  positives are never length-filtered.
- ``decontaminate: report``, ``decontam_normalise: whitespace``, benchmarks math500/aime24/aime25 =
  ``decontaminate.py`` (8-gram overlap, lower-cased, whitespace collapsed; it reports, removes nothing).

Our defaults (the demo) differ where we prefer other practice: text identity, a gold answer required,
trace-level length filters before selection (a too-long first correct trace is replaced by the next
one), contaminated problems removed after stripping punctuation. Traces whose completeness is unknown
(OpenR1-Math-Raw has no finish reasons) are kept.

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
from .prompts import DEFAULT_PROTOCOL
from .schema import PAIR_COLUMNS, POSITIVE_COLUMNS, stable_id

logger = logging.getLogger(__name__)

LIGHT_COLUMNS = ["problem_id", "row_id", "gen_index", "answer", "source", "problem_is_valid", "finish_reason",
                 "reasoning_complete", "label_math_verify", "label_llama", "source_row", "source_gen"]


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


def _truthy(s: pd.Series) -> np.ndarray:
    """``bool(v)`` of each label, as the official scripts take it: a missing label (None, NaN, NA) is False."""
    known = s.notna().to_numpy()
    out = np.zeros(len(s), dtype=bool)
    out[known] = s[known].astype(bool).to_numpy()
    return out


def _verifiers(df: pd.DataFrame, rule: str) -> tuple[np.ndarray, np.ndarray]:
    _require(df, "label_llama", rule)
    _require(df, "label_math_verify", rule)
    return _truthy(df["label_llama"]), _truthy(df["label_math_verify"])


def rule_landmv(ours: pd.Series, df: pd.DataFrame) -> pd.Series:
    """LANDMV, the paper's rule as the official code applies it: ``experiments_trl/data_preprocess/
    clean_base_shuffled_dpo.py`` (the pairs REDI trains on; "LandMV False means NOT (Llama True AND MathRep
    True)") and ``clean_base_shuffled.py`` (the SFT positives). True iff ``bool(llama) and bool(math_verify)``;
    every other trace is False: one verifier rejects it, or a label is missing (``bool(None)`` is False).
    App. C.2 says the same ("deemed incorrect by either"). Never None.

    Where a source row lacks a whole label list the official scripts skip the row; here its traces are all
    False, so the row has no correct trace and yields neither a positive nor a pair there either: the same
    selection (only the funnel's label counts see those traces)."""
    llama, mv = _verifiers(df, "landmv")
    return pd.Series(llama & mv, index=df.index, dtype=object)


def rule_landmv_both_wrong(ours: pd.Series, df: pd.DataFrame) -> pd.Series:
    """The verifier-signal ablation's labels (``experiments_trl/data_preprocess/ablation_verifier_signal.py``):
    True iff both verifiers say correct, False iff neither does (``not bool(l) and not bool(mr)``: a missing
    label counts as not-correct), None (neither positive nor negative) when exactly one says correct.
    Only the labels follow that script; its split of the pairs into normal and inverted halves, its balancing
    and its length rule (responses only, no chat template) are not reproduced."""
    llama, mv = _verifiers(df, "landmv_both_wrong")
    out = np.full(len(df), None, dtype=object)
    out[llama & mv] = True
    out[~llama & ~mv] = False
    return pd.Series(out, index=df.index, dtype=object)


LABEL_RULES: dict[str, Callable[[pd.Series, pd.DataFrame], pd.Series]] = {
    "math_verify": rule_math_verify, "dataset": rule_dataset, "landmv": rule_landmv,
    "landmv_both_wrong": rule_landmv_both_wrong}
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


def render_prompt(tokenizer, problem: str, protocol: str = DEFAULT_PROTOCOL, generation_prompt: bool = True) -> str:
    """The training prompt of ``problem`` (``redi.prompts.render_prompt`` under the training ``protocol``). Without the
    generation prompt: the protocol's messages in the chat template only, as the official length study renders
    a prompt (``apply_chat_template(prompt_msgs, add_generation_prompt=False)``). The stage's one prompt renderer."""
    from . import prompts

    if generation_prompt:
        return prompts.render_prompt(tokenizer, problem, protocol)
    return tokenizer.apply_chat_template(prompts.get_protocol(protocol).messages(problem), tokenize=False,
                                         add_generation_prompt=False)


def _template_split(render: Callable[[str], str]) -> tuple[str, str] | None:
    """(text before, text after) the inserted string when ``render`` inserts it verbatim (checked with two probes
    that start and end with whitespace, so a template that trims is caught), else None."""
    a, b = " \n\x00probe\x00", "\t\x00other probe\x00 "
    ra, rb = render(a), render(b)
    if ra.count(a) == 1 and rb == ra.replace(a, b):
        pre, post = ra.split(a)
        return pre, post
    return None


def render_prompts(tokenizer, problems: list[str], protocol: str = DEFAULT_PROTOCOL, generation_prompt: bool = True) -> list[str]:
    """:func:`render_prompt` of every problem, rendering the chat template once when it inserts the problem
    verbatim (:func:`_template_split`, then checked on the first 32 problems); otherwise once per problem
    (jinja, ~50 us each)."""
    def one(p: str) -> str:
        return render_prompt(tokenizer, p, protocol, generation_prompt)

    split = _template_split(one)
    if split is not None:
        out = [split[0] + p + split[1] for p in problems]
        if all(out[i] == one(p) for i, p in enumerate(problems[:32])):
            return out
    return [one(p) for p in problems]


def prompt_lengths(tokenizer, problems: list[str], count: Callable[[list[str]], list[int]] | None = None,
                   protocol: str = DEFAULT_PROTOCOL, official: bool = False) -> list[int]:
    """Prompt tokens of each problem under the training ``protocol``. Default: the full training prompt (chat
    template + generation prompt), as training sees it. ``official``: as ``study_length_distribution.py``
    counts, the chat template without the generation prompt, + 1.

    ``count``: counts tokens elsewhere (the grading workers, :meth:`Grader.count`); its counts of the first
    SAMPLE_CHECK prompts are checked against ``tokenizer``'s, and on any difference all are counted here."""
    texts = render_prompts(tokenizer, problems, protocol, generation_prompt=not official)
    plus = 1 if official else 0
    if count is None:
        return [n + plus for n in _token_lengths(tokenizer, texts)]
    got = count(texts)
    missing = [i for i, n in enumerate(got) if n is None]  # killed at the deadline: count them here
    for i, n in zip(missing, _token_lengths(tokenizer, [texts[i] for i in missing]), strict=True):
        got[i] = n
    if got[:SAMPLE_CHECK] != _token_lengths(tokenizer, texts[:SAMPLE_CHECK]):
        logger.warning("verify: tokenizer.json and the transformers tokenizer count prompt tokens differently; counting "
                       "them with the transformers tokenizer in this process")
        got = _token_lengths(tokenizer, texts)
    return [n + plus for n in got]


def response_lengths(tokenizer, traces: list[str]) -> list[int]:
    """Tokens of each trace + 1 (the ``response_tokens`` column; the trace-level limit of
    ``length_filter: traces_before_selection``)."""
    return [n + 1 for n in _token_lengths(tokenizer, traces)]


def _render_response(tokenizer, trace: str) -> str:
    """A response as ``study_length_distribution.py`` renders it: the chat template of the assistant message alone,
    without generation prompt (with Qwen2.5-Math's template this includes its default system turn)."""
    return tokenizer.apply_chat_template([{"role": "assistant", "content": trace}], tokenize=False, add_generation_prompt=False)


def official_response_lengths(tokenizer, traces: list[str], response_tokens: list[int]) -> list[int]:
    """``study_length_distribution.py``'s chosen_len / rejected_len: tokens of :func:`_render_response` + 1.

    Computed as ``response_tokens`` (the trace's own tokens + 1, counted by the workers) + the template's tokens
    around the message when the template inserts the trace verbatim and the trace starts with no whitespace
    (nothing then merges across the boundary; checked on the first 32 traces against the full rendering, which is
    used for every trace on any difference); a trace that starts with whitespace is always counted rendered."""
    split = _template_split(lambda t: _render_response(tokenizer, t))
    if split is None:
        return [n + 1 for n in _token_lengths(tokenizer, [_render_response(tokenizer, t) for t in traces])]
    pre, post = split
    around = _token_lengths(tokenizer, [pre + post])[0]
    out = [n + around for n in response_tokens]
    exact = [i for i, t in enumerate(traces) if i < 32 or t[:1].isspace()]
    for i, n in zip(exact, _token_lengths(tokenizer, [pre + traces[i] + post for i in exact]), strict=True):
        if out[i] != n + 1 and not traces[i][:1].isspace():
            logger.warning("verify: the chat template's tokens do not add up around a response; counting every selected "
                           "pair's responses rendered in full")
            return [m + 1 for m in _token_lengths(tokenizer, [pre + t + post for t in traces])]
        out[i] = n + 1
    return out


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
    valid, source, answer = col("problem_is_valid"), col("source"), col("answer")
    complete, finish = col("reasoning_complete"), col("finish_reason")
    known = lambda s: s.notna().to_numpy()  # noqa: E731 - None, NaN and pd.NA are all unknown
    text = lambda s: s.astype(str).str.strip().str.lower().to_numpy()  # noqa: E731
    false = lambda s: s.map(lambda v: not _null(v) and not bool(v)).to_numpy(dtype=bool)  # noqa: E731
    none = np.zeros(len(df), bool)
    per_trace = cfg.length_filter == "traces_before_selection"  # else: pairs are length-filtered after selection
    conds = [
        cfg.require_valid & known(valid) & (text(valid) != "yes"),
        known(source) & np.isin(text(source), list(excluded)),
        cfg.require_answer & ~(known(answer) & (text(answer) != "")),
        info["contaminated"].to_numpy(dtype=bool) & (cfg.decontaminate == "remove"),
        none if cfg.max_prompt_tokens is None or not per_trace else (info["prompt_tokens"].to_numpy() > cfg.max_prompt_tokens),
        cfg.require_complete & ((known(complete) & false(complete)) | (known(finish) & (finish.astype(str).to_numpy() != "stop"))),
        none if cfg.max_response_tokens is None or not per_trace
        else (df["response_tokens"].to_numpy(dtype=np.int64) > cfg.max_response_tokens),
        ~known(df["label"]),
    ]
    return pd.Series(np.select(conds, FILTER_ORDER, default=""), index=idx, dtype=object)


FILTER_ORDER = ["problem_invalid", "excluded_source", "no_answer", "contaminated", "prompt_too_long", "incomplete", "response_too_long",
                "unlabelled"]


def funnel(df: pd.DataFrame) -> list[dict]:
    """Traces and problems left after each filter step."""
    left, out = df, [{"step": "input", "traces": len(df), "problems": df["problem_id"].nunique()}]
    for step in FILTER_ORDER:
        left = left[left["filter_reason"] != step]
        out.append({"step": f"after {step}", "traces": len(left), "problems": left["problem_id"].nunique()})
    return out


# ----------------------------------------------------------------------------- funnel report

OFFICIAL_FIGURES = {"positives": 77_629, "pairs_before_length_filter": 53_175}
"""The official selection on the full OpenR1-Math-Raw train split (official README: "77629 entries", "53175
queries"; paper App. C.2: 78k positives, 53k pairs), before the pairs' length filter."""
RAW_HUB_ID, RAW_ROWS = "open-r1/OpenR1-Math-Raw", 516_499
OFFICIAL_SETTINGS = {"label_rule": "landmv", "problem_identity": "row", "require_answer": False, "require_valid": True,
                     "exclude_sources": ["cn_k12"], "positives": "first", "pairs_per_problem": 1,
                     "length_filter": "pairs_after_selection"}
"""The verify settings that decide the two official counts (plus ``decontaminate`` not ``remove``)."""


def _full_raw(source: dict | None) -> str | None:
    """None when ``source`` (the download summary) is the whole Hub OpenR1-Math-Raw train split, else why not."""
    if not source:
        return "the data's origin is unknown to this stage"
    if source.get("hub_id") != RAW_HUB_ID or source.get("hub_split") != "train":
        return f"this run's data is {source.get('hub_id') or source.get('local_path') or source.get('source')}, not the Hub's {RAW_HUB_ID} train split"
    if source.get("max_rows") is not None or source.get("rows_read") != RAW_ROWS:
        return f"this run read {source.get('rows_read')} rows of {RAW_HUB_ID}, not all {RAW_ROWS:,}"
    return None


def funnel_report(summary: dict, cfg: VerifyConfig, protocol: str, source: dict | None) -> tuple[dict, str]:
    """The official figures beside ours (summary ``official``) and ``funnel.md``: what was selected, the official
    counts, whether they are comparable and why not, then the trace funnel and the decontamination report."""
    sel = summary["selection"]
    settings = cfg.model_dump(mode="json")
    differ = [f"{k}={settings[k]!r}" for k, v in OFFICIAL_SETTINGS.items() if settings[k] != v]
    differ += ["decontaminate='remove'"] if cfg.decontaminate == "remove" else []
    why_not = _full_raw(source)
    comparable = why_not is None and not differ
    if comparable:
        note = (f"This run read the whole {RAW_HUB_ID} train split with the official selection settings: the two counts "
                "should equal the official ones; a difference means the data or the rules differ.")
    else:
        reasons = ([why_not] if why_not else []) + ([f"its settings differ from the official ones ({', '.join(differ)})"] if differ else [])
        note = (f"The official figures apply only to the full {RAW_HUB_ID} train split under the official selection "
                f"settings; {'; '.join(reasons)}, so they are shown for reference only.")
    ours_before = sel["pairs_selected"] if cfg.length_filter == "pairs_after_selection" else None
    official = {**OFFICIAL_FIGURES, "comparable": comparable, "note": note,
                "ours": {"positives": sel["positives"], "pairs_before_length_filter": ours_before}}
    if comparable:
        official["match"] = {k: official["ours"][k] == v for k, v in OFFICIAL_FIGURES.items()}
    fmt = lambda v: "n/a" if v is None else f"{v:,}"  # noqa: E731
    drops = sel["pairs_dropped"]
    lim = f"prompt > {cfg.max_prompt_tokens}, chosen or rejected > {cfg.max_response_tokens} tokens"
    lines = ["# Verify: what was selected", "", "## Selected vs the official figures", "",
             "| | this run | official (full OpenR1-Math-Raw) |", "|---|---|---|",
             f"| positives (SFT, {'first correct trace per problem' if cfg.positives == 'first' else 'every correct trace'}) "
             f"| {fmt(sel['positives'])} | {OFFICIAL_FIGURES['positives']:,} |",
             f"| pairs before the length filter | {fmt(ours_before)} | {OFFICIAL_FIGURES['pairs_before_length_filter']:,} |",
             f"| pairs dropped by the length filter ({lim}) | "
             f"{fmt(sum(drops.values())) if ours_before is not None else 'n/a'} | not published |",
             f"| pairs (stage 2) | {fmt(sel['pairs'])} | not published |", "", note, ""]
    if cfg.length_filter == "traces_before_selection":
        lines += ["Length filter: every too-long trace was dropped before selection (`traces_before_selection`), so this run "
                  "has no pair count before a length filter and its positives were length-filtered too.", ""]
    lines += [f"Settings: label_rule={cfg.label_rule}, problem_identity={cfg.problem_identity}, require_answer={cfg.require_answer}, "
              f"length_filter={cfg.length_filter}, prompt protocol {protocol}, decontaminate={cfg.decontaminate}.", ""]
    dec = summary["decontamination"]
    if cfg.decontaminate != "off":
        lines += ["## Decontamination", "",
                  f"{dec['ngram']}-gram overlap ({dec['normalise']} normalisation) against {', '.join(dec['checked_benchmarks']) or 'no benchmark'}: "
                  f"{dec['problems_flagged']:,} problems flagged ({dec['per_benchmark']}); among the selected: {dec['positives_flagged']:,} "
                  f"positives, {dec['pairs_flagged']:,} pairs. "
                  + ("Flagged problems were removed." if cfg.decontaminate == "remove" else "Report only: nothing was removed "
                     "(as the official decontaminate.py)."), ""]
    lines += ["## Trace funnel", "", "| step | problems | traces |", "|---|---|---|"]
    lines += [f"| {f['step']} | {f['problems']:,} | {f['traces']:,} |" for f in summary["funnel"]]
    return official, "\n".join(lines) + "\n"


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


def pair_length_drops(pairs: pd.DataFrame, df: pd.DataFrame, info: pd.DataFrame, cfg: VerifyConfig, tokenizer,
                      texts: dict[int, tuple[str, str]]) -> pd.Series:
    """``length_filter: pairs_after_selection`` (official ``study_length_distribution.py``): why each selected pair
    is dropped ('' = kept): ``prompt_too_long`` (prompt_len > max_prompt_tokens) or ``response_too_long`` (chosen_len
    or rejected_len > max_response_tokens), counted as :func:`prompt_lengths` (official) and
    :func:`official_response_lengths` count them."""
    out = np.full(len(pairs), "", dtype=object)
    if not len(pairs):
        return pd.Series(out, dtype=object)
    if cfg.max_response_tokens is not None:
        pos = np.concatenate([pairs["_pos"].to_numpy(), pairs["_pos_r"].to_numpy()]).astype(np.int64)
        counted = df["response_tokens"].to_numpy(dtype=np.int64)[pos].tolist()  # df rows are in traces.parquet order
        n = official_response_lengths(tokenizer, [texts[int(i)][1] for i in pos], counted)
        long = np.asarray(n).reshape(2, -1).max(axis=0) > cfg.max_response_tokens
        out[long] = "response_too_long"
    if cfg.max_prompt_tokens is not None:
        out[info.loc[pairs["problem_id"], "prompt_tokens"].to_numpy() > cfg.max_prompt_tokens] = "prompt_too_long"
    return pd.Series(out, dtype=object)


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


def apply_identity(df: pd.DataFrame, cfg: VerifyConfig) -> pd.DataFrame:
    """``problem_identity: text``: as downloaded (one problem per problem text). ``row``: one problem per source
    row, as the official scripts (each Raw row is one item of their loop): ``problem_id`` := stable_id(text id,
    "row", source_row) and ``gen_index`` := ``source_gen``, the generation's index within its row (the official
    ``chosen_gen_idx`` / ``rejected_gen_idx``)."""
    if cfg.problem_identity == "text":
        return df
    if df["source_row"].isna().any() or df["source_gen"].isna().any():
        raise ValueError("verify.problem_identity=row needs the source_row / source_gen columns of traces.parquet, which this "
                         "file lacks: rebuild it with the current download stage (--refresh download) or set "
                         "verify.problem_identity=text")
    rows = df["source_row"].astype("int64")
    keys = {(p, r): stable_id(p, "row", r) for p, r in set(zip(df["problem_id"], rows.tolist(), strict=True))}
    df["problem_id"] = [keys[k] for k in zip(df["problem_id"], rows.tolist(), strict=True)]
    df["gen_index"] = df["source_gen"].astype("int64")
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

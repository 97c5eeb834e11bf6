"""What the verify stage selects: problem identity, trace filters, positives and pairs, and the funnel report
beside the official figures (the label rules are ``redi.label_rules``). Pure functions of the light per-trace
table (no texts, no tokenizer); redi.verify grades, counts tokens, reads and writes.

Order of the trace filters (a trace is dropped at the first that fails; counts after each step go into
the summary's ``funnel``): problem_is_valid -> excluded sources -> no gold answer (``require_answer``)
-> decontamination (``decontaminate: remove``) -> prompt length -> reasoning complete / finish reason ->
response length -> a label exists. The two length steps are trace filters only under
``length_filter: traces_before_selection``; under ``pairs_after_selection`` they drop selected pairs
(``redi.verify.pair_length_drops``).

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
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .config.verify import VerifyConfig
from .label_rules import LABEL_RULES, LabelRuleError  # noqa: F401 - re-exported with the selection's names
from .schema import PAIR_COLUMNS, POSITIVE_COLUMNS, stable_id

# ----------------------------------------------------------------------------- problem identity


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
    bad = (source or {}).get("bad_reasons") or {}
    dups = sum(v for k, v in bad.items() if k.startswith("duplicate row"))
    if dups:
        note += (f" {dups:,} exact duplicate rows were dropped at download (redi.data); the official scripts count each "
                 "as one more problem, so their counts can be up to that much higher on this data.")
    ours_before = sel["pairs_selected"] if cfg.length_filter == "pairs_after_selection" else None
    official = {**OFFICIAL_FIGURES, "comparable": comparable, "note": note, "duplicate_rows_dropped": dups,
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
    if source and "rows_read" in source:
        lines += [f"Download: {source['rows_read']:,} source rows read, {source.get('bad_rows', 0):,} unusable "
                  f"({', '.join(f'{k}: {v:,}' for k, v in bad.items()) or 'none'}).", ""]
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

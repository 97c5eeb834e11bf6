"""Stage ``download``: any teacher-trace source -> ``traces.parquet`` (one row per (problem, generation)).

Sources are the entries of ``redi.sources.SOURCES`` (``data.source``): the Hugging Face Hub
(``open-r1/OpenR1-Math-220k`` configs default/extended/all, and ``open-r1/OpenR1-Math-Raw``, the set the
paper used) streamed with ``datasets.load_dataset(..., streaming=True)``; local parquet / jsonl files,
folders of them, or a ``datasets`` save_to_disk folder; or the offline synthetic teacher (``redi.synth``).
Every source's rows go through the same normaliser (this module).

Schemas (auto-detected per row from its columns; see docs/data.md for the column lists):

- ``openr1-220k``: list columns ``generations, finish_reasons, is_reasoning_complete,
  correctness_math_verify, correctness_llama`` aligned per generation.
- ``openr1-raw``: ``generations`` plus ``correctness`` = struct ``{llama_verification,
  math_verify_answer, math_verify_reparsed_answer}`` (current revision) or a flat
  ``correctness_math_verify`` list (first revision); ``problem_is_valid``; no finish reasons.
  The Math-Verify label is ``correctness.math_verify_reparsed_answer`` only, the column the official
  REDI scripts read (``clean_base_shuffled.py``, ``clean_base_shuffled_dpo.py``); where it is null the
  label is unknown (None), never taken from ``math_verify_answer``.
- ``flat``: already one row per trace: ``problem, answer, trace`` (or ``generation``/``completion``/``response``).

Rows are streamed and written in batches with a ``pyarrow.parquet.ParquetWriter``, so memory does
not grow with the number of rows (only a problem-id -> generation-count map grows, with problems).
Bad input never stops the stage while good rows remain: bad rows are counted by reason with
their ids (capped) in the summary; the stage fails with one clear message only when nothing usable is left.
A bad value never becomes data: a label must be a boolean (or 0/1), a gold a string or a finite number;
an unreadable file or parquet row group is named and skipped (docs/faults.md lists every kind).
Departure from the official scripts: a row with the same problem, answer and traces as an earlier row
is dropped as a duplicate (they would count it as a second problem).

Problem identity: every trace keeps its source row (``source_row``, the row's position in read
order, like the official ``original_index``) and its index within that row (``source_gen``), so the
verify stage can treat one source row as one problem, as the official code does
(``verify.problem_identity: row``). ``problem_id`` / ``gen_index`` identify the problem *text*: a text
that appears in several rows is one ``problem_id`` and its generations are numbered on across the rows
(``verify.problem_identity: text``, this project's default). Rows whose ``answer`` is missing or empty
are kept with ``answer`` None (the official LandMV scripts never read ``answer``); the verify stage
drops them where a gold is wanted (``verify.require_answer``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .config.data import DataConfig
from .schema import TRACE_COLUMNS, stable_id
from .sources import BadRow, DataError, Unreadable, get_source

__all__ = ["BadRow", "DataError", "TRACE_SCHEMA", "BadRows", "TraceWriter", "detect_schema", "download", "normalise_row",
           "normalise_stream"]

logger = logging.getLogger(__name__)

TRACE_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()), ("row_id", pa.string()), ("gen_index", pa.int32()), ("problem", pa.string()),
        ("answer", pa.string()), ("source", pa.string()), ("problem_is_valid", pa.string()), ("trace", pa.string()),
        ("finish_reason", pa.string()), ("reasoning_complete", pa.bool_()), ("label_math_verify", pa.bool_()),
        ("label_llama", pa.bool_()), ("source_uuid", pa.string()), ("source_row", pa.int64()), ("source_gen", pa.int32()),
    ]
)
assert TRACE_SCHEMA.names == list(TRACE_COLUMNS), "TRACE_SCHEMA must follow redi.schema.TRACE_COLUMNS"

FLAT_TRACE_KEYS = ("trace", "generation", "completion", "response")
MAX_BAD_IDS = 200
MAX_BAD_IDS_PER_REASON = 5
BATCH_TRACES = 2048


# ----------------------------------------------------------------------------- schema detection


def detect_schema(row: dict) -> str | None:
    """``openr1-220k`` / ``openr1-raw`` / ``flat`` from a row's columns, or None if unknown."""
    keys = set(row)
    if not {"problem", "answer"} <= keys:
        return None
    if "generations" in keys:
        raw = "correctness" in keys or ("problem_is_valid" in keys and "finish_reasons" not in keys)
        return "openr1-raw" if raw else "openr1-220k"
    if any(k in keys for k in FLAT_TRACE_KEYS):
        return "flat"
    return None


def _schema_reason(row: dict) -> str:
    """Why detect_schema found no schema: the missing column named when the row has traces, else its columns."""
    has_traces = "generations" in row or any(k in row for k in FLAT_TRACE_KEYS)
    missing = [k for k in ("problem", "answer") if k not in row]
    if has_traces and missing:
        return f"missing column {' and '.join(repr(k) for k in missing)}"
    return f"unknown schema (columns {sorted(row)[:8]})"


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return v.strip() if isinstance(v, str) and v.strip() else None


def _aligned(row: dict, key: str, n: int) -> list | None:
    """A per-generation list column, None when absent/null; BadRow when its length differs from n."""
    v = row.get(key)
    if v is None:
        return None
    if not isinstance(v, (list, tuple)):
        raise BadRow(f"{key} is not a list")
    if len(v) != n:
        raise BadRow(f"unequal lengths: {key} has {len(v)}, generations has {n}")
    return list(v)


def _opt_bool(v: Any, key: str = "label") -> bool | None:
    """A boolean column value: bool, or the integers / floats 0 and 1; None stays None (unknown).

    Anything else (the string "false", NaN, 2) is a bad value: the row is rejected rather than the
    value read as ``bool(v)``, which makes "false" and NaN True.
    """
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    raise BadRow(f"non-boolean {key} ({type(v).__name__})")


MAX_PROBLEM_CHARS = 100_000
MAX_ANSWER_CHARS = 10_000
MAX_TRACE_CHARS = 2_000_000
"""Longest problem, gold answer and trace accepted (characters). Far above any real row (OpenR1's traces
stop at 32k tokens, ~100k characters); a longer value is a broken row (a file pasted into a cell)."""


def _check_text(key: str, v: Any, limit: int) -> Any:
    """`v` unchanged when it can be a `key` value (None, a string within `limit`, a finite number for the
    answer); BadRow naming the problem otherwise."""
    if v is None or (isinstance(v, str) and len(v) <= limit):
        if key == "answer" and isinstance(v, str) and v.strip().lower() == "nan":
            raise BadRow("answer is 'nan' (a missing value written as text)")
        return v
    if isinstance(v, str):
        raise BadRow(f"{key} longer than {limit} characters")
    if key == "answer" and isinstance(v, (int, float)) and not isinstance(v, bool):
        if isinstance(v, float) and not math.isfinite(v):
            raise BadRow(f"answer is {v} (not a number)")
        return v
    raise BadRow(f"{key} has type {type(v).__name__}, not text")


def _raw_labels(row: dict, n: int) -> tuple[list | None, list | None]:
    """(math_verify, llama) label lists of an OpenR1-Math-Raw row (either revision).

    Current revision: ``correctness.math_verify_reparsed_answer`` and ``correctness.llama_verification``, as
    the official scripts; ``math_verify_answer`` is not read (a null reparsed list stays unknown)."""
    corr = row.get("correctness")
    if isinstance(corr, dict):
        return _aligned(corr, "math_verify_reparsed_answer", n), _aligned(corr, "llama_verification", n)
    if corr is not None:
        raise BadRow(f"correctness has type {type(corr).__name__}, not a struct")
    return _aligned(row, "correctness_math_verify", n), _aligned(row, "correctness_llama", n)


def normalise_row(row: dict, schema: str) -> tuple[dict, list[dict], int]:
    """(problem fields, one dict per usable generation, number of non-string traces skipped).

    Raises BadRow with the reason when the row as a whole cannot be used. A missing or empty ``answer``
    is kept as None (the verify stage decides whether a gold is needed).
    """
    for key in ("problem", "answer"):
        if key not in row:
            raise BadRow(f"missing column {key!r}")
    problem = _text(_check_text("problem", row["problem"], MAX_PROBLEM_CHARS))
    answer = _text(_check_text("answer", row["answer"], MAX_ANSWER_CHARS))
    if problem is None:
        raise BadRow("missing or empty problem")
    head = {"problem": problem, "answer": answer, "source": _text(row.get("source")),
            "problem_is_valid": _text(row.get("problem_is_valid")), "source_uuid": _text(row.get("uuid"))}
    if schema == "flat":
        key = next((k for k in FLAT_TRACE_KEYS if k in row), None)
        if key is None:  # schema forced to flat on a row without a trace column
            raise BadRow(f"missing column 'trace' (or {', '.join(FLAT_TRACE_KEYS[1:])})")
        gens: list = [row.get(key)]
        finish = [row.get("finish_reason")]
        complete = [row.get("reasoning_complete", row.get("is_reasoning_complete"))]
        mv, llama = [row.get("label_math_verify")], [row.get("label_llama")]
    else:
        gens = row.get("generations")
        if gens is None or isinstance(gens, (str, bytes)) or not isinstance(gens, (list, tuple)):
            raise BadRow("generations is None or not a list")
        if not gens:
            raise BadRow("no generations")
        n = len(gens)
        finish, complete = _aligned(row, "finish_reasons", n), _aligned(row, "is_reasoning_complete", n)
        mv, llama = _raw_labels(row, n) if schema == "openr1-raw" else (
            _aligned(row, "correctness_math_verify", n), _aligned(row, "correctness_llama", n))
    traces, skipped = [], 0
    for i, g in enumerate(gens):
        if not isinstance(g, str) or not g.strip():
            skipped += 1
            continue
        if len(g) > MAX_TRACE_CHARS:
            raise BadRow(f"trace longer than {MAX_TRACE_CHARS} characters")
        traces.append({"gen": i, "trace": g, "finish_reason": _text(finish[i]) if finish else None,
                       "reasoning_complete": _opt_bool(complete[i], "reasoning_complete") if complete else None,
                       "label_math_verify": _opt_bool(mv[i], "label_math_verify") if mv else None,
                       "label_llama": _opt_bool(llama[i], "label_llama") if llama else None})
    if not traces:
        raise BadRow("no string traces")
    return head, traces, skipped


# ----------------------------------------------------------------------------- writing


class TraceWriter:
    """Appends trace rows to a parquet file in batches (flat memory), numbering generations per problem."""

    def __init__(self, path: Path, batch: int = BATCH_TRACES):
        self.path, self.batch = path, batch
        self._writer: pq.ParquetWriter | None = None
        self._buf: dict[str, list] = {k: [] for k in TRACE_SCHEMA.names}
        self._next_gen: dict[str, int] = {}
        self.n_traces = 0

    def add(self, head: dict, traces: list[dict], source_row: int) -> None:
        pid = stable_id(head["problem"])
        base = self._next_gen.get(pid, 0)
        for t in traces:
            gen = base + t["gen"]
            row = {**head, **{k: v for k, v in t.items() if k != "gen"}, "problem_id": pid, "row_id": stable_id(pid, gen),
                   "gen_index": gen, "source_row": source_row, "source_gen": t["gen"]}
            for k in TRACE_SCHEMA.names:
                self._buf[k].append(row[k])
        self._next_gen[pid] = base + max(t["gen"] for t in traces) + 1
        self.n_traces += len(traces)
        if len(self._buf["row_id"]) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self._buf["row_id"]:
            return
        table = pa.Table.from_pydict(self._buf, schema=TRACE_SCHEMA)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, TRACE_SCHEMA, compression="zstd")
        self._writer.write_table(table)
        self._buf = {k: [] for k in TRACE_SCHEMA.names}

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()

    @property
    def n_problems(self) -> int:
        return len(self._next_gen)


class BadRows:
    """Counts of unusable rows by reason, with the first row ids (``file:line``, ``file:row``) of each
    reason, and every unreadable file or parquet row group by name."""

    def __init__(self) -> None:
        self.reasons: Counter = Counter()
        self.ids: list[dict] = []
        self.unreadable: list[dict] = []
        self.traces_skipped = 0

    def add(self, row_id: str, reason: str) -> None:
        self.reasons[reason] += 1
        if self.reasons[reason] <= MAX_BAD_IDS_PER_REASON and len(self.ids) < MAX_BAD_IDS:
            self.ids.append({"row": row_id, "reason": reason})

    def add_unreadable(self, where: str, err: Unreadable) -> None:
        self.add(where, str(err))
        self.unreadable.append({"where": where, "error": err.detail})
        logger.warning("download: %s skipped, the other files are read (%s)", where, err.detail)

    def summary(self) -> dict:
        return {"bad_rows": sum(self.reasons.values()), "bad_reasons": dict(self.reasons), "bad_row_ids": self.ids,
                "unreadable": self.unreadable, "non_string_traces_skipped": self.traces_skipped}


def _row_fingerprint(row: dict, head: dict, traces: list[dict]) -> int:
    """Identity of a source row's content (problem, answer as given, traces) for spotting an exact duplicate.

    Python's string hash (cached on each string, no copy); 64 bits, so a false match needs ~4e9 rows."""
    return hash((head["problem"], row.get("answer"), tuple(t["trace"] for t in traces)))


def normalise_stream(rows: Iterable[tuple[str, dict | None]], schema: str, writer: TraceWriter, bad: BadRows,
                     max_rows: int | None = None, progress: bool = True) -> tuple[int, Counter]:
    """Normalise and write every row; returns (rows read, rows per detected schema)."""
    from tqdm.auto import tqdm

    n, schemas, seen = 0, Counter(), set()
    for row_id, row in tqdm(rows, desc="download", unit="row", disable=not progress, mininterval=1.0):
        if max_rows is not None and n >= max_rows:
            break
        n += 1
        if isinstance(row, Unreadable):
            bad.add_unreadable(row_id, row)
            continue
        if isinstance(row, BadRow):
            bad.add(row_id, str(row))
            continue
        if not isinstance(row, dict):
            bad.add(row_id, "not a JSON object")
            continue
        s = detect_schema(row) if schema == "auto" else schema
        if s is None:
            bad.add(row_id, _schema_reason(row))
            continue
        try:
            head, traces, skipped = normalise_row(row, s)
        except BadRow as e:
            bad.add(row_id, str(e))
            continue
        except (KeyError, TypeError, IndexError) as e:  # a row of the right name but wrong shape
            bad.add(row_id, f"malformed row for schema {s}: {type(e).__name__}")
            continue
        fp = _row_fingerprint(row, head, traces)
        if fp in seen:
            bad.add(row_id, "duplicate row (same problem, answer and traces as an earlier row)")
            continue
        seen.add(fp)
        bad.traces_skipped += skipped
        schemas[s] += 1
        writer.add(head, traces, n - 1)
    return n, schemas


# ----------------------------------------------------------------------------- entry point


def download(cfg: DataConfig, out_dir: Path, progress: bool = True, work: Path | None = None) -> dict:
    """Write ``out_dir/traces.parquet`` (TRACE_COLUMNS) from cfg's source; return the summary.

    source=synthetic also writes ``out_dir/benchmarks/demo_val.jsonl`` and ``demo_test.jsonl``.
    Raises DataError (one line saying what to do) when the source is missing/unreachable or no
    usable row is left. ``work``: the stage's work folder, given to a resumable source (``DataSource.resumable``).
    """
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info: dict = {"source": cfg.source}
    writer, bad = TraceWriter(out_dir / "traces.parquet"), BadRows()
    try:
        src = get_source(cfg.source)
        rows = src.rows(cfg, out_dir, info, work) if src.resumable else src.rows(cfg, out_dir, info)
        n_rows, schemas = normalise_stream(rows, cfg.schema_, writer, bad, cfg.max_rows, progress)
    finally:
        writer.close()
    if writer.n_traces == 0:
        (out_dir / "traces.parquet").unlink(missing_ok=True)
        unreadable = f"; unreadable: {', '.join(u['where'] for u in bad.unreadable[:5])}" if bad.unreadable else ""
        raise DataError(f"no usable trace in {n_rows} source rows ({dict(bad.reasons) or 'empty source'}{unreadable}); "
                        "expected the OpenR1-Math-220k / OpenR1-Math-Raw columns (problem, answer, generations, ...) "
                        "or flat rows (problem, answer, trace)")
    if bad.reasons:
        logger.warning("download: %d bad rows skipped: %s", sum(bad.reasons.values()), dict(bad.reasons))
    summary = {**info, "rows_read": n_rows, "max_rows": cfg.max_rows, "problems": writer.n_problems, "traces": writer.n_traces,
               "schemas": dict(schemas), **bad.summary(), "seconds": round(time.monotonic() - t0, 2),
               "file_bytes": os.path.getsize(out_dir / "traces.parquet")}
    logger.info("download: %d traces of %d problems from %d rows (%s)", writer.n_traces, writer.n_problems, n_rows, cfg.source)
    return summary

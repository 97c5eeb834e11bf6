"""A generator of hostile download-stage input: good rows mixed with many kinds of bad rows and files.

``write_bad_input(folder)`` writes jsonl and parquet files (and a few files that are not data at all)
into ``folder`` and returns an :class:`Expected`: every good row (the traces it must give, with their
labels and gold), every bad kind with the reason prefix the download stage must count it under and the
``file:line`` / ``file:row`` / ``file:row group`` where it sits, and the quirks (BOM, CRLF, extra
columns, numbers as answers, ...) whose rows are valid and must be kept.

Used by tests/test_bad_input.py; the figures it gives are in docs/faults.md.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HUGE = 2_000_001  # one more character than redi.data.MAX_TRACE_CHARS


@dataclass
class Expected:
    good: dict[str, dict] = field(default_factory=dict)  # problem -> {"answer", "traces": [(trace, mv, llama)]}
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, reason prefix, location)
    quirks: list[str] = field(default_factory=list)  # kinds whose rows are valid and kept
    lost: set[str] = field(default_factory=set)  # good problems inside a corrupt row group (unreadable, not bad)

    @property
    def bad_kinds(self) -> list[str]:
        return sorted({k for k, _, _ in self.bad})

    def reason_counts(self) -> Counter:
        return Counter(r for _, r, _ in self.bad)

    def by_location(self) -> dict[str, tuple[str, str]]:
        return {loc: (kind, reason) for kind, reason, loc in self.bad}


class _Maker:
    """Numbers good problems and records what each written row must become."""

    def __init__(self, exp: Expected):
        self.exp, self.k = exp, 0

    def _next(self) -> int:
        self.k += 1
        return self.k

    def good_220k(self, **over) -> dict:
        k = self._next()
        row = {"problem": f"Good problem {k}: what is {k} + 1?", "answer": str(k + 1),
               "generations": [f"<think>{k} + 1 = {k + 1}</think> \\boxed{{{k + 1}}}", f"<think>guess</think> \\boxed{{{k}}}"],
               "finish_reasons": ["stop", "length"], "is_reasoning_complete": [True, False],
               "correctness_math_verify": [True, False], "correctness_llama": [True, None], "source": "olympiads", "uuid": f"u-{k}"}
        row.update(over)
        return row

    def good_flat(self) -> dict:
        k = self._next()
        return {"problem": f"Good flat problem {k}: what is 2 * {k}?", "answer": str(2 * k),
                "trace": f"2 * {k} = {2 * k}, so \\boxed{{{2 * k}}}", "label_math_verify": True, "label_llama": False}

    def good_raw(self) -> dict:
        k = self._next()
        return {"problem": f"Good raw problem {k}: what is {k} - 1?", "answer": str(k - 1),
                "generations": [f"\\boxed{{{k - 1}}}", f"\\boxed{{{k + 5}}}"], "problem_is_valid": "Yes",
                "correctness": {"llama_verification": [True, False], "math_verify_answer": [True, True],
                                "math_verify_reparsed_answer": [True, False]}}

    def expect(self, row: dict, answer: str | None = None) -> None:
        """Record a good row's expected traces (trace, label_math_verify, label_llama)."""
        if "trace" in row:
            traces = [(row["trace"], row.get("label_math_verify"), row.get("label_llama"))]
        else:
            gens = row["generations"]
            corr = row.get("correctness")
            mv = corr["math_verify_reparsed_answer"] if corr else row.get("correctness_math_verify")
            ll = corr["llama_verification"] if corr else row.get("correctness_llama")
            traces = [(g, None if mv is None else _bool(mv[i]), None if ll is None else _bool(ll[i]))
                      for i, g in enumerate(gens) if isinstance(g, str) and g.strip()]
        self.exp.good[row["problem"]] = {"answer": answer if answer is not None else str(row["answer"]), "traces": traces}

    def bad_220k(self, kind: str, **over) -> dict:
        row = self.good_220k()
        row["problem"] = f"BAD {kind}: {row['problem']}"
        row.update(over)
        return row


def _bool(v) -> bool | None:
    return None if v is None else bool(v)


# ------------------------------------------------------------------------------------------- jsonl


def _jsonl_lines(m: _Maker) -> list[tuple[str | None, str | None, bytes]]:
    """(bad kind or None, reason prefix, line bytes) for mixed.jsonl; good rows are recorded on the maker."""
    out: list[tuple[str | None, str | None, bytes]] = []

    def good(row: dict | None = None) -> None:
        row = row or (m.good_220k, m.good_flat, m.good_raw)[m.k % 3]()
        m.expect(row)
        out.append((None, None, json.dumps(row).encode()))

    def bad(kind: str, reason: str, line: bytes | dict) -> None:
        out.append((kind, reason, line if isinstance(line, bytes) else json.dumps(line, allow_nan=True).encode()))

    some = m.good_220k()
    good(some)
    bad("not JSON", "invalid JSON", b"this line is not JSON")
    bad("trailing garbage", "invalid JSON", json.dumps(m.bad_220k("trailing")).encode() + b" }garbage")
    bad("truncated line", "invalid JSON", json.dumps(m.bad_220k("truncated")).encode()[:60])
    bad("JSON array", "not a JSON object", b"[1, 2, 3]")
    bad("JSON string", "not a JSON object", b'"just a string"')
    bad("JSON null", "not a JSON object", b"null")
    bad("lone surrogate escape", "lone surrogate escape", json.dumps(m.bad_220k("surrogate")).encode().replace(b"BAD", b"BAD \\ud800", 1))
    bad("raw non-UTF-8 bytes", "not valid UTF-8", json.dumps(m.bad_220k("latin1")).encode().replace(b"BAD", b"BAD caf\xe9", 1))
    bad("JSON nested too deeply", "invalid JSON (nested too deeply)", b'{"problem": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    bad("NaN answer", "answer is nan", m.bad_220k("nan answer", answer=float("nan")))
    bad("inf answer", "answer is inf", m.bad_220k("inf answer", answer=float("inf")))
    bad("-inf answer", "answer is -inf", m.bad_220k("-inf answer", answer=float("-inf")))
    bad("'nan' text answer", "answer is 'nan'", m.bad_220k("nan text", answer="nan"))
    bad("boolean answer", "answer has type bool", m.bad_220k("bool answer", answer=True))
    bad("list answer", "answer has type list", m.bad_220k("list answer", answer=["4"]))
    bad("dict problem", "problem has type dict", m.bad_220k("x", problem={"text": "BAD dict problem"}))
    bad("number problem", "problem has type int", m.bad_220k("x", problem=12345))
    bad("null problem", "missing or empty problem", m.bad_220k("x", problem=None))
    bad("empty problem", "missing or empty problem", m.bad_220k("x", problem=""))
    bad("whitespace problem", "missing or empty problem", m.bad_220k("x", problem=" \t "))
    row = m.bad_220k("no answer column")
    del row["answer"]
    bad("missing answer column", "missing column 'answer'", row)
    row = m.bad_220k("no problem column")
    del row["problem"]
    bad("missing problem column", "missing column 'problem'", row)
    bad("unknown schema", "unknown schema", {"question": "BAD unknown schema", "output": "42"})
    good()
    bad("null generations", "generations is None or not a list", m.bad_220k("null gens", generations=None))
    bad("string generations", "generations is None or not a list", m.bad_220k("str gens", generations="\\boxed{1}"))
    bad("empty generations", "no generations", m.bad_220k("empty gens", generations=[], finish_reasons=[], is_reasoning_complete=[],
                                                          correctness_math_verify=[], correctness_llama=[]))
    bad("nested list generations", "no string traces", m.bad_220k("nested gens", generations=[["\\boxed{1}"], ["x"]]))
    bad("null traces only", "no string traces", m.bad_220k("null traces", generations=[None, None]))
    bad("finish_reasons length mismatch", "unequal lengths", m.bad_220k("finish len", finish_reasons=["stop"]))
    bad("labels length mismatch", "unequal lengths", m.bad_220k("label len", correctness_math_verify=[True, False, True]))
    bad("label 'false' string", "non-boolean label_math_verify (str)", m.bad_220k("false str", correctness_math_verify=["false", "true"]))
    bad("label NaN", "non-boolean label_math_verify (float)", m.bad_220k("nan label", correctness_math_verify=[float("nan"), True]))
    bad("label 2", "non-boolean label_math_verify (int)", m.bad_220k("label 2", correctness_math_verify=[2, 0]))
    bad("llama label 'true' string", "non-boolean label_llama (str)", m.bad_220k("llama str", correctness_llama=["true", "false"]))
    bad("reasoning_complete 'yes'", "non-boolean reasoning_complete (str)", m.bad_220k("complete yes", is_reasoning_complete=["yes", "no"]))
    bad("labels not a list", "correctness_math_verify is not a list", m.bad_220k("labels scalar", correctness_math_verify=True))
    raw = m.good_raw()
    raw.update(problem="BAD correctness string " + raw["problem"], correctness="yes")
    bad("correctness a string", "correctness has type str", raw)
    bad("huge problem", "problem longer than", m.bad_220k("huge problem", problem="BAD huge " + "x" * 100_000))
    bad("huge answer", "answer longer than", m.bad_220k("huge answer", answer="1" * 10_001))
    bad("huge trace", "trace longer than", m.bad_220k("huge trace", generations=["x" * HUGE, "\\boxed{1}"]))
    flat = m.good_flat()
    flat.update(problem="BAD flat label " + flat["problem"], label_math_verify="false")
    bad("flat label 'false' string", "non-boolean label_math_verify (str)", flat)
    bad("duplicate row", "duplicate row", some)
    for _ in range(60):
        good()
    return out


def _write_jsonl(folder: Path, m: _Maker) -> None:
    lines = _jsonl_lines(m)
    with (folder / "mixed.jsonl").open("wb") as f:
        for i, (kind, reason, line) in enumerate(lines, 1):
            f.write(line + b"\n")
            if kind is not None:
                m.exp.bad.append((kind, reason, f"mixed.jsonl:{i}"))
    # Quirks: a BOM, CRLF line ends, blank lines, extra columns, numbers as answers, 0/1 labels, nulls in the
    # optional columns, non-ASCII text and an escaped surrogate pair, some non-string traces in a good row.
    rows = []
    r = m.good_220k()
    rows.append((r, None))
    r = m.good_220k(extra_column={"nested": [1, 2]}, another=None)
    rows.append((r, None))
    r = m.good_220k()
    r["answer"] = int(r["answer"])
    rows.append((r, None))
    r = m.good_220k(answer=2.5)
    rows.append((r, "2.5"))
    r = m.good_220k(answer=10**30)
    rows.append((r, str(10**30)))
    r = m.good_220k(correctness_math_verify=[1, 0], correctness_llama=[0, 1])
    rows.append((r, None))
    r = m.good_220k(finish_reasons=None, is_reasoning_complete=None, correctness_math_verify=None, correctness_llama=None,
                    source=None, uuid=None)
    rows.append((r, None))
    r = m.good_220k()
    r["problem"] += " Überprüfe: ∑ 数学 😀"
    rows.append((r, None))
    r = m.good_220k(generations=[None, 7, "\\boxed{1}"], finish_reasons=["stop"] * 3, is_reasoning_complete=[True] * 3,
                    correctness_math_verify=[False, False, True], correctness_llama=[None] * 3)
    rows.append((r, None))
    text = b"\xef\xbb\xbf"  # BOM
    for j, (row, ans) in enumerate(rows):
        m.expect(row, ans)
        text += json.dumps(row).encode() + b"\r\n" + (b"\r\n" if j == 3 else b"")
    (folder / "quirks.jsonl").write_bytes(text)
    (folder / "empty.jsonl").write_bytes(b"")
    (folder / "README.md").write_text("not data: ignored by suffix\n")
    m.exp.quirks += ["UTF-8 BOM", "CRLF line ends", "blank lines", "extra columns", "integer answer", "float answer",
                     "30-digit integer answer", "0/1 integer labels", "nulls in every optional column",
                     "non-ASCII text and an escaped surrogate pair", "non-string traces beside good ones",
                     "empty .jsonl file", "non-data file in the folder"]


# ------------------------------------------------------------------------------------------- parquet


GEN_SCHEMA = [("problem", pa.string()), ("generations", pa.list_(pa.string())), ("finish_reasons", pa.list_(pa.string()))]


def _write_table(m: _Maker, path: Path, rows: list[tuple[str | None, str | None, dict]], schema: pa.Schema,
                 answers: dict | None = None, **kw) -> None:
    """Rows (bad kind or None, reason, row) as one parquet file; good rows recorded, bad ones located."""
    for i, (kind, reason, row) in enumerate(rows):
        if kind is None:
            m.expect(row, (answers or {}).get(i))
        else:
            m.exp.bad.append((kind, reason, f"{path.name}:{i}"))
    pq.write_table(pa.Table.from_pylist([r for _, _, r in rows], schema=schema), path, **kw)


def _write_parquet(folder: Path, m: _Maker) -> None:
    base = [*GEN_SCHEMA, ("is_reasoning_complete", pa.list_(pa.bool_())), ("correctness_llama", pa.list_(pa.bool_()))]
    # answers stored as float64: finite ones are data, NaN and inf are bad rows
    rows = []
    answers = {}
    for j in range(6):
        r = m.good_220k(correctness_math_verify=[True, False])
        r["answer"] = float(r["answer"])
        answers[len(rows)] = str(r["answer"])
        rows.append((None, None, r))
        if j == 2:
            rows.append(("parquet NaN answer", "answer is nan", m.bad_220k("pq nan", answer=float("nan"))))
            rows.append(("parquet inf answer", "answer is inf", m.bad_220k("pq inf", answer=float("inf"))))
    schema = pa.schema([*base, ("answer", pa.float64()), ("correctness_math_verify", pa.list_(pa.bool_()))])
    _write_table(m, folder / "float_answers.parquet", rows, schema, answers)
    # labels stored as strings: "false"/"true" are bad values, a null list is unknown
    rows = [(None, None, m.good_220k(correctness_math_verify=None)) for _ in range(4)]
    rows.insert(2, ("parquet label strings", "non-boolean label_math_verify (str)", m.bad_220k("pq str labels", correctness_math_verify=["false", "true"])))
    schema = pa.schema([*base, ("answer", pa.string()), ("correctness_math_verify", pa.list_(pa.string()))])
    _write_table(m, folder / "string_labels.parquet", rows, schema)
    # labels stored as float64 (pandas turns a bool column with gaps into floats): 1.0/0.0 are fine, NaN is not
    rows = [(None, None, m.good_220k(correctness_math_verify=[1.0, 0.0])) for _ in range(4)]
    rows.insert(1, ("parquet NaN label", "non-boolean label_math_verify (float)", m.bad_220k("pq nan label", correctness_math_verify=[float("nan"), 1.0])))
    rows.insert(3, ("parquet null problem", "missing or empty problem", m.bad_220k("x", problem=None)))
    rows.insert(4, ("parquet unequal label length", "unequal lengths", m.bad_220k("pq len", correctness_math_verify=[1.0])))
    schema = pa.schema([*base, ("answer", pa.string()), ("correctness_math_verify", pa.list_(pa.float64()))])
    _write_table(m, folder / "float_labels.parquet", rows, schema)
    m.exp.quirks.append("float 1.0/0.0 labels (parquet)")
    # a file without the answer column: every row is bad, the column is named
    rows = [("parquet file without answer column", "missing column 'answer'", {"problem": f"BAD no answer {j}", "generations": ["\\boxed{1}"]})
            for j in range(3)]
    _write_table(m, folder / "no_answer.parquet", rows, pa.schema([("problem", pa.string()), ("generations", pa.list_(pa.string()))]))
    # a string cell that is not valid UTF-8 (written through raw buffers, as a buggy writer would)
    good_rows = [m.good_220k() for _ in range(3)]
    problems = [r["problem"].encode() for r in good_rows]
    problems.insert(1, b"BAD invalid utf-8 \xff\xfe")
    offsets, acc = [0], 0
    for p in problems:
        acc += len(p)
        offsets.append(acc)
    col = pa.Array.from_buffers(pa.string(), len(problems), [None, pa.py_buffer(pa.array(offsets, pa.int32()).buffers()[1].to_pybytes()),
                                                             pa.py_buffer(b"".join(problems))])
    rest = good_rows[:1] + [m.bad_220k("utf8")] + good_rows[1:]
    table = pa.table({"problem": col, "answer": [r["answer"] for r in rest], "generations": [r["generations"] for r in rest],
                      "correctness_math_verify": [r["correctness_math_verify"] for r in rest]})
    pq.write_table(table, folder / "bad_utf8.parquet")
    for r in good_rows:
        r.pop("correctness_llama")
        m.expect(r)
    m.exp.bad.append(("parquet invalid UTF-8 cell", "not valid UTF-8", "bad_utf8.parquet:1"))
    # unreadable files: truncated, not parquet at all, empty
    rows = [(None, None, m.good_220k()) for _ in range(4)]
    pq.write_table(pa.Table.from_pylist([r for _, _, r in rows]), folder / "truncated.parquet")
    data = (folder / "truncated.parquet").read_bytes()
    (folder / "truncated.parquet").write_bytes(data[: len(data) // 2])
    for _, _, r in rows:
        m.exp.lost.add(r["problem"])
    m.exp.bad.append(("truncated parquet file", "unreadable parquet file", "truncated.parquet"))
    (folder / "text.parquet").write_text(json.dumps(m.good_220k()) + "\n")
    m.exp.bad.append(("jsonl text named .parquet", "unreadable parquet file", "text.parquet"))
    (folder / "zero.parquet").write_bytes(b"")
    m.exp.bad.append(("empty parquet file", "unreadable parquet file", "zero.parquet"))
    _write_corrupt_row_group(folder / "row_groups.parquet", m)


def _write_corrupt_row_group(path: Path, m: _Maker) -> None:
    """Three row groups of 5 good rows; the pages of the middle one are overwritten."""
    rows = [m.good_220k() for _ in range(15)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5, use_dictionary=False, compression="none")
    md = pq.ParquetFile(path).metadata
    col = md.row_group(1).column(0)
    start = col.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    for j, r in enumerate(rows):
        if 5 <= j < 10:
            m.exp.lost.add(r["problem"])
            continue
        m.expect(r)
    m.exp.bad.append(("corrupt parquet row group", "unreadable parquet row group", f"{path.name}:row group 1"))


def write_bad_input(folder: Path) -> Expected:
    """Write the hostile input into `folder` (created) and return what the download stage must make of it."""
    folder.mkdir(parents=True, exist_ok=True)
    exp = Expected()
    m = _Maker(exp)
    _write_jsonl(folder, m)
    _write_parquet(folder, m)
    return exp

"""Benchmark registry: every benchmark as rows of ``id, problem, answer`` (BENCHMARK_COLUMNS), from a local
file or the Hugging Face Hub.

Adding a benchmark is one :class:`BenchmarkSpec` entry in :data:`REGISTRY`, which carries everything about it:
its source (Hub id, split, row mapper, its folder in a local copy, or a file of its own), whether it is one of
``evaluate.benchmarks``' defaults and of ``verify.decontam_benchmarks``' defaults, whether a data source's
download artifact provides it, and the paper's numbers on it. The configs' defaults, the order of the results
table's columns (registry order), the paper's columns and the CLI's lists are derived from it.

Where a benchmark comes from, first match wins:

1. ``cfg.benchmark_paths[name]`` (a ``.jsonl``/``.parquet`` file, or a folder holding ``test.jsonl``),
2. ``extra_paths[name]`` (the download artifact's files, for specs with ``from_download``),
3. ``<cfg.benchmark_dir or $REDI_BENCHMARK_DIR>/<spec.local_dir>/test.jsonl`` when that file exists
   (``local_dir`` = the name, except ``amc``: ``amc_rllm``, as in shared/data),
4. the spec's own ``path`` (a file of the benchmark, relative paths from this package's folder),
5. the Hub (``datasets.load_dataset``), with the spec's row mapper.

Two AMC sets: ``amc`` is the paper's "AMC23" column, rllm's ``amc.json`` (83 problems of AMC 12A/12B 2022
and 2023; on the Hub as ``AI-MO/aimo-validation-amc``, from which rllm's copy was made: same 83 problems,
rllm adds a difficulty field; the texts were not compared offline); ``amc23`` is Qwen2.5-Math's 40-problem
AMC 2023 set, another benchmark: the paper's 62.4 is not comparable with it. The prompt and token budget are
the recipe's (``evaluate.prompt_protocol``), not the benchmark's: the paper used one protocol for all, and one
evaluation runs one protocol (one engine, one protocol recorded with every result row).

Local files must already have ``id, problem, answer``; rows are validated (missing or empty fields, an
empty file, duplicate ids raise :class:`BenchmarkError` naming the file and the row).

The Hub sets are the ones commonly used for these benchmarks (open-r1, Qwen2.5-Math, simpleRL, rllm);
the paper does not name its copies. Answer mapping: GSM8K takes the text after ``####`` (thousands
commas removed), OlympiadBench ``final_answer[0]`` without ``$``, AMC23 float answers become integers.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the configs read this registry (their defaults): nothing of redi.config is imported here
    from .config.evaluate import EvaluateConfig

log = logging.getLogger(__name__)

ENV_DIR = "REDI_BENCHMARK_DIR"
REQUIRED = ("id", "problem", "answer")


class BenchmarkError(ValueError):
    """A benchmark that cannot be loaded; the message says which file/row and what to do."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark, everything about it.

    Source: ``hub_id`` / ``split`` / ``config`` / ``revision`` and ``to_row(hub_row, index) -> {id, problem,
    answer}`` for the Hub; ``local_dir``: its folder in a local copy (default: the name); ``path``: a file of its
    own (``.jsonl``/``.parquet`` with id, problem, answer; relative to this package's folder); ``from_download``:
    the data source (``redi.sources``) whose download artifact writes ``benchmarks/<name>.jsonl``.
    Membership: ``default``: in ``evaluate.benchmarks`` by default; ``decontaminate``: in
    ``verify.decontam_benchmarks`` by default. ``paper``: the paper's final-table pass@1 (%) per run label
    (``base``, ``sft``, ``redi``), for the paper's own benchmarks; those are its columns, in registry order.
    The registry's order is the results table's column order.
    """

    name: str
    hub_id: str | None
    split: str = "test"
    config: str | None = None
    revision: str | None = None
    to_row: Callable[[dict, int], dict] | None = None
    description: str = ""
    local_dir: str | None = None
    path: str | None = None
    from_download: str | None = None
    default: bool = False
    decontaminate: bool = False
    paper: dict[str, float] | None = None

    @property
    def folder(self) -> str:
        """The benchmark's folder in a local copy (``<benchmark_dir>/<folder>/test.jsonl``)."""
        return self.local_dir or self.name

    def own_file(self) -> Path | None:
        """The spec's own file (``path``), relative paths from this package's folder."""
        return None if self.path is None else Path(__file__).resolve().parent / Path(self.path).expanduser()


def _num(x: Any) -> str:
    """Answers stored as numbers: 27.0 -> '27', 0.5 -> '0.5'."""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x).strip()


def _pick(row: dict, *names: str) -> Any:
    for n in names:
        if row.get(n) not in (None, ""):
            return row[n]
    raise KeyError(f"none of the fields {names} in Hub row (fields: {sorted(row)})")


def _generic(prefix: str) -> Callable[[dict, int], dict]:
    def to_row(r: dict, i: int) -> dict:
        rid = r.get("id", r.get("unique_id", r.get("problem_idx", i)))
        return {"id": f"{prefix}-{rid}", "problem": str(_pick(r, "problem", "question", "Question")), "answer": _num(_pick(r, "answer", "Answer"))}

    return to_row


def _math500(r: dict, i: int) -> dict:
    return {"id": r["unique_id"], "problem": r["problem"], "answer": str(r["answer"])}


def _gsm8k(r: dict, i: int) -> dict:
    ans = r["answer"].split("####")[-1].strip().replace(",", "")
    return {"id": f"gsm8k-test-{i}", "problem": r["question"], "answer": ans}


_AMC_URL = re.compile(r"(\d{4})_AMC_(12[AB])_Problems/Problem_(\d+)")


def _amc_aimo(r: dict, i: int) -> dict:
    """AI-MO/aimo-validation-amc: id from the AoPS url (as the local copy's ``amc2022-12A-1``), float answers -> int."""
    m = _AMC_URL.search(str(r.get("url", "")))
    rid = f"amc{m[1]}-{m[2]}-{m[3]}" if m else f"amc-{r.get('id', i)}"
    return {"id": rid, "problem": r["problem"], "answer": _num(r["answer"])}


def _olympiad(r: dict, i: int) -> dict:
    fa = r["final_answer"]
    ans = (fa[0] if isinstance(fa, list | tuple) else fa).strip().strip("$").strip()
    return {"id": f"olympiadbench-{r.get('id', i)}", "problem": r["question"], "answer": ans}


def _paper(base: float, sft: float, redi: float) -> dict[str, float]:
    """The paper's final table (arXiv 2505.24850 v1; pass@1 over 16 samples, %): Qwen2.5-Math-1.5B,
    Qwen-SFT-1.5B-5ep, Qwen-REDI-1.5B."""
    return {"base": base, "sft": sft, "redi": redi}


REGISTRY: dict[str, BenchmarkSpec] = {}
"""The registered benchmarks by name; their order is the results table's column order (the paper's five first)."""


def register(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Add (or replace) a benchmark: from now on a valid name, in the defaults it opts into, in the table."""
    REGISTRY[spec.name] = spec
    return spec


for _spec in [
    BenchmarkSpec("math500", "HuggingFaceH4/MATH-500", "test", to_row=_math500, description="MATH-500 (PRM800K test split), 500",
                  default=True, decontaminate=True, paper=_paper(52.2, 80.4, 83.1)),
    BenchmarkSpec("aime24", "HuggingFaceH4/aime_2024", "train", to_row=_generic("aime24"), description="AIME 2024 I+II, 30",
                  default=True, decontaminate=True, paper=_paper(10.0, 21.9, 28.1)),
    BenchmarkSpec("amc", "AI-MO/aimo-validation-amc", "train", to_row=_amc_aimo, local_dir="amc_rllm",
                  description="AMC 12 2022+2023, 83 (rllm's amc.json: the paper's AMC23 column)", default=True,
                  paper=_paper(42.5, 57.5, 62.4)),
    BenchmarkSpec("minerva_math", "math-ai/minervamath", "test", to_row=_generic("minerva"), description="Minerva / MIT OCW, 272",
                  default=True, decontaminate=True, paper=_paper(10.7, 27.5, 28.8)),
    BenchmarkSpec("olympiadbench", "Hothan/OlympiadBench", "train", config="OE_TO_maths_en_COMP", to_row=_olympiad,
                  description="OlympiadBench OE_TO_maths_en_COMP, 675", default=True, decontaminate=True, paper=_paper(25.2, 41.5, 45.2)),
    BenchmarkSpec("aime25", "math-ai/aime25", "test", to_row=_generic("aime25"), description="AIME 2025 I+II, 30",
                  default=True, decontaminate=True),
    BenchmarkSpec("amc23", "math-ai/amc23", "test", to_row=_generic("amc23"), description="AMC 2023 (Qwen2.5-Math 40-problem set)",
                  decontaminate=True),
    BenchmarkSpec("gsm8k", "openai/gsm8k", "test", config="main", to_row=_gsm8k, description="GSM8K test, 1319",
                  default=True, decontaminate=True),
    BenchmarkSpec("demo_test", None, from_download="synthetic",
                  description="The offline synthetic source's held-out test problems (download artifact)"),
    BenchmarkSpec("demo_val", None, from_download="synthetic",
                  description="The offline synthetic source's held-out validation problems (download artifact)"),
]:
    register(_spec)


def default_benchmarks() -> list[str]:
    """``evaluate.benchmarks`` by default: the entries with ``default``, in registry order."""
    return [s.name for s in REGISTRY.values() if s.default]


def default_decontam() -> list[str]:
    """``verify.decontam_benchmarks`` by default: the entries with ``decontaminate``, in registry order."""
    return [s.name for s in REGISTRY.values() if s.decontaminate]


def from_download(source: str) -> tuple[str, ...]:
    """The benchmarks that the download artifact of data source `source` provides."""
    return tuple(s.name for s in REGISTRY.values() if s.from_download == source)


def paper_benchmarks() -> tuple[str, ...]:
    """The paper's table columns in its order (the entries with ``paper`` numbers)."""
    return tuple(s.name for s in REGISTRY.values() if s.paper)


# ---------------------------------------------------------------- resolution


def _file_in(path: Path) -> Path:
    """A benchmark path as given: a file, or a folder holding test.jsonl / test.parquet."""
    if path.is_dir():
        for cand in ("test.jsonl", "test.parquet"):
            if (path / cand).exists():
                return path / cand
        raise BenchmarkError(f"benchmark folder {path} has no test.jsonl or test.parquet")
    if not path.exists():
        raise BenchmarkError(f"benchmark file not found: {path}")
    return path


def resolve(name: str, cfg: EvaluateConfig, extra_paths: dict[str, Path] | None = None) -> Path | BenchmarkSpec:
    """The local file that would be loaded for `name`, or its Hub spec (see the module docstring for the order)."""
    extra_paths = extra_paths or {}
    if name in cfg.benchmark_paths:
        return _file_in(Path(cfg.benchmark_paths[name]).expanduser())
    if name in extra_paths:
        return _file_in(Path(extra_paths[name]))
    root = cfg.benchmark_dir or os.environ.get(ENV_DIR)
    spec = REGISTRY.get(name)
    if root:
        for cand in ("test.jsonl", "test.parquet"):
            p = Path(root).expanduser() / (spec.folder if spec else name) / cand
            if p.exists():
                return p
    if spec is None:
        raise BenchmarkError(f"unknown benchmark {name!r}: registered are {sorted(REGISTRY)}; or give a file in evaluate.benchmark_paths")
    if spec.path is not None:
        return _file_in(spec.own_file())
    if spec.hub_id is None:
        raise BenchmarkError(f"benchmark {name!r} has no Hub source and no local file: {_where_from(spec)}")
    return spec


def _where_from(spec: BenchmarkSpec) -> str:
    via = f"the download artifact (data.source={spec.from_download}) or " if spec.from_download else ""
    return f"it comes from {via}evaluate.benchmark_paths.{spec.name}"


def check_names(names: list[str] | tuple[str, ...], cfg: EvaluateConfig, extra: tuple[str, ...] = ()) -> None:
    """BenchmarkError (one line) unless every name can be resolved without loading anything: a registered
    benchmark, a file in ``cfg.benchmark_paths``, a ``<benchmark_dir>/<name>/test.*`` file, or one of
    `extra` (names the download artifact will provide). Run before the first expensive step."""
    root = cfg.benchmark_dir or os.environ.get(ENV_DIR)
    unknown = []
    for name in names:
        if name in cfg.benchmark_paths:
            path = Path(cfg.benchmark_paths[name]).expanduser()
            if not path.exists():
                raise BenchmarkError(f"evaluate.benchmark_paths.{name}: {path} does not exist; point it at a .jsonl/.parquet "
                                     "file (fields id, problem, answer) or a folder holding test.jsonl")
            continue
        spec = REGISTRY.get(name)
        in_dir = root and any((Path(root).expanduser() / (spec.folder if spec else name) / c).exists()
                              for c in ("test.jsonl", "test.parquet"))
        if spec is None and name not in extra and not in_dir:
            unknown.append(name)
        elif spec is not None and spec.hub_id is None and spec.path is None and name not in extra and not in_dir:
            raise BenchmarkError(f"benchmark {name!r} is not available here: {_where_from(spec)}")
    if unknown:
        raise BenchmarkError(f"unknown benchmark{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: registered are "
                             f"{', '.join(sorted(REGISTRY))}; or give a file in evaluate.benchmark_paths.<name>")


def _revision(spec: BenchmarkSpec, cfg: EvaluateConfig) -> str | None:
    return cfg.benchmark_revisions.get(spec.name, spec.revision)


def fingerprint(name: str, cfg: EvaluateConfig, extra_paths: dict[str, Path] | None = None) -> str:
    """sha256 of the local file that would be loaded, or ``hub:<id>@<revision>`` (``main`` if unpinned)."""
    src = resolve(name, cfg, extra_paths)
    if isinstance(src, Path):
        from .fingerprint import file_sha256

        return file_sha256(src)  # cached by path, size and mtime: an unchanged file is not read again
    cfg_part = f"/{src.config}" if src.config else ""
    return f"hub:{src.hub_id}{cfg_part}:{src.split}@{_revision(src, cfg) or 'main'}"


# ---------------------------------------------------------------- loading


def read_local(path: Path) -> list[dict]:
    """Rows of a .jsonl or .parquet benchmark file (unvalidated). Bad JSON names the line."""
    if path.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    rows = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}: line {ln} is not valid JSON ({e.msg})") from None
    return rows


def validate_rows(rows: list[dict], origin: str) -> list[dict]:
    """Check id/problem/answer are present and non-empty and ids unique; return rows with string fields."""
    if not rows:
        raise BenchmarkError(f"{origin}: no rows (empty benchmark file)")
    out, seen = [], {}
    for i, r in enumerate(rows, 1):
        missing = [k for k in REQUIRED if r.get(k) is None or (isinstance(r.get(k), str) and not r[k].strip())]
        if missing:
            raise BenchmarkError(f"{origin}: row {i} lacks {', '.join(missing)} (every row needs {', '.join(REQUIRED)}); row keys: {sorted(r)}")
        row = dict(r)
        row["id"], row["problem"], row["answer"] = str(r["id"]), str(r["problem"]), _num(r["answer"])
        if row["id"] in seen:
            raise BenchmarkError(f"{origin}: duplicate id {row['id']!r} in rows {seen[row['id']]} and {i}")
        seen[row["id"]] = i
        out.append(row)
    return out


def load_hub(spec: BenchmarkSpec, revision: str | None = None) -> list[dict]:
    """Load and map a Hub benchmark; any failure becomes one line saying how to go offline."""
    try:
        import datasets

        ds = datasets.load_dataset(spec.hub_id, spec.config, split=spec.split, revision=revision)
    except Exception as e:  # noqa: BLE001 — offline, auth, missing config: all mean "give a local file"
        raise BenchmarkError(
            f"cannot load benchmark {spec.name!r} from the Hub ({spec.hub_id}, {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
            f"offline? set evaluate.benchmark_paths.{spec.name}, evaluate.benchmark_dir or ${ENV_DIR} "
            f"to a folder with {spec.folder}/test.jsonl (fields id, problem, answer)"
        ) from None
    assert spec.to_row is not None
    return [spec.to_row(dict(r), i) for i, r in enumerate(ds)]


def load_benchmark(name: str, cfg: EvaluateConfig, extra_paths: dict[str, Path] | None = None) -> list[dict]:
    """Validated rows (id, problem, answer, + any extra fields) of benchmark `name`; the first
    ``cfg.max_problems`` only when that is set."""
    src = resolve(name, cfg, extra_paths)
    if isinstance(src, Path):
        rows, origin = read_local(src), str(src)
    else:
        rev = _revision(src, cfg)
        rows, origin = load_hub(src, rev), f"hub:{src.hub_id}@{rev or 'main'}"
    rows = validate_rows(rows, origin)
    if cfg.max_problems:
        rows = rows[: cfg.max_problems]
    log.info("benchmark %s: %d problems from %s", name, len(rows), origin)
    return rows


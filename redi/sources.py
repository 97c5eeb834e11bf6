"""Where the download stage's teacher traces come from: ``SOURCES``, one :class:`DataSource` entry per value of
``data.source``, and the readers they use.

An entry carries everything about its source: the row iterator, the ``DataConfig`` fields it reads (the others'
fields are left out of the download key, ``DataConfig.hash_fields``), the fields it requires, its local inputs
(content-fingerprinted into the download key) and a check that fails before any work. ``DataConfig.source``
accepts exactly the registered names; the recipe forms list them. Adding a source is one ``register`` call
here (its reader may live in its own module, imported inside ``rows``); its config fields, if it needs new
ones, go into ``DataConfig`` (``redi/config/data.py``).

A source yields ``(where, row)`` pairs: ``where`` names the row in error reports (``file:line``), ``row`` is a
dict in one of the schemas of ``redi.data`` (detected per row), or a :class:`BadRow` saying why it is not one.
The normaliser (``redi.data``) turns rows into trace rows; a source never decides what a trace is.

This module imports nothing heavy at import time (the configs read the registry); pyarrow, ``datasets`` and the
Hub client are imported by the readers that need them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

    from .config.data import DataConfig

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """The download stage cannot produce any usable trace; the message says what to do."""


class BadRow(ValueError):
    """One source row that cannot be used; the message is the reason (counted in the summary)."""


RowStream = Iterator[tuple[str, "dict | BadRow | None"]]


@dataclass(frozen=True)
class DataSource:
    """One value of ``data.source``.

    ``rows(cfg, out_dir, info)`` yields ``(where, row)`` pairs; it may record facts about the source in ``info``
    (they go into the download summary) and write side files into ``out_dir`` (the synthetic source's held-out
    benchmarks). ``fields``: the ``DataConfig`` fields it reads that not every source reads (left out of the
    download key when another source is chosen); ``requires``: those that must be set. ``key_inputs(cfg)``:
    fingerprints of local inputs, added to the download key. ``check(cfg)``: a one-line DataError before any
    work (a missing file). ``resumable``: ``rows`` takes a fourth argument, the stage's work folder (kept across a
    killed attempt, None outside a store build), to save progress a rerun reuses."""

    name: str
    rows: Callable[[DataConfig, Path, dict], RowStream]
    summary: str
    fields: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    key_inputs: Callable[[DataConfig], dict[str, str]] | None = None
    check: Callable[[DataConfig], None] | None = None
    resumable: bool = False


SOURCES: dict[str, DataSource] = {}
"""The registered data sources by name (``data.source``), in registration order."""


def register(src: DataSource) -> DataSource:
    """Add (or replace) a data source; ``data.source`` accepts its name from now on."""
    SOURCES[src.name] = src
    return src


def get_source(name: str) -> DataSource:
    """The registered source `name`; ValueError listing the valid names otherwise."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; registered: {', '.join(SOURCES)}")
    return SOURCES[name]


def source_fields() -> set[str]:
    """Every ``DataConfig`` field some source declares as its own."""
    return {f for s in SOURCES.values() for f in s.fields}


# ----------------------------------------------------------------------------- readers


_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class Unreadable(BadRow):
    """A whole file or parquet row group that cannot be read (named in the summary, the others are read)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason)
        self.detail = detail


def _json_row(line: bytes) -> dict | BadRow:
    """One jsonl line as a dict, or the BadRow saying why it is not one."""
    try:
        obj = json.loads(line)  # bytes: a UTF-8 BOM is accepted, invalid UTF-8 raises UnicodeDecodeError
    except UnicodeDecodeError:
        return BadRow("not valid UTF-8")
    except json.JSONDecodeError as e:
        return BadRow(f"invalid JSON ({e.msg})")
    except RecursionError:
        return BadRow("invalid JSON (nested too deeply)")
    if not isinstance(obj, dict):
        return BadRow("not a JSON object")
    if _ESCAPED_SURROGATE.search(line):  # "\ud800" decodes to a lone surrogate, which no UTF-8 writer accepts
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return BadRow("lone surrogate escape (not valid Unicode)")
    return obj


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict | BadRow]]:
    try:
        f = path.open("rb")
    except OSError as e:
        yield path.name, Unreadable("unreadable file", f"{path}: {e.strerror or e}")
        return
    with f:
        for i, line in enumerate(f):
            if line.strip():
                yield f"{path.name}:{i + 1}", _json_row(line)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"


def _rows_of(batch: pa.RecordBatch) -> list[dict | BadRow]:
    """A batch as rows; a row whose strings are not valid UTF-8 becomes a BadRow, the others are kept."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        out: list[dict | BadRow] = []
        for j in range(batch.num_rows):
            try:
                out.append(batch.slice(j, 1).to_pylist()[0])
            except UnicodeDecodeError:
                out.append(BadRow("not valid UTF-8"))
        return out


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict | BadRow]]:
    """Rows of a parquet file, row group by row group: an unreadable file or row group is reported, not raised."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid (not parquet, truncated), OSError: the file is named, the others are read
        yield path.name, Unreadable("unreadable parquet file", f"{path}: {_one_line(e)}")
        return
    i = 0
    for g in range(pf.num_row_groups):
        first = i
        try:
            for batch in pf.iter_batches(batch_size=256, row_groups=[g]):
                for row in _rows_of(batch):
                    yield f"{path.name}:{i}", row
                    i += 1
        except Exception as e:  # a corrupt page: the rest of this row group is lost, the next ones are read
            lost = pf.metadata.row_group(g).num_rows - (i - first)
            yield f"{path.name}:row group {g}", Unreadable(
                "unreadable parquet row group", f"{path} row group {g} ({lost} rows): {_one_line(e)}")
            i = first + pf.metadata.row_group(g).num_rows


def _iter_saved_dataset(path: Path, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # a missing or corrupt arrow file, a broken state.json: one line naming the folder
        raise DataError(f"cannot read the datasets folder {path} ({_one_line(e)}); save it again with "
                        "Dataset.save_to_disk, or point data.local_path at parquet/jsonl files") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path} is a datasets folder without split {split!r} (has {sorted(ds)}); set data.hub_split")
        ds = ds[split]
    for i, row in enumerate(ds):  # memory-mapped Arrow: rows are read lazily
        yield f"{path.name}[{i}]", row


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _data_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".jsonl") and p.is_file())
    if not files:
        raise DataError(f"no .parquet or .jsonl files under {path}: point data.local_path at a file, a folder of them or a datasets save_to_disk folder")
    return files


def iter_local(path: str | Path, split: str = "train") -> Iterator[tuple[str, dict | None]]:
    """(row id, row) from a parquet/jsonl file, a folder of them, or a datasets save_to_disk folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.local_path {str(p)!r} does not exist: set data.local_path to a parquet/jsonl file or folder, or use data.source=synthetic (`redi demo`)")
    if p.is_dir() and _is_saved_dataset(p):
        yield from _iter_saved_dataset(p, split)
        return
    for f in ([p] if p.is_file() else _data_files(p)):
        if f.suffix == ".parquet":
            yield from _iter_parquet(f)
        elif f.suffix in (".jsonl", ".json"):
            yield from _iter_jsonl(f)
        else:
            raise DataError(f"unsupported file type {f.suffix!r} ({f}): use .parquet or .jsonl")


def resolve_revision(hub_id: str, revision: str | None) -> str:
    """The commit sha of `revision` (None = main) on the Hub, or ``"unresolved"`` when offline."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(hub_id, revision=revision, timeout=10).sha or "unresolved"
    except Exception as e:  # offline, unreachable, unknown repo: the load itself reports the error
        logger.info("could not resolve the revision of %s (%s)", hub_id, type(e).__name__)
        return revision or "unresolved"


def iter_hub(cfg: DataConfig, revision: str | None) -> Iterator[tuple[str, dict]]:
    """(row id, row) streamed from the Hub; one clear DataError line when it cannot be reached."""
    import datasets

    try:
        ds = datasets.load_dataset(cfg.hub_id, cfg.hub_config, split=cfg.hub_split, revision=revision, streaming=True)
        it = iter(ds)
        first = next(it, None)
    except Exception as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise DataError(
            f"cannot load {cfg.hub_id} ({cfg.hub_config}, {cfg.hub_split}) from the Hugging Face Hub: {msg}. "
            "Offline? Use data.source=local with data.local_path=<parquet/jsonl/folder>, or `redi demo` (synthetic data)."
        ) from None
    if first is None:
        return
    yield f"{cfg.hub_split}[0]", first
    i = 1
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:  # the connection dropped mid-stream: one line, not a traceback
            raise DataError(f"the Hub stream of {cfg.hub_id} broke after {i} rows ({_one_line(e)}); run the download "
                            "stage again (it restarts), or download the files and use data.source=local") from None
        yield f"{cfg.hub_split}[{i}]", row
        i += 1


def iter_synthetic(rows: Iterable[dict]) -> Iterator[tuple[str, dict]]:
    for i, row in enumerate(rows):
        yield f"synthetic[{i}]", row


def input_fingerprint(path: str | Path, data: bool = False) -> str:
    """Content fingerprint of a local input (redi.fingerprint): a changed file is a new key; a data folder
    counts only the files the local source reads. Missing: a stable marker (the stage reports it)."""
    from .fingerprint import fingerprint

    p = Path(path).expanduser()
    include = None
    if data and p.is_dir() and not _is_saved_dataset(p):
        include = lambda f: f.suffix in (".parquet", ".jsonl")  # noqa: E731 - as _data_files
    try:
        return fingerprint(p, include)
    except OSError as e:
        return f"unavailable:{type(e).__name__}"



# ----------------------------------------------------------------------------- the registry


def _write_benchmarks(out_dir: Path, val: list[dict], test: list[dict]) -> dict:
    """The synthetic source's held-out problems as the ``demo_val`` / ``demo_test`` benchmark files
    (``redi.benchmarks`` entries with ``from_download="synthetic"``)."""
    bdir = out_dir / "benchmarks"
    bdir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("demo_val", val), ("demo_test", test)):
        with (bdir / f"{name}.jsonl").open("w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"demo_val": len(val), "demo_test": len(test)}


def _synthetic_rows(cfg: DataConfig, out_dir: Path, info: dict) -> RowStream:
    from . import synth

    train, val, test = synth.generate(cfg.synth)
    info["benchmarks"] = _write_benchmarks(out_dir, val, test)
    return iter_synthetic(train)


def _hub_rows(cfg: DataConfig, out_dir: Path, info: dict) -> RowStream:
    rev = resolve_revision(cfg.hub_id, cfg.revision)
    info.update(hub_id=cfg.hub_id, hub_config=cfg.hub_config, hub_split=cfg.hub_split, revision=rev, revision_requested=cfg.revision)
    return iter_hub(cfg, cfg.revision or (rev if rev != "unresolved" else None))


def _local_rows(cfg: DataConfig, out_dir: Path, info: dict) -> RowStream:
    info["local_path"] = str(Path(cfg.local_path).expanduser().resolve())
    return iter_local(cfg.local_path, cfg.hub_split)


def _local_check(cfg: DataConfig) -> None:
    p = Path(cfg.local_path).expanduser()
    if not p.exists():
        raise DataError(f"data.local_path {str(p)!r} does not exist: set data.local_path to a parquet/jsonl file or "
                        "folder, or use data.source=synthetic (`redi demo`)")


register(DataSource(
    "synthetic", _synthetic_rows, "the project's offline teacher (redi.synth); its held-out problems are the demo_val/demo_test benchmarks",
    fields=("synth",)))
register(DataSource(
    "hub", _hub_rows, "datasets.load_dataset of data.hub_id, streamed; the revision is resolved and recorded",
    fields=("hub_id", "hub_config", "hub_split", "revision")))
register(DataSource(
    "local", _local_rows, "parquet/jsonl files, a folder of them, or a datasets save_to_disk folder (data.local_path)",
    fields=("local_path", "hub_split"), requires=("local_path",),
    key_inputs=lambda cfg: {"local_data": input_fingerprint(cfg.local_path, data=True)}, check=_local_check))


def _teacher():  # noqa: ANN202
    """redi.teacher, imported by name: the download stage's code version (redi.keys.module_closure, which follows
    import statements) must not take in the sampler and the grader for every source; the generate source keys
    its own code instead (redi.teacher.key_inputs)."""
    import importlib

    return importlib.import_module(".teacher", __package__)


def _generate_rows(cfg: DataConfig, out_dir: Path, info: dict, work: Path | None = None) -> RowStream:
    return _teacher().rows(cfg, out_dir, info, work)


def _generate_key(cfg: DataConfig) -> dict[str, str]:
    return _teacher().key_inputs(cfg)


def _generate_check(cfg: DataConfig) -> None:
    _teacher().check(cfg)


register(DataSource(
    "generate", _generate_rows, "traces sampled from a model (folder, a registered run's model, Hub id) for benchmark, "
    "file or synthetic problems, graded with redi.grader (redi.teacher, data.generate)",
    fields=("generate", "synth"), requires=("generate.model",), key_inputs=_generate_key, check=_generate_check,
    resumable=True))

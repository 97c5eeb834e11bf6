"""Training data for redi.train: tokenised examples with the paper's filters, data order, lr schedule.

- prompts: ``redi.prompts.render_prompt`` with the run's training protocol (``prompt.train``); completions:
  the trace + ``redi.prompts.completion_terminator`` (Qwen2.5-Math: ``<|im_end|>\n<|endoftext|>``, as the
  official data; the tiny model: ``<|im_end|>``), the terminator counted in ``|y|``.
- SFT: positives -> (prompt, completion) examples; over-long ones truncated at the end (counted). The loss
  covers the completion only (paper App. C), or every token with ``sft.loss_on_prompt`` (the official run:
  TRL's padding-free collator on chat messages masks nothing).
- stage 2: pairs -> (chosen, rejected) examples; pairs with chosen == rejected are dropped; a prompt longer
  than ``max_prompt_length`` drops its pair or, with ``long_prompts: truncate``, keeps its last
  ``max_prompt_length`` tokens as the official TRL fork does (counted either way); over-long sequences
  truncated keep_end (the paper's truncation mode; counted).
- storage: tokenised once per (data file, tokenizer, protocol, lengths) into an Arrow file of int32 ids
  (``work_dir/tokens``), memory-mapped by every rank: ~4 bytes of shared host RAM per token instead of
  Python int tuples (~36 bytes per token per rank). Built by local rank 0 only.
- order: step ``s`` uses stream positions ``s*G .. (s+1)*G`` of one seeded permutation per epoch, so a
  checkpoint's data position is its step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .config.train import OptimConfig, SFTConfig, Stage2Config
from .packing import Example, make_example
from .prompts import DEFAULT_PROTOCOL, completion_suffix, render_prompt
from .train_backend import TrainingSetupError

log = logging.getLogger(__name__)


TOKENS_FORMAT = 1
"""Version of the token-table layout; part of every cache key."""

_BATCH_ROWS = 512  # rows tokenised at a time while building (bounds the builder's Python-int peak)


def _encode(tok, texts: list[str]) -> list[list[int]]:
    return tok(texts, add_special_tokens=False)["input_ids"] if texts else []


class TokenTable(Sequence):
    """Tokenised sequences as flat int32 token ids + int64 offsets + int32 prompt lengths.

    Backed by an Arrow IPC file memory-mapped read-only (every rank maps the same pages: about 4 bytes
    of host RAM per token, shared) or by in-memory numpy arrays. ``table[i]`` is an :class:`Example`
    whose ``ids`` is a zero-copy int32 view.
    """

    def __init__(self, values: np.ndarray, offsets: np.ndarray, prompt_lens: np.ndarray, counts: dict):
        self.values, self.offsets, self.prompt_lens, self.counts = values, offsets, prompt_lens, counts

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return Example(self.values[self.offsets[i]:self.offsets[i + 1]], int(self.prompt_lens[i]))

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def write(self, path: Path) -> None:
        """Arrow IPC file (columns ``ids`` large_list<int32>, ``prompt_len`` int32; counts in the schema metadata)."""
        import pyarrow as pa

        ids = pa.LargeListArray.from_arrays(pa.array(self.offsets, pa.int64()), pa.array(self.values, pa.int32()))
        table = pa.table({"ids": ids, "prompt_len": pa.array(self.prompt_lens, pa.int32())})
        table = table.replace_schema_metadata({"redi_counts": json.dumps(self.counts), "format": str(TOKENS_FORMAT)})
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)

    @classmethod
    def open(cls, path: Path) -> TokenTable:
        """Memory-map an Arrow file written by :meth:`write` (zero-copy)."""
        import pyarrow as pa

        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        col = table.column("ids")
        ids = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()  # written as one chunk: no copy
        values = ids.values.to_numpy(zero_copy_only=True)
        offsets = ids.offsets.to_numpy(zero_copy_only=True)
        pcol = table.column("prompt_len")
        plen = (pcol.chunk(0) if pcol.num_chunks == 1 else pcol.combine_chunks()).to_numpy(zero_copy_only=True)
        counts = json.loads(table.schema.metadata[b"redi_counts"])
        return cls(values, offsets, plen, counts)


class PairTable(Sequence):
    """(chosen, rejected) pairs over a :class:`TokenTable` whose rows alternate chosen, rejected."""

    def __init__(self, table: TokenTable):
        self.table, self.counts = table, table.counts

    def __len__(self) -> int:
        return len(self.table) // 2

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.table[2 * i], self.table[2 * i + 1]


class _Builder:
    """Appends examples batch by batch into int32 arrays (about 4 bytes per token while building)."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []
        self.lens: list[int] = []
        self.plens: list[int] = []

    def add(self, ex: Example) -> None:
        self.chunks.append(np.asarray(ex.ids, dtype=np.int32))
        self.lens.append(len(ex.ids))
        self.plens.append(ex.prompt_len)

    def flush(self) -> None:  # merge the batch's small arrays into one (few Python objects per batch)
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]

    def table(self, counts: dict) -> TokenTable:
        values = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int32)
        offsets = np.zeros(len(self.lens) + 1, dtype=np.int64)
        np.cumsum(self.lens, out=offsets[1:])
        return TokenTable(values, offsets, np.asarray(self.plens, dtype=np.int32), counts)


def _tokenizer_fingerprint(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    blob += f"|{type(tok).__name__}|{tok.eos_token_id}|{getattr(tok, 'chat_template', None)}"
    return hashlib.sha256(blob.encode()).hexdigest()


def _file_sha(path: Path) -> str:
    """sha256 of the data file, from redi.fingerprint's cache while its size and mtime are unchanged (every rank,
    every start and resume would otherwise read the whole file again)."""
    from .fingerprint import file_sha256

    return file_sha256(path)


def _cached(cache_dir: Path | None, key: dict, build: Callable[[], TokenTable]) -> TokenTable:
    """Build once per key into ``cache_dir`` and memory-map it; ``cache_dir`` None: build in memory.

    Under a multi-process launch only local rank 0 builds (atomic rename); the other ranks wait for
    the file (no lock, no collective), up to ``REDI_TOKENS_WAIT_S`` seconds (default 7200).
    """
    if cache_dir is None:
        return build()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{key['kind']}-{digest}.arrow"
    if not path.exists():
        if os.environ.get("LOCAL_RANK", "0") == "0":
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")  # local rank 0 of every node
            t0 = time.time()
            build().write(tmp)
            os.replace(tmp, path)
            log.info("tokenised %s into %s in %.1f s", key["data"], path, time.time() - t0)
        else:
            _wait_for(path)
    return TokenTable.open(path)


def _wait_for(path: Path) -> None:
    limit = float(os.environ.get("REDI_TOKENS_WAIT_S", "7200"))
    t0 = time.time()
    log.info("waiting for local rank 0 to tokenise into %s", path)
    while not path.exists():
        if time.time() - t0 > limit:
            raise TimeoutError(f"{path} did not appear within {limit:.0f} s: local rank 0 tokenises it; check its log "
                               "(or raise REDI_TOKENS_WAIT_S)")
        time.sleep(1.0)


def _key(kind: str, tok, path: Path, prompt_protocol: str, **fields) -> dict:
    return {"kind": kind, "format": TOKENS_FORMAT, "data": str(path), "data_sha256": _file_sha(path),
            "tokenizer": _tokenizer_fingerprint(tok), "protocol": prompt_protocol, **fields}


def load_sft_examples(cfg: SFTConfig, tok, positives_path: Path, prompt_protocol: str = DEFAULT_PROTOCOL,
                      cache_dir: Path | None = None) -> tuple[TokenTable, dict]:
    """Positives -> (prompt, completion + terminator) examples, truncated (keep start) to cfg.max_length.

    Returns a :class:`TokenTable` (memory-mapped from ``cache_dir`` when given, built there once) and the counts.
    """
    key = _key("sft", tok, positives_path, prompt_protocol, max_length=cfg.max_length,
               loss_on_prompt=cfg.loss_on_prompt)
    table = _cached(cache_dir, key, lambda: _build_sft(cfg, tok, positives_path, prompt_protocol))
    return table, table.counts


def _build_sft(cfg: SFTConfig, tok, positives_path: Path, prompt_protocol: str) -> TokenTable:
    import pandas as pd

    df = pd.read_parquet(positives_path, columns=["problem", "completion"])
    counts = {"rows": len(df)}
    ok = df["completion"].notna() & (df["completion"].astype(str).str.strip() != "") & df["problem"].notna()
    counts["dropped_empty"] = int((~ok).sum())
    df = df[ok]
    if df.empty:
        raise TrainingSetupError(f"SFT: no training examples left in {positives_path} ({counts['rows']} rows, "
                                 f"{counts['dropped_empty']} with an empty completion or problem)")
    end = completion_suffix(tok)  # make_example appends the EOS id after it
    out, truncated = _Builder(), 0
    for s in range(0, len(df), _BATCH_ROWS):
        part = df.iloc[s:s + _BATCH_ROWS]
        prompts = _encode(tok, [render_prompt(tok, p, prompt_protocol) for p in part["problem"]])
        comps = _encode(tok, [c + end for c in part["completion"].astype(str)])
        for p, c in zip(prompts, comps, strict=True):
            ex, cut = make_example(p, c, tok.eos_token_id, cfg.max_length, keep="start")
            out.add(Example(ex.ids, 0) if cfg.loss_on_prompt else ex)
            truncated += cut
        out.flush()
    counts.update(examples=len(df), truncated=truncated)
    return out.table(counts)


def load_pair_examples(cfg: Stage2Config, tok, pairs_path: Path, prompt_protocol: str = DEFAULT_PROTOCOL,
                       cache_dir: Path | None = None) -> tuple[PairTable, dict]:
    """Pairs -> (chosen, rejected) examples; identical pairs and over-long prompts dropped; keep_end truncation.

    Returns a :class:`PairTable` (``pairs[i]`` = (chosen, rejected)) over a token table memory-mapped from
    ``cache_dir`` when given, and the counts.
    """
    key = _key("pairs", tok, pairs_path, prompt_protocol, max_length=cfg.max_length,
               max_prompt_length=cfg.max_prompt_length, long_prompts=cfg.long_prompts)
    table = _cached(cache_dir, key, lambda: _build_pairs(cfg, tok, pairs_path, prompt_protocol))
    return PairTable(table), table.counts


def _build_pairs(cfg: Stage2Config, tok, pairs_path: Path, prompt_protocol: str) -> TokenTable:
    import pandas as pd

    df = pd.read_parquet(pairs_path, columns=["problem", "chosen", "rejected"])
    counts = {"rows": len(df)}
    same = df["chosen"].astype(str) == df["rejected"].astype(str)
    counts["dropped_identical"] = int(same.sum())
    df = df[~same]
    end = completion_suffix(tok)  # make_example appends the EOS id after it
    out, truncated, long_prompts, n = _Builder(), 0, 0, 0
    for s in range(0, len(df), _BATCH_ROWS):
        part = df.iloc[s:s + _BATCH_ROWS]
        prompts = _encode(tok, [render_prompt(tok, p, prompt_protocol) for p in part["problem"]])
        long = [len(p) > cfg.max_prompt_length for p in prompts]
        long_prompts += sum(long)
        if cfg.long_prompts == "truncate":  # the official fork keeps the prompt's last max_prompt_length tokens
            prompts = [p[-cfg.max_prompt_length:] for p in prompts]
        keep = [cfg.long_prompts == "truncate" or not x for x in long]
        prompts = [p for p, k in zip(prompts, keep, strict=True) if k]
        chosen = _encode(tok, [c + end for c, k in zip(part["chosen"].astype(str), keep, strict=True) if k])
        rejected = _encode(tok, [r + end for r, k in zip(part["rejected"].astype(str), keep, strict=True) if k])
        for p, c, r in zip(prompts, chosen, rejected, strict=True):
            ec, tc = make_example(p, c, tok.eos_token_id, cfg.max_length, keep="end")
            er, tr = make_example(p, r, tok.eos_token_id, cfg.max_length, keep="end")
            out.add(ec)
            out.add(er)
            truncated += tc + tr
            n += 1
        out.flush()
    counts["truncated_long_prompt" if cfg.long_prompts == "truncate" else "dropped_long_prompt"] = long_prompts
    counts.update(examples=n, truncated_sequences=truncated)
    if not n:
        raise TrainingSetupError(f"stage 2: no pairs left in {pairs_path} ({counts['rows']} rows; "
                                 f"{counts['dropped_identical']} with chosen == rejected, "
                                 f"{counts.get('dropped_long_prompt', 0)} with a prompt > {cfg.max_prompt_length} tokens)")
    return out.table(counts)


def step_indices(n: int, global_batch: int, step: int, seed: int) -> list[int]:
    """Indices of the examples of optimiser step ``step``: a stream of one seeded permutation per epoch."""
    out, start = [], step * global_batch
    for k in range(start, start + global_batch):
        epoch, pos = divmod(k, n)
        out.append(int(_permutation(n, seed, epoch)[pos]))
    return out


_PERM_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        _PERM_CACHE.clear()
        _PERM_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERM_CACHE[key]


def total_steps(cfg: OptimConfig, n: int) -> int:
    """max_steps, else floor(epochs * n / global_batch), at least 1."""
    return cfg.max_steps or max(1, int(cfg.epochs * n // cfg.global_batch))


def lr_factor(cfg: OptimConfig, total: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up over ceil(warmup_ratio*total) steps, then the chosen decay."""
    warm = math.ceil(cfg.warmup_ratio * total)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        decay = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay

    return f

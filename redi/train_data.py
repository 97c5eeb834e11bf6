"""Training data for redi.train: tokenised examples with the paper's filters, data order, lr schedule.

- prompts: ``redi.prompts.render_prompt`` with the run's training protocol (``prompt.train``); completions:
  the trace + ``redi.prompts.completion_terminator`` (Qwen2.5-Math: ``<|im_end|>\n<|endoftext|>``, as the
  official data; the tiny model: ``<|im_end|>``), the terminator counted in ``|y|``.
- SFT: positives -> (prompt, completion) examples; over-long ones truncated at the end (counted).
- stage 2: pairs -> (chosen, rejected) examples; pairs with chosen == rejected and pairs whose prompt is
  longer than ``max_prompt_length`` are dropped (counted, the paper's 800-token rule); over-long
  sequences truncated keep_end (the paper's truncation mode; counted).
- order: step ``s`` uses stream positions ``s*G .. (s+1)*G`` of one seeded permutation per epoch, so a
  checkpoint's data position is its step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .config.train import OptimConfig, SFTConfig, Stage2Config
from .packing import Example, make_example
from .prompts import DEFAULT_PROTOCOL, completion_suffix, render_prompt


def _encode(tok, texts: list[str]) -> list[list[int]]:
    return tok(texts, add_special_tokens=False)["input_ids"] if texts else []


def load_sft_examples(cfg: SFTConfig, tok, positives_path: Path,
                      prompt_protocol: str = DEFAULT_PROTOCOL) -> tuple[list[Example], dict]:
    """Positives -> (prompt, completion + terminator) examples, truncated (keep start) to cfg.max_length."""
    import pandas as pd

    df = pd.read_parquet(positives_path, columns=["problem", "completion"])
    counts = {"rows": len(df)}
    ok = df["completion"].notna() & (df["completion"].astype(str).str.strip() != "") & df["problem"].notna()
    counts["dropped_empty"] = int((~ok).sum())
    df = df[ok]
    if df.empty:
        raise ValueError(f"SFT: no training examples left in {positives_path} ({counts['rows']} rows, "
                         f"{counts['dropped_empty']} with an empty completion or problem)")
    prompts = _encode(tok, [render_prompt(tok, p, prompt_protocol) for p in df["problem"]])
    end = completion_suffix(tok)  # make_example appends the EOS id after it
    comps = _encode(tok, [c + end for c in df["completion"].astype(str)])
    examples, truncated = [], 0
    for p, c in zip(prompts, comps, strict=True):
        ex, cut = make_example(p, c, tok.eos_token_id, cfg.max_length, keep="start")
        examples.append(ex)
        truncated += cut
    counts.update(examples=len(examples), truncated=truncated)
    return examples, counts


def load_pair_examples(cfg: Stage2Config, tok, pairs_path: Path,
                       prompt_protocol: str = DEFAULT_PROTOCOL) -> tuple[list[tuple[Example, Example]], dict]:
    """Pairs -> (chosen, rejected) examples; identical pairs and over-long prompts dropped; keep_end truncation."""
    import pandas as pd

    df = pd.read_parquet(pairs_path, columns=["problem", "chosen", "rejected"])
    counts = {"rows": len(df)}
    same = df["chosen"].astype(str) == df["rejected"].astype(str)
    counts["dropped_identical"] = int(same.sum())
    df = df[~same]
    prompts = _encode(tok, [render_prompt(tok, p, prompt_protocol) for p in df["problem"]])
    long_prompt = [len(p) > cfg.max_prompt_length for p in prompts]
    counts["dropped_long_prompt"] = int(sum(long_prompt))
    keep = [not x for x in long_prompt]
    prompts = [p for p, k in zip(prompts, keep, strict=True) if k]
    end = completion_suffix(tok)  # make_example appends the EOS id after it
    chosen = _encode(tok, [c + end for c, k in zip(df["chosen"].astype(str), keep, strict=True) if k])
    rejected = _encode(tok, [r + end for r, k in zip(df["rejected"].astype(str), keep, strict=True) if k])
    pairs, truncated = [], 0
    for p, c, r in zip(prompts, chosen, rejected, strict=True):
        ec, tc = make_example(p, c, tok.eos_token_id, cfg.max_length, keep="end")
        er, tr = make_example(p, r, tok.eos_token_id, cfg.max_length, keep="end")
        pairs.append((ec, er))
        truncated += tc + tr
    counts.update(examples=len(pairs), truncated_sequences=truncated)
    if not pairs:
        raise ValueError(f"stage 2: no pairs left in {pairs_path} ({counts['rows']} rows; "
                         f"{counts['dropped_identical']} with chosen == rejected, "
                         f"{counts['dropped_long_prompt']} with a prompt > {cfg.max_prompt_length} tokens)")
    return pairs, counts


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

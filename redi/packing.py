"""Tokenised examples, padding-free packing, and per-sequence completion log-probs.

An :class:`Example` is one (prompt, completion) token sequence; the completion ends with the terminator of
``redi.prompts.completion_terminator`` (its last token the EOS), and ``|y|`` = its number of completion
tokens including the terminator.

Packing (``packed=True``): a micro-batch of sequences is concatenated into rows of at most
``row_tokens`` tokens (first-fit; a longer sequence gets a row of its own), shape (R, C);
``position_ids`` restart at 0 for each sequence and no attention mask is passed, with
``use_cache=False``. transformers 5.x then detects the packed format from the position ids
(``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal mask, so a
sequence never attends to another one (tested: packed log-probs equal unpacked ones). With a KV cache
the detection is skipped and sequences leak into each other, hence ``use_cache=False`` always.
Why rows and not one long row: with SDPA/eager attention the block-diagonal mask does not save
compute, so a row of T tokens costs O(T^2) attention; rows of a few times the typical sequence length
keep that near the per-sequence cost (docs/benchmarks/train.md). With flash-attention (varlen via position ids) one row is ideal.
The padded alternative (``packed=False``, right padding + attention mask) is kept for the benchmark
and for models whose attention ignores position-id packing.

Only the hidden states that predict completion tokens reach the LM head, and log-probs come from
``redi.logprobs.LogProbLM`` chunk by chunk (Liger's fused kernel on CUDA when installed): no (N, V)
logits on any device. On CUDA, flash-attention-2 reads packed rows as varlen (one row per micro-batch,
``pack_tokens`` ignored); other CUDA attention runs each packed sequence alone without a mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .logprobs import PACKED_SDPA, LogProbLM, resolve_attn, unwrap_logprob


@dataclass(frozen=True, eq=False)
class Example:
    """One tokenised sequence: ``prompt_len`` prompt tokens followed by completion tokens (EOS last).

    ``ids`` is a tuple (built in memory) or an int32 numpy view into a memory-mapped token table
    (``redi.train_data``); both index, slice and ``len`` alike.
    """

    ids: Sequence[int] | np.ndarray
    prompt_len: int

    @property
    def completion_len(self) -> int:
        """``|y|``: the tokens the loss scores: completion tokens including the EOS (every token but the first
        when ``prompt_len`` is 0, since the first token of a sequence is never predicted)."""
        return len(self.ids) - max(self.prompt_len, 1)


def make_example(prompt_ids: Sequence[int], completion_ids: Sequence[int], eos_id: int, max_length: int,
                 keep: str = "end") -> tuple[Example, bool]:
    """Prompt + completion + EOS, truncated to ``max_length`` tokens. Returns (example, was_truncated).

    ``keep="end"`` (stage 2, the paper's keep_end) drops tokens from the start (prompt first);
    ``keep="start"`` (SFT) drops the end of the completion. At least one completion token is kept.
    """
    comp = list(completion_ids) + [eos_id]
    ids, plen = list(prompt_ids) + comp, len(prompt_ids)
    if len(ids) <= max_length:
        return Example(tuple(ids), plen), False
    if keep == "end":
        cut = len(ids) - max_length
        return Example(tuple(ids[cut:]), max(0, plen - cut)), True
    plen = min(plen, max_length - 1)
    return Example(tuple(list(prompt_ids)[:plen] + comp[: max_length - plen]), plen), True


@dataclass
class Batch:
    """Model inputs for a micro-batch plus where its completion tokens are.

    ``keep``: (N,) flat positions (row * C + column) whose logits predict the N completion tokens ``targets`` (N,);
    ``seg``: (N,) index of the sequence each of them belongs to.
    """

    input_ids: torch.Tensor  # (R, C) packed rows, or (B, L) padded
    position_ids: torch.Tensor | None  # (R, C) packed; None when padded
    attention_mask: torch.Tensor | None  # (B, L) padded; None when packed
    keep: torch.Tensor  # (N,)
    targets: torch.Tensor  # (N,)
    seg: torch.Tensor  # (N,)
    n_seqs: int
    n_tokens: int  # real (non-pad) tokens

    def to(self, device: torch.device | str) -> Batch:
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(mv(self.input_ids), mv(self.position_ids), mv(self.attention_mask), mv(self.keep),
                     mv(self.targets), mv(self.seg), self.n_seqs, self.n_tokens)


def _pack_rows(examples: Sequence[Example], row_tokens: int | None) -> list[list[int]]:
    """First-fit (in order) assignment of example indices to rows of at most ``row_tokens`` tokens."""
    cap = max([row_tokens or 0] + [len(ex.ids) for ex in examples]) if row_tokens else None
    rows: list[list[int]] = []
    used: list[int] = []
    for i, ex in enumerate(examples):
        n = len(ex.ids)
        for r, u in enumerate(used):
            if cap is None or u + n <= cap:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    return rows


def row_budget(device: torch.device | str, pack_tokens: int | None, attn: str = "auto") -> int | None:
    """Packed-row budget: one row (None) where attention runs per packed sequence, else ``pack_tokens``.

    Per sequence means: CUDA (flash-attention-2 reads one row as varlen; other attention runs sequences
    one by one, see ``LogProbLM``) and, elsewhere, ``redi.logprobs.PACKED_SDPA`` (what ``auto`` gives on
    CPU); there splitting rows only adds padding. With ``sdpa`` or ``eager`` named on CPU the
    block-diagonal mask costs O(row^2), so rows stay at ``pack_tokens``.
    """
    dev = torch.device(device).type
    return None if dev == "cuda" or resolve_attn(attn, dev) in (PACKED_SDPA, "flash_attention_2") else pack_tokens


def collate(examples: Sequence[Example], packed: bool = True, pad_id: int = 0, row_tokens: int | None = None) -> Batch:
    """Pack examples padding-free into rows of <= ``row_tokens`` tokens (None: one row), or right-pad them.

    Packed rows restart ``position_ids`` at 0 for every sequence; rows shorter than the longest are
    filled with pad tokens that form their own (never predicted) segment.
    """
    groups = _pack_rows(examples, row_tokens) if packed else [[i] for i in range(len(examples))]
    width = max(sum(len(examples[i].ids) for i in g) for g in groups)
    input_ids = np.full((len(groups), width), pad_id, dtype=np.int64)
    position_ids = np.zeros((len(groups), width), dtype=np.int64)
    mask = np.zeros((len(groups), width), dtype=np.int64)
    keep, targets, seg = [], [], []
    for r, g in enumerate(groups):
        off = 0
        for i in g:
            ex = examples[i]
            ids = np.asarray(ex.ids, dtype=np.int64)
            n = len(ids)
            input_ids[r, off:off + n] = ids
            position_ids[r, off:off + n] = np.arange(n)
            mask[r, off:off + n] = 1
            start = max(ex.prompt_len, 1)  # the very first token of a sequence is never predicted
            keep.append(np.arange(r * width + off + start - 1, r * width + off + n - 1))
            targets.append(ids[start:])
            seg.append(np.full(n - start, i, dtype=np.int64))
            off += n
        position_ids[r, off:] = np.arange(width - off)  # padding: its own segment
    n_tok = sum(len(ex.ids) for ex in examples)
    t = torch.from_numpy
    return Batch(t(input_ids), t(position_ids) if packed else None, None if packed else t(mask),
                 t(np.concatenate(keep)), t(np.concatenate(targets)), t(np.concatenate(seg)), len(examples), n_tok)


def token_logps(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Log-probs of the completion tokens, shape (N,), fp32.

    ``model`` is a :class:`redi.logprobs.LogProbLM` (possibly wrapped by DDP / FSDP / DeepSpeed: its
    forward is the wrapped forward), or a bare causal LM, which is wrapped on the fly (same parameters).
    """
    lp_model = model if unwrap_logprob(model) is not None else LogProbLM(model)
    return lp_model(batch.input_ids, batch.keep, batch.targets, position_ids=batch.position_ids,
                    attention_mask=batch.attention_mask)


def sequence_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence SUMMED completion log-probs (S,) fp32 and completion lengths |y| incl. EOS (S,)."""
    lp_model = model if unwrap_logprob(model) is not None else LogProbLM(model)
    sums = lp_model(batch.input_ids, batch.keep, batch.targets, position_ids=batch.position_ids,
                    attention_mask=batch.attention_mask, seg=batch.seg, n_seqs=batch.n_seqs)  # (S,)
    lens = torch.bincount(batch.seg, minlength=batch.n_seqs)  # (S,)
    return sums, lens

"""Tokenised examples, padding-free packing, and per-sequence completion log-probs.

An :class:`Example` is one (prompt, completion) token sequence; the completion ends with the EOS
(``<|im_end|>``), and ``|y|`` = its number of completion tokens including that EOS.

Packing (``packed=True``): a micro-batch of sequences is concatenated into ONE row of shape (1, T),
``position_ids`` restart at 0 for each sequence and no attention mask is passed, with
``use_cache=False``. transformers 5.x then detects the packed format from the position ids
(``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal mask, so a
sequence never attends to another one (tested: packed log-probs equal unpacked ones). With a KV cache
the detection is skipped and sequences leak into each other, hence ``use_cache=False`` always.
The padded alternative (``packed=False``, right padding + attention mask) is kept for the benchmark
and for models whose attention ignores position-id packing.

Only the completion positions reach the LM head: ``logits_to_keep`` is given the indices of the
positions that predict completion tokens, so the (N, V) logits never cover prompts or padding.
(The paper used Liger kernels to avoid materialising logits at all; we do not.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Example:
    """One tokenised sequence: ``prompt_len`` prompt tokens followed by completion tokens (EOS last)."""

    ids: tuple[int, ...]
    prompt_len: int

    @property
    def completion_len(self) -> int:
        """``|y|``: completion tokens including the EOS."""
        return len(self.ids) - self.prompt_len


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

    ``keep``: (N,) flat positions whose logits predict the N completion tokens ``targets`` (N,);
    ``seg``: (N,) index of the sequence each of them belongs to.
    """

    input_ids: torch.Tensor  # (1, T) packed, or (B, L) padded
    position_ids: torch.Tensor | None  # (1, T) packed; None when padded
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


def _completion_positions(ex: Example, offset: int) -> tuple[list[int], list[int]]:
    """Positions (offset-based) whose next-token prediction is a completion token, and those tokens."""
    start = max(ex.prompt_len, 1)  # the very first token of a sequence is never predicted
    pos = list(range(offset + start - 1, offset + len(ex.ids) - 1))
    return pos, list(ex.ids[start:])


def collate(examples: Sequence[Example], packed: bool = True, pad_id: int = 0) -> Batch:
    """Pack (one row, position ids reset per sequence) or right-pad a list of examples."""
    keep, targets, seg = [], [], []
    if packed:
        ids, pos_ids = [], []
        for i, ex in enumerate(examples):
            p, t = _completion_positions(ex, len(ids))
            keep += p
            targets += t
            seg += [i] * len(t)
            ids += ex.ids
            pos_ids += range(len(ex.ids))
        input_ids, position_ids, mask = torch.tensor([ids]), torch.tensor([pos_ids]), None
    else:
        width = max(len(ex.ids) for ex in examples)
        input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, ex in enumerate(examples):
            input_ids[i, : len(ex.ids)] = torch.tensor(ex.ids)
            mask[i, : len(ex.ids)] = 1
            p, t = _completion_positions(ex, i * width)
            keep += p
            targets += t
            seg += [i] * len(t)
        position_ids = None
    n_tok = sum(len(ex.ids) for ex in examples)
    return Batch(input_ids, position_ids, mask, torch.tensor(keep, dtype=torch.long), torch.tensor(targets),
                 torch.tensor(seg), len(examples), n_tok)


def token_logps(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Log-probs of the completion tokens, shape (N,), through the model's own forward.

    Packed: ``logits_to_keep`` selects only the N completion positions, so logits are (1, N, V).
    Padded: full (B, L, V) logits, then the same positions are gathered from the flattened view.
    """
    if batch.position_ids is not None:
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                    logits_to_keep=batch.keep)
        logits = out.logits[0]  # (N, V)
    else:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        logits = out.logits.flatten(0, 1)[batch.keep]  # (N, V)
    logits = logits.float()
    return logits.gather(-1, batch.targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (N,)


def sequence_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence SUMMED completion log-probs (S,) and completion lengths |y| incl. EOS (S,)."""
    lp = token_logps(model, batch)  # (N,)
    sums = torch.zeros(batch.n_seqs, dtype=lp.dtype, device=lp.device).index_add(0, batch.seg, lp)  # (S,)
    lens = torch.bincount(batch.seg, minlength=batch.n_seqs)  # (S,)
    return sums, lens

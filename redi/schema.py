"""Column contracts between stages. Every stage reads and writes these names; nothing else is assumed.

Traces (``download`` output, ``traces.parquet``): one row per (problem, generation).
Positives / pairs (``verify`` output): what the training stages consume.
Benchmarks: ``id, problem, answer`` (+ optional extras), one row per problem.
"""

from __future__ import annotations

import hashlib

TRACE_COLUMNS: dict[str, str] = {
    "problem_id": "deterministic id of the problem text: stable_id(problem text)",
    "row_id": "deterministic id of the trace: stable_id(problem_id, gen_index)",
    "gen_index": "index of the generation among all generations of this problem text (0-based, source order, across rows)",
    "problem": "problem statement (no prompt suffix, no chat template)",
    "answer": "gold final answer as the source gives it; None when the source row has none",
    "source": "problem source (e.g. olympiads, cn_k12, synthetic)",
    "problem_is_valid": "'yes'/'no' where the source has it, else None",
    "trace": "teacher generation text (R1 style: <think>...</think> then the answer)",
    "finish_reason": "'stop', 'length', ... or None when unknown",
    "reasoning_complete": "is_reasoning_complete where the source has it, else None",
    "label_math_verify": "the dataset's own Math-Verify label, else None",
    "label_llama": "the dataset's Llama judge label, else None",
    "source_uuid": "the source's own row id (uuid) where present",
    "source_row": "0-based position of the source row in read order (bad rows counted), like the official original_index",
    "source_gen": "index of the generation within its source row (the official chosen_gen_idx / rejected_gen_idx)",
}

POSITIVE_COLUMNS: dict[str, str] = {
    "id": "stable_id(problem_id, gen_index)",
    "problem_id": "problem id",
    "problem": "problem statement",
    "completion": "the correct trace",
    "answer": "gold answer",
}

PAIR_COLUMNS: dict[str, str] = {
    "id": "stable_id(problem_id, chosen_index, rejected_index)",
    "problem_id": "problem id",
    "problem": "problem statement",
    "chosen": "a correct trace (y_w)",
    "rejected": "an incorrect trace of the same problem (y_l)",
    "answer": "gold answer",
    "chosen_index": "gen_index of the chosen trace",
    "rejected_index": "gen_index of the rejected trace",
}

BENCHMARK_COLUMNS: dict[str, str] = {"id": "problem id", "problem": "problem statement", "answer": "gold answer"}


def stable_id(*parts: object, n: int = 16) -> str:
    """A deterministic hex id of the parts (never uuid4: ids must be reproducible)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8"))
    return h.hexdigest()[:n]

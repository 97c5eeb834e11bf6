"""Config of the ``verify`` stage: grading, filters, and the split into positives and pairs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import StrictModel


class VerifyConfig(StrictModel):
    """Stage 2 of the DAG: label every trace, filter as in the paper, write positives and pairs."""

    label_rule: Literal["math_verify", "dataset", "landmv"] = Field(
        "math_verify",
        description="`math_verify`: our own grading (redi.verify.grade); `dataset`: the dataset's Math-Verify label; "
        "`landmv`: the paper's rule, correct only if the Llama judge AND Math-Verify agree (refuses if a column is missing).",
    )
    workers: int = Field(0, ge=0, description="Grading worker processes; 0 = all cores. Does not change results.")
    timeout_s: float = Field(5.0, gt=0, description="Hard per-trace grading deadline, enforced from outside the worker; a trace past it is labelled None.")
    executor: Literal["processes", "dask"] = Field("processes", description="`processes`: a local pool; `dask`: shards fanned out through prefect-dask on a Dask cluster.")
    dask_address: str | None = Field(None, description="Scheduler address of an existing Dask cluster (executor=dask); None starts a local 2-worker cluster.")
    shard_size: int = Field(2000, ge=1, description="Traces per shard when fanning out. Does not change results.")
    require_complete: bool = Field(True, description="Drop traces whose reasoning is not complete (is_reasoning_complete False or finish_reason != stop).")
    require_valid: bool = Field(True, description="Drop problems with problem_is_valid != 'yes' (where the column exists).")
    exclude_sources: list[str] = Field(default_factory=lambda: ["cn_k12"], description="Problem sources to drop (the paper drops cn_k12).")
    max_prompt_tokens: int | None = Field(800, ge=1, description="Drop problems whose prompt is longer (tokens of the recipe's tokenizer). Paper: 800.")
    max_response_tokens: int | None = Field(19000, ge=1, description="Drop traces whose response is longer (tokens). Paper: 19000.")
    positives: Literal["first", "all"] = Field("first", description="SFT set: the first correct trace per problem (paper) or all of them.")
    pairs_per_problem: int = Field(1, ge=1, description="Pairs per problem: 1 = (first correct, first incorrect), as the paper; more pairs zip further correct/incorrect traces.")
    decontaminate: bool = Field(True, description="Drop training problems sharing an n-gram with any evaluation benchmark problem.")
    decontam_ngram: int = Field(8, ge=3, description="n of the n-gram overlap check (official code: 8).")
    decontam_benchmarks: list[str] = Field(
        default_factory=lambda: ["math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench", "gsm8k"],
        description="Benchmarks checked for overlap; those that cannot be loaded are reported and skipped.",
    )

    def hash_fields(self) -> dict:
        d = self.model_dump(mode="json")
        for k in ("workers", "executor", "dask_address", "shard_size"):
            d.pop(k)
        return d

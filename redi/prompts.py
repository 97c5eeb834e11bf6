"""The one place where a problem becomes a prompt: the same for SFT, stage 2 and evaluation."""

from __future__ import annotations

from typing import Any

from .config.evaluate import OPENR1_SUFFIX

# Qwen-style ChatML template, installed on the tiny model and on tokenizers that have none.
# Generation prompt: "<|im_start|>assistant\n"; the completion ends with "<|im_end|>" (the EOS).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def user_content(problem: str, suffix: str | None = OPENR1_SUFFIX) -> str:
    """Open-R1's user turn: the problem, a newline, then the instruction to box the answer."""
    return f"{problem}\n{suffix}" if suffix else problem


def build_messages(problem: str, suffix: str | None = OPENR1_SUFFIX, system: str | None = None) -> list[dict[str, str]]:
    """Chat messages for one problem (without the assistant turn)."""
    msgs: list[dict[str, str]] = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": user_content(problem, suffix)})
    return msgs


def render_prompt(tokenizer: Any, problem: str, suffix: str | None = OPENR1_SUFFIX, system: str | None = None) -> str:
    """The prompt text with the tokenizer's chat template and the generation prompt appended.

    Raises ValueError naming the cause when the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "?")
        raise ValueError(
            f"tokenizer {name!r} has no chat template: set model.chat_template in the recipe "
            "(redi.prompts.CHATML_TEMPLATE is the Qwen-style one)"
        )
    return tokenizer.apply_chat_template(build_messages(problem, suffix, system), tokenize=False, add_generation_prompt=True)

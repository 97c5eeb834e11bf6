"""The one place where a problem becomes a prompt, and where a training completion ends.

**Prompt protocols** (:data:`PROTOCOLS`): each names a user-turn template, an optional explicit system
turn, a forced generation prefix and a default generation budget. The recipe picks one for training
(``prompt.train``: the verify stage's prompt-length count, SFT and stage 2) and one for evaluation
(``evaluate.prompt_protocol``; unset = the training one). :func:`render_prompt` renders a problem with the
tokenizer's own chat template, so a template that adds a default system turn (Qwen2.5-Math's: "Please
reason step by step, and put your final answer within \\boxed{}.") adds it under every protocol that sets
no system turn. Rendered examples for Qwen2.5-Math's template: docs/evaluation.md.

- ``open-r1``: user = problem + "\\n" + the Open-R1 suffix. The project's own default (demo, study). With
  Qwen2.5-Math's template the instruction then appears twice (system turn and user turn): not the paper's.
- ``paper-train``: user = the raw problem (official ``clean_base_shuffled*.py``: ``{"role": "user",
  "content": problem}``, no system message; the template adds its default system turn).
- ``paper-final``: the paper's final tables (official README + rllm ``deepscaler_dataset.py
  --use_math_template``): user = lighteval's MATH query template, then a blank line and the problem; the
  official eval template's generation prompt is ``<|im_start|>assistant<think>\\n``: ``<think>\\n`` is
  forced and *replaces* the newline after the assistant header (kept as the official code renders it);
  30,720 new tokens.
- ``paper-intermediate``: the intermediate evaluations (official ``eval.sh``: lighteval with open-r1's
  ``evaluate.py`` and ``--use-chat-template``): the same user turn, the template's plain generation prompt,
  no forced prefix; 32,768 new tokens (also the context length there).

**Forced prefix.** The prompt fed to the engine ends with the prefix, so its tokens count as prompt tokens
(``prompt_tokens`` of a sample, the context budget); the model's continuation alone is the completion,
graded as generated (the prefix is not prepended).

**Completion terminator** (:func:`completion_terminator`): a training completion is the trace followed by
what the chat template renders after an assistant message's content, cut after the tokenizer's EOS if that
text contains it, else followed by the EOS: where generation under the same template would stop. Qwen2.5-Math
(ChatML, EOS ``<|endoftext|>``): ``trace<|im_end|>\\n<|endoftext|>``, the official data (TRL renders
``...<|im_end|>\\n`` and appends the EOS). The tiny model (ChatML, EOS ``<|im_end|>``): ``trace<|im_end|>``.
TRL would append a second EOS after ``<|im_end|>\\n`` for a tokenizer whose EOS is ``<|im_end|>``; we stop at
the first. ``|y|`` (the REDI length normaliser) counts every completion token, the terminator's included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OPENR1_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."

MATH_QUERY_TEMPLATE = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be of the "
    "following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' (without quotes) "
    "where ANSWER is just the final number or expression that solves the problem. Think step by step before answering."
    "\n\n{problem}"
)
"""lighteval's / open-r1's / rllm's MATH query template (two spaces after "clearly."), ``{problem}`` marked."""

PROBLEM = "{problem}"

# Qwen-style ChatML template, installed on the tiny model and on tokenizers that have none. No default system
# turn. Generation prompt: "<|im_start|>assistant\n"; an assistant turn ends "<|im_end|>\n".
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class PromptProtocol:
    """How a problem is put to the model. ``user_template`` holds ``{problem}`` once (replaced literally, so
    other braces are text)."""

    name: str
    user_template: str
    system: str | None = None
    prefix: str = ""
    header_newline: bool = True
    max_new_tokens: int = 32768
    description: str = ""

    def __post_init__(self) -> None:
        if self.user_template.count(PROBLEM) != 1:
            raise ValueError(f"prompt protocol {self.name!r}: user_template must contain {PROBLEM} exactly once")
        if not self.header_newline and not self.prefix:
            raise ValueError(f"prompt protocol {self.name!r}: header_newline=False needs a prefix to take the newline's place")

    def user_turn(self, problem: str) -> str:
        return self.user_template.replace(PROBLEM, problem)

    def messages(self, problem: str) -> list[dict[str, str]]:
        """Chat messages for one problem (without the assistant turn)."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.user_turn(problem)}]


PROTOCOLS: dict[str, PromptProtocol] = {
    p.name: p
    for p in [
        PromptProtocol("open-r1", PROBLEM + "\n" + OPENR1_SUFFIX,
                       description="user = problem + newline + the Open-R1 suffix; the project's default (demo, study)"),
        PromptProtocol("paper-train", PROBLEM,
                       description="user = the raw problem, the template's own system turn (official training data)"),
        PromptProtocol("paper-final", MATH_QUERY_TEMPLATE, prefix="<think>\n", header_newline=False, max_new_tokens=30720,
                       description="MATH query template, forced '<think>\\n' glued to the assistant header, 30,720 tokens "
                                   "(paper's final tables, rllm)"),
        PromptProtocol("paper-intermediate", MATH_QUERY_TEMPLATE, max_new_tokens=32768,
                       description="MATH query template, plain generation prompt, 32,768 tokens (intermediate evaluations, lighteval)"),
    ]
}
DEFAULT_PROTOCOL = "open-r1"


def get_protocol(protocol: str | PromptProtocol) -> PromptProtocol:
    """The protocol object for a name (or the object itself); an unknown name lists the valid ones."""
    if isinstance(protocol, PromptProtocol):
        return protocol
    try:
        return PROTOCOLS[protocol]
    except KeyError:
        raise ValueError(f"unknown prompt protocol {protocol!r}: registered are {sorted(PROTOCOLS)} (redi.prompts.PROTOCOLS)") from None


def _require_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "?")
        raise ValueError(
            f"tokenizer {name!r} has no chat template: set model.chat_template in the recipe "
            "(redi.prompts.CHATML_TEMPLATE is the Qwen-style one)"
        )


def render_prompt(tokenizer: Any, problem: str, protocol: str | PromptProtocol = DEFAULT_PROTOCOL) -> str:
    """The prompt text: the protocol's messages in the tokenizer's chat template, its generation prompt, then
    the protocol's forced prefix. Raises ValueError naming the cause when the tokenizer has no chat template."""
    _require_template(tokenizer)
    p = get_protocol(protocol)
    text = tokenizer.apply_chat_template(p.messages(problem), tokenize=False, add_generation_prompt=True)
    if not p.header_newline:
        if not text.endswith("\n"):
            raise ValueError(f"prompt protocol {p.name!r} glues its prefix to the assistant header, but this chat template's "
                             f"generation prompt does not end with a newline (ends {text[-20:]!r})")
        text = text[:-1]
    return text + p.prefix


def completion_terminator(tokenizer: Any) -> str:
    """The text that ends every training completion (see the module docstring), EOS included: what the
    tokenizer's chat template renders after an assistant message's content, up to its first EOS."""
    _require_template(tokenizer)
    eos = tokenizer.eos_token
    if not eos:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no EOS token: a completion could never end")
    mark = "\x00redi-completion\x00"
    user = [{"role": "user", "content": "x"}]
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": mark}], tokenize=False)
    if full.count(mark) != 1:
        raise ValueError("the chat template does not render an assistant message's content verbatim; cannot tell how a completion ends")
    tail = full.split(mark, 1)[1]
    return tail[: tail.index(eos) + len(eos)] if eos in tail else tail + eos


def completion_suffix(tokenizer: Any) -> str:
    """:func:`completion_terminator` without its final EOS: the text appended to each trace before tokenising;
    ``redi.packing.make_example`` then appends the EOS id (Qwen2.5-Math: ``"<|im_end|>\\n"``; tiny: ``""``)."""
    return completion_terminator(tokenizer)[: -len(tokenizer.eos_token)]

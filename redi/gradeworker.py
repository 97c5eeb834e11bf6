"""The grading workers: how :class:`redi.gradepool.GradingPool` starts them (:func:`start_context`) and
the loop each one runs (:func:`worker_main`).

It grades chunks of ``(response, gold)`` items with :func:`redi.grader.grade_or_none`, publishes in a shared
heartbeat which item it is on and since when (the parent enforces the deadline from outside), optionally
counts each response's tokens, and exchanges its new cache entries with the other workers
(``redi.grader`` "Caches"). :func:`warm` pays Math-Verify's first-use costs; the forkserver preloads it
(``redi._gradewarm``) so workers fork warm.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import deque

from . import grader
from .grader import grade_or_none

FLUSH_S = 0.05
"""A worker sends the results it holds at the end of each chunk, or once this long has passed ..."""
SHARE_S = 0.01
"""... or this long when it holds new cache entries for the other workers (redi.grader "Caches")."""
POLL_S = 0.005
"""A worker looks for the other workers' cache entries between items this often."""


_forkserver_owner: int | None = None  # the process that started the forkserver


def start_context() -> mp.context.BaseContext:
    """forkserver with math_verify imported and warmed (cheap worker starts, safe in threaded parents); spawn elsewhere.

    CPython 3.11's forkserver never receives the main script's path (it asks for ``main_path``, the
    preparation data calls it ``init_main_from_path``), so its ``__main__`` preload is a no-op and every
    worker re-imports the main script after the fork (slow for a script that imports pandas). The path
    goes through ``REDI_FORKSERVER_MAIN`` instead and ``redi._gradewarm`` imports it in the forkserver.

    A process forked from one that started the forkserver (a data-loader worker calling ``grade``) cannot
    use it (multiprocessing fails with ChildProcessError), so it spawns its workers.
    """
    global _forkserver_owner
    if "forkserver" not in mp.get_all_start_methods() or _forkserver_owner not in (None, os.getpid()):
        return mp.get_context("spawn")
    _forkserver_owner = os.getpid()
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path and getattr(main.__spec__, "name", None) is None:  # the path multiprocessing's children will import
        os.environ["REDI_FORKSERVER_MAIN"] = os.path.normpath(os.path.join(mp.process.ORIGINAL_DIR or "", path))
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["redi._gradewarm"])
    return ctx


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


_WARM_ITEMS = [("\\boxed{12}", "12"), ("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{x^2+1}", "x^2+1"),
               ("\\boxed{\\sqrt{2}\\pi}", "\\pi\\sqrt{2}"), ("\\boxed{(1, 2]}", "(1,2]"), ("the final answer is 5", "5")]


def warm() -> None:
    """Pay Math-Verify's and SymPy's first-use costs (per kind of answer) once.

    Called in the forkserver (``redi._gradewarm`` is preloaded there), so every worker, replacements
    included, is forked warm; and in each worker, where it is free once warm.
    """
    for response, gold in _WARM_ITEMS:
        grade_or_none(response, gold)


def token_counter(tokenizer_json: str | None):
    """``text -> number of tokens`` with a ``tokenizers`` tokenizer (no special tokens, no truncation), or None."""
    if tokenizer_json is None:
        return None
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_truncation()
    tok.no_padding()

    def count(text) -> int | None:
        if not isinstance(text, str):
            return 0
        try:
            return len(tok.encode(text, add_special_tokens=False).ids)
        except Exception:  # noqa: BLE001 - unknown here; the caller counts it with transformers' tokenizer
            return None

    return count


def worker_main(conn, beat, tokenizer_json: str | None = None, share: bool = True) -> None:
    """Worker loop: receive chunks ``(first_key, [(response, gold), ...])`` (item j has key first_key + j),
    send ``(first_key, [verdict, ...], fresh)`` for consecutive runs of them (with a tokenizer:
    ``[(verdict, tokens of the response), ...]``), where ``fresh`` holds the cache entries this worker
    computed meanwhile (``redi.grader.share_take``). Messages ``(None, entries)`` carry
    the other workers' entries (``redi.grader.share_put``); they are read between items (every POLL_S), so
    that a string parsed by one worker reaches the others within ~SHARE_S + POLL_S.

    ``beat[0]`` = key of the item being graded, ``beat[1]`` = when it started (``time.monotonic``,
    system-wide on Linux) or 0.0 between items. Exits on None or EOF, and quietly (no traceback) when the
    parent is gone (a broken pipe) or on Ctrl-C, which the parent handles: it stops the workers itself.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _worker_loop(conn, beat, tokenizer_json, share)
    except (OSError, EOFError):  # the pipe to the parent: BrokenPipeError, ConnectionResetError, EBADF
        pass


def _worker_loop(conn, beat, tokenizer_json: str | None, share: bool) -> None:
    warm()
    count = token_counter(tokenizer_json)
    if share:  # a lone worker has nobody to share with, and exporting entries costs time
        grader.share_start()
    try:
        conn.send(("ready", None))  # the parent times a worker's items only once it is ready
    except (BrokenPipeError, OSError):
        return
    chunks: deque = deque()  # chunks read while polling for cache entries
    while True:
        if chunks:
            msg = chunks.popleft()
        else:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
        if msg is None:
            return
        k0, items = msg
        if k0 is None:
            grader.share_put(items)
            continue
        out, first = [], k0
        last = polled = time.monotonic()
        for j, (response, gold) in enumerate(items):
            beat[0] = k0 + j
            beat[1] = time.monotonic()
            out.append(grade_or_none(response, gold) if count is None else (grade_or_none(response, gold), count(response)))
            beat[1] = 0.0
            now = time.monotonic()
            if now - last >= FLUSH_S or (now - last >= SHARE_S and grader.share_pending()):
                conn.send((first, out, grader.share_take()))
                out, first, last = [], k0 + j + 1, now
            if now - polled >= POLL_S:
                polled = now
                try:
                    while conn.poll():
                        m = conn.recv()
                        if m is not None and m[0] is None:
                            grader.share_put(m[1])
                        else:
                            chunks.append(m)
                except (EOFError, OSError):
                    return
        if out:
            conn.send((first, out, grader.share_take()))

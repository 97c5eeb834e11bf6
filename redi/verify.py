"""The one grader of the project: Math-Verify on the final answer, with a hard deadline from outside.

``grade(response, gold)`` is used both to label teacher traces (``redi.split``) and to grade
evaluation samples (``redi.evaluate``). It returns ``True`` / ``False``, or ``None`` when the gold
cannot be parsed at all (the example cannot be judged, as Open-R1's accuracy reward does).

How an answer is read (both sides go through the same ``parse_answer`` so that
``grade("\\boxed{" + gold + "}", gold)`` holds for every benchmark gold):

1. Response: the content of the LAST ``\\boxed{...}`` (brace-matched, linear time), as Open-R1's
   evaluations (boxed_match_priority=0, rightmost match first). Without any ``\\boxed``, Math-Verify's
   anchored extraction (``final answer is ...``, ``answer: ...``) on the whole response; no
   anchor-free fallback, so a truncated trace whose last number happens to equal the gold is not
   counted as correct.
2. An answer string is normalised (``4.5e33`` -> ``4.5\\times 10^{33}``, ``np.arcsin(x)`` ->
   ``\\arcsin(x)``, a trailing ``$.`` dropped, plain ``-1./3`` read as an expression), then parsed as
   ``$answer$`` with ``LatexExtractionConfig`` and, failing that, with ``ExprExtractionConfig``
   (whole-string matches only). The raw string is
   kept as a last candidate, so two answers that neither parser understands match only when they are
   identical strings.
3. Equivalence: ``math_verify.verify(gold_candidates, pred_candidates)`` (any pair matching).

Math-Verify's own timeouts use ``signal.alarm`` (main thread only), so they are disabled here
(``parsing_timeout=None``, ``timeout_seconds=None``) and the deadline is enforced by
:class:`GradingPool`: each item runs in a worker process; a worker past its deadline is killed and
replaced, its item gets ``None`` and is counted. ``grade`` itself has no deadline: call it directly
only on trusted input, use ``grade_many`` / ``GradingPool`` otherwise.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing.connection import wait as mp_wait
from typing import Any

logger = logging.getLogger(__name__)

Verdict = bool | None

_E_NOTATION = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*[eE]\s*([+-]?\d+)\s*$")
_PLAIN_EXPR = re.compile(r"^[\d\s.+\-*/()]+$")  # "-1./3", "10/13": python arithmetic, not LaTeX
_NP_FUNC = re.compile(r"\b(?:np|numpy|math)\.(arcsin|arccos|arctan|sin|cos|tan|log|exp|sqrt|pi)\b")
START_TIMEOUT_S = 300.0
"""A worker that has not said ready by then means a blocked start (see _wait_once): fail, never hang."""
IDLE_POLL_S = 1.0
"""The scheduler re-checks its queue at least this often."""
CHUNK = 16
"""Items sent to a worker at once (refilled at half), so workers never wait for the parent; each item still
has its own deadline (the clock restarts at every result)."""
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``) in `text`, brace-matched; None if absent/unclosed.

    Linear in len(text) from the last opening, so a 100 kB or deeply nested box cannot blow up.
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
            i += 1
    return None


def normalise_answer(ans: str) -> str:
    """Rewrite answer forms Math-Verify's LaTeX reader gets wrong into LaTeX it reads right."""
    ans = ans.strip().rstrip(".").strip().strip("$").strip()
    m = _E_NOTATION.match(ans)
    if m:
        return f"{m.group(1)}\\times 10^{{{int(m.group(2))}}}"
    ans = _NP_FUNC.sub(lambda mm: "\\pi" if mm.group(1) == "pi" else "\\" + mm.group(1), ans)
    return ans


def _mv():
    """Math-Verify, imported lazily (workers preload it; importing the module stays cheap)."""
    import math_verify
    import math_verify.grader
    import math_verify.parser

    # Deadlines are enforced by GradingPool, so Math-Verify's "timeout disabled" warning is noise.
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    return math_verify


@lru_cache(maxsize=1)
def _configs():
    mv = _mv()
    latex = [mv.LatexExtractionConfig(boxed_match_priority=0)]
    expr = [mv.ExprExtractionConfig()]
    anchored = [
        mv.LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),
        mv.ExprExtractionConfig(try_extract_without_anchor=False),
    ]
    return latex, expr, anchored


def _sympy_only(parsed: list) -> list:
    return [p for p in parsed if not isinstance(p, str)]


def _whole_match(parsed: list, text: str) -> bool:
    """Math-Verify returns [value, matched_text]: accept an expression only if it spans the whole answer."""
    strs = [p for p in parsed if isinstance(p, str)]
    return bool(strs) and re.sub(r"\s", "", strs[-1]) == re.sub(r"\s", "", text)


@lru_cache(maxsize=4096)
def parse_answer(ans: str) -> tuple:
    """Candidates for one answer string: parsed SymPy objects first, then the raw string (never raises).

    LaTeX first (the answer wrapped in ``$...$``); plain arithmetic (``-1./3``) is read as an
    expression first, because LaTeX reads ``1.`` as 1. An expression parse counts only if it spans
    the whole answer (otherwise ``\\hbar \\omega(v+1/2)`` would be read as ``2``).
    """
    mv = _mv()
    latex, expr, _ = _configs()
    norm = normalise_answer(ans)
    if not norm:
        return ()
    order = (expr, latex) if _PLAIN_EXPR.match(norm) else (latex, expr)
    for cfg in order:
        if cfg is latex:
            got = _sympy_only(mv.parse(f"${norm}$", cfg, parsing_timeout=None))
        else:
            parsed = mv.parse(norm, cfg, parsing_timeout=None)
            got = _sympy_only(parsed) if _whole_match(parsed, norm) else []
        if got:
            return (*got, norm)
    return (norm,)


def _parse_response(response: str) -> list:
    box = last_boxed(response)
    if box is not None:
        return list(parse_answer(box))
    _, _, anchored = _configs()
    return list(_mv().parse(response, anchored, parsing_timeout=None))


def grade(response: str, gold: str) -> Verdict:
    """True/False: is the response's final answer equivalent to `gold`; None if `gold` cannot be parsed.

    No deadline here (see the module docstring): use :func:`grade_many` for untrusted input.
    """
    if not isinstance(gold, str) or not isinstance(response, str):
        return None
    gold_c = parse_answer(gold)
    if not gold_c:
        return None
    pred_c = _parse_response(response)
    if not pred_c:
        return False
    return bool(_mv().verify(list(gold_c), pred_c, timeout_seconds=None))


def _safe_grade(response: str, gold: str) -> Verdict:
    try:
        return grade(response, gold)
    except Exception:  # noqa: BLE001 - a grader bug must not kill the worker; the item is unjudgeable
        logger.debug("grade raised", exc_info=True)
        return None


# ----------------------------------------------------------------------------- worker processes


def _worker_main(conn) -> None:
    """Worker loop: receive a chunk [(key, response, gold), ...], send (key, verdict) per item as it is done.

    Exits on None or EOF. Results go back one by one so the parent can time each item.
    """
    _configs()
    try:
        conn.send(("ready", None))  # the parent starts an item's deadline only once its worker is ready
    except (BrokenPipeError, OSError):
        return  # the pool gave up on this worker before it was ready
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        for key, response, gold in msg:
            conn.send((key, _safe_grade(response, gold)))


def _context() -> mp.context.BaseContext:
    """forkserver with math_verify preloaded (cheap worker starts, safe in threaded parents); spawn elsewhere."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["redi.verify", "math_verify", "latex2sympy2_extended", "sympy"])
        return ctx
    return mp.get_context("spawn")


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


@dataclass
class _Slot:
    """One worker process and the item it is grading."""

    proc: Any
    conn: Any
    inflight: deque = field(default_factory=deque)  # keys sent, in order; the first is being graded
    deadline: float = 0.0
    ready: bool = False
    started_at: float = field(default_factory=time.monotonic)


@dataclass
class PoolStats:
    """Counters of a pool's life: graded items, deadline kills, worker crashes, workers started."""

    done: int = 0
    timeouts: int = 0
    crashes: int = 0
    started: int = 0
    timeout_examples: list = field(default_factory=list)


class GradingPool:
    """Worker processes grading (response, gold) items, each under a hard deadline enforced here.

    ``submit`` returns a Future resolved with True/False/None. A worker that overruns ``timeout_s``
    is killed and replaced and its item resolves to None (``stats.timeouts``); a worker that dies
    resolves its item to None too (``stats.crashes``). Thread-safe submit; use as a context manager.
    """

    def __init__(self, workers: int = 0, timeout_s: float = 5.0):
        self.n = workers or default_workers()
        self.timeout_s = float(timeout_s)
        self.stats = PoolStats()
        self._ctx = _context()
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._retry: deque = deque()  # keys of a killed worker's chunk that were never started
        self._items: dict[int, tuple] = {}
        self._futures: dict[int, tuple[Future, str]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._closing = False
        self._woken = False
        self._start_failures = 0
        self._error: Exception | None = None  # why the scheduler stopped, if it failed
        self._slots = [self._start_worker() for _ in range(self.n)]
        self._thread = threading.Thread(target=self._run, name="grading-pool", daemon=True)
        self._thread.start()

    # -- public
    def submit(self, response: str, gold: str) -> Future:
        """Queue one item; the Future resolves to its verdict (None on timeout/crash)."""
        fut: Future = Future()
        with self._lock:
            if self._error is not None:
                raise RuntimeError(f"GradingPool failed: {self._error}") from self._error
            if self._closing:
                raise RuntimeError("GradingPool is closed")
            key = self._next
            self._next += 1
            self._futures[key] = (fut, response[:200] if isinstance(response, str) else "")
            self._items[key] = (response, gold)
        self._pending.put(key)
        self._wake()
        return fut

    def _wake(self) -> None:
        with self._lock:
            if self._woken:
                return
            self._woken = True
        self._wake_w.send_bytes(b"x")

    def close(self) -> None:
        """Finish every submitted item, then stop the workers."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._woken = True
        self._wake_w.send_bytes(b"x")
        self._thread.join()
        for s in self._slots:
            self._stop_worker(s, graceful=True)

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- workers
    def _start_worker(self) -> _Slot:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child,), daemon=True, name="redi-grader")
        proc.start()
        child.close()
        self.stats.started += 1
        return _Slot(proc, parent)

    @staticmethod
    def _stop_worker(slot: _Slot, graceful: bool) -> None:
        if graceful:
            try:
                slot.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            slot.proc.join(timeout=2)
        if slot.proc.is_alive():
            slot.proc.kill()
            slot.proc.join()
        slot.conn.close()

    def _resolve(self, key: int, verdict: Verdict) -> None:
        with self._lock:
            fut, _ = self._futures.pop(key)
            self._items.pop(key, None)
        self.stats.done += 1
        fut.set_result(verdict)

    def _replace(self, i: int, reason: str) -> None:
        slot = self._slots[i]
        key = slot.inflight.popleft()
        self._retry.extend(slot.inflight)  # the rest of its chunk never ran: grade them elsewhere
        if reason == "timeout":
            self.stats.timeouts += 1
            if len(self.stats.timeout_examples) < 5:
                self.stats.timeout_examples.append(self._futures[key][1])
        else:
            self.stats.crashes += 1
        logger.warning("grading worker %s (pid %s) on item %s: killed and replaced", reason, slot.proc.pid, key)
        self._stop_worker(slot, graceful=False)
        self._slots[i] = self._start_worker()
        self._resolve(key, None)

    # -- scheduler thread
    def _dispatch(self) -> None:
        for slot in self._slots:
            if not slot.ready or len(slot.inflight) >= CHUNK // 2:
                continue
            keys = self._take(CHUNK - len(slot.inflight))
            if not keys:
                return
            if not slot.inflight:
                slot.deadline = time.monotonic() + self.timeout_s
            slot.inflight.extend(keys)
            with self._lock:
                chunk = [(k, *self._items[k]) for k in keys]
            slot.conn.send(chunk)

    def _take(self, n: int) -> list[int]:
        keys = []
        while len(keys) < n and self._retry:
            keys.append(self._retry.popleft())
        while len(keys) < n:
            try:
                keys.append(self._pending.get_nowait())
            except queue.Empty:
                break
        return keys

    def _busy(self) -> bool:
        return any(s.inflight for s in self._slots) or bool(self._retry) or not self._pending.empty()

    def _starting(self) -> list[_Slot]:
        return [s for s in self._slots if not s.ready]

    def _run(self) -> None:
        try:
            while True:
                self._dispatch()
                if self._closing and not self._busy():
                    return
                self._wait_once()
        except Exception as e:  # the scheduler must never leave futures hanging
            logger.error("grading pool failed: %s", e)
            with self._lock:
                self._error = e
                self._closing = True
                futs = list(self._futures.values())
                self._futures.clear()
            for fut, _ in futs:
                if not fut.done():
                    fut.set_exception(e)

    def _wait_once(self) -> None:
        busy = [s for s in self._slots if s.inflight]
        now = time.monotonic()
        starting = self._starting()
        late = [s for s in starting if now - s.started_at > START_TIMEOUT_S]
        if late:
            raise RuntimeError(
                f"grading workers did not start within {START_TIMEOUT_S:.0f} s. Workers re-import the main module: "
                "a script that grades (directly or through a pipeline stage) must guard its entry point with "
                "`if __name__ == '__main__':`; otherwise the machine is overloaded."
            )
        timeout = min([s.deadline - now for s in busy] + [s.started_at + START_TIMEOUT_S - now for s in starting],
                      default=None)
        handles = [self._wake_r] + [s.conn for s in busy + starting] + [s.proc.sentinel for s in busy + starting]
        # Never sleep unboundedly: even a missed wake-up costs at most IDLE_POLL_S, never a hang.
        ready = set(mp_wait(handles, timeout=IDLE_POLL_S if timeout is None else max(0.0, min(timeout, IDLE_POLL_S))))
        for i, s in enumerate(self._slots):
            if not s.ready and (s.conn in ready or s.proc.sentinel in ready):
                self._on_start(i)
        if self._wake_r in ready:
            # Drain first, then re-arm: re-arming before the drain could swallow the byte of a submit that
            # came in between and leave `_woken` set forever, so later submits would never wake an idle pool.
            while self._wake_r.poll():
                self._wake_r.recv_bytes()
            with self._lock:
                self._woken = False
        for i, s in enumerate(self._slots):
            if not s.inflight:
                continue
            if s.conn in ready or s.conn.poll():
                self._receive(i)
            elif s.proc.sentinel in ready or not s.proc.is_alive():
                self._replace(i, "crash")
            elif time.monotonic() >= s.deadline:
                self._replace(i, "timeout")

    def _on_start(self, i: int) -> None:
        """A starting worker said ready (or died while starting: start another; its items are unaffected)."""
        s = self._slots[i]
        try:
            s.conn.recv()
            s.ready = True
        except (EOFError, OSError):
            self._start_failures += 1
            if self._start_failures > 3 * self.n:
                raise RuntimeError("grading workers keep dying while starting (is math_verify importable?)") from None
            logger.warning("grading worker (pid %s) died while starting; starting another", s.proc.pid)
            self._stop_worker(s, graceful=False)
            self._slots[i] = self._start_worker()

    def _receive(self, i: int) -> None:
        s = self._slots[i]
        try:
            while s.inflight and s.conn.poll():
                key, verdict = s.conn.recv()
                s.inflight.popleft()
                s.deadline = time.monotonic() + self.timeout_s  # the next item's clock starts now
                self._resolve(key, verdict)
        except (EOFError, OSError):
            self._replace(i, "crash")


def grade_many(
    items: Sequence[tuple[str, str]],
    workers: int = 0,
    timeout_s: float = 5.0,
    progress: bool = True,
    desc: str = "grading",
    stats: dict | None = None,
) -> list[Verdict]:
    """Grade (response, gold) pairs in worker processes, order preserved; None = unjudgeable or timed out.

    `stats`, if given, is filled with the pool's counters (done, timeouts, crashes, workers started).
    """
    from tqdm.auto import tqdm

    items = list(items)
    if not items:
        return []
    n = min(workers or default_workers(), len(items))
    with GradingPool(n, timeout_s) as pool:
        futs = [pool.submit(r, g) for r, g in items]
        out = []
        for f in tqdm(futs, desc=desc, total=len(futs), disable=not progress, unit="item", mininterval=1.0):
            out.append(f.result())
    if stats is not None:
        stats.update(vars(pool.stats))
    if pool.stats.timeouts or pool.stats.crashes:
        logger.warning("%s: %d timeouts, %d worker crashes out of %d items", desc, pool.stats.timeouts, pool.stats.crashes, len(items))
    return out

"""Worker processes that run :func:`redi.grader.grade` under a hard per-item deadline enforced from outside.

Math-Verify's own timeouts use ``signal.alarm`` (main thread only), so the grader runs with them off
and this pool enforces the deadline instead: each worker publishes in shared memory which item it is
grading and since when (a "heartbeat", two doubles written per item, no message); the parent's
scheduler thread kills a worker whose current item is past ``timeout_s``, resolves exactly that
item to ``None`` and re-queues the rest of the worker's items to its replacement.

Throughput: the parent's per-item cost must stay far below one grading, or the parent, not the workers,
sets the pace on a small machine (docs/benchmarks/verify.md has the figures). So items travel in chunks
(slices of a batch, up to ``CHUNK_MAX`` per message, two queued per worker so a worker never waits
for the parent), results come back as one list per chunk (or every ``FLUSH_S`` on a slow chunk),
messages are sent by a feeder thread per worker (a full pipe never blocks the scheduler, which must
stay free to enforce deadlines), and the parent touches chunks, never single items. Workers fork warm
from a forkserver (``redi._gradewarm``). This module is the parent side (the pool, its scheduler thread,
the process's shared pool); what the scheduler moves (batches, segments, worker slots) is
:mod:`redi.gradebatch`; the loop each worker runs is :mod:`redi.gradeworker`.

Workers share their caches: what one worker parsed or graded reaches the others between items
(``redi.grader`` "Caches": results carry the worker's new entries, the scheduler forwards them, workers
read them between items), so N workers do about the work of one. ``benchmarks/bench_verify.py``
measures it (docs/benchmarks/verify.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from multiprocessing.connection import wait as mp_wait
from multiprocessing.reduction import ForkingPickler

from . import interrupt
from .gradebatch import STOP, Batch, PoolStats, Segment, WorkerSlot, feeder
from .grader import Verdict
from .gradeworker import FLUSH_S, POLL_S, SHARE_S, default_workers, start_context, warm, worker_main

__all__ = [
    "CHUNK_MAX", "CHUNK_MIN", "FLUSH_S", "IDLE_POLL_S", "POLL_S", "SHARE_S", "START_TIMEOUT_S", "GradingPool",
    "default_workers", "grade_many", "shared_pool", "warm",
]

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0
"""A worker that has not said ready by then means a blocked start (see _wait_once): fail, never hang."""
IDLE_POLL_S = 1.0
"""The scheduler re-checks its queue and its workers at least this often."""
CHUNK_MIN, CHUNK_MAX = 8, 512
"""Items per message to a worker: a quarter of the queue per worker within these bounds (big chunks when
much is queued: fewer messages; small ones on a short queue: every worker gets some). Two are queued
per worker."""


class GradingPool:
    """Worker processes grading (response, gold) items, each under a hard deadline enforced here.

    ``submit`` returns a Future resolved with True/False/None; ``map`` / ``map_async`` grade a batch
    (cheaper per item: the parent handles chunks, never single items). A worker whose current item
    overruns ``timeout_s`` is killed and replaced; that item resolves to None (``stats.timeouts``), the
    worker's other items are graded again by its replacement. A worker that dies on an item resolves
    that item to None (``stats.crashes``). Thread-safe; use as a context manager (``close`` waits for
    every queued item).

    ``tokenizer_json`` (a ``tokenizers`` tokenizer serialised as JSON): the workers also count each
    response's tokens (no special tokens, no truncation), and every result is ``(verdict, tokens)``;
    ``(None, None)`` for an item killed at its deadline. This is the verify stage's other per-trace work,
    done here so that it scales with the workers (and runs on the Dask cluster when verify fans out).
    """

    def __init__(self, workers: int = 0, timeout_s: float = 5.0, tokenizer_json: str | None = None):
        self.n = workers or default_workers()
        self.timeout_s = float(timeout_s)
        self.tokenizer_json = tokenizer_json
        self.stats = PoolStats()
        self._ctx = start_context()
        self._pending: deque = deque()  # Segment not yet sent
        self._retry: deque = deque()  # Segment of a killed worker, sent first
        self._queued = 0  # items in _pending + _retry
        self._next = 0
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._closing = False
        self._woken = False
        self._start_failures = 0
        self._unblamed = 0
        self._error: Exception | None = None  # why the scheduler stopped, if it failed
        self._batches: dict[int, Batch] = {}  # unfinished batches by k0
        self._slots = [self._start_worker() for _ in range(self.n)]
        self._thread = threading.Thread(target=self._run, name="grading-pool", daemon=True)
        self._thread.start()

    # -- public
    def submit(self, response: str, gold: str) -> Future:
        """Queue one item; the Future resolves to its verdict (None on timeout/crash)."""
        fut: Future = Future()
        self._enqueue(Batch([(response, gold)], future=fut))
        return fut

    def map_async(self, items: Iterable[tuple[str, str]]) -> Batch:
        """Queue a batch of (response, gold) items; the returned :class:`Batch` fills in input order.

        Items go out in input order: the workers share what they parse and grade (``redi.grader``,
        "Caches"), so equal answers need not meet in one worker and the parent spends no CPU sorting.
        """
        batch = Batch(list(items))
        if batch.items:
            self._enqueue(batch)
        return batch

    def map(self, items: Iterable[tuple[str, str]], progress: bool = False, desc: str = "grading") -> list[Verdict]:
        """Grade a batch and wait for it (with a progress bar: rate and ETA)."""
        batch = self.map_async(items)
        if progress and batch.left:
            from tqdm.auto import tqdm

            with tqdm(total=len(batch.out), desc=desc, unit="item", mininterval=1.0) as bar:
                while not batch.wait(0.5):
                    interrupt.check(desc)
                    bar.update(batch.done - bar.n)
                bar.update(batch.done - bar.n)
        return batch.result()

    def _enqueue(self, batch: Batch) -> None:
        with self._lock:
            if self._error is not None:
                raise RuntimeError(f"GradingPool failed: {self._error}") from self._error
            if self._closing:
                raise RuntimeError("GradingPool is closed")
            batch.k0 = self._next
            self._next += len(batch.items)
            self._batches[batch.k0] = batch
            self._pending.append(Segment(batch, 0, len(batch.items)))
            self._queued += len(batch.items)
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            if self._woken:
                return
            self._woken = True
        self._wake_w.send_bytes(b"x")

    def close(self) -> None:
        """Finish every queued item, then stop the workers."""
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
    def _start_worker(self) -> WorkerSlot:
        parent, child = self._ctx.Pipe(duplex=True)
        beat = self._ctx.RawArray("d", 2)
        proc = self._ctx.Process(target=worker_main, args=(child, beat, self.tokenizer_json, self.n > 1), daemon=True, name="redi-grader")
        proc.start()
        child.close()
        self.stats.started += 1
        slot = WorkerSlot(proc, parent, beat)
        slot.feeder = threading.Thread(target=feeder, args=(parent, slot.outq, slot.kick), daemon=True, name="grading-feeder")
        slot.feeder.start()
        return slot

    @staticmethod
    def _stop_worker(slot: WorkerSlot, graceful: bool) -> None:
        if graceful:
            slot.send(None)
            slot.proc.join(timeout=5)
        if slot.proc.is_alive():
            slot.proc.kill()
            slot.proc.join()
        slot.outq.clear()
        slot.send(STOP)
        slot.feeder.join(timeout=10)  # a send to a dead worker fails at once (EPIPE)
        slot.conn.close()

    def _put(self, seg: Segment, verdicts: list[Verdict]) -> None:
        """Verdicts for the first len(verdicts) positions of seg (which is advanced past them)."""
        batch = seg.batch
        batch.fill(seg.a, verdicts)
        seg.a += len(verdicts)
        self.stats.done += len(verdicts)
        if batch.left == 0:
            with self._lock:
                self._batches.pop(batch.k0, None)

    def _replace(self, i: int, reason: str) -> None:
        """Kill worker i. Its current item resolves to None (on a timeout only if it is really past its
        deadline: the heartbeat is read after the kill, when it can no longer move); its other items are
        graded again by the replacement, first in line."""
        slot = self._slots[i]
        self._stop_worker(slot, graceful=False)
        cur = slot.current()
        segs = list(slot.inflight)
        # the chunk holding the current item: usually the first, or the second when the first's results were
        # sent but not yet read
        j = next((j for j, s in enumerate(segs) if cur and s.batch.k0 + s.a <= cur[0] < s.batch.k0 + s.b), None)
        if j is not None and reason == "timeout" and time.monotonic() - cur[1] < self.timeout_s:
            j = None  # it had just moved on to a fresh item (a lost race): nobody to blame
        blamed, hit = (None, None) if j is None else (cur[0] - segs[j].batch.k0, segs[j])  # dispatch position in hit.batch
        if hit is not None:  # everything else the worker held is graded again (results it had not sent died with it)
            segs[j : j + 1] = [s for s in (Segment(hit.batch, hit.a, blamed), Segment(hit.batch, blamed + 1, hit.b)) if s.b > s.a]
        with self._lock:
            self._retry.extendleft(reversed(segs))
            self._queued += sum(s.b - s.a for s in segs)
        if blamed is None:
            self._unblamed += 1
            if self._unblamed > 10 * self.n:
                raise RuntimeError(f"grading workers keep dying outside any item ({reason})")
        elif reason == "timeout":
            self.stats.timeouts += 1
            if len(self.stats.timeout_examples) < 5:
                resp = hit.batch.items[blamed][0]
                self.stats.timeout_examples.append(resp[:200] if isinstance(resp, str) else repr(resp)[:200])
        else:
            self.stats.crashes += 1
        logger.warning("grading worker %s (pid %s) on item %s: killed and replaced", reason, slot.proc.pid,
                       None if blamed is None else hit.batch.k0 + blamed)
        self._slots[i] = self._start_worker()
        if blamed is not None:
            self._put(Segment(hit.batch, blamed, blamed + 1), [None if self.tokenizer_json is None else (None, None)])

    # -- scheduler thread
    def _dispatch(self) -> None:
        for slot in self._slots:
            while slot.ready and len(slot.inflight) < 2:
                seg = self._take(min(CHUNK_MAX, max(CHUNK_MIN, -(-self._queued // (4 * len(self._slots))))))
                if seg is None:
                    return
                slot.inflight.append(seg)
                slot.send((seg.batch.k0 + seg.a, seg.batch.items[seg.a : seg.b]))

    def _take(self, n: int) -> Segment | None:
        """Up to n consecutive items of the first queued segment (retries first)."""
        with self._lock:
            q = self._retry if self._retry else self._pending
            if not q:
                return None
            seg = q[0]
            if seg.b - seg.a <= n:
                out = q.popleft()  # off the queue: safe to hand out as it is
            else:
                out = Segment(seg.batch, seg.a, seg.a + n)
                seg.a += n
            self._queued -= out.b - out.a
            return out

    def _busy(self) -> bool:
        return any(s.inflight for s in self._slots) or self._queued > 0

    def _run(self) -> None:
        try:
            while True:
                self._dispatch()
                if self._closing and not self._busy():
                    return
                self._wait_once()
        except Exception as e:  # the scheduler must never leave callers waiting forever
            logger.error("grading pool failed: %s", e)
            with self._lock:
                self._error = e
                self._closing = True
                batches = list(self._batches.values())
                self._batches.clear()
            for b in batches:
                if not b.event.is_set():
                    b.error = e
                    b.finish()

    def _timeout(self, busy: list[WorkerSlot], starting: list[WorkerSlot], now: float) -> float:
        """How long the scheduler may sleep: until the nearest deadline, at most IDLE_POLL_S."""
        t = IDLE_POLL_S
        for s in busy:
            cur = s.current()
            # between items: the next one starts now at the earliest, so re-check within half a deadline
            t = min(t, cur[1] + self.timeout_s - now if cur is not None else self.timeout_s / 2)
        for s in starting:
            t = min(t, s.started_at + START_TIMEOUT_S - now)
        return max(0.0, t)

    def _wait_once(self) -> None:
        busy = [s for s in self._slots if s.inflight]
        starting = [s for s in self._slots if not s.ready]
        now = time.monotonic()
        if any(now - s.started_at > START_TIMEOUT_S for s in starting):
            raise RuntimeError(
                f"grading workers did not start within {START_TIMEOUT_S:.0f} s. Workers re-import the main module: "
                "a script that grades (directly or through a pipeline stage) must guard its entry point with "
                "`if __name__ == '__main__':`; otherwise the machine is overloaded."
            )
        handles = [self._wake_r] + [s.conn for s in busy + starting] + [s.proc.sentinel for s in busy + starting]
        ready = set(mp_wait(handles, timeout=self._timeout(busy, starting, now)))
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
        now = time.monotonic()
        for i, s in enumerate(self._slots):
            if not s.inflight:
                continue
            if s.conn in ready or s.conn.poll():
                self._receive(i)
            elif s.proc.sentinel in ready or not s.proc.is_alive():
                self._replace(i, "crash")
            else:
                cur = s.current()
                if cur is not None and now - cur[1] >= self.timeout_s:
                    self._replace(i, "timeout")

    def _on_start(self, i: int) -> None:
        """A starting worker said ready (or died while starting: start another; no item was sent to it)."""
        s = self._slots[i]
        try:
            s.conn.recv()
            s.ready = True
        except (EOFError, OSError):
            self._start_failures += 1
            if self._start_failures > 3 * self.n:
                raise RuntimeError("grading workers keep dying while starting: is math_verify importable, and does the main "
                                   "script guard its entry point with `if __name__ == '__main__':`?") from None
            logger.warning("grading worker (pid %s) died while starting; starting another", s.proc.pid)
            self._stop_worker(s, graceful=False)
            self._slots[i] = self._start_worker()

    def _receive(self, i: int) -> None:
        s = self._slots[i]
        try:
            while s.inflight and s.conn.poll():
                k, verdicts, fresh = s.conn.recv()
                if fresh:  # forward to the other workers at once (they read it between items)
                    others = [o for o in self._slots if o is not s and o.ready]
                    if others:
                        blob = bytes(ForkingPickler.dumps((None, fresh)))  # what Connection.send would send, pickled once
                        for other in others:
                            other.send(blob)
                        self.stats.shared += len(fresh) * len(others)
                while verdicts:
                    seg = s.inflight[0]
                    if seg.batch.k0 + seg.a != k:
                        raise RuntimeError(f"grading worker answered out of order (key {k})")
                    part, verdicts = verdicts[: seg.b - seg.a], verdicts[seg.b - seg.a :]
                    self._put(seg, part)
                    k += len(part)
                    if seg.a == seg.b:
                        s.inflight.popleft()
        except (EOFError, OSError):
            self._replace(i, "crash")


_shared: GradingPool | None = None
_shared_pid = 0
_shared_lock = threading.Lock()


def shared_pool(timeout_s: float) -> GradingPool:
    """The process's one-worker pool behind :func:`redi.grader.grade` (started on first use, closed at exit;
    replaced when another deadline is asked for or the pool failed; a forked child starts its own: the
    parent's scheduler thread does not exist there)."""
    global _shared, _shared_pid
    with _shared_lock:
        if _shared is not None and _shared_pid != os.getpid():
            _shared = None  # inherited through fork: not ours to close
        if _shared is None or _shared.timeout_s != float(timeout_s) or _shared._error is not None or _shared._closing:
            old, _shared, _shared_pid = _shared, GradingPool(1, timeout_s), os.getpid()
            if old is None:
                import atexit

                atexit.register(_close_shared)
            else:
                old.close()
        return _shared


def _close_shared() -> None:
    if _shared is not None and _shared_pid == os.getpid():
        _shared.close()


def grade_many(
    items: Sequence[tuple[str, str]],
    workers: int = 0,
    timeout_s: float = 5.0,
    progress: bool = True,
    desc: str = "grading",
    stats: dict | None = None,
    tokenizer_json: str | None = None,
) -> list:
    """Grade (response, gold) pairs in worker processes, order preserved; None = unjudgeable or timed out.

    `stats`, if given, is filled with the pool's counters (done, timeouts, crashes, workers started).
    `tokenizer_json`: results are ``(verdict, response tokens)`` (see :class:`GradingPool`).
    """
    items = list(items)
    if not items:
        return []
    n = min(workers or default_workers(), len(items))
    with GradingPool(n, timeout_s, tokenizer_json) as pool:
        out = pool.map(items, progress=progress, desc=desc)
    if stats is not None:
        stats.update(vars(pool.stats))
    if pool.stats.timeouts or pool.stats.crashes:
        logger.warning("%s: %d timeouts, %d worker crashes out of %d items", desc, pool.stats.timeouts, pool.stats.crashes, len(items))
    return out

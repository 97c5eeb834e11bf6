"""What :class:`redi.gradepool.GradingPool`'s scheduler moves around: batches (verdicts in input order),
segments of a batch (the chunks in flight), worker slots (pipe, heartbeat, feeder thread, chunks sent) and
the pool's counters. No scheduling decisions here; they are in :mod:`redi.gradepool`."""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from . import interrupt
from .grader import Verdict

__all__ = ["STOP", "Batch", "PoolStats", "Segment", "WorkerSlot", "feeder"]

STOP = object()
"""Queued last for a worker's feeder thread: it returns."""


def feeder(conn: Connection, q: deque, ready: threading.Event) -> None:
    """Send a worker's queued messages, in order, so that the scheduler never blocks on a full pipe."""
    while True:
        ready.wait()
        ready.clear()
        while q:
            msg = q.popleft()
            if msg is STOP:
                return
            try:
                if type(msg) is bytes:  # pickled once for several workers (forwarded cache entries)
                    conn.send_bytes(msg)
                else:
                    conn.send(msg)
            except (OSError, ValueError):  # worker gone: the scheduler notices through its sentinel
                return


class Batch:
    """Items queued together (:meth:`redi.gradepool.GradingPool.map_async`, or one ``submit``): verdicts in
    input order, filled as chunks come back. Items own the keys ``k0 .. k0 + n - 1``."""

    def __init__(self, items: list[tuple], future: Future | None = None):
        self.items = items
        self.out: list[Verdict] = [None] * len(items)
        self.left = len(items)
        self.k0 = -1
        self.future = future
        self.event = threading.Event()
        self.error: BaseException | None = None
        if not items:
            self.event.set()

    @property
    def done(self) -> int:
        return len(self.out) - self.left

    def wait(self, timeout: float | None = None) -> bool:
        return self.event.wait(timeout)

    def result(self) -> list[Verdict]:
        while not self.event.wait(0.5):
            interrupt.check("grading")
        if self.error is not None:
            raise RuntimeError(f"GradingPool failed: {self.error}") from self.error
        return self.out

    def fill(self, pos: int, verdicts: list[Verdict]) -> None:
        """Verdicts of positions pos, pos+1, ... (scheduler thread only)."""
        self.out[pos : pos + len(verdicts)] = verdicts
        self.left -= len(verdicts)
        if self.left == 0:
            self.finish()

    def finish(self) -> None:
        """Resolve the batch (its future, if any, with the first verdict or the error) and wake its waiters."""
        if self.future is not None:
            if self.error is not None:
                self.future.set_exception(self.error)
            else:
                self.future.set_result(self.out[0])
        self.event.set()


@dataclass
class Segment:
    """Consecutive dispatch positions [a, b) of one batch."""

    batch: Batch
    a: int
    b: int


@dataclass
class WorkerSlot:
    """One worker process: its pipe, heartbeat, feeder thread and the segments sent to it (in order)."""

    proc: Any
    conn: Any
    beat: Any
    outq: deque = field(default_factory=deque)
    kick: threading.Event = field(default_factory=threading.Event)
    feeder: threading.Thread | None = None
    inflight: deque = field(default_factory=deque)  # Segment per chunk sent, shrinking from the front as results come
    ready: bool = False
    started_at: float = field(default_factory=time.monotonic)

    def send(self, msg: Any) -> None:
        """Queue ``msg`` for the feeder thread (never blocks)."""
        self.outq.append(msg)
        self.kick.set()

    def current(self) -> tuple[int, float] | None:
        """(key, started) of the item being graded, or None between items (consistent read of the heartbeat)."""
        t = self.beat[1]
        if t == 0.0:
            return None
        key = int(self.beat[0])
        return (key, t) if self.beat[1] == t else None


@dataclass
class PoolStats:
    """Counters of a pool's life: graded items, deadline kills, worker crashes, workers started, cache entries shared."""

    done: int = 0
    timeouts: int = 0
    crashes: int = 0
    started: int = 0
    shared: int = 0  # cache entries forwarded from one worker to another (redi.grader "Caches")
    timeout_examples: list = field(default_factory=list)

"""Grading the verify stage's traces batch by batch: a local :class:`redi.gradepool.GradingPool`, or shards over a
Dask cluster (``executor="dask"``); both give the same labels. The same workers can count each trace's tokens."""

from __future__ import annotations

import os
import threading
from collections import Counter

from . import interrupt
from .config.verify import VerifyConfig

_shard_pool = None  # (pid, timeout_s, tokenizer_json, GradingPool): this process's pool for shards
_shard_lock = threading.Lock()


def _grade_shard(items: list[tuple[str, str]], timeout_s: float, tokenizer_json: str | None = None) -> tuple[list, dict]:
    """One shard on one machine (a Dask worker) -> (results, the pool's counters for this shard).

    The worker process keeps one 1-process GradingPool (hard deadlines) across shards: starting a pool per
    shard (a forked grader that loads the tokenizer) cost ~0.4 s per shard, which made the Dask path 3.5x
    the local pool on the same cores (docs/benchmarks/verify_dask.md). A new deadline or tokenizer (another
    run on the same cluster) replaces it; shards of one process go through it one at a time, so each
    shard's counters are exact.
    """
    global _shard_pool
    from .gradepool import GradingPool

    key = (os.getpid(), float(timeout_s), tokenizer_json)
    with _shard_lock:
        cur = _shard_pool
        if cur is None or cur[:3] != key or cur[3]._error is not None or cur[3]._closing:
            if cur is not None and cur[0] == key[0]:
                cur[3].close()
            elif cur is None:
                import atexit

                atexit.register(_close_shard_pool)
            _shard_pool = cur = (*key, GradingPool(1, timeout_s, tokenizer_json))
        pool = cur[3]
        before = {k: v for k, v in vars(pool.stats).items() if isinstance(v, int)}
        out = pool.map(items)
        stats = {k: v - before[k] for k, v in vars(pool.stats).items() if isinstance(v, int)}
    return out, stats


def _close_shard_pool() -> None:
    if _shard_pool is not None and _shard_pool[0] == os.getpid():
        _shard_pool[3].close()


def _dask_client(address: str | None):
    import dask
    from dask.distributed import Client, LocalCluster

    if address:
        return Client(address), None
    # Grading workers are child processes: dask's worker processes must not be daemonic.
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None)
    return Client(cluster), cluster


class Grader:
    """Labels (trace, gold) items batch by batch with redi.grader, in a local process pool or sharded over a
    Dask cluster (same labels). ``submit`` queues a batch and returns at once, so the next batch is read
    while this one is graded; ``result`` waits for it. With ``tokenizer_json`` the same workers also count
    each trace's tokens and results are ``(verdict, tokens)``. Use as a context manager."""

    def __init__(self, cfg: VerifyConfig, tokenizer_json: str | None = None):
        self.cfg = cfg
        self.stats: Counter = Counter()
        self._pool = self._client = self._cluster = None
        self._tok = tokenizer_json
        self._extra = 0  # items of count(): not traces
        if cfg.executor == "dask":
            self._client, self._cluster = _dask_client(cfg.dask_address)
            if tokenizer_json is not None:  # sent to every Dask worker once, not with every shard
                self._tok = self._client.scatter(tokenizer_json, broadcast=True)
        else:
            from .gradepool import GradingPool

            self._pool = GradingPool(cfg.workers, cfg.timeout_s, tokenizer_json)

    def submit(self, items: list[tuple[str, str]]):
        if self._pool is not None:
            return self._pool.map_async(items)
        shards = [items[i : i + self.cfg.shard_size] for i in range(0, len(items), self.cfg.shard_size)]
        return self._client.map(_grade_shard, shards, timeout_s=self.cfg.timeout_s, tokenizer_json=self._tok, pure=False)

    def count(self, texts: list[str]) -> list[int | None]:
        """Tokens of each text, counted by the workers (needs ``tokenizer_json``; None: killed at the deadline);
        these items are not counted in ``stats``."""
        from tqdm.auto import tqdm

        self._extra += len(texts)
        handle = self.submit([(t, None) for t in texts])  # no gold: nothing to grade
        if self._pool is not None:  # a local pool's Batch counts its items as they come back
            with tqdm(total=len(texts), desc="counting prompt tokens", unit="prompt", mininterval=1.0) as bar:
                while not handle.wait(0.5):
                    interrupt.check("counting prompt tokens")
                    bar.update(handle.done - bar.n)
                bar.update(handle.done - bar.n)
        return [n for _, n in self.result(handle)]

    def result(self, handle) -> list:
        if self._pool is not None:
            return handle.result()
        out = []
        for verdicts, st in (f.result() for f in handle):
            out += verdicts
            self.stats.update({k: v for k, v in st.items() if isinstance(v, int)})
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self.stats.update({k: v for k, v in vars(self._pool.stats).items() if isinstance(v, int)})
        self.stats["done"] -= self._extra
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

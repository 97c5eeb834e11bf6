"""A real Dask cluster on 127.0.0.1 for the tests and benchmarks: a ``dask scheduler`` and N ``dask worker``
processes (one thread each), started as on separate machines. Used by tests/test_verify.py and
benchmarks/bench_verify_dask.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def dask_cluster(tmp: Path, workers: int = 2) -> Iterator[str]:
    """Yield the scheduler's address once ``workers`` workers have joined (at most 120 s); stop them all on exit."""
    from dask.distributed import Client

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    addr = f"tcp://127.0.0.1:{port}"
    # grading forks its own time-limited processes: the worker processes must not be daemonic (as redi.tracegrader's LocalCluster)
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
                               str(port), "--dashboard-address", ":0", "--no-show"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for i in range(workers):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", addr, "--nthreads", "1",
                                           "--nworkers", "1", "--no-dashboard", "--local-directory", str(tmp / f"w{i}")],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 120
        while True:
            try:
                with Client(addr, timeout=5) as c:
                    c.wait_for_workers(workers, timeout=max(1, deadline - time.time()))
                break
            except (OSError, TimeoutError):
                if time.time() > deadline:
                    raise RuntimeError(f"the Dask cluster at {addr} did not come up with {workers} workers in 120 s") from None
                time.sleep(0.5)
        yield addr
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()

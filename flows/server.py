"""Prefect's temporary API server for a command run without ``PREFECT_API_URL``, in its own session.

Without an API URL Prefect starts a temporary server itself, but in the caller's process group: Ctrl-C in
a terminal (SIGINT to the whole group) or a batch scheduler's SIGTERM to the job stops that server at the
same moment as the run, and the interrupted flow then spends about a minute retrying to report its final
state to a server that is gone. Started here in a session of its own, the server outlives the run's
unwinding and is stopped at interpreter exit, after Prefect's own services have drained into it. Same
command, environment and database (``PREFECT_HOME``) as Prefect's own temporary server.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from redi.launch import free_port

log = logging.getLogger("prefect")


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


_SERVER: tuple[subprocess.Popen, str] | None = None


def temporary_server(startup_timeout_s: float | None = None) -> str:
    """The API URL of this process's temporary server, started on first use (and again if it died).

    One per process, like Prefect's own: it is stopped at interpreter exit, by a handler registered before
    any of Prefect's background services exist, so it runs after they have drained their last events and
    logs into it (``atexit`` runs handlers last-in, first-out)."""
    global _SERVER
    if _SERVER is not None and _SERVER[0].poll() is None:
        return _SERVER[1]
    import prefect
    from prefect.settings import get_current_settings

    if startup_timeout_s is None:
        startup_timeout_s = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120))
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
           "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
           "--lifespan", "on"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    atexit.register(_stop, proc, url)
    log.info("Starting temporary server on %s", url.removesuffix("/api"))
    t0 = time.time()
    while not _healthy(url):
        if proc.poll() is not None:
            raise RuntimeError(f"Prefect's temporary server exited (status {proc.returncode}) while starting: its "
                               "error is printed above; or set PREFECT_API_URL to a running server")
        if time.time() - t0 > startup_timeout_s:
            _stop(proc, url)
            raise RuntimeError(f"Prefect's temporary server did not answer within {startup_timeout_s:g} s: raise "
                               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or set PREFECT_API_URL to a running server")
        time.sleep(0.2)
    _SERVER = (proc, url)
    return url


def _stop(proc: subprocess.Popen, url: str) -> None:
    if proc.poll() is not None:
        return
    try:  # at interpreter exit: logging's handlers (Prefect's API handler, a closed capture) may be gone
        print(f"{time.strftime('%H:%M:%S')} INFO prefect: Stopping temporary server on {url.removesuffix('/api')}",
              file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def api(url: str) -> Iterator[None]:
    """Point this process's Prefect client at ``url`` for the block."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield

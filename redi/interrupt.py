"""Stopping a run on SIGTERM / Ctrl-C, whichever thread its stage runs in.

A signal's Python handler runs only in the main thread (and only once it is awake: flows wait through
:func:`get`). Under Prefect a stage runs in a task-runner thread, and while the
main thread unwinds (``KeyboardInterrupt``, or Prefect's ``TerminationSignal`` for SIGTERM and for a
cancellation from the UI), the task runner joins that thread: without help, an SFT interrupted at step 10
of 100,000 keeps training until its last step. So, once per process, :func:`begin`:

1. sets a process-wide flag (:func:`request_stop`) that every long loop of the library polls through
   :func:`check` (a training step, a generation batch, a wait on grading workers, vLLM engines or a
   launched training). The loop raises :class:`Stopped`, its stage unwinds through its ``finally`` blocks
   (workers and engines are shut down, the artifact's unpublished folder is left to the next build's
   clean-up, checkpoints already written stay usable), and the task-runner thread ends;
2. starts a daemon thread that, if the process is still alive ``REDI_STOP_GRACE_S`` seconds later (60 by
   default; a step that is itself minutes long, a C call that never returns), kills every child process
   and exits with the signal's status. No interrupted run outlives its deadline.

Who calls :func:`begin`: the CLI's signal handler, and :func:`on_interrupt` around every flow body, which
sees the exception the signal raised in the main thread. Prefect's own SIGTERM handler stays in place
(its cancellation protocol checks that it is installed). The library installs no signal handler.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

STOP = threading.Event()
GRACE_S = 60.0
_deadline_started = threading.Lock()
_deadline: threading.Thread | None = None
_begun = threading.Event()
F = TypeVar("F", bound=Callable[..., Any])


POLL_S = 0.2
"""Longest a main-thread wait of :func:`get` sleeps before a pending signal handler gets to run."""


def get(q: Any) -> Any:
    """``q.get()`` for the main thread, in waits of :data:`POLL_S`.

    The kernel hands a process-directed signal (``kill``, ``killpg``) to any thread that does not block it. If
    that is a worker thread, CPython only flags the handler for the main thread, which runs it when it next
    wakes: a main thread asleep in a plain ``q.get()`` sleeps through a SIGTERM until the next item arrives,
    which for a flow waiting on an SFT of 100,000 steps is the end of the training."""
    import queue

    while True:
        try:
            return q.get(timeout=POLL_S)
        except queue.Empty:
            continue


class Stopped(KeyboardInterrupt):
    """Raised by :func:`check` once a stop was requested (a ``KeyboardInterrupt``: no ``except Exception``
    retries or swallows it)."""


def request_stop() -> None:
    STOP.set()


def clear() -> None:
    """Forget an earlier request (a new command in the same process; a deadline already started stays)."""
    STOP.clear()
    _begun.clear()


def stopping() -> bool:
    return STOP.is_set()


def check(where: str) -> None:
    """Raise :class:`Stopped` if a stop was requested; ``where`` names the loop in its message."""
    if STOP.is_set():
        raise Stopped(f"stop requested: {where} stopped")


def end_processes(procs: list, grace: float = 0.0) -> None:
    """End psutil processes: SIGTERM and ``grace`` seconds to exit (when grace > 0), then SIGKILL."""
    import psutil

    for sig_first in ((True, False) if grace > 0 else (False,)):
        for p in procs:
            try:
                p.terminate() if sig_first else p.kill()
            except psutil.Error:
                pass
        _, procs = psutil.wait_procs(procs, timeout=grace if sig_first else 5)


def kill_children() -> None:
    """SIGKILL every descendant of this process (a Prefect server, grading workers, vLLM engines, a launch)."""
    import psutil

    try:
        end_processes(psutil.Process().children(recursive=True))
    except psutil.Error:
        return


def start_deadline(grace: float, status: int) -> None:
    """Once per process: after ``grace`` seconds, kill the children and ``os._exit(status)``."""
    global _deadline
    with _deadline_started:
        if _deadline is not None:
            return

        def expire() -> None:
            threading.Event().wait(grace)
            say(f"redi: the run did not stop within {grace:g} s of the interrupt; killing its processes")
            kill_children()
            os._exit(status)

        _deadline = threading.Thread(target=expire, name="redi-stop-deadline", daemon=True)
        _deadline.start()


def grace_s() -> float:
    return float(os.environ.get("REDI_STOP_GRACE_S", GRACE_S))


def status_of(exc: BaseException) -> int:
    """Exit status for an interrupt: 128 + the signal (SIGTERM: 143; Ctrl-C and anything else: 130)."""
    sig = getattr(exc, "signal", None)  # Prefect's TerminationSignal carries it
    if sig == signal.SIGTERM or "SIGTERM" in str(exc):
        return 128 + signal.SIGTERM
    return 128 + signal.SIGINT


def begin(status: int) -> bool:
    """Stop every stage thread and bound the wait (once per process; later calls return False)."""
    if _begun.is_set():
        return False
    _begun.set()
    request_stop()
    grace = grace_s()
    start_deadline(grace, status)
    say(f"redi: stopping ({'SIGTERM' if status == 143 else 'interrupt'}): the running stage stops at its next step; "
        f"forced in {grace:g} s")
    return True


def say(line: str) -> None:
    """One line on stderr, safe inside a signal handler: ``os.write`` takes no lock of ``sys.stderr``'s
    buffer, which the interrupted code may hold (``print`` would raise a reentrant-call error there)."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


@contextmanager
def on_interrupt() -> Iterator[None]:
    """Around a flow body (main thread): a ``KeyboardInterrupt``, ``SystemExit`` or Prefect
    ``TerminationSignal`` unwinding through it first stops the stage threads (:func:`begin`)."""
    try:
        yield
    except (Exception, GeneratorExit):
        raise
    except BaseException as e:
        begin(status_of(e))
        raise


def stoppable(fn: F) -> F:
    """Decorator form of :func:`on_interrupt` (under ``@flow``; keeps the signature Prefect reads)."""
    import inspect
    import typing

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with on_interrupt():
            return fn(*args, **kwargs)
    # Prefect evaluates string annotations in the wrapper's module: give it fn's, resolved in fn's module
    hints = typing.get_type_hints(fn, include_extras=True)
    sig = inspect.signature(fn)
    wrapper.__annotations__ = hints
    wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()],
        return_annotation=hints.get("return", sig.return_annotation))
    return wrapper  # type: ignore[return-value]

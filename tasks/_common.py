"""What every stage task shares: the Pipeline scoped to one stage, and what the UI shows while it runs.

``run_stage`` is the body of every stage task. While the task runs:
  * the library's log lines (``redi.*``: stage start, cache hit or built, summaries) and vLLM's go to
    the task run's logs in the Prefect UI, from any thread of the process;
  * every tqdm progress bar of the library also logs a line every ``PROGRESS_STEP`` percent;
  * the task run is named from a cache check when it starts (``stage_run_name``): ``sft [cache hit]`` or
    ``sft [building]``, then ``sft [built 12.3 s]`` when it completes, so cache hits are visible per
    task while the run goes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

from redi.artifacts import Artifact
from redi.config import Recipe
from redi.pipeline import Pipeline

FORWARDED_LOGGERS = ("redi", "vllm")
PROGRESS_LOGGER = "redi.progress"
PROGRESS_STEP = 5  # percent between progress log lines
PROGRESS_EVERY_S = 30.0  # bars without a total: a line this often
_ARTIFACT_FIELDS = {f.name for f in fields(Artifact)}


_NETWORK_MODULES = ("requests", "urllib3", "httpx", "httpcore", "aiohttp", "fsspec", "huggingface_hub")
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def is_network_error(e: BaseException) -> bool:
    """A connection failure, time-out or HTTP 408/429/5xx, here or in the chain of causes: what a retry can fix.

    A user error (a ``DataError``, ``RecipeError``, a full disk, a 404, ...) is not one, even when raised
    while handling one: the chain is followed only through errors that are not themselves the user's."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == "OfflineModeIsEnabled":  # a ConnectionError, but HF_HUB_OFFLINE=1 stays set
            return False
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None:
            return status in _RETRY_STATUS
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in ("gaierror", "ConnectTimeout", "ReadTimeout"):
            return True
        if type(e).__module__.split(".")[0] in _NETWORK_MODULES and type(e).__name__.endswith(
                ("ConnectionError", "Timeout", "TimeoutError", "ProtocolError", "TransportError", "NetworkError")):
            return True
        if _is_user_error(e):
            return False
        e = e.__cause__ or e.__context__
    return False


def _is_user_error(e: BaseException) -> bool:
    from redi.cli import user_error  # the CLI's one-line errors: bad data, recipe, paths, disk, ...

    return isinstance(e, (ValueError, KeyError)) or user_error(e) is not None


def retry_on_network_errors(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn`` of the tasks with retries: retry only a network error (bad data,
    a bad recipe, a full disk or any other user error fails at once: a retry would fail the same way)."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_network_error(exc)


def pipeline_for(recipe: dict[str, Any], stage: str) -> Pipeline:
    """A Pipeline whose ``run.refresh`` keeps only ``stage``.

    Each task builds its own Pipeline, and some stages look up their upstream internally (evaluate
    reads the download artifact's held-out splits). A refresh of ``download`` must rebuild download
    once, in the download task, not again inside every evaluate task; keys do not depend on
    ``run.refresh``, so scoping it changes nothing else.
    """
    r = Recipe.model_validate(recipe)
    r.run.refresh = [s for s in r.run.refresh if s == stage]
    return Pipeline(r)


def art(d: dict[str, Any] | None) -> Artifact | None:
    """The Artifact of a task's artifact dict (extra keys such as ``run_seconds`` are dropped)."""
    return Artifact.from_dict({k: v for k, v in d.items() if k in _ARTIFACT_FIELDS}) if d is not None else None


def run_stage(recipe: dict[str, Any], stage: str, call: Callable[[Pipeline], Any],
              nodes: list[tuple[str, str | None]] | None = None) -> dict[str, dict[str, Any]]:
    """Run ``call(pipeline)`` for ``stage`` with the UI feedback above; return {node name: artifact dict}.

    ``nodes`` are the DAG nodes this task produces (default: the stage itself), e.g. evaluate[base]
    and grade[base]. Each artifact dict gains ``run_seconds``: the time this run spent on the node
    (building it, or validating the cached copy).
    """
    nodes = nodes or [(stage, None)]
    pipe = pipeline_for(recipe, stage)
    with run_logs():
        _check_cache(pipe, nodes)  # logs "cache hit" / "not cached, building" before any work
        t0 = time.time()
        call(pipe)
        out = {}
        for name in (f"{s}[{lab}]" if lab else s for s, lab in nodes):
            out[name] = pipe.nodes[name].to_dict() | {"run_seconds": round(pipe.timings[name], 2)}
        if not all(a["cached"] for a in out.values()):
            _rename(f"built {time.time() - t0:.1f} s")
    return out


def stage_run_name(stage: str) -> Callable[..., str]:
    """A ``task_run_name`` callable: ``sft [cache hit]`` or ``sft [building]``, decided from the task's parameters
    when the task run starts (before it shows as Running), so cache hits are visible while the flow goes."""
    def name(parameters: dict[str, Any]) -> str:
        label = parameters.get("label")
        title = f"{stage}[{label}]" if label else stage
        try:
            pipe = pipeline_for(parameters["recipe"], stage)
            nodes = [("evaluate", label), ("grade", label)] if stage == "evaluate" else [(stage, None)]
            hit = all(pipe.store.lookup(s, pipe.key(s, lab)) is not None and not pipe.refreshing(s) for s, lab in nodes)
        except Exception:  # the name is feedback only; the task itself reports any real problem
            return title
        return f"{title} [{'cache hit' if hit else 'building'}]"
    return name


def _check_cache(pipe: Pipeline, nodes: list[tuple[str, str | None]]) -> dict[str, bool]:
    """Look each node up before any work (validates checksums once; the build's own lookup reuses that)."""
    log = logging.getLogger("redi.tasks")
    out = {}
    for stage, label in nodes:
        name = f"{stage}[{label}]" if label else stage
        key = pipe.key(stage, label)
        refresh = pipe.refreshing(stage)
        hit = pipe.store.lookup(stage, key) is not None and not refresh
        out[name] = hit
        if not hit:  # a hit is logged by the library a moment later; a build only when it ends
            log.info("%s: %s (key %s, %s)", name, "refresh requested, rebuilding" if refresh else "not cached, building",
                     key, pipe.store.dir(stage, key))
    return out


def _rename(status: str) -> None:
    """Replace the ``[...]`` status of the current task run's name; the server takes it with the next state."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is not None:
        ctx.task_run.name = ctx.task_run.name.split(" [")[0] + f" [{status}]"


# ------------------------------------------------------------------------------------------ logs
@contextmanager
def run_logs() -> Iterator[None]:
    """Send the library's log records (and tqdm progress as log lines) to the current Prefect run's logs."""
    from prefect.context import FlowRunContext, TaskRunContext

    tctx, fctx = TaskRunContext.get(), FlowRunContext.get()
    flow_run_id = tctx.task_run.flow_run_id if tctx else fctx.flow_run.id if fctx and fctx.flow_run else None
    if flow_run_id is None:  # not in a run (task.fn called directly): nothing to forward to
        yield
        return
    task_run_id = tctx.task_run.id if tctx else None
    handler = _run_handler(flow_run_id, task_run_id)
    me = threading.get_ident()
    with _SHARED:  # nodes run side by side in threads: the first one in sets the levels, the last one out restores
        _TASK_THREADS[me] = task_run_id
        if not _SAVED:
            for name in (*FORWARDED_LOGGERS, PROGRESS_LOGGER):
                lg = logging.getLogger(name)
                _SAVED.append((lg, lg.level, lg.propagate))
                if name.startswith("redi") and lg.getEffectiveLevel() > logging.INFO:  # a flow-run process starts with
                    lg.setLevel(logging.INFO)  # the root at WARNING; vLLM keeps its own level (VLLM_LOGGING_LEVEL)
            # progress lines go to the run's logs only: the terminal already draws the bar
            logging.getLogger(PROGRESS_LOGGER).propagate = False
        _SAVED_USERS.add(me)
        for name in (*FORWARDED_LOGGERS, PROGRESS_LOGGER):
            logging.getLogger(name).addHandler(handler)
    try:
        with progress_as_logs():
            yield
    finally:
        with _SHARED:
            for name in (*FORWARDED_LOGGERS, PROGRESS_LOGGER):
                logging.getLogger(name).removeHandler(handler)
            _TASK_THREADS.pop(me, None)
            _SAVED_USERS.discard(me)
            if not _SAVED_USERS:
                for lg, level, propagate in _SAVED:
                    lg.setLevel(level)
                    lg.propagate = propagate
                _SAVED.clear()


_SHARED = threading.RLock()
_TASK_THREADS: dict[int, Any] = {}
"""Thread id -> task run id of every stage task running in this process (records from a task's own thread go
to that task's run only; records from other threads, e.g. a library worker thread, go to every running task)."""
_SAVED: list[tuple[logging.Logger, int, bool]] = []
_SAVED_USERS: set[int] = set()
_BARS: list[Any] = []  # [tqdm class before the swap, tasks inside progress_as_logs]


def _run_handler(flow_run_id: Any, task_run_id: Any) -> logging.Handler:
    """Prefect's API log handler, bound to one flow/task run so records from any thread reach it."""
    from prefect.logging.handlers import APILogHandler

    class RunHandler(APILogHandler):
        def emit(self, record: logging.LogRecord) -> None:
            owner = _TASK_THREADS.get(record.thread)
            if owner is not None and owner != task_run_id:  # another running stage task's line
                return
            record.flow_run_id = flow_run_id
            if task_run_id is not None:
                record.task_run_id = task_run_id
            super().emit(record)

    h = RunHandler()
    h.setLevel(logging.INFO)
    return h


@contextmanager
def progress_as_logs(step: int = PROGRESS_STEP) -> Iterator[None]:
    """While active, every ``tqdm.auto.tqdm`` bar also logs ``desc: 35% (700/2000 sample, 12.3/s, ETA 0:57)``
    to ``redi.progress`` each time it crosses a multiple of ``step`` percent (the bar itself still draws).

    The library imports ``tqdm.auto.tqdm`` inside the functions that draw bars, so swapping the module
    attribute here reaches them. Tasks running side by side share one swap: the first one in swaps, the last one
    out restores.
    """
    import tqdm.auto as tqdm_auto

    with _SHARED:
        if _BARS:
            _BARS[1] += 1
            installed = True
        else:
            installed = False
            base = tqdm_auto.tqdm
            _BARS[:] = [base, 1]
    def leave() -> None:  # the last task out restores the original class
        with _SHARED:
            _BARS[1] -= 1
            if not _BARS[1]:
                tqdm_auto.tqdm = _BARS[0]
                _BARS.clear()

    if installed:
        try:
            yield
        finally:
            leave()
        return
    log = logging.getLogger(PROGRESS_LOGGER)

    class LoggedBar(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._next_pct, self._next_t = step, time.time() + PROGRESS_EVERY_S
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            self._maybe_log()
            return out

        def close(self) -> None:
            if self.total and self.n >= self.total and self._next_pct <= 100:  # 100% not logged yet
                self._next_pct = 0
                self._maybe_log()
            super().close()

        def _maybe_log(self) -> None:
            if self.disable:
                return
            if self.total:
                pct = 100.0 * self.n / self.total
                if pct < self._next_pct:
                    return
                self._next_pct = (int(pct) // step + 1) * step
            elif time.time() < self._next_t:
                return
            self._next_t = time.time() + PROGRESS_EVERY_S
            d = self.format_dict
            rate = d.get("rate") or (self.n / d["elapsed"] if d.get("elapsed") else None)
            unit = d.get("unit") or "it"
            parts = [f"{self.n:,.0f}/{self.total:,.0f} {unit}" if self.total else f"{self.n:,.0f} {unit}"]
            if rate:
                parts.append(f"{rate:,.1f} {unit}/s")
                if self.total and self.n < self.total:
                    parts.append(f"ETA {self.format_interval((self.total - self.n) / rate)}")
            head = f"{self.desc or 'progress'}: " + (f"{100.0 * self.n / self.total:.0f}% " if self.total else "")
            log.info("%s(%s)", head, ", ".join(parts))

    with _SHARED:
        tqdm_auto.tqdm = LoggedBar
    try:
        yield
    finally:
        leave()

"""Experiment tracking: ``run.report_to`` sends a run to TensorBoard, MLflow, Weights & Biases and/or Trackio.

One tracker run per DAG node (``sft``, ``redi``, ``evaluate[sft]``, ``grade[sft]``, ... and ``report``), all in
one experiment / project named ``run.name``. What each gets:

- the resolved recipe: flattened params (``sft.lr``) and ``recipe.yaml`` as a text / artifact;
- tags: ``redi.node``, ``redi.key`` (the node's artifact key), ``redi.artifact_path``;
- training nodes (sft, redi): every field of ``signals.jsonl`` per optimiser step as ``train/<signal>``
  (``redi.train`` calls :func:`log_signals` on rank 0; :func:`log_metrics` is the same door for other callers);
- grade nodes: ``eval/<benchmark>/<metric>`` from metrics.json (``average`` is a benchmark there);
- the report: ``eval/<model>/<benchmark>/<metric>`` for every model, and the key of every node as a tag;
- every node: ``stage/seconds``, ``stage/cached`` and the numbers of its summary as ``summary/...``.

A tracker run is identified by (tracking dir, run.name, node, artifact key): a node rebuilt with the same key
(a resumed training, the ``accelerate launch`` child process, a refresh) logs into the same tracker run,
and a cached node that this tracking dir has not logged yet is logged from its artifact (signals.jsonl
replayed, metrics.json read): turning tracking on over a cached run fills the trackers without retraining.
A marker file per backend and node (``<dir>/.logged/``) says what was logged.

Where each library writes (offline by default): :mod:`redi.tracking_backends`.

Writes happen on one background thread per tracker run, in batches at most every ``interval`` seconds: the
training thread pays one queue put per step (``benchmarks/bench_tracking.py``). A backend that fails while
logging is reported once (warning) and dropped; training goes on.

Departure from the anchors: TRL / open-r1 log through ``transformers``' callbacks or accelerate's trackers
inside the trainer only; here every DAG node logs through this one module, training and evaluation alike.
"""

from __future__ import annotations

import contextvars
import importlib.util
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .tracking_backends import BACKEND_CLASSES, Backend, RunSpec

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = tuple(BACKEND_CLASSES)
"""The values of ``run.report_to``."""


class TrackingError(RuntimeError):
    """A tracking backend cannot be used (library not installed); the message names the extra to install."""


def check_installed(report_to: list[str] | tuple[str, ...]) -> None:
    """Raise :class:`TrackingError` (one line) for the first backend of ``report_to`` whose library is missing.

    Only looks the module up (no import): cheap enough for recipe validation."""
    for name in report_to:
        module, extra = BACKEND_CLASSES[name].requires
        if importlib.util.find_spec(module) is None:
            raise TrackingError(f"run.report_to has {name!r} but the {module!r} package is not installed: "
                                f"pip install 'redi-pipeline[{extra}]' (or remove {name} from run.report_to)")


# ------------------------------------------------------------------------------------------ what is logged


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"sft": {"lr": 1e-5}}`` -> ``{"sft.lr": 1e-5}``; lists are kept as values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of ``values`` as floats (bools as 0/1); None, strings and lists are left out."""
    out = {}
    for k, v in values.items():
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def signal_metrics(record: dict[str, Any]) -> dict[str, float]:
    """One ``signals.jsonl`` record as tracker metrics: ``train/<field>`` for every numeric field but ``step``."""
    return {f"train/{k}": v for k, v in numbers(record).items() if k != "step"}


def eval_metrics(metrics: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """metrics.json (``redi.evaluate``) as ``<prefix>/<benchmark>/<metric>``; the macro average is ``average``."""
    per = dict(metrics.get("benchmarks", {}))
    if metrics.get("average"):
        per["average"] = metrics["average"]
    return {f"{prefix}/{bench}/{k}": v for bench, m in per.items() for k, v in numbers(m).items()}


def curve_metrics(rows: list[dict[str, Any]], metrics: tuple[str, ...] = ("pass@1", "mean_completion_tokens"),
                  ) -> list[tuple[dict[str, float], int]]:
    """A ``curves.json`` (``redi.curves``) as ``curves/<stage>/<benchmark>/<metric>`` at each point's step."""
    out = []
    for stage, step in dict.fromkeys((r["stage"], r["step"]) for r in rows):
        out.append(({f"curves/{stage}/{r['benchmark']}/{m}": float(r[m]) for r in rows
                     if (r["stage"], r["step"]) == (stage, step) for m in metrics if r.get(m) is not None}, step))
    return out


def summary_metrics(summary: dict[str, Any], limit: int = 200) -> dict[str, float]:
    """The numbers of a stage summary, two levels deep, as ``summary/<a>/<b>`` (at most ``limit``)."""
    flat: dict[str, Any] = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            flat.update({f"summary/{k}/{k2}": v2 for k2, v2 in v.items() if not isinstance(v2, dict)})
        else:
            flat[f"summary/{k}"] = v
    return dict(list(numbers(flat).items())[:limit])


# ------------------------------------------------------------------------------------------ one node's run


class Tracker:
    """The tracker run of one node on every backend of ``report_to``, written from a background thread.

    Nothing is opened until something is logged: a cached node that is already logged costs nothing.
    ``log_metrics`` / ``set_tags`` queue; ``close`` writes what is queued and closes every backend."""

    def __init__(self, report_to: list[str], spec: RunSpec, params: dict[str, Any], recipe_yaml: str,
                 interval: float = 10.0):
        self.report_to, self.spec, self.params, self.recipe_yaml = list(report_to), spec, params, recipe_yaml
        self.interval = interval
        self.errors: list[str] = []
        self.cpu_s = {"open": 0.0, "write": 0.0}  # CPU seconds of the writer thread (benchmarks/bench_tracking.py)
        self._q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def pending(self) -> list[str]:
        """Backends that have not logged this node yet (no marker)."""
        return [b for b in self.report_to if not self._marker(b).exists()]

    def _marker(self, backend: str) -> Path:
        return self.spec.directory / ".logged" / backend / self.spec.experiment / f"{self.spec.node}@{self.spec.key}"

    def _put(self, item: tuple) -> None:
        with self._lock:
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._work, name=f"redi-tracking-{self.spec.node}", daemon=True)
                self._thread.start()
        self._q.put(item)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``{name: value}`` at ``step`` (non-numeric values are dropped)."""
        clean = numbers(metrics)
        if clean:
            self._put(("metrics", clean, int(step)))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put(("tags", {k: str(v) for k, v in tags.items()}))

    def close(self, failed: bool = False) -> None:
        """Write everything queued, close the backends; marks the node logged when it did not fail."""
        self._failed = failed
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    # -------------------------------------------------------------- the writer thread
    def _open(self) -> list[Backend]:
        self.spec.directory.mkdir(parents=True, exist_ok=True)
        opened = []
        for name in self.report_to:
            try:
                b = BACKEND_CLASSES[name](self.spec)
                if b.new:
                    b.log_params(self.params, self.recipe_yaml)
                opened.append(b)
            except Exception as e:  # noqa: BLE001 - tracking must never stop the stage
                self._error(name, "open", e)
        return opened

    def _error(self, name: str, what: str, e: Exception) -> None:
        msg = f"tracking: {name} could not {what} the run {self.spec.node!r} ({type(e).__name__}: {e}); it logs nothing more"
        self.errors.append(msg)
        log.warning(msg)

    def _work(self) -> None:
        t0 = time.thread_time()
        backends = self._open()
        self.cpu_s["open"] = time.thread_time() - t0
        while True:
            stop = self._stop.wait(self.interval)
            items = []
            while True:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            backends = self._dispatch(backends, items)
            if stop and self._q.empty():
                break
        for b in backends:
            try:
                b.close(self._failed)
                if not self._failed:
                    self._marker(b.name).parent.mkdir(parents=True, exist_ok=True)
                    self._marker(b.name).write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            except Exception as e:  # noqa: BLE001
                self._error(b.name, "close", e)
        self.cpu_s["write"] = time.thread_time() - t0 - self.cpu_s["open"]

    def _dispatch(self, backends: list[Backend], items: list[tuple]) -> list[Backend]:
        """Send queued items in order; consecutive metric steps go as one batch."""
        groups: list[tuple[str, Any]] = []
        for item in items:
            if item[0] == "metrics":
                if groups and groups[-1][0] == "metrics":
                    groups[-1][1].append((item[1], item[2]))
                else:
                    groups.append(("metrics", [(item[1], item[2])]))
            else:
                groups.append(("tags", item[1]))
        alive = []
        for b in backends:
            try:
                for kind, payload in groups:
                    b.log_metrics(payload) if kind == "metrics" else b.set_tags(payload)
                alive.append(b)
            except Exception as e:  # noqa: BLE001
                self._error(b.name, "log to", e)
        return alive


# ------------------------------------------------------------------------------------------ the active run

_ACTIVE: contextvars.ContextVar[Tracker | None] = contextvars.ContextVar("redi_tracker", default=None)
ENV = "REDI_TRACKING"
"""Environment variable that hands a node's tracker run to the ``accelerate launch -m redi.train`` child."""


def active() -> Tracker | None:
    """The tracker run of the node being built in this thread (None when tracking is off)."""
    return _ACTIVE.get()


@contextmanager
def activate(tracker: Tracker | None) -> Iterator[Tracker | None]:
    token = _ACTIVE.set(tracker)
    try:
        yield tracker
    finally:
        _ACTIVE.reset(token)


def log_metrics(metrics: dict[str, Any], step: int) -> None:
    """Log ``{name: number}`` at ``step`` to the active node's tracker run; nothing when tracking is off."""
    t = _ACTIVE.get()
    if t is not None:
        t.log_metrics(metrics, step)


def log_signals(record: dict[str, Any]) -> None:
    """One training step's signal record (the ``signals.jsonl`` line) as ``train/<signal>`` at its step."""
    t = _ACTIVE.get()
    if t is not None:
        t.log_metrics(signal_metrics(record), record["step"])


def child_env() -> dict[str, str]:
    """Environment for a child process that trains the active node (``run.launcher: accelerate``)."""
    t = _ACTIVE.get()
    if t is None:
        return {}
    return {ENV: json.dumps({"report_to": t.report_to, "spec": t.spec.to_json(), "params": t.params,
                             "recipe_yaml": t.recipe_yaml})}


def from_env() -> Tracker | None:
    """The tracker run handed over by :func:`child_env` (rank 0 of the child only; None elsewhere)."""
    raw = os.environ.get(ENV)
    if not raw or int(os.environ.get("RANK", "0")) != 0:
        return None
    d = json.loads(raw)
    return Tracker(d["report_to"], RunSpec.from_json(d["spec"]), d["params"], d["recipe_yaml"])


# ------------------------------------------------------------------------------------------ a run's tracking


class Tracking:
    """The tracking of one recipe: which backends, where, under which experiment; opens one Tracker per node."""

    def __init__(self, report_to: list[str], directory: Path, experiment: str, params: dict[str, Any],
                 recipe_yaml: str, offline: bool = True):
        check_installed(report_to)
        self.report_to, self.directory, self.experiment = list(report_to), Path(directory), experiment
        self.params, self.recipe_yaml, self.offline = params, recipe_yaml, offline

    @classmethod
    def from_recipe(cls, recipe: Any, run_dir: Path) -> Tracking | None:
        """None when ``run.report_to`` is empty or this is not rank 0 of a launch."""
        from . import distributed
        from .config import recipe_to_yaml

        run = recipe.run
        if not run.report_to or not distributed.is_main():
            return None
        directory = Path(run.tracking_dir).expanduser() if run.tracking_dir else Path(run_dir) / "tracking"
        return cls(run.report_to, directory, run.name, flatten(recipe.model_dump(mode="json")), recipe_to_yaml(recipe),
                   offline=run.offline)

    def tracker(self, node: str, key: str, interval: float = 10.0) -> Tracker:
        spec = RunSpec(self.directory, self.experiment, node, key, self.offline)
        return Tracker(self.report_to, spec, self.params, self.recipe_yaml, interval)

    def finish_node(self, tracker: Tracker, artifact: Any, seconds: float) -> None:
        """After a node's build: log its key, time and summary; for a cached node not logged by every backend
        yet, what it logged when built (signals.jsonl, metrics.json) is read from the artifact; then close."""
        pending = tracker.pending()
        if not tracker.started:
            if artifact.cached and not pending:
                return
            tracker.report_to = pending if artifact.cached else tracker.report_to
            if artifact.cached:
                replay(tracker, artifact)
        if artifact.stage == "grade" and not artifact.cached:
            metrics_file = Path(artifact.path) / "metrics.json"
            if metrics_file.exists():
                tracker.log_metrics(eval_metrics(json.loads(metrics_file.read_text())), 0)
        tracker.set_tags({"redi.node": tracker.spec.node, "redi.key": artifact.key, "redi.artifact_path": artifact.path})
        tracker.log_metrics({"stage/seconds": seconds, "stage/cached": artifact.cached,
                             **summary_metrics(artifact.summary)}, 0)
        tracker.close()


    def log_report(self, key: str, metrics: dict[str, dict], node_keys: dict[str, str], table_markdown: str) -> None:
        """The report's tracker run (once per report content ``key``): ``eval/<model>/<benchmark>/<metric>`` for
        every model's metrics.json, the key of every node as ``key/<node>``, the results table as ``results.md``."""
        tracker = self.tracker("report", key)
        tracker.report_to = tracker.pending()
        if not tracker.report_to:
            return
        for model, m in metrics.items():
            tracker.log_metrics(eval_metrics(m, f"eval/{model}"), 0)
        tracker.set_tags({"redi.node": "report", "redi.key": key, **{f"key/{n}": k for n, k in node_keys.items()},
                          "results.md": table_markdown})
        tracker.close()


def replay(tracker: Tracker, artifact: Any) -> None:
    """What a node logged when it was built, read back from its artifact (a cached node logged late)."""
    folder = Path(artifact.path)
    if (folder / "signals.jsonl").exists():
        for line in (folder / "signals.jsonl").read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                tracker.log_metrics(signal_metrics(rec), rec["step"])
    if artifact.stage == "grade" and (folder / "metrics.json").exists():
        tracker.log_metrics(eval_metrics(json.loads((folder / "metrics.json").read_text())), 0)
    if artifact.stage == "curves" and (folder / "curves.json").exists():
        for metrics, step in curve_metrics(json.loads((folder / "curves.json").read_text())):
            tracker.log_metrics(metrics, step)

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

Offline by default: MLflow writes an SQLite store (``<dir>/mlflow.db``, artifacts in ``<dir>/mlartifacts``;
``MLFLOW_TRACKING_URI`` overrides it; MLflow 3's plain-folder store refuses to start), TensorBoard event
files (``<dir>/tensorboard``), W&B runs in offline mode under ``<dir>/wandb`` when ``run.offline`` is set
(else ``WANDB_MODE`` or online), Trackio its local database (``TRACKIO_DIR`` = ``<dir>/trackio``).

Writes happen on one background thread per tracker run, in batches at most every ``interval`` seconds: the
training thread pays one queue put per step (``benchmarks/bench_tracking.py``). A backend that fails while
logging is reported once (warning) and dropped; training goes on.

Departure from the anchors: TRL / open-r1 log through ``transformers``' callbacks or accelerate's trackers
inside the trainer only; here every DAG node logs through this one module, training and evaluation alike.
"""

from __future__ import annotations

import contextvars
import hashlib
import importlib.util
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BACKENDS = ("tensorboard", "mlflow", "wandb", "trackio")
"""The values of ``run.report_to``."""

_REQUIRES: dict[str, tuple[str, str]] = {  # backend -> (module that must import, extra that installs it)
    "tensorboard": ("tensorboard", "tracking"),
    "mlflow": ("mlflow", "tracking"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
}


class TrackingError(RuntimeError):
    """A tracking backend cannot be used (library not installed); the message names the extra to install."""


def check_installed(report_to: list[str] | tuple[str, ...]) -> None:
    """Raise :class:`TrackingError` (one line) for the first backend of ``report_to`` whose library is missing.

    Only looks the module up (no import): cheap enough for recipe validation."""
    for name in report_to:
        module, extra = _REQUIRES[name]
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


def summary_metrics(summary: dict[str, Any], limit: int = 200) -> dict[str, float]:
    """The numbers of a stage summary, two levels deep, as ``summary/<a>/<b>`` (at most ``limit``)."""
    flat: dict[str, Any] = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            flat.update({f"summary/{k}/{k2}": v2 for k2, v2 in v.items() if not isinstance(v2, dict)})
        else:
            flat[f"summary/{k}"] = v
    return dict(list(numbers(flat).items())[:limit])


# ------------------------------------------------------------------------------------------ backends


@dataclass(frozen=True)
class RunSpec:
    """Where and under which names one tracker run lives (the identity of a node's run)."""

    directory: Path
    experiment: str
    node: str
    key: str
    offline: bool = True

    @property
    def run_id(self) -> str:
        """A stable id for backends that resume by id (W&B) or by name (Trackio)."""
        return hashlib.sha256(f"{self.experiment}/{self.node}/{self.key}".encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({"directory": str(self.directory), "experiment": self.experiment, "node": self.node,
                           "key": self.key, "offline": self.offline})

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        d = json.loads(text)
        return cls(Path(d["directory"]), d["experiment"], d["node"], d["key"], d["offline"])


class Backend:
    """One library's run. ``new`` is False when an earlier process created this run (then params are not
    logged again: MLflow refuses to change a param)."""

    name = ""
    new = True

    def log_params(self, params: dict[str, Any], recipe_yaml: str) -> None:
        raise NotImplementedError

    def log_metrics(self, batch: list[tuple[dict[str, float], int]]) -> None:
        """Several steps at once: ``[(metrics, step), ...]`` in logging order."""
        raise NotImplementedError

    def set_tags(self, tags: dict[str, str]) -> None:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        raise NotImplementedError


class TensorBoardBackend(Backend):
    """``torch.utils.tensorboard.SummaryWriter`` in ``<dir>/tensorboard/<run name>/<node>/<key>``."""

    name = "tensorboard"

    def __init__(self, spec: RunSpec):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = spec.directory / "tensorboard" / spec.experiment / spec.node / spec.key
        self.new = not (self.logdir.exists() and any(self.logdir.glob("events.out.tfevents.*")))
        self.writer = SummaryWriter(log_dir=str(self.logdir), flush_secs=30)

    def log_params(self, params: dict[str, Any], recipe_yaml: str) -> None:
        # TensorBoard renders text as markdown: an indented block keeps the YAML as written.
        self.writer.add_text("recipe.yaml", "    " + recipe_yaml.replace("\n", "\n    "), 0)

    def log_metrics(self, batch: list[tuple[dict[str, float], int]]) -> None:
        for metrics, step in batch:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.writer.add_text(k, v, 0)

    def close(self, failed: bool) -> None:
        self.writer.close()


_MLFLOW_BAD = re.compile(r"[^\w./\- :]")


def mlflow_name(name: str) -> str:
    """MLflow accepts letters, digits, ``_ - . / : space`` only: ``pass@1`` -> ``pass_at_1``, others -> ``_``."""
    return _MLFLOW_BAD.sub("_", name.replace("@", "_at_"))


_MLFLOW_LOCK = threading.Lock()


class MLflowBackend(Backend):
    """``MlflowClient`` on ``sqlite:///<dir>/mlflow.db`` (or ``MLFLOW_TRACKING_URI``); experiment ``run.name``,
    run name the node, found again by its ``redi.node`` / ``redi.key`` tags."""

    name = "mlflow"

    def __init__(self, spec: RunSpec):
        from filelock import FileLock

        for noisy in ("alembic", "mlflow.store.db.utils"):  # schema creation chatter on a new store
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from mlflow import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{spec.directory / 'mlflow.db'}"
        # One creator at a time (threads and processes): a new SQLite store runs its schema migrations once.
        with _MLFLOW_LOCK, FileLock(str(spec.directory / ".mlflow.lock")):
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(spec.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                spec.experiment, artifact_location=(spec.directory / "mlartifacts").absolute().as_uri())
            found = self.client.search_runs([exp_id], f"tags.`redi.node` = '{spec.node}' and tags.`redi.key` = '{spec.key}'",
                                            max_results=1)
            if found:
                self.run_id, self.new = found[0].info.run_id, False
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                run = self.client.create_run(exp_id, run_name=spec.node, tags={"redi.node": spec.node, "redi.key": spec.key})
                self.run_id = run.info.run_id
        self.uri = uri

    def log_params(self, params: dict[str, Any], recipe_yaml: str) -> None:
        from mlflow.entities import Param

        items = [Param(mlflow_name(k)[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        self.client.log_text(self.run_id, recipe_yaml, "recipe.yaml")

    def log_metrics(self, batch: list[tuple[dict[str, float], int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(mlflow_name(k), v, now, step) for metrics, step in batch for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(mlflow_name(k)[:250], str(v)[:5000]) for k, v in tags.items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbBackend(Backend):
    """``wandb.init`` with a stable id (resume="allow"), files under ``<dir>/wandb``; offline when ``run.offline``
    is set, else ``WANDB_MODE`` (default online, which needs ``wandb login``). Not tested here (docs/tracking.md)."""

    name = "wandb"

    def __init__(self, spec: RunSpec):
        import wandb

        mode = "offline" if spec.offline else os.environ.get("WANDB_MODE", "online")
        spec.directory.mkdir(parents=True, exist_ok=True)
        self.dir = spec.directory
        self.run = wandb.init(project=spec.experiment, name=spec.node, id=spec.run_id, dir=str(spec.directory), mode=mode,
                              resume="allow", reinit="create_new", tags=[spec.node])
        self.new = not self.run.resumed
        self.last_step = self.run.step - 1 if self.run.resumed else 0

    def log_params(self, params: dict[str, Any], recipe_yaml: str) -> None:
        self.run.config.update(params, allow_val_change=True)
        path = self.dir / "wandb-files" / self.run.id / "recipe.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(recipe_yaml)
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def log_metrics(self, batch: list[tuple[dict[str, float], int]]) -> None:
        for metrics, step in batch:
            if step < self.last_step:  # W&B drops a step below the last one: a summary value instead (the stage and
                self.run.summary.update(metrics)  # evaluation figures logged at step 0 after the training steps)
            else:
                self.run.log(metrics, step=step)
                self.last_step = step

    def set_tags(self, tags: dict[str, str]) -> None:
        self.run.summary.update(tags)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class TrackioBackend(Backend):
    """``trackio.init`` on its local database (``TRACKIO_DIR`` = ``<dir>/trackio`` unless set before trackio is
    first imported), run name ``<node>-<key>``, resumed by name. Not tested here (docs/tracking.md)."""

    name = "trackio"

    def __init__(self, spec: RunSpec):
        os.environ.setdefault("TRACKIO_DIR", str(spec.directory / "trackio"))
        import trackio

        self.spec = spec
        self.trackio = trackio
        self.run = None

    def _open(self, config: dict[str, Any] | None) -> None:
        if self.run is None:
            self.run = self.trackio.init(project=self.spec.experiment, name=f"{self.spec.node}-{self.spec.key}",
                                         config=config, resume="allow", embed=False, auto_log_cpu=False, auto_log_gpu=False)

    def log_params(self, params: dict[str, Any], recipe_yaml: str) -> None:
        self._open({**params, "recipe.yaml": recipe_yaml})

    def log_metrics(self, batch: list[tuple[dict[str, float], int]]) -> None:
        self._open(None)
        for metrics, step in batch:
            self.run.log(metrics, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._open(None)
        self.run.config.update(tags)

    def close(self, failed: bool) -> None:
        if self.run is not None:
            self.run.finish()


BACKEND_CLASSES: dict[str, type[Backend]] = {
    "tensorboard": TensorBoardBackend, "mlflow": MLflowBackend, "wandb": WandbBackend, "trackio": TrackioBackend,
}


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

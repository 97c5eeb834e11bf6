"""The tracking backends: one class per library behind :class:`Backend` (TensorBoard, MLflow, W&B, Trackio).

:mod:`redi.tracking` opens them on its writer thread and never calls a library directly; each library is
imported only when its backend opens a run.

Offline by default: MLflow writes an SQLite store (``<dir>/mlflow.db``, artifacts in ``<dir>/mlartifacts``;
``MLFLOW_TRACKING_URI`` overrides it; MLflow 3's plain-folder store refuses to start), TensorBoard event
files (``<dir>/tensorboard``), W&B runs in offline mode under ``<dir>/wandb`` when ``run.offline`` is set
(else ``WANDB_MODE`` or online), Trackio its local database (``TRACKIO_DIR`` = ``<dir>/trackio``).

Adding a backend: a :class:`Backend` subclass with ``name`` and ``requires``, registered in
:data:`BACKEND_CLASSES` (``run.report_to`` accepts its name from there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    requires = ("", "")
    """(module that must import, extra of redi-pipeline that installs it)."""
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
    requires = ("tensorboard", "tracking")

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
    requires = ("mlflow", "tracking")

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
    requires = ("wandb", "wandb")

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
    requires = ("trackio", "trackio")

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

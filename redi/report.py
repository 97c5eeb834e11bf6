"""The ``report`` node: append a run's metrics to the results store, write its table and plot under
``runs/<name>/``, and register the run for nightly evaluation (``latest.json``).

:meth:`redi.pipeline.Pipeline.report` calls :func:`report`; the table and plot are :mod:`redi.results`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import dag, distributed, results
from .artifacts import Artifact, hash_obj
from .config import recipe_to_yaml

if TYPE_CHECKING:
    from .pipeline import Pipeline

log = logging.getLogger(__name__)


def report(pipe: Pipeline, models: dict[str, Artifact], grades: dict[str, Artifact], register: bool = False) -> dict[str, Any]:
    """Append the metrics to the results store and write the table + plot; ``register`` also registers the run.

    Registering writes ``runs/<name>/recipe.yaml`` and ``latest.json``: what nightly evaluation
    evaluates (the models, their labels, the evaluation settings). Only a full run of the recipe
    (``Pipeline.run``, the ``redi-pipeline`` flow) or an explicit ``register=True`` does it. Any other
    report (a stage rerun, perhaps with overrides) is recorded on its own: results-store rows with
    ``kind="stage"`` and ``runs/<name>/stage-runs/<recipe hash>/`` with its recipe, table and plot, so
    it can never change what nightly evaluates by accident. Under a multi-process launch rank 0 writes
    it and the other ranks get its result.
    """
    if distributed.launched() and not distributed.is_main():
        return distributed.broadcast(None)
    h = pipe.recipe_hash()
    rdir = pipe.run_dir() if register else pipe.run_dir() / "stage-runs" / h
    if not os.access(pipe.store.root, os.W_OK):  # a shared read-only cache: report, write nothing
        return distributed.broadcast(_read_only_report(pipe, grades, models, h, rdir))
    rdir.mkdir(parents=True, exist_ok=True)
    pipe.store.pull_tree(rdir, names=("latest.json",))  # a URL root: the shared registration and results first
    pipe.store.pull_tree(pipe.results_path(), only_missing=True)
    (rdir / "recipe.yaml").write_text(recipe_to_yaml(pipe.recipe))
    if register:
        _register(pipe, rdir, models, grades)
    kind = "pipeline" if register else "stage"
    store = results.ResultsStore(pipe.results_path())
    for lab, g in grades.items():
        metrics = json.loads(g.file("metrics.json").read_text())
        store.append_metrics(
            run=pipe.recipe.run.name, label=pipe.result_label(lab), model_key=models[lab].key, recipe_hash=h,
            eval_key=g.key, metrics=metrics, protocol=pipe.recipe.evaluate.hash_fields(), kind=kind,
        )
    df = store.load(run=pipe.recipe.run.name)
    # The registered table never shows stage reruns; a rerun's table shows that rerun's recipe only.
    df = df[df["kind"] != "stage"] if register else df[(df["kind"] == "stage") & (df["recipe_hash"] == h)]
    if not df.empty:
        df = df[df["time"] == df.groupby(["run", "label"])["time"].transform("max")]
    table = results.comparison_table(df, paper=pipe.recipe.evaluate.protocol().name == results.PAPER_PROTOCOL)
    (rdir / "results.md").write_text(table.markdown)
    table.frame.to_csv(rdir / "results.csv")
    results.bar_chart(df, rdir / "results.png")
    pipe.store.push_tree(pipe.results_path(), only_missing=True)  # a URL root: publish (latest.json last)
    pipe.store.push_tree(rdir, last=("latest.json",))
    if pipe.tracking:  # run.report_to: metrics per model and benchmark, every node's key (once per content)
        keys = {**{n: a.key for n, a in pipe.nodes.items()}, **{a.stage: a.key for a in models.values()},
                **{dag.node_name("grade", lab): g.key for lab, g in grades.items()}}
        pipe.tracking.log_report(hash_obj({"recipe": h, "grades": {lab: g.key for lab, g in grades.items()}}),
                                 {pipe.result_label(lab): json.loads(g.file("metrics.json").read_text())
                                  for lab, g in grades.items()}, keys, table.markdown)
    if not register:
        log.info("report: stage rerun recorded in %s (not registered: runs/%s/latest.json unchanged)", rdir, pipe.recipe.run.name)
    return distributed.broadcast({"run_dir": str(rdir), "registered": register, "table_markdown": table.markdown,
                                  "table_rows": table.rows, "plot": str(rdir / "results.png")})


def _read_only_report(pipe: Pipeline, grades: dict[str, Artifact], models: dict[str, Artifact], h: str, rdir: Path) -> dict:
    """The table of this run's grades, computed in memory: a read-only artifact root gets no results rows,
    no ``runs/`` folder and no registration (logged)."""
    import pandas as pd

    rows = [r for lab, g in grades.items() for r in results.rows_from_metrics(
        json.loads(g.file("metrics.json").read_text()), run=pipe.recipe.run.name, label=pipe.result_label(lab),
        model_key=models[lab].key, recipe_hash=h, eval_key=g.key, protocol=pipe.recipe.evaluate.hash_fields())]
    table = results.comparison_table(pd.DataFrame(rows), paper=pipe.recipe.evaluate.protocol().name == results.PAPER_PROTOCOL)
    log.warning("report: %s is not writable: results not recorded, %s not written, run not registered",
                pipe.store.root, rdir)
    return {"run_dir": str(rdir), "registered": False, "read_only": True, "table_markdown": table.markdown,
            "table_rows": table.rows, "plot": None}


def _register(pipe: Pipeline, rdir: Path, models: dict[str, Artifact], grades: dict[str, Artifact]) -> None:
    """Write ``latest.json``: the run's latest models and grades (what nightly evaluation evaluates)."""
    # Merge with what the run registered before: evaluating one label must not unregister the others.
    prev = _read_json(rdir / "latest.json") if (rdir / "latest.json").exists() else {}
    same_recipe = prev.get("recipe_hash") == pipe.recipe_hash()
    dropped = sorted(set(prev.get("models", {})) - set(models)) if not same_recipe else []
    if dropped:
        log.warning("register: run %s now has a different recipe; its models %s are no longer registered",
                    pipe.recipe.run.name, dropped)
    latest = {
        "run": pipe.recipe.run.name,
        "recipe_hash": pipe.recipe_hash(),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "models": {**(prev.get("models", {}) if same_recipe else {}),
                   **{lab: {"key": art.key, "stage": art.stage, "dir": str(pipe.model_dir(lab, art))} for lab, art in models.items()}},
        "grades": {**(prev.get("grades", {}) if same_recipe else {}), **{lab: g.key for lab, g in grades.items()}},
    }
    _atomic_write(rdir / "latest.json", json.dumps(latest, indent=2))
    log.info("register: run %s registered for nightly evaluation (%s)", pipe.recipe.run.name, rdir / "latest.json")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("unreadable %s: starting it afresh", path)
        return {}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

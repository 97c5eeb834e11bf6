"""Flows of the REDI DAG: ``redi-pipeline`` (the whole run) and ``redi-stage`` (one stage, upstream from cache).

The flows only schedule tasks: ``run_dag`` takes the nodes of a run from ``redi.dag.graph`` (the table
``redi.dag.NODES``, in the order of the library's walker ``redi.dag.walk``) and submits each node's Prefect
task (thread-pool task runner) as soon as its upstream is done and the GPUs, cores and process it needs
(``redi.dag.needs``) are free in the flow's :class:`Resources`, up to ``run.max_parallel`` at once; so
``evaluate[base]`` runs while ``verify``/``sft`` do, when the machine has room for both. The UI shows one task per node. Every task is a thin wrapper over :class:`redi.pipeline.Pipeline`, and
the content-addressed store decides what is a cache hit, so running a stage whose upstream is
cached costs one checksum pass per upstream artifact.

Precedence: defaults < the recipe (``recipe_path`` YAML, or a whole ``recipe``) < overrides < refresh.
Giving both ``recipe`` and ``recipe_path`` is an error, never a silent choice. The per-stage
deployments (one form per stage, the recipe picked from a dropdown) are in ``flows/stages.py``.

Registration: only a full run (``redi-pipeline``) or ``register_run=True`` rewrites what nightly
evaluation evaluates (``runs/<name>/latest.json``); see :meth:`redi.pipeline.Pipeline.report`.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from redi import dag, interrupt
from redi.config import Recipe, RecipeError, apply_overrides, load_recipe
from redi.interrupt import stoppable
from redi.storage import normalize_root
from tasks.curves import curves
from tasks.download import download
from tasks.evaluate import evaluate
from tasks.model import base_model
from tasks.redi import stage2
from tasks.report import publish, report
from tasks.sft import sft
from tasks.verify import verify

Stage = Literal[dag.STAGES]  # type: ignore[valid-type]
Label = Literal[dag.MODEL_LABELS]  # type: ignore[valid-type]
TASKS = {"download": download, "model": base_model, "verify": verify, "sft": sft, "redi": stage2, "curves": curves,
         "evaluate": evaluate}
"""The Prefect task of each node of ``redi.dag.NODES``; called with (recipe, *upstream artifacts) or (recipe, label, model)."""
if set(TASKS) != set(dag.STAGES):  # a node added to the table needs its task here
    raise ImportError(f"flows.pipeline.TASKS {sorted(TASKS)} do not match the DAG's stages {list(dag.STAGES)}")

HELP = {
    "overrides": "Recipe fields to change for this run, as dotted keys: {\"redi.alpha\": 1.0, \"evaluate.n_samples\": 8}. "
                 "Applied after the recipe. Changed fields change the cache keys of the stages they determine.",
    "refresh": "Stages to recompute even when a valid cached artifact exists (added to the recipe's run.refresh).",
    "recipe_path": "A recipe YAML (or its folder), relative to the directory `redi serve` runs in. "
                   "Give either this or `recipe`, not both.",
    "recipe": "The whole recipe, typed (the deployment pre-fills it with its recipe's resolved fields; edit any field). "
              "Give either this or `recipe_path`, not both.",
    "labels": "Which models to evaluate: base, sft, redi (default: the recipe's evaluate.models).",
    "register_run": "Register this result for nightly evaluation: rewrite runs/RUN/recipe.yaml and latest.json (RUN = run.name) with this "
                "recipe and these models. Off: the rerun is recorded on its own (results store kind=stage, "
                "runs/RUN/stage-runs/RECIPE_HASH/) and nightly evaluates what the last full run registered.",
}


def documented(summary: str, *params: str, extra: dict[str, str] | None = None):
    """Give a flow function a Google-style docstring whose Args section Prefect shows as each parameter's help."""
    def wrap(fn):
        helps = HELP | (extra or {})
        fn.__doc__ = summary + "\n\nArgs:\n" + "".join(f"    {p}: {helps[p]}\n" for p in params)
        return fn
    return wrap


def resolve_recipe(recipe_path: str | None = None, recipe: Recipe | dict[str, Any] | None = None,
                   overrides: dict[str, Any] | list[str] | None = None, refresh: list[str] | None = None) -> Recipe:
    """Defaults < YAML (or a whole recipe) < overrides < refresh. Raises RecipeError naming the field."""
    if recipe is not None and recipe_path:
        raise RecipeError(f"give either recipe (the typed form) or recipe_path ({recipe_path!r}), not both: "
                          "clear one of them")
    if recipe is not None:
        tree = recipe.model_dump(mode="json", by_alias=True) if isinstance(recipe, Recipe) else dict(recipe)
        if overrides:
            apply_overrides(tree, overrides)
        try:
            r = Recipe.model_validate(tree)
        except Exception as e:
            raise RecipeError(f"invalid recipe (flow parameter): {e}") from None
    else:
        r = load_recipe(recipe_path, overrides or None)
    if refresh:
        try:
            r.run.refresh = sorted(set(r.run.refresh) | set(refresh), key=dag.STAGES.index)
        except Exception as e:
            raise RecipeError(f"refresh: {e}") from None
    return r


class Resources:
    """What the flow's process may hand to nodes running side by side: GPU ids, cores, the process, slots.

    An in-flow pool, not Prefect's server-side tag concurrency limits: a tag limit counts task runs, it cannot
    say *which* GPU a node gets (the node's vLLM engines and ``accelerate launch`` children must see only
    theirs), it needs a server with the limits created beforehand (the ephemeral API of ``redi run`` has none),
    and a task held back by one waits in a retry loop instead of starting the moment a slot frees. Each
    task also carries a tag, ``gpu`` or ``cpu``, so a server-wide limit can be added on top
    (``prefect concurrency-limit create gpu 8``) to bound several flow runs sharing one machine.
    Used from the flow's thread only (taken before a submit, given back when the future is done).
    """

    def __init__(self, gpus: list[str], cores: int, slots: int | None = None):
        self.free_gpus, self.cores, self.slots = list(gpus), cores, slots
        self.n_gpus, self.process = len(gpus), True

    def take(self, need: dag.Needs) -> tuple[str, ...] | None:
        """The GPU ids given for ``need`` (possibly none), or None when it does not fit now."""
        if (self.slots is not None and self.slots < 1) or need.gpus > len(self.free_gpus) or need.cores > self.cores \
                or (need.process and not self.process):
            return None
        ids, self.free_gpus = tuple(self.free_gpus[:need.gpus]), self.free_gpus[need.gpus:]
        self.cores -= need.cores
        self.process = self.process and not need.process
        if self.slots is not None:
            self.slots -= 1
        return ids

    def give(self, need: dag.Needs, ids: tuple[str, ...]) -> None:
        self.free_gpus = sorted(self.free_gpus + list(ids), key=lambda g: int(g) if g.isdigit() else g)
        self.cores += need.cores
        self.process = self.process or need.process
        if self.slots is not None:
            self.slots += 1


def machine(r: Recipe) -> tuple[list[str], int]:
    """The GPUs (ids as CUDA_VISIBLE_DEVICES names them; none when run.device resolves to cpu) and cores of this process."""
    from redi.generate_vllm import visible_gpus
    from redi.launch import auto_device

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return (visible_gpus() if auto_device(r.run.device) == "cuda" else []), cores


def schedule(plan: list[tuple[str, dag.Node, str | None, list[str]]], needs: dict[str, dag.Needs], pool: Resources,
             submit: Callable[[dag.Node, list[Any], str | None, list[Any], list[str]], Any]) -> dict[str, Any]:
    """Run ``plan`` (``redi.dag.graph``): submit each node, in plan order, once its upstream is done and ``pool`` has
    what it ``needs``; return {node name: result}.

    ``submit(node, upstream results, label, upstream futures, tags)`` returns a Prefect future; the GPUs it was
    given are in ``redi.launch.ASSIGNED_GPUS`` of the submitting context (the task runner copies it to the task's
    thread). A failed node stops new submissions; the nodes already running finish, then its error is raised.
    """
    from redi.launch import ASSIGNED_GPUS

    results: dict[str, Any] = {}
    futures: dict[str, Any] = {}
    running: dict[str, tuple[dag.Needs, tuple[str, ...]]] = {}
    pending = list(plan)
    done: queue.Queue[str] = queue.Queue()
    error: BaseException | None = None
    while pending or running:
        for item in list(pending) if error is None else []:
            name, node, label, ups = item
            if any(u not in results for u in ups):
                continue
            ids = pool.take(needs[name])
            if ids is None:
                continue
            token = ASSIGNED_GPUS.set(ids if pool.n_gpus else None)
            try:
                fut = submit(node, [results[u] for u in ups], label, [futures[u] for u in ups],
                             ["gpu" if needs[name].gpus else "cpu"])
            finally:
                ASSIGNED_GPUS.reset(token)
            futures[name], running[name] = fut, (needs[name], ids)
            fut.add_done_callback(lambda _f, n=name: done.put(n))
            pending.remove(item)
        if not running:
            if error is None and pending:  # every need is clamped to the machine, so an idle pool fits any node
                raise RuntimeError(f"scheduler stalled with {[p[0] for p in pending]} pending (a bug)")
            break
        name = interrupt.get(done)  # short waits: a SIGTERM handed to a worker thread still runs its handler
        pool.give(*running.pop(name))
        try:
            results[name] = futures[name].result()
        except BaseException as e:  # noqa: BLE001 - re-raised once the running nodes are done
            error = error or e
    if error is not None:
        raise error
    return results


def run_dag(r: Recipe, until: str = "report", labels: list[str] | None = None, register: bool = False) -> dict[str, Any]:
    """Run the DAG up to ``until`` (a stage, or "report" for everything), nodes side by side where
    their upstream and the machine allow (:func:`schedule`).

    ``labels`` limits which models are evaluated (default: the recipe's evaluate.models); ``register``
    makes the report register the run (what nightly evaluates). Returns {"artifacts": {node: artifact
    dict}, "report": ..., "dag": rows, "seconds": wall time}.
    """
    t0 = time.time()
    rd = r.model_dump(mode="json", by_alias=True)
    labels = list(labels or r.evaluate.models)

    def submit(node: dag.Node, upstream: list[dict[str, Any]], label: str | None, after: list[Any], tags: list[str]) -> Any:
        task = TASKS[node.name].with_options(tags=tags)
        args = (rd, label, *upstream) if node.per_label else (rd, *upstream)
        return task.submit(*args, wait_for=after)  # wait_for: done already; it draws the UI's edges

    plan = dag.graph(until, labels, skip=dag.disabled(r))
    gpus, cores = machine(r)
    needs = {name: dag.needs(node, r, len(gpus), cores) for name, node, _, _ in plan}
    done = schedule(plan, needs, Resources(gpus, cores, r.run.max_parallel), submit)
    stages = {name: done[name] for name, _, label, _ in plan if label is None}
    evaluations = {label: done[name] for name, _, label, _ in plan if label is not None}
    arts: dict[str, dict[str, Any]] = dict(stages)
    for nodes in evaluations.values():  # evaluate[lab] (the samples) and grade[lab]
        arts |= nodes
    rep = None
    if evaluations:
        grades = {lab: nodes[dag.node_name("grade", lab)] for lab, nodes in evaluations.items()}
        rep = report(rd, {lab: stages[dag.LABEL_STAGE[lab]] for lab in labels}, grades, register or until == "report")
    rows = dag.node_rows(arts)
    made = publish(r.run.name, rep, rows, round(time.time() - t0, 1))
    out = {"run": r.run.name, "artifacts": arts, "report": rep, "dag": rows, "prefect_artifacts": made,
           "seconds": round(time.time() - t0, 2)}
    get_run_logger().info("run %s: %d/%d nodes from cache, %.1fs; artifacts under %s", r.run.name,
                          sum(x["status"] == "cache hit" for x in rows), len(rows), out["seconds"],
                          normalize_root(r.run.artifact_root))
    return out


RUNNER = ThreadPoolTaskRunner
"""The flows' task runner: nodes run in threads of the flow's process (:func:`schedule` bounds how many)."""


@flow(name="redi-pipeline", task_runner=RUNNER(), description="The whole REDI run: download -> model -> verify -> sft -> redi -> evaluate -> report. "
      "Registers the run for nightly evaluation.")
@stoppable
@documented("The whole DAG of a recipe; registers the run (runs/RUN/latest.json) for nightly evaluation.",
            "overrides", "refresh", "recipe_path", "recipe")
def redi_pipeline(
    overrides: dict[str, Any] | None = None,
    refresh: list[Stage] | None = None,
    recipe_path: str | None = None,
    recipe: Recipe | None = None,
) -> dict[str, Any]:
    r = resolve_recipe(recipe_path, recipe, overrides, refresh)
    return run_dag(r, "report", register=True)


@flow(name="redi-stage", task_runner=RUNNER(), description="One stage of the REDI DAG; its upstream is taken from cache (or computed).")
@stoppable
@documented("One stage of a recipe; upstream from cache. stage=evaluate evaluates `labels` and records the result.",
            "stage", "overrides", "refresh", "recipe_path", "recipe", "labels", "register_run", "expect_keys",
            extra={"stage": "The stage to run: " + ", ".join(dag.STAGES) + ".",
                   "expect_keys": "Set by redi-cluster: {node: artifact key} of this stage and its upstream as the "
                                  "dispatcher computed them; the run fails at once if this worker computes others."})
def redi_stage(
    stage: Stage,
    overrides: dict[str, Any] | None = None,
    refresh: list[Stage] | None = None,
    recipe_path: str | None = None,
    recipe: Recipe | None = None,
    labels: list[Label] | None = None,
    register_run: bool = False,
    expect_keys: dict[str, str] | None = None,
) -> dict[str, Any]:
    r = resolve_recipe(recipe_path, recipe, overrides, refresh)
    if expect_keys:
        check_keys(r, expect_keys)
    return run_dag(r, stage, labels, register_run)


def check_keys(r: Recipe, expect: dict[str, str]) -> None:
    """Fail before any work when this machine's code computes other artifact keys than the dispatcher did
    (``expect``: {node name: key}, flows/cluster.py): another project version would rebuild upstream silently."""
    from redi.pipeline import Pipeline

    pipe = Pipeline(r)
    for name, key in expect.items():
        stage, _, label = name.partition("[")
        ours = pipe.key(stage, label.rstrip("]") or None)
        if ours != key:
            raise RecipeError(f"{name}: this worker computes key {ours}, the dispatcher {key}: run the same version of the "
                              "project (code and packages) on every worker")

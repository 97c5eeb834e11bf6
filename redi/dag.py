"""The REDI DAG as one table, and the one walker over it.

    download -> model -> verify -> sft -> redi -> (curves) -> evaluate[label] (-> grade[label]) -> report

``NODES`` is the only place the stages are listed: their order, inputs, recipe section, the
:class:`redi.pipeline.Pipeline` method that builds each, and the model label under which a stage's
artifact is evaluated. ``Pipeline`` (plan, run, one stage), the CLI (``run``, ``stage``, ``status``,
the summary table), the Prefect flows, ``deployments/serve.py`` and the recipe's ``run.refresh``
vocabulary are derived from it; :func:`walk` is the only code that orders the nodes of a run (the
library passes the Pipeline's builders, the flow passes one Prefect task per node).

This module is pure data and imports nothing from the rest of the package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Node:
    """One stage of the DAG.

    ``upstream``: the stages whose artifacts the builder takes, in the builder's positional order.
    ``section``: the recipe section that configures it (``Recipe.<section>``). ``builder``: the
    ``Pipeline`` method that builds it. ``label``: the model label its artifact is evaluated under
    (``evaluate.models``), if it produces a model. ``per_label``: built once per evaluated model,
    from that model's stage (``evaluate``: it also produces ``grade[label]``). ``enabled_by``: a dotted recipe
    field; when it is empty (None, 0, []) the node is off and a run skips it (:func:`disabled`).

    What it holds while it runs (:func:`needs`; a scheduler that runs nodes side by side honours it, the
    library's :func:`walk` runs one at a time): ``gpus``, the GPUs it uses on a machine that has them (-1:
    every visible one); ``cores``, the cores it keeps busy when its work is on the CPU (0: every core);
    ``in_process``, whether its torch work runs in the calling process (the process's global RNG and
    thread settings: two such nodes never overlap in one process). Each is a value or a function of the recipe.
    """

    name: str
    upstream: tuple[str, ...]
    section: str
    builder: str
    label: str | None = None
    per_label: bool = False
    summary: str = ""
    enabled_by: str | None = None
    gpus: Callable[[Any], int] | int = 0
    cores: Callable[[Any], int] | int = 1
    in_process: Callable[[Any], bool] | bool = False


def _eval_gpus(r: Any) -> int:
    """vLLM: one engine per data-parallel rank, each on tensor_parallel_size GPUs; transformers: one GPU."""
    return r.evaluate.data_parallel_size * r.evaluate.tensor_parallel_size if r.evaluate.backend == "vllm" else 1


def _eval_cores(r: Any) -> int:
    """vLLM on CPU binds every core it is given; transformers runs on run.threads (0: every core)."""
    return 0 if r.evaluate.backend == "vllm" else (r.run.threads or 0)


NODES: tuple[Node, ...] = (
    Node("download", (), "data", "download", summary="the teacher traces (Hub, local files or the offline synthetic teacher)"),
    Node("model", ("download",), "model", "base_model", label="base", summary="the base model (built for `tiny`, else loaded and saved)",
         in_process=True),
    Node("verify", ("download", "model"), "verify", "verify", summary="label every trace, filter, decontaminate, split into positives and pairs",
         cores=lambda r: 1 if r.verify.executor == "dask" else r.verify.workers),
    Node("sft", ("verify", "model"), "sft", "sft", label="sft", summary="stage 1: SFT on the positive traces",
         gpus=-1, cores=lambda r: r.run.threads or 0, in_process=lambda r: r.run.launcher == "inprocess"),
    Node("redi", ("verify", "sft"), "redi", "stage2", label="redi",
         summary="stage 2 from the SFT model with the recipe's objective (redi.loss: redi, dpo, simpo, ...)",
         gpus=-1, cores=lambda r: r.run.threads or 0, in_process=lambda r: r.run.launcher == "inprocess"),
    Node("curves", ("sft", "redi"), "evaluate", "curves", enabled_by="evaluate.checkpoints",
         summary="evaluate the models kept during training (sft/redi.keep_checkpoints) with evaluate.checkpoints: pass@1 "
                 "and response length against the step",
         gpus=lambda r: _eval_gpus(r), cores=lambda r: _eval_cores(r), in_process=lambda r: r.evaluate.backend == "hf"),
    Node("evaluate", (), "evaluate", "evaluate", per_label=True,
         summary="sample and grade one model on the recipe's benchmarks (nodes evaluate[label] and grade[label])",
         gpus=lambda r: _eval_gpus(r), cores=lambda r: _eval_cores(r), in_process=lambda r: r.evaluate.backend == "hf"),
)

NODE: dict[str, Node] = {n.name: n for n in NODES}
STAGES: tuple[str, ...] = tuple(n.name for n in NODES)
"""Every cached stage, in order: the vocabulary of ``redi stage``, ``--refresh`` and ``run.refresh``."""
MODEL_LABELS: tuple[str, ...] = tuple(n.label for n in NODES if n.label)
LABEL_STAGE: dict[str, str] = {n.label: n.name for n in NODES if n.label}
"""Which stage produces the model evaluated under each label."""
TRAIN_STAGES: tuple[str, ...] = tuple(n.name for n in NODES if not n.per_label)
EVAL_STAGE: str = next(n.name for n in NODES if n.per_label)
UNTIL = (*STAGES, "report")
"""What a run can stop after: a stage, or ``report`` (the whole DAG, reported)."""


def node_name(stage: str, label: str | None = None) -> str:
    """``sft``, or ``evaluate[base]`` for a per-label node."""
    return f"{stage}[{label}]" if label else stage


def closure(targets: Iterable[str]) -> list[str]:
    """The stages ``targets`` need (themselves included), in table order."""
    need: set[str] = set()
    todo = list(targets)
    while todo:
        s = todo.pop()
        if s not in need:
            need.add(s)
            todo.extend(NODE[s].upstream)
    return [s for s in STAGES if s in need]


def needed(until: str, labels: Sequence[str]) -> list[str]:
    """The model-building stages a run up to ``until`` builds, in order.

    ``report``: every stage (the whole DAG); ``evaluate``: what the evaluated ``labels`` need; a
    stage: that stage and its upstream.
    """
    if until not in UNTIL:
        raise ValueError(f"unknown stage {until!r}; valid: {', '.join(UNTIL)}")
    if until == "report":
        return list(TRAIN_STAGES)
    if until == EVAL_STAGE:
        return closure(LABEL_STAGE[lab] for lab in labels)
    return closure([until])


def disabled(recipe: Any) -> frozenset[str]:
    """The nodes that are off in ``recipe``: their ``enabled_by`` field is empty."""
    def value(path: str) -> Any:
        obj = recipe
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    return frozenset(n.name for n in NODES if n.enabled_by and not value(n.enabled_by))


@dataclass(frozen=True)
class Needs:
    """What one node holds while it runs: GPU count, core count, and the calling process (its torch state)."""

    gpus: int = 0
    cores: int = 1
    process: bool = False


def needs(node: Node, recipe: Any, gpus: int, cores: int) -> Needs:
    """What ``node`` holds under ``recipe`` on a machine with ``gpus`` usable GPUs (0: none, or device=cpu) and
    ``cores`` cores; every count is clamped to the machine, so a node asking for more runs alone.

    A node whose work goes to a GPU there keeps one core for its host side; one that runs its torch work in the
    calling process takes every GPU (a thread cannot be pinned to a device: ``CUDA_VISIBLE_DEVICES`` is per process).
    """
    def value(v: Any) -> Any:
        return v(recipe) if callable(v) else v

    process = bool(value(node.in_process))
    g = value(node.gpus) if gpus else 0
    g = gpus if g and (g < 0 or process) else min(g, gpus)
    c = 1 if g else value(node.cores)
    return Needs(gpus=g, cores=min(c, cores) if c > 0 else cores, process=process)


def graph(until: str, labels: Sequence[str], skip: Iterable[str] = ()) -> list[tuple[str, Node, str | None, list[str]]]:
    """The one plan of a run up to ``until``: its nodes in order, ``(name, node, label, upstream names)``.

    :func:`walk` runs it one node at a time; the Prefect flow's scheduler runs each node as soon as its upstream
    is done. Unknown labels, and asking for a node that is off (``skip``), fail naming the fix.
    """
    bad = [lab for lab in labels if lab not in LABEL_STAGE]
    if bad:
        raise ValueError(f"unknown model labels {bad}; valid: {', '.join(MODEL_LABELS)}")
    skip = frozenset(skip)
    if until in skip:
        raise ValueError(f"stage {until} is off in this recipe: set {NODE[until].enabled_by} to turn it on")
    out: list[tuple[str, Node, str | None, list[str]]] = [
        (name, NODE[name], None, list(NODE[name].upstream)) for name in needed(until, labels) if name not in skip]
    if until in (EVAL_STAGE, "report"):
        out += [(node_name(EVAL_STAGE, lab), NODE[EVAL_STAGE], lab, [LABEL_STAGE[lab]]) for lab in labels]
    return out


def walk(until: str, labels: Sequence[str], step: Callable[[Node, list[Any], str | None], Any],
         skip: Iterable[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the DAG up to ``until`` through ``step(node, upstream results, label)``, one node at a time in
    :func:`graph`'s order (the flow runs the same plan with nodes side by side: ``flows.pipeline.schedule``).

    ``skip``: nodes that are off (:func:`disabled`); no node takes them as upstream. Asking for one
    (``until``) is an error naming the field that turns it on.

    Returns ``(stages, evaluations)``: ``{stage: step result}`` for every model-building stage run, in
    order, and ``{label: step result}`` of the evaluation node of each label (only for ``until`` in
    ``evaluate`` / ``report``). The caller reports.
    """
    results: dict[str, Any] = {}
    stages: dict[str, Any] = {}
    evaluations: dict[str, Any] = {}
    for name, node, label, ups in graph(until, labels, skip):
        results[name] = step(node, [results[u] for u in ups], label)
        if label is None:
            stages[name] = results[name]
        else:
            evaluations[label] = results[name]
    return stages, evaluations


def node_rows(artifacts: dict[str, dict[str, Any]], timings: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One summary row per DAG node from ``{node name: artifact dict}`` (``Artifact.to_dict()``).

    ``seconds`` is the time this run spent on the node (``timings[name]``, else the dict's ``run_seconds``,
    else the build time for a built node and 0 for a cache hit); ``build_s`` the time the artifact took
    when it was built (its manifest).
    """
    rows = []
    for name, a in artifacts.items():
        built_s = a.get("manifest", {}).get("seconds", 0.0) or 0.0
        secs = (timings or {}).get(name, a.get("run_seconds", 0.0 if a.get("cached") else built_s))
        rows.append({"stage": name, "key": a["key"], "status": "cache hit" if a.get("cached") else "built",
                     "seconds": secs, "build_s": built_s, "path": a["path"]})
    return rows

"""``redi-cluster``: one run whose stages are cluster jobs, each a flow run of a stage deployment on a work pool.

The dispatcher (this flow) holds no data. For each node of the run (``redi.dag.graph``), as soon as its
upstream is done (:func:`flows.pipeline.schedule`), it starts a flow run of a ``redi-stage`` deployment
(``flows.pipeline:redi_stage``) with only the recipe, the stage (and label) and the artifact keys it computed
for the node and its upstream (``expect_keys``). The worker that picks the run up, on any machine, pulls the
upstream artifacts from the shared artifact root (``run.artifact_root``: an ``s3://`` URL, or a folder every
machine mounts), builds the node into its own local cache and publishes it; a worker whose code computes other
keys (another version of the project) refuses before any work instead of silently rebuilding upstream. Last,
one more stage run (``evaluate`` of every label, all cache hits) writes the report and registers the run.

Routing: ``deployments`` maps a stage to a deployment (a work pool per kind of machine, e.g. ``redi-stage/gpu``
for sft, redi, evaluate), ``queues`` to a work queue of that pool, ``job_variables`` to per-stage variables
(``{"sft": {"gpus": 8}}`` with deployments/work-pools/kubernetes.json). See docs/scaling.md.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.pipeline import RUNNER, Resources, resolve_recipe, schedule
from redi import dag
from redi.interrupt import stoppable

DEFAULT_DEPLOYMENT = "redi-stage/cluster"


def expected_keys(r: Any, name: str, label: str | None) -> dict[str, str]:
    """The artifact keys of node ``name`` and of the nodes it reads, as this machine's code computes them."""
    from redi.pipeline import Pipeline

    pipe = Pipeline(r)
    stage = dag.EVAL_STAGE if label else name
    out = {dag.node_name(stage, label): pipe.key(stage, label)}
    if label:
        out[dag.node_name("grade", label)] = pipe.key("grade", label)
    for up in dag.closure([dag.LABEL_STAGE[label]] if label else list(dag.NODE[name].upstream)):
        if up not in dag.disabled(r):
            out[up] = pipe.key(up)
    return out


@task(name="dispatch", cache_policy=NONE, task_run_name="{node}")
def dispatch(node: str, deployment: str, parameters: dict[str, Any], work_queue_name: str | None,
             job_variables: dict[str, Any] | None, poll_s: float) -> dict[str, Any]:
    """One flow run of ``deployment``, waited for; fails unless it completed."""
    from prefect.deployments import run_deployment

    fr = run_deployment(deployment, parameters=parameters, work_queue_name=work_queue_name, job_variables=job_variables,
                        timeout=None, poll_interval=poll_s, flow_run_name=node, as_subflow=True)
    if not fr.state or not fr.state.is_completed():
        state = fr.state.type.value if fr.state else "unknown"
        raise RuntimeError(f"{node}: flow run {fr.name} ({fr.id}) of {deployment} ended {state}: "
                           f"{fr.state.message if fr.state else ''}")
    return {"node": node, "flow_run_id": str(fr.id), "deployment": deployment, "work_pool": fr.work_pool_name,
            "work_queue": fr.work_queue_name, "keys": parameters["expect_keys"]}


@flow(name="redi-cluster", task_runner=RUNNER(), description="One run of a recipe whose stages are flow runs of stage "
      "deployments on work pools (other machines), sharing only the artifact root.")
@stoppable
def redi_cluster(
    recipe_path: str | None = None,
    recipe: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    refresh: list[str] | None = None,
    deployments: dict[str, str] | None = None,
    queues: dict[str, str] | None = None,
    job_variables: dict[str, dict[str, Any]] | None = None,
    poll_s: float = 5.0,
) -> dict[str, Any]:
    """Dispatch every node of the recipe's run to its stage deployment, as soon as its upstream is done.

    Args:
        recipe_path: A recipe YAML readable here (its resolved fields are what the stages get; give this or recipe).
        recipe: The whole recipe as a dict (give this or recipe_path).
        overrides: Recipe fields to change, as dotted keys.
        refresh: Stages to recompute even when cached.
        deployments: Stage -> deployment (flow/name) that runs it; others go to redi-stage/cluster.
        queues: Stage -> work queue of its deployment's pool (default: the deployment's).
        job_variables: Stage -> job variables of its flow runs (e.g. {"sft": {"gpus": 8}}).
        poll_s: How often to poll a dispatched flow run's state.
    """
    r = resolve_recipe(recipe_path, recipe, overrides, refresh)
    if not r.run.artifact_root.startswith(("s3://", "gs://", "gcs://", "az://", "abfs://", "/")):
        raise ValueError(f"run.artifact_root={r.run.artifact_root!r} is relative: every worker would use its own folder; "
                         "give an object-store URL (s3://bucket/prefix) or an absolute path all machines mount")
    rd = r.model_dump(mode="json", by_alias=True)
    deployments, queues, job_variables = deployments or {}, queues or {}, job_variables or {}
    labels = list(r.evaluate.models)
    plan = dag.graph("report", labels, skip=dag.disabled(r))
    log = get_run_logger()

    def parameters(stage: str, labels_: list[str] | None, expect: dict[str, str], register: bool = False) -> dict[str, Any]:
        return {"stage": stage, "recipe": rd, "labels": labels_, "register_run": register, "expect_keys": expect}

    def submit(node: dag.Node, upstream: list[Any], label: str | None, after: list[Any], tags: list[str]) -> Any:
        name = dag.node_name(node.name, label)
        dep = deployments.get(node.name, DEFAULT_DEPLOYMENT)
        log.info("%s -> %s%s", name, dep, f" (queue {queues[node.name]})" if node.name in queues else "")
        return dispatch.with_options(tags=tags).submit(
            name, dep, parameters(node.name, [label] if label else None, expected_keys(r, node.name, label)),
            queues.get(node.name), job_variables.get(node.name), poll_s, wait_for=after)

    # the machines are elsewhere: every node may be in flight at once (each worker's own limits apply there)
    runs = schedule(plan, {p[0]: dag.Needs(cores=1) for p in plan}, Resources([], cores=len(plan)), submit)
    report = None
    if any(label for _, _, label, _ in plan):
        expect = {k: v for lab in labels for k, v in expected_keys(r, dag.EVAL_STAGE, lab).items()}
        report = dispatch(f"report[{r.run.name}]", deployments.get("report", DEFAULT_DEPLOYMENT),
                          parameters(dag.EVAL_STAGE, labels, expect, register=True), queues.get("report"),
                          job_variables.get("report"), poll_s)
    return {"run": r.run.name, "artifact_root": r.run.artifact_root, "nodes": runs, "report": report}

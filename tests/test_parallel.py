"""Independent DAG nodes side by side in the ``redi-pipeline`` flow (flows.pipeline.schedule / Resources).

Fast tier: the scheduler in a real Prefect flow (temporary API) over sleeping tasks, start and end times of
the task runs read back from the API: two independent nodes overlap; two GPU nodes on a one-GPU machine never
do; on two GPUs they do, each seeing its own device (redi.launch.ASSIGNED_GPUS); run.max_parallel=1 runs one
at a time; a failed node stops new submissions. Slow tier: the tiny recipe's real DAG with nodes side by side
gives the same keys and numbers as one node at a time, and evaluate[base] ran while verify did.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest_orchestration import write_recipe

from redi import dag

SLEEP = 1.0


def _task_runs(flow_run_id) -> dict[str, tuple[float, float]]:
    """{task run name (status suffix dropped): (start, end)} of one flow run, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.split(" [")[0]: (r.start_time.timestamp(), r.end_time.timestamp()) for r in runs
            if r.start_time and r.end_time and not r.name.startswith(("report", "publish"))}


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return min(a[1], b[1]) - max(a[0], b[0])


def _fake_plan() -> list[tuple[str, dag.Node, str | None, list[str]]]:
    """a -> (b, c) -> d: b and c are independent once a is done."""
    node = lambda n, ups: dag.Node(n, tuple(ups), "run", n)  # noqa: E731
    return [("a", node("a", []), None, []), ("b", node("b", ["a"]), None, ["a"]), ("c", node("c", ["a"]), None, ["a"]),
            ("d", node("d", ["b", "c"]), None, ["b", "c"])]


def _run_schedule(needs: dict[str, dag.Needs], gpus: list[str], cores: int, slots: int | None = None,
                  fail: str | None = None):
    from prefect import flow, task

    from flows.pipeline import RUNNER, Resources, schedule
    from redi.launch import ASSIGNED_GPUS

    @task(task_run_name="{name}")
    def work(name: str, upstream: list) -> dict:
        time.sleep(SLEEP)
        if name == fail:
            raise RuntimeError(f"{name} failed")
        return {"name": name, "gpus": ASSIGNED_GPUS.get(), "upstream": upstream}

    @flow(task_runner=RUNNER())
    def fake_dag() -> dict:
        def submit(node, upstream, label, after, tags):
            return work.with_options(tags=tags).submit(node.name, [u["name"] for u in upstream], wait_for=after)

        return schedule(_fake_plan(), needs, Resources(gpus, cores, slots), submit)

    state = fake_dag(return_state=True)
    return state, _task_runs(state.state_details.flow_run_id)


CPU = dag.Needs(gpus=0, cores=1)
GPU = dag.Needs(gpus=1, cores=1)


def test_independent_nodes_overlap(prefect_harness):
    state, times = _run_schedule({n: CPU for n in "abcd"}, [], cores=2)
    res = state.result()
    assert res["d"]["upstream"] == ["b", "c"]
    assert _overlap(times["b"], times["c"]) > 0.5 * SLEEP, times
    assert times["b"][0] >= times["a"][1] - 0.05 and times["d"][0] >= max(times["b"][1], times["c"][1]) - 0.05


def test_gpu_nodes_never_share_a_device(prefect_harness):
    needs = {"a": CPU, "b": GPU, "c": GPU, "d": CPU}
    _, one = _run_schedule(needs, ["0"], cores=8)
    assert _overlap(one["b"], one["c"]) <= 0, one  # one GPU: one after the other
    state, two = _run_schedule(needs, ["0", "1"], cores=8)
    res = state.result()
    assert _overlap(two["b"], two["c"]) > 0.5 * SLEEP, two  # two GPUs: side by side, each on its own
    assert sorted([res["b"]["gpus"], res["c"]["gpus"]]) == [("0",), ("1",)]
    assert res["a"]["gpus"] == ()  # a CPU node's children see no GPU when the machine has some


def test_cores_and_max_parallel_bound_the_overlap(prefect_harness):
    _, one_core = _run_schedule({n: CPU for n in "abcd"}, [], cores=1)
    assert _overlap(one_core["b"], one_core["c"]) <= 0, one_core
    _, one_slot = _run_schedule({n: CPU for n in "abcd"}, [], cores=8, slots=1)
    assert _overlap(one_slot["b"], one_slot["c"]) <= 0, one_slot
    proc = dag.Needs(gpus=0, cores=1, process=True)  # in-process torch work: one at a time per process
    _, process = _run_schedule({"a": CPU, "b": proc, "c": proc, "d": CPU}, [], cores=8)
    assert _overlap(process["b"], process["c"]) <= 0, process


def test_a_failed_node_stops_new_submissions(prefect_harness):
    state, times = _run_schedule({n: CPU for n in "abcd"}, [], cores=2, fail="b")
    assert state.is_failed()
    assert "c" in times and "d" not in times  # c was running and finished; d never started
    with pytest.raises(RuntimeError, match="b failed"):
        state.result()


def test_needs_clamp_to_the_machine():
    from redi.config import load_recipe

    r = load_recipe(None, ["run.threads=1", "evaluate.backend=vllm", "evaluate.data_parallel_size=2"])
    n = dag.NODE
    assert dag.needs(n["sft"], r, 0, 2) == dag.Needs(gpus=0, cores=1, process=True)
    assert dag.needs(n["sft"], r, 8, 16) == dag.Needs(gpus=8, cores=1, process=True)  # training takes every GPU
    assert dag.needs(n["evaluate"], r, 8, 16) == dag.Needs(gpus=2, cores=1, process=False)  # dp x tp engines
    assert dag.needs(n["evaluate"], r, 1, 16).gpus == 1  # more than the machine has: runs alone
    assert dag.needs(n["evaluate"], r, 0, 2).cores == 2  # vLLM on CPU binds every core
    hf = load_recipe(None, ["evaluate.backend=hf"])
    assert dag.needs(n["evaluate"], hf, 4, 16) == dag.Needs(gpus=4, cores=1, process=True)  # in-process: every GPU


@pytest.mark.slow
def test_tiny_dag_side_by_side_equals_one_at_a_time(prefect_harness, tmp_path):
    """Same keys and the same metrics; evaluate[base] overlapped verify; nodes holding the process never overlapped."""
    import os

    from flows.pipeline import redi_pipeline

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores for two 1-core nodes side by side")
    out = {}
    for mode, parallel in (("seq", 1), ("par", None)):
        recipe = write_recipe(tmp_path / mode, {"run.max_parallel": parallel})
        state = redi_pipeline(recipe_path=str(recipe), return_state=True)
        assert state.is_completed(), state
        out[mode] = (state.result(), _task_runs(state.state_details.flow_run_id))
    (seq, seq_t), (par, par_t) = out["seq"], out["par"]
    assert {k: a["key"] for k, a in par["artifacts"].items()} == {k: a["key"] for k, a in seq["artifacts"].items()}
    assert par["report"]["table_rows"] == seq["report"]["table_rows"]
    assert _overlap(par_t["evaluate[base]"], par_t["verify"]) > 0, par_t
    assert all(_overlap(seq_t[a], seq_t[b]) <= 0 for a in seq_t for b in seq_t if a < b), seq_t
    held = [n for n in par_t if n in ("model", "sft", "redi") or n.startswith("evaluate")]  # tiny: hf backend, in process
    assert all(_overlap(par_t[a], par_t[b]) <= 0 for a in held for b in held if a < b), par_t
    assert Path(par["artifacts"]["redi"]["path"]).is_dir()


def test_max_parallel_is_strict_and_not_part_of_the_run(tmp_path):
    from redi.config import RecipeError, load_recipe
    from redi.pipeline import Pipeline

    root = f"run.artifact_root={tmp_path}"
    one, free = load_recipe(None, [root, "run.max_parallel=1"]), load_recipe(None, [root])
    assert free.run.max_parallel is None and Pipeline(one).recipe_hash() == Pipeline(free).recipe_hash()
    with pytest.raises(RecipeError, match="max_parallel"):
        load_recipe(None, [root, "run.max_parallel=0"])

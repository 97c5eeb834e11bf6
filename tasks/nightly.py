"""Tasks of the nightly evaluation: evaluate every registered run's latest models, publish the history."""

from __future__ import annotations

import base64
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE


@task(name="evaluate-registered", cache_policy=NONE)
def evaluate_registered(artifact_root: str, evaluate: dict[str, Any] | None, evaluate_overrides: dict[str, Any] | None,
                        runs: list[str] | None, labels: list[str] | None, results_db: str | None) -> list[dict[str, Any]]:
    from redi import runs as run_registry
    from redi.config import EvaluateConfig

    from ._common import run_logs

    cfg = EvaluateConfig.model_validate(evaluate) if evaluate is not None else None
    with run_logs():  # the library's lines (cache hit / built, progress, summaries) go to this run's logs
        res = run_registry.evaluate_registered(artifact_root, cfg, evaluate_overrides, runs, labels, results_db)
    return [asdict(r) for r in res]


@task(name="publish-history", cache_policy=NONE)
def publish_history(artifact_root: str, results_db: str | None, tonight: list[dict[str, Any]]) -> dict[str, Any]:
    """Table + markdown of tonight's results and of the whole nightly history, and the history plot."""
    from redi import runs as run_registry

    hist = run_registry.nightly_history(artifact_root, results_db)
    rows = [{k: r[k] for k in ("run", "label", "status", "model_key", "eval_key")} |
            {"pass@1": (r.get("metrics") or {}).get("average", {}).get("pass@1")} for r in tonight]
    create_table_artifact(rows or [{"run": "(no registered runs)"}], key="nightly-tonight",
                          description="Tonight's evaluation of the latest model of each registered run")
    create_table_artifact(hist["rows"] or [{"run": "(empty history)"}], key="nightly-history",
                          description="Every nightly evaluation so far")
    plot = Path(hist["plot"]) if hist.get("plot") else None
    figure = ""
    if plot and plot.is_file():  # inline in the markdown: an image artifact would print its whole data: URL under it
        figure = f"![pass@1 over time]({'data:image/png;base64,' + base64.b64encode(plot.read_bytes()).decode()})\n\n"
    create_markdown_artifact(f"## Nightly evaluation history\n\n{figure}{hist['markdown']}\n\nResults store: `{hist['results']}`"
                             + (f" (plot: `{plot}`)" if plot else ""), key="nightly-history-md", description="Nightly history")
    return hist

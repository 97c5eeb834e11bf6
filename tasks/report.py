"""Task ``report`` (register the run, append metrics, table + plot) and the Prefect UI artifacts.

UI artifacts per run (keys are versioned, so each run adds a version):
  ``<run>-metrics``   table: the run's metrics table (``Pipeline.report``'s ``table_rows``)
  ``<run>-report``    markdown: the same table + where the files are
  ``<run>-dag``       markdown: every stage's key, cache hit or built, seconds, folder
  (the report embeds the results bar chart as a data: URL in the markdown: the UI has no file access, and an
  image artifact would print the whole URL under the picture)
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

_MAX_INLINE_IMAGE = 2_000_000  # bytes; larger plots are linked by path only


def artifact_key(run: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", run.lower()).strip("-") or "run"
    return f"{slug}-{what}"


def dag_markdown(rows: list[dict[str, Any]], title: str, wall_s: float | None = None) -> str:
    lines = [f"## {title}", "", "| node | status | seconds (this run) | build s (artifact) | key | folder |",
             "|---|---|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} | {r.get('build_s', 0.0):.1f} | `{r['key']}` | `{r['path']}` |")
    hits = sum(r["status"] == "cache hit" for r in rows)
    built = sum(r["seconds"] for r in rows if r["status"] == "built")
    wall = f"; wall {wall_s:.1f} s" if wall_s is not None else ""
    lines += ["", f"{hits}/{len(rows)} nodes from cache; {built:.1f} s building, "
                  f"{sum(r['seconds'] for r in rows):.1f} s in stages{wall}."]
    return "\n".join(lines)


@task(name="report", cache_policy=NONE)
def report(recipe: dict[str, Any], models: dict[str, dict[str, Any]], grades: dict[str, dict[str, Any]],
           register: bool = False) -> dict[str, Any]:
    """Pipeline.report: results store, table, plot; ``register`` also writes runs/<name>/latest.json (nightly's input)."""
    from ._common import art, pipeline_for, run_logs

    with run_logs():
        return pipeline_for(recipe, "report").report({k: art(v) for k, v in models.items()},
                                                     {k: art(v) for k, v in grades.items()}, register=register)


@task(name="publish", cache_policy=NONE)
def publish(run: str, report: dict[str, Any] | None, dag: list[dict[str, Any]], wall_s: float | None = None) -> dict[str, str]:
    """Create the UI artifacts; returns {artifact key: kind}."""
    made = {}
    key = artifact_key(run, "dag")
    create_markdown_artifact(dag_markdown(dag, f"Run `{run}`: DAG nodes", wall_s), key=key, description=f"Cache status of run {run}")
    made[key] = "markdown"
    if report:
        key = artifact_key(run, "metrics")
        create_table_artifact(report["table_rows"], key=key, description=f"Metrics of run {run} (latest per model)")
        made[key] = "table"
        key = artifact_key(run, "report")
        reg = ("Registered for nightly evaluation (latest.json)." if report.get("registered", True) else
               "A stage rerun: recorded on its own, not registered (nightly evaluation is unchanged).")
        plot = Path(report.get("plot", ""))
        figure = ""
        if plot.is_file() and plot.stat().st_size <= _MAX_INLINE_IMAGE:  # inline: an image artifact prints its data: URL
            figure = f"![{run}: pass@1 by benchmark](data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()})\n\n"
        md = (f"## Run `{run}`: metrics\n\n{report['table_markdown']}\n\n{figure}{reg}\n\n"
              f"Files: `{report['run_dir']}` (results.md, results.csv, results.png)")
        create_markdown_artifact(md, key=key, description=f"Report of run {run}")
        made[key] = "markdown"
    return made

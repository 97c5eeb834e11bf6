"""Task ``report`` (register the run, append metrics, table + plot) and the Prefect UI artifacts.

UI artifacts per run (keys are versioned, so each run adds a version):
  ``<run>-metrics``   table: the run's metrics table (``Pipeline.report``'s ``table_rows``)
  ``<run>-report``    markdown: the same table + where the files are
  ``<run>-dag``       markdown: every stage's key, cache hit or built, seconds, folder
  ``<run>-plot``      image: the results bar chart (embedded as a data: URL; the UI has no file access)
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

_MAX_INLINE_IMAGE = 2_000_000  # bytes; larger plots are linked by path only


def artifact_key(run: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", run.lower()).strip("-") or "run"
    return f"{slug}-{what}"


def dag_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stage node from the artifact dicts a flow collected ({node name: artifact dict})."""
    rows = []
    for name, a in results.items():
        m = a.get("manifest", {})
        rows.append({"stage": name, "key": a["key"], "status": "cache hit" if a.get("cached") else "built",
                     "seconds": 0.0 if a.get("cached") else m.get("seconds", 0.0), "path": a["path"]})
    return rows


def dag_markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"## {title}", "", "| stage | status | key | build s | folder |", "|---|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['status']} | `{r['key']}` | {r['seconds']:.1f} | `{r['path']}` |")
    hits = sum(r["status"] == "cache hit" for r in rows)
    lines += ["", f"{hits}/{len(rows)} stages from cache; compute {sum(r['seconds'] for r in rows):.1f} s."]
    return "\n".join(lines)


@task(name="report", cache_policy=NONE)
def report(recipe: dict[str, Any], models: dict[str, dict[str, Any]], grades: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Pipeline.report: runs/<name>/latest.json (registers the run for nightly eval), results store, table, plot."""
    from ._common import art, pipeline_for

    return pipeline_for(recipe, "report").report({k: art(v) for k, v in models.items()}, {k: art(v) for k, v in grades.items()})


@task(name="publish", cache_policy=NONE)
def publish(run: str, report: dict[str, Any] | None, dag: list[dict[str, Any]]) -> dict[str, str]:
    """Create the UI artifacts; returns {artifact key: kind}."""
    made = {}
    key = artifact_key(run, "dag")
    create_markdown_artifact(dag_markdown(dag, f"Run `{run}`: stages"), key=key, description=f"Cache status of run {run}")
    made[key] = "markdown"
    if report:
        key = artifact_key(run, "metrics")
        create_table_artifact(report["table_rows"], key=key, description=f"Metrics of run {run} (latest per model)")
        made[key] = "table"
        key = artifact_key(run, "report")
        md = f"## Run `{run}`: metrics\n\n{report['table_markdown']}\n\nFiles: `{report['run_dir']}` (results.md, results.csv, results.png, latest.json)"
        create_markdown_artifact(md, key=key, description=f"Report of run {run}")
        made[key] = "markdown"
        plot = Path(report.get("plot", ""))
        if plot.is_file() and plot.stat().st_size <= _MAX_INLINE_IMAGE:
            key = artifact_key(run, "plot")
            url = "data:image/png;base64," + base64.b64encode(plot.read_bytes()).decode()
            create_image_artifact(url, key=key, description=f"Results of run {run} ({plot})")
            made[key] = "image"
    return made

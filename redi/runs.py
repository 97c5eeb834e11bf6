"""Registered runs and evaluation outside a recipe's own DAG: nightly re-evaluation and `redi eval`.

A run is *registered* when ``Pipeline.report`` writes ``<artifact_root>/runs/<name>/latest.json``
(the keys and folders of its latest base/sft/redi models) beside the resolved ``recipe.yaml``.
Nightly evaluation re-evaluates those models on a benchmark suite (an ``EvaluateConfig``, by default
each run's own evaluation section with optional overrides) and appends the metrics to the results
store with ``kind="nightly"``, so the history shows how each run's models score over time and across
evaluation protocols. Evaluation goes through the same content-addressed ``evaluate``/``grade``
stages as the pipeline, so an unchanged model on unchanged benchmarks is a cache hit; the history
row is appended anyway (it records that the model was checked that night).

``evaluate_external`` evaluates any model folder or Hub id (``redi eval``). Its cache key hashes the
evaluation fields, the benchmark fingerprints and the model's content (the manifest checksums when
the folder is a store artifact, else a sha256 of its files; ``hub:<id>`` for a Hub id).

Never imports Prefect: ``flows/nightly.py`` is a thin wrapper around these functions.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import MANIFEST, Artifact, ArtifactStore, hash_obj, stage_key
from .config import EvaluateConfig, Recipe, RecipeError, apply_overrides, load_recipe
from .pipeline import LABEL_STAGE, MODEL_LABELS, Pipeline, stage_code
from .storage import normalize_root

log = logging.getLogger(__name__)


@dataclass
class RegisteredRun:
    """One ``runs/<name>/latest.json`` entry."""

    name: str
    run_dir: Path
    latest: dict[str, Any]

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self.latest.get("models", {})


@dataclass
class NightlyResult:
    run: str
    label: str
    model_key: str
    status: str  # "evaluated" | "cached" | "skipped: <why>" | "failed: <why>"
    eval_key: str | None = None
    path: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def registered_runs(artifact_root: str | Path, names: list[str] | None = None) -> list[RegisteredRun]:
    """Every run with a readable ``latest.json`` under ``<artifact_root>/runs``, sorted by name (a URL root:
    its registrations are pulled into the local cache first)."""
    store = ArtifactStore(artifact_root)
    runs_dir = store.root / "runs"
    store.pull_tree(runs_dir, names=("latest.json", "recipe.yaml"))
    out = []
    for latest in sorted(runs_dir.glob("*/latest.json")):
        name = latest.parent.name
        if names and name not in names:
            continue
        try:
            out.append(RegisteredRun(name, latest.parent, json.loads(latest.read_text())))
        except (OSError, json.JSONDecodeError) as e:
            log.warning("registry: %s is unreadable, run %s skipped (%s)", latest, name, e)
    missing = set(names or []) - {r.name for r in out}
    if missing:
        log.warning("registry: no registered run named %s under %s", sorted(missing), runs_dir)
    return out


def nightly_recipe(run: RegisteredRun, artifact_root: str | Path, evaluate: EvaluateConfig | None = None,
                   evaluate_overrides: dict[str, Any] | None = None) -> Recipe:
    """The run's own resolved recipe with its evaluation section replaced and/or overridden.

    ``run.artifact_root`` is pinned to the store the run is registered in (recipes often say
    ``artifacts`` relative to where they were launched); ``evaluate.models`` to every label the run has.
    """
    tree = load_recipe(run.run_dir / "recipe.yaml").model_dump(mode="json", by_alias=True)
    tree["run"]["artifact_root"] = normalize_root(artifact_root)
    tree["run"]["cache_dir"] = None  # the registering machine's cache folder means nothing here: this one's default
    tree["run"]["refresh"] = []
    if evaluate is not None:
        tree["evaluate"] = evaluate.model_dump(mode="json")
    apply_overrides(tree, {f"evaluate.{k}": v for k, v in (evaluate_overrides or {}).items()})
    try:
        return Recipe.model_validate(tree)
    except Exception as e:  # pydantic ValidationError: name the field like load_recipe does
        raise RecipeError(f"nightly evaluation settings for run {run.name!r}: {e}") from None


def evaluate_registered(
    artifact_root: str | Path,
    evaluate: EvaluateConfig | None = None,
    evaluate_overrides: dict[str, Any] | None = None,
    runs: list[str] | None = None,
    labels: list[str] | None = None,
    results_db: str | None = None,
    kind: str = "nightly",
) -> list[NightlyResult]:
    """Evaluate the latest models of every registered run and append the metrics (``kind``) to the results store.

    A model whose artifact is gone or corrupt is reported as skipped, never retrained. A failing
    evaluation is reported and the other runs still go ahead.
    """
    from . import results

    out: list[NightlyResult] = []
    for run in registered_runs(artifact_root, runs):
        try:
            recipe = nightly_recipe(run, artifact_root, evaluate, evaluate_overrides)
        except (RecipeError, OSError) as e:
            out += [NightlyResult(run.name, lab, m.get("key", "?"), f"skipped: {e}") for lab, m in run.models.items()]
            continue
        pipe = Pipeline(recipe)
        store = results.ResultsStore(Path(results_db) if results_db else pipe.results_path())
        for label, model in sorted(run.models.items()):
            if label not in MODEL_LABELS or (labels and label not in labels):
                continue
            art = pipe.store.lookup(LABEL_STAGE[label], model["key"])
            if art is None:
                log.warning("nightly: %s/%s model %s is missing or corrupt: skipped", run.name, label, model["key"])
                out.append(NightlyResult(run.name, label, model["key"], "skipped: model artifact missing or corrupt"))
                continue
            try:
                grade = pipe.evaluate(label, art)
            except Exception as e:
                log.exception("nightly: evaluating %s/%s failed", run.name, label)
                out.append(NightlyResult(run.name, label, art.key, f"failed: {type(e).__name__}: {e}"))
                continue
            metrics = json.loads(grade.file("metrics.json").read_text())
            store.append_metrics(run=run.name, label=pipe.result_label(label), model_key=art.key, recipe_hash=run.latest.get("recipe_hash", ""),
                                 eval_key=grade.key, metrics=metrics, protocol=recipe.evaluate.hash_fields(), kind=kind)
            out.append(NightlyResult(run.name, label, art.key, "cached" if grade.cached else "evaluated",
                                     grade.key, grade.path, metrics))
    return out


# ---------------------------------------------------------------------------------------- any model
def model_fingerprint(model: str) -> str:
    """Content identity of a model: manifest checksums for a store artifact, sha256 of files for a
    folder, ``hub:<id>`` for anything that is not a local path (a Hub id)."""
    p = Path(model).expanduser()
    if not p.exists():
        return f"hub:{model}"
    p = p.resolve()
    for cand in (p, p.parent):  # a base-model artifact is the folder; sft/redi keep the model in <artifact>/model
        m = cand / MANIFEST
        if m.is_file():
            files = json.loads(m.read_text()).get("files", {})
            rel = "" if cand == p else p.name + "/"
            sub = {k: v["sha256"] for k, v in files.items() if k.startswith(rel)}
            if sub:
                return "sha:" + hash_obj(sub, 32)
    from .fingerprint import fingerprint

    return "sha:" + fingerprint(p).removeprefix("sha256:")[:32]  # cached: an unchanged folder is not read again


def evaluate_external(model: str, recipe: Recipe, name: str | None = None, kind: str = "eval") -> dict[str, Any]:
    """Evaluate any model folder or Hub id with ``recipe.evaluate``; append to the results store.

    ``recipe`` supplies the evaluation protocol, the artifact root, the results store and (for a
    synthetic source) the held-out ``demo_test``/``demo_val`` files. Returns the grade artifact dict,
    the metrics and where the results went.
    """
    from . import benchmarks, results
    from . import evaluate as ev

    pipe = Pipeline(recipe)
    cfg = recipe.evaluate
    extra = pipe.extra_benchmark_paths()
    fps = {}
    for b in cfg.benchmarks:
        try:
            fps[b] = benchmarks.fingerprint(b, cfg, extra)
        except Exception as e:
            fps[b] = f"unavailable:{type(e).__name__}"
    model_fp = model_fingerprint(model)
    model_arg = Path(model).expanduser().resolve() if Path(model).expanduser().exists() else Path(model)
    code = stage_code("evaluate", "grade")
    key = stage_key("evaluate", cfg.hash_fields(), {"model": model_fp, "benchmarks": fps}, code)
    label = name or Path(model).name or model
    t0 = time.time()
    art: Artifact = pipe.store.build(
        "evaluate", key, lambda out, work: ev.evaluate_model(cfg, model_arg, out, extra, label, work=work),
        config=cfg.hash_fields(), inputs={"model": model_fp, "model_path": str(model), "benchmarks": fps},
        refresh="evaluate" in recipe.run.refresh)
    metrics = json.loads(art.file("metrics.json").read_text())
    store = results.ResultsStore(pipe.results_path())
    store.append_metrics(run=recipe.run.name, label=label, model_key=model_fp, recipe_hash=pipe.recipe_hash(),
                         eval_key=key, metrics=metrics, protocol=cfg.hash_fields(), kind=kind)
    return {"artifact": art.to_dict(), "metrics": metrics, "results": str(pipe.results_path()),
            "seconds": round(time.time() - t0, 1), "cached": art.cached}


# ---------------------------------------------------------------------------------------- history
def nightly_history(artifact_root: str | Path, results_db: str | None = None, kind: str = "nightly") -> dict[str, Any]:
    """The ``kind`` rows of the results store: the macro-average row of every evaluation as table rows
    and markdown (latest 50), and ``results.history_plot`` (pass@1 over time per run/model, one panel
    per benchmark) written to ``<results>/nightly_history.png``."""
    from . import results

    if results_db:
        path = Path(results_db)
    else:  # a URL root: the shared results store is pulled into its cache first
        store = ArtifactStore(artifact_root)
        path = store.root / "results"
        store.pull_tree(path, only_missing=True)
    out: dict[str, Any] = {"results": str(path), "rows": [], "markdown": "(no nightly results yet)", "plot": None}
    df = results.ResultsStore(path).load(kind=kind)
    if df.empty:
        return out
    avg = df[df["benchmark"] == results.AVERAGE]
    cols = ["time", "run", "label", "pass@1", "pass@1_sem", "n_samples", "model_key", "eval_key"]
    view = avg[[c for c in cols if c in avg.columns]].copy()
    view["time"] = pd_utc(view["time"])
    out["rows"] = json.loads(view.to_json(orient="records"))
    lines = ["| time (UTC) | run | model | pass@1 % | ± | n | model key |", "|---|---|---|---:|---:|---:|---|"]
    for r in out["rows"][-50:]:
        lines.append(f"| {r['time']} | {r['run']} | {r['label']} | {100 * (r.get('pass@1') or 0):.1f} | "
                     f"{100 * (r.get('pass@1_sem') or 0):.1f} | {r.get('n_samples')} | `{r.get('model_key')}` |")
    out["markdown"] = "\n".join(lines)
    out["plot"] = str(results.history_plot(df, path / "nightly_history.png"))
    return out


def pd_utc(seconds: Any) -> Any:
    import pandas as pd

    return pd.to_datetime(seconds, unit="s").dt.strftime("%Y-%m-%d %H:%M:%S")


def metrics_rows(metrics: dict[str, Any], cols: tuple[str, ...] = ("pass@1", "pass@1_sem", "maj@1", "no_answer_share",
                                                                  "truncated_share", "n_problems", "n_samples")) -> list[dict[str, Any]]:
    """metrics.json of an evaluation as one row per benchmark plus the macro average (scalars only)."""
    per = metrics.get("benchmarks", {k: v for k, v in metrics.items() if isinstance(v, dict) and k != "average"})
    rows = [{"benchmark": b, **{c: m.get(c) for c in cols if c in m}} for b, m in per.items()]
    if isinstance(metrics.get("average"), dict):
        rows.append({"benchmark": "average", **{c: metrics["average"].get(c) for c in cols if c in metrics["average"]}})
    return rows

"""The folders of a push, one per repository (model, dataset, details), and the inputs of their cards.

:mod:`redi.publish` calls :func:`write_model`, :func:`write_dataset` and :func:`write_details` for the parts it
stages; :mod:`redi.cards` renders the cards from the plain values gathered here. Model weights are hard links to
the artifact's files where the file system allows it (no copy of a multi-GB checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cards
from .artifacts import MANIFEST
from .publish_source import PublishError, RunSource, evaluation_samples

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("redi.publish")

REPO = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO / "deployments"
PAPER_RECIPE = RECIPES_DIR / "redi-qwen2.5-math-1.5b" / "recipe.yaml"
"""The paper's recipe: the model card compares the run's recipe with it field by field."""
KNOWN_LICENSES: dict[str, str] = {
    "tiny": "apache-2.0",  # built by this project (pyproject: Apache-2.0)
    "synthetic": "apache-2.0",  # written by this project's own teacher (redi.synth)
    "Qwen/Qwen2.5-Math-1.5B": "apache-2.0",
    "open-r1/OpenR1-Math-Raw": "apache-2.0",
}
"""License of a base model / trace source when ``--license`` is not given; anything else needs the flag."""


# ------------------------------------------------------------------------------------------ card inputs
def licenses(recipe: Any, flag: str | None, kinds: list[str]) -> dict[str, str]:
    """The license of each kind: ``flag``, else :data:`KNOWN_LICENSES` of the base model (model, details)
    or of the trace source (dataset)."""
    base = recipe.model.base
    data = recipe.data.hub_id if recipe.data.source == "hub" else recipe.data.source
    out = {}
    for k in kinds:
        what, name = ("data.source" if recipe.data.source != "hub" else "data.hub_id", data) if k == "dataset" else ("model.base", base)
        lic = flag or KNOWN_LICENSES.get(name)
        if not lic:
            raise PublishError(f"the license of {what} {name!r} is not known here: pass --license (a Hub license id, "
                               "e.g. apache-2.0, mit, other) that the model's / traces' own license allows")
        out[k] = lic
    return out


def metrics_table(src: RunSource) -> tuple[str, pd.DataFrame]:
    """The run's registered grades as the pipeline's comparison table, with the paper's rows (markdown, frame)."""
    import pandas as pd

    from . import results

    rows = []
    for lab, g in src.grades.items():
        metrics = json.loads(g.file("metrics.json").read_text())
        rows += results.rows_from_metrics(metrics, run=src.name, label=src.result_label(lab), eval_key=g.key,
                                          model_key=src.latest["models"].get(lab, {}).get("key", ""), kind="pipeline")
    if not rows:
        return "(this run has no registered evaluation)", pd.DataFrame()
    table = results.comparison_table(pd.DataFrame(rows), paper=True)
    return table.markdown, table.frame


def recipe_departures(src: RunSource, notes: str | os.PathLike[str] | None) -> tuple[str | None, str | None]:
    """(this recipe's documented departures, the implementation's): the "departs from the paper" sections of
    ``notes`` (a markdown file) or ``deployments/<run name>/README.md``, and of the paper recipe's README."""
    mine = Path(notes) if notes else RECIPES_DIR / src.name / "README.md"
    if notes and not mine.is_file():
        raise PublishError(f"--notes {notes}: no such file (give the recipe's README.md with a '## Where ... departs from the paper' section)")
    own = cards.departures_section(mine.read_text()) if mine.is_file() else None
    if notes and own is None:
        raise PublishError(f"--notes {notes}: no '## ... departs ...' / '## Deviations ...' section found: add one, or leave --notes out")
    paper_readme = PAPER_RECIPE.parent / "README.md"
    impl = cards.departures_section(paper_readme.read_text()) if paper_readme.is_file() else None
    return own, (impl if mine.resolve() != paper_readme.resolve() else None)


def differences(src: RunSource) -> list[tuple[str, Any, Any]]:
    from .config import load_recipe

    if not PAPER_RECIPE.is_file():
        return []
    dump = lambda r: r.model_dump(mode="json", by_alias=True)  # noqa: E731
    diffs = cards.recipe_differences(dump(src.recipe), dump(load_recipe(PAPER_RECIPE)))
    if src.recipe.data.source != "hub":  # data.hub_id is not read then
        diffs = [d for d in diffs if d[0] != "data.hub_id"]
    return diffs


def stages_text(src: RunSource) -> list[str]:
    r = src.recipe
    base = r.model.base if r.model.base != "tiny" else f"a tiny Qwen2 built by the pipeline ({r.model.tiny.num_layers} layers, width {r.model.tiny.hidden_size})"
    sv = src.verify.summary if src.verify else {}
    lines = [f"- Base model: {base}."]
    if src.label in ("sft", "redi"):
        lines.append(f"- Stage 1, SFT on {sv.get('positives', '?')} positive traces: lr {r.sft.lr}, global batch {r.sft.global_batch}, "
                     + (f"{r.sft.max_steps} steps." if r.sft.max_steps else f"{r.sft.epochs} epochs."))
    if src.label == "redi":
        coef = f", alpha {r.redi.alpha}" if r.redi.loss == "redi" else ""
        lines.append(f"- Stage 2, `{r.redi.loss}` objective{coef} on {sv.get('pairs', '?')} pairs: lr {r.redi.lr}, global batch "
                     f"{r.redi.global_batch}, " + (f"{r.redi.max_steps} steps." if r.redi.max_steps else f"{r.redi.epochs} epochs."))
    tr = src.model.summary
    if tr.get("steps"):
        lines.append(f"- This model's training: {tr['steps']} steps on {tr.get('device', '?')}, {tr.get('train_seconds', '?')} s.")
    lines.append(f"- Artifact: `{src.model.stage}/{src.model.key}` of the run's content-addressed store.")
    return lines


def source_text(recipe: Any, license_: str) -> str:
    d = recipe.data
    if d.source == "hub":
        rev = f", revision `{d.revision}`" if d.revision else ""
        return (f"Teacher traces: [{d.hub_id}](https://huggingface.co/datasets/{d.hub_id}) (split `{d.hub_split}`{rev}; "
                f"license {KNOWN_LICENSES.get(d.hub_id, 'see its card')}), the generations of a reasoning teacher.")
    if d.source == "synthetic":
        return ("Synthetic traces written offline by this project's own teacher (`redi/synth.py`): arithmetic and "
                "algebra word problems, each with correct and deliberately wrong worked solutions. No third-party text.")
    return f"Local files (`data.local_path`); their license is their owner's ({license_} as given)."


# ------------------------------------------------------------------------------------------ folders
def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)



def write_model(src: RunSource, folder: Path, repo_id: str, ids: dict[str, str], lic: str,
                departures: tuple[str | None, str | None]) -> dict[str, Any]:
    """The model's files (manifest left out), recipe.yaml and README.md (the model card); ``departures`` from
    :func:`recipe_departures`."""
    _fresh(folder)
    mdir = src.model_dir()
    for p in sorted(mdir.rglob("*")):
        if p.is_file() and p.relative_to(mdir).as_posix() != MANIFEST:
            _link(p, folder / p.relative_to(mdir))
    (folder / "recipe.yaml").write_text(src.recipe_yaml)
    metrics_md, _ = metrics_table(src)
    own, impl = departures
    r = src.recipe
    base = r.model.base if r.model.base != "tiny" and not Path(r.model.base).expanduser().exists() else None
    datasets = [x for x in (ids.get("dataset"), r.data.hub_id if r.data.source == "hub" else None) if x]
    funnel_md = src.verify.file("funnel.md").read_text() if src.verify and (src.verify.dir / "funnel.md").exists() else None
    card = cards.model_card({
        "repo_id": repo_id, "run": src.name, "label": src.label, "name": src.name_of_model, "license": lic,
        "base_model": base, "datasets": datasets,
        "tags": list(dict.fromkeys(["redi", "reinforcement-distillation", "math", "reasoning", src.name_of_model])),
        "recipe_yaml": src.recipe_yaml, "stages": stages_text(src), "funnel_md": funnel_md, "metrics_md": metrics_md,
        "protocol": {"name": r.evaluate.protocol().name, **_protocol(src)},
        "paper_protocol": r.evaluate.protocol().name == _paper_protocol(),
        "differences": differences(src), "recipe_departures": own, "implementation_departures": impl,
        "dataset_repo": ids.get("dataset"), "details_repo": ids.get("details")})
    (folder / "README.md").write_text(card)
    return {"files": _files(folder), "model": src.name_of_model, "artifact": f"{src.model.stage}/{src.model.key}"}


def _paper_protocol() -> str:
    from .results import PAPER_PROTOCOL

    return PAPER_PROTOCOL


def _protocol(src: RunSource) -> dict[str, Any]:
    for g in src.grades.values():
        proto = g.summary.get("protocol")
        if proto:
            return dict(proto)
    return {}


def write_dataset(src: RunSource, folder: Path, repo_id: str, ids: dict[str, str], lic: str) -> dict[str, Any]:
    """positives.parquet and pairs.parquet of the verify artifact (as they are) and README.md (the dataset card)."""
    import pyarrow.parquet as pq

    from .label_rules import LABEL_RULES
    from .schema import PAIR_COLUMNS, POSITIVE_COLUMNS

    assert src.verify is not None
    _fresh(folder)
    counts, schemas = {}, {}
    for table, cols in (("positives", POSITIVE_COLUMNS), ("pairs", PAIR_COLUMNS)):
        path = src.verify.file(f"{table}.parquet")
        _link(path, folder / f"{table}.parquet")
        meta = pq.read_schema(path)
        counts[table] = pq.ParquetFile(path).metadata.num_rows
        described = {**cols, **{c: "" for c in meta.names if c not in cols}}
        schemas[table] = cards.schema_table(described, {n: str(meta.field(n).type) for n in meta.names})
    v = src.recipe.verify
    s = src.verify.summary
    selection = {k: getattr(v, k) for k in ("label_rule", "problem_identity", "positives", "pairs_per_problem", "require_answer",
                                            "require_valid", "exclude_sources", "length_filter", "max_prompt_tokens",
                                            "max_response_tokens", "decontaminate") if hasattr(v, k)}
    rule = LABEL_RULES.get(v.label_rule)
    funnel_md = src.verify.file("funnel.md").read_text() if (src.verify.dir / "funnel.md").exists() else None
    r = src.recipe
    card = cards.dataset_card({
        "repo_id": repo_id, "run": src.name, "license": lic, "source": source_text(r, lic),
        "source_datasets": [r.data.hub_id] if r.data.source == "hub" else None, "counts": counts, "schemas": schemas,
        "label_rule": v.label_rule, "label_rule_summary": rule.summary if rule else "(not registered here)",
        "selection": selection, "funnel": s.get("funnel", []), "funnel_md": funnel_md, "model_repo": ids.get("model")})
    (folder / "README.md").write_text(card)
    return {"files": _files(folder), "counts": counts, "artifact": f"verify/{src.verify.key}"}


def write_details(src: RunSource, folder: Path, repo_id: str, ids: dict[str, str], lic: str) -> dict[str, Any]:
    """details/<model>/<benchmark>.parquet (every sample), results/<model>.json and README.md."""
    import pandas as pd

    from .evaluate import SAMPLE_FILE_COLUMNS

    _fresh(folder)
    files = []
    for lab, g in src.grades.items():
        samples = evaluation_samples(src, lab)
        name = src.result_label(lab)
        _link(g.file("metrics.json"), folder / "results" / f"{name}.json")
        if samples is None:
            continue
        for bench, part in samples.groupby("benchmark", sort=False):
            rel = f"details/{name}/{bench}.parquet"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            part.reset_index(drop=True).to_parquet(folder / rel, index=False)
            files.append({"model": name, "benchmark": str(bench), "path": rel, "rows": len(part)})
    if not files:
        raise PublishError(f"run {src.name!r} has no evaluation samples to publish: evaluate it (`redi run RECIPE`), "
                           "or leave the details out with --only model,dataset")
    dtypes = {c: str(t) for c, t in pd.read_parquet(folder / files[0]["path"]).dtypes.items()}
    metrics_md, _ = metrics_table(src)
    card = cards.details_card({"repo_id": repo_id, "run": src.name, "license": lic, "files": files,
                               "schema": cards.schema_table(SAMPLE_FILE_COLUMNS, dtypes), "protocol": _protocol(src),
                               "metrics_md": metrics_md, "model_repo": ids.get("model")})
    (folder / "README.md").write_text(card)
    return {"files": _files(folder), "details": files}


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

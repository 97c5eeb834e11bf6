"""Publish a registered run to the Hugging Face Hub: a model, its training data, its evaluation details.

``redi push`` and the ``redi-push`` flow call :func:`publish`. It reads a run registered by
``Pipeline.report`` (``<artifact_root>/runs/<name>/latest.json`` and ``recipe.yaml``, see :mod:`redi.runs`)
and writes one folder per repository under ``out``:

- ``model/``: the chosen model's files (``base``, ``sft``, ``redi``, or the stage-2 objective's name:
  ``dpo``, ``simpo``, ...), ``recipe.yaml`` and a model card (:func:`redi.cards.model_card`);
- ``dataset/``: ``positives.parquet`` and ``pairs.parquet`` of the run's verify artifact with a dataset card;
- ``details/``: every evaluation sample of the run's models, ``details/<model>/<benchmark>.parquet``, and
  ``results/<model>.json`` (metrics), with a card, as lighteval's ``details_*`` datasets;
- ``push.json`` beside them: which folder goes to which repository (not uploaded).

A dry run stops there. A real push then uploads exactly those folders through ``huggingface_hub``
(``HfApi.create_repo(exist_ok=True)`` and ``HfApi.upload_folder``, one commit per repository). The token
is ``huggingface_hub.get_token()`` (``HF_TOKEN`` or ``hf auth login``), never a recipe field; it is not
logged. Every input is checked before the first upload: the run, the label, the artifacts, the repo ids,
the license, the token, offline mode; each failure is a one-line :class:`PublishError` naming the fix.

Model weights are hard links to the artifact's files where the file system allows it (no copy of a
multi-GB checkpoint); do not edit files in a staged folder. Never imports Prefect.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cards
from .artifacts import MANIFEST, Artifact, ArtifactStore
from .dag import LABEL_STAGE, MODEL_LABELS

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("model", "dataset", "details")
"""The repositories a push can write, in upload order."""
REPO_TYPES = {"model": "model", "dataset": "dataset", "details": "dataset"}
SUFFIX = {"model": "", "dataset": "-data", "details": "-details"}
"""Default repo ids from ``--repo NS/NAME``: NS/NAME, NS/NAME-data, NS/NAME-details."""
PLAN_FILE = "push.json"
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
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class PublishError(ValueError):
    """Bad input for a push (a one-line message naming the thing and the fix)."""


# ------------------------------------------------------------------------------------------ checks
def check_repo_id(repo_id: str, what: str = "--repo") -> str:
    """``namespace/name`` as the Hub accepts it (letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``)."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id \
            or repo_id.endswith((".git", ".")):
        raise PublishError(f"{what} {repo_id!r} is not a Hub repo id: use NAMESPACE/NAME (your user or organisation, "
                           "then letters, digits, '-', '_' or '.'), e.g. my-user/redi-demo")
    return repo_id


def repo_ids(repo: str, only: list[str] | None = None, dataset_repo: str | None = None,
             details_repo: str | None = None) -> dict[str, str]:
    """The repo id of each published kind: ``repo`` + :data:`SUFFIX`, unless given explicitly."""
    kinds = list(only or KINDS)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise PublishError(f"--only: unknown part {', '.join(bad)}; use a comma-separated subset of {','.join(KINDS)}")
    check_repo_id(repo)
    explicit = {"dataset": dataset_repo, "details": details_repo}
    ids = {k: check_repo_id(explicit[k], f"--{k}-repo") if explicit.get(k) else repo + SUFFIX[k] for k in KINDS if k in kinds}
    for k, rid in ids.items():
        check_repo_id(rid, f"the {k} repo id")
    if len(set(zip(ids.values(), (REPO_TYPES[k] for k in ids), strict=True))) < len(ids):
        raise PublishError(f"two parts would go to the same repository ({ids}): give --dataset-repo / --details-repo distinct ids")
    return ids


def hub_token(token: str | None = None) -> str:
    """The token of a real push: ``token`` or huggingface_hub's (``HF_TOKEN``, ``hf auth login``); offline mode is an error."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset HF_HUB_OFFLINE (and run.offline only "
                           "affects runs), or add --dry-run to write the folders only")
    tok = token or get_token()
    if not tok:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access), "
                           "or add --dry-run to write the folders only")
    return tok


# ------------------------------------------------------------------------------------------ the run
@dataclass
class RunSource:
    """What a push reads from one registered run (resolved and checked by :func:`load_run`)."""

    name: str
    run_dir: Path
    recipe: Any  # redi.config.Recipe
    recipe_yaml: str
    latest: dict[str, Any]
    store: ArtifactStore
    label: str  # the DAG label of the chosen model
    model: Artifact
    verify: Artifact | None = None
    grades: dict[str, Artifact] = field(default_factory=dict)

    def result_label(self, label: str) -> str:
        """base / sft, or the stage-2 objective's name (as the results store calls the stage-2 model)."""
        return self.recipe.redi.loss if LABEL_STAGE[label] == "redi" else label

    @property
    def name_of_model(self) -> str:
        return self.result_label(self.label)

    def model_dir(self) -> Path:
        return self.model.dir if self.label == "base" else self.model.file("model")


def _labels_help(recipe: Any) -> str:
    return ", ".join(dict.fromkeys([*MODEL_LABELS, recipe.redi.loss]))


def resolve_label(label: str, recipe: Any) -> str:
    """The DAG label of ``label``: ``base``/``sft``/``redi``, or the stage-2 objective the run trained with."""
    if label in MODEL_LABELS:
        return label
    if label == recipe.redi.loss:
        return "redi"
    raise PublishError(f"--model {label!r}: this run has no such model; choose one of {_labels_help(recipe)} "
                       f"(its stage-2 objective is {recipe.redi.loss!r})")


def load_run(artifact_root: str | os.PathLike[str], run: str, label: str, need_verify: bool = True) -> RunSource:
    """The registered run ``run`` with its chosen model, verify artifact and grades, every artifact validated."""
    from .config import RecipeError, load_recipe
    from .runs import registered_runs

    found = registered_runs(artifact_root)
    match = [r for r in found if r.name == run]
    if not match:
        names = ", ".join(r.name for r in found) or "none"
        raise PublishError(f"run {run!r} is not registered under {artifact_root}/runs (registered: {names}): run its "
                           "recipe to the end (`redi run RECIPE`), or pass --artifact-root of the store it ran in")
    reg = match[0]
    try:
        recipe = load_recipe(reg.run_dir / "recipe.yaml")
    except (RecipeError, OSError) as e:
        raise PublishError(f"run {run!r}: its recipe {reg.run_dir / 'recipe.yaml'} cannot be read ({e}): run its recipe again") from None
    dag_label = resolve_label(label, recipe)
    entry = reg.models.get(dag_label)
    if not entry:
        raise PublishError(f"run {run!r} registered no {dag_label} model (registered: {', '.join(reg.models) or 'none'}): "
                           f"evaluate it with `redi stage evaluate RECIPE --labels {dag_label} --register`, or choose another --model")
    store = ArtifactStore(artifact_root)
    model = _artifact(store, LABEL_STAGE[dag_label], entry["key"], f"the {dag_label} model of run {run!r}")
    src = RunSource(run, reg.run_dir, recipe, (reg.run_dir / "recipe.yaml").read_text(), reg.latest, store, dag_label, model)
    try:
        src.verify = _verify_artifact(src)
    except PublishError:
        if need_verify:
            raise
    for lab, key in sorted(reg.latest.get("grades", {}).items(), key=lambda kv: MODEL_LABELS.index(kv[0]) if kv[0] in MODEL_LABELS else 99):
        g = store.lookup("grade", key)
        if g is None:
            log.warning("push: the grade artifact %s of %s/%s is missing or corrupt: left out of the metrics", key, run, lab)
            continue
        src.grades[lab] = g
    return src


def _artifact(store: ArtifactStore, stage: str, key: str, what: str) -> Artifact:
    art = store.lookup(stage, key)
    if art is None:
        raise PublishError(f"{what} ({stage} artifact {key} under {store.location}) is missing or corrupt: rerun the "
                           "run's recipe (`redi run RECIPE`) to rebuild it, then push again")
    return art


def _verify_artifact(src: RunSource) -> Artifact:
    """The verify artifact the run's trained models learnt from (their manifests name it)."""
    for lab in ("sft", "redi"):
        entry = src.latest.get("models", {}).get(lab)
        if entry:
            art = src.model if lab == src.label else src.store.lookup(LABEL_STAGE[lab], entry["key"])
            key = (art.manifest.get("inputs", {}) if art else {}).get("verify")
            if key:
                return _artifact(src.store, "verify", key, f"the training data of run {src.name!r}")
    raise PublishError(f"run {src.name!r} registered no trained model (sft or redi), so it names no verify artifact: "
                       "register one (`redi run RECIPE`), or leave the dataset out with --only model,details")


def evaluation_samples(src: RunSource, label: str) -> pd.DataFrame | None:
    """Every sample of ``label``'s registered evaluation under the current grader: the grade artifact's
    samples.parquet when it re-graded, else the evaluation's (whose verdicts the grade copied)."""
    import pandas as pd

    g = src.grades.get(label)
    if g is None:
        return None
    if (g.dir / "samples.parquet").exists():
        return pd.read_parquet(g.dir / "samples.parquet")
    ek = g.manifest.get("inputs", {}).get("evaluate")
    ev = src.store.lookup("evaluate", ek) if ek else None
    if ev is None or not (ev.dir / "samples.parquet").exists():
        log.warning("push: the evaluation samples of %s/%s (evaluate %s) are missing: no details for it", src.name, label, ek)
        return None
    return pd.read_parquet(ev.dir / "samples.parquet")


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


def prepare_out(out: Path) -> Path:
    """``out`` empty, or a previous push folder (it has push.json): its part folders are replaced."""
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not (out / PLAN_FILE).is_file():
        raise PublishError(f"--out {out} is not empty and is not an earlier push folder (no {PLAN_FILE}): choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    for k in KINDS:
        if (out / k).exists():
            shutil.rmtree(out / k)
    (out / PLAN_FILE).unlink(missing_ok=True)
    return out


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


# ------------------------------------------------------------------------------------------ entry points
def stage(artifact_root: str | os.PathLike[str], run: str, model: str, repo: str, out: str | os.PathLike[str] | None = None,
          only: list[str] | None = None, dataset_repo: str | None = None, details_repo: str | None = None,
          license: str | None = None, notes: str | None = None) -> dict[str, Any]:
    """Write the folders a push uploads (one per repository) under ``out`` and ``push.json``; upload nothing.

    ``out`` defaults to ``<artifact_root>/runs/<run>/publish/<model>``. Returns the plan: ``{"out", "run",
    "model", "parts": {kind: {"repo_id", "repo_type", "folder", "files", ...}}}`` (also in push.json)."""
    ids = repo_ids(repo, only, dataset_repo, details_repo)
    src = load_run(artifact_root, run, model, need_verify="dataset" in ids)
    lic = licenses(src.recipe, license, list(ids))
    departures = recipe_departures(src, notes) if "model" in ids else (None, None)
    if "details" in ids and not src.grades:
        raise PublishError(f"run {run!r} has no registered evaluation to publish as details: evaluate it "
                           "(`redi run RECIPE`), or leave the details out with --only model,dataset")
    out_dir = prepare_out(Path(out) if out else src.run_dir / "publish" / model)
    parts: dict[str, Any] = {}
    for kind, rid in ids.items():
        folder = out_dir / kind
        if kind == "model":
            info = write_model(src, folder, rid, ids, lic[kind], departures)
        elif kind == "dataset":
            info = write_dataset(src, folder, rid, ids, lic[kind])
        else:
            info = write_details(src, folder, rid, ids, lic[kind])
        parts[kind] = {"repo_id": rid, "repo_type": REPO_TYPES[kind], "folder": str(folder), **info}
        log.info("push: %s folder for %s (%s): %s, %d files", kind, rid, REPO_TYPES[kind], folder, len(info["files"]))
    plan = {"out": str(out_dir), "run": run, "model": src.name_of_model, "parts": parts}
    (out_dir / PLAN_FILE).write_text(json.dumps(plan, indent=2))
    return plan


def upload(plan: dict[str, Any], token: str | None = None, private: bool = False, api: Any = None,
           commit_message: str | None = None) -> dict[str, Any]:
    """Upload each folder of ``plan`` (from :func:`stage`) to its repository: ``create_repo(exist_ok=True)``
    then ``upload_folder``. Returns ``{kind: commit url}``."""
    from huggingface_hub import HfApi

    tok = hub_token(token)
    api = api or HfApi()
    urls = {}
    for kind, part in plan["parts"].items():
        api.create_repo(part["repo_id"], repo_type=part["repo_type"], private=private, exist_ok=True, token=tok)
        info = api.upload_folder(folder_path=part["folder"], repo_id=part["repo_id"], repo_type=part["repo_type"], token=tok,
                                 commit_message=commit_message or f"REDI run {plan['run']}: {kind} of {plan['model']}")
        urls[kind] = getattr(info, "commit_url", str(info))
        log.info("push: %s uploaded to %s (%s)", kind, part["repo_id"], urls[kind])
    return urls


def publish(artifact_root: str | os.PathLike[str], run: str, model: str, repo: str, out: str | os.PathLike[str] | None = None,
            dry_run: bool = False, only: list[str] | None = None, dataset_repo: str | None = None,
            details_repo: str | None = None, license: str | None = None, notes: str | None = None,
            private: bool = False, token: str | None = None, api: Any = None) -> dict[str, Any]:
    """:func:`stage`, then (unless ``dry_run``) :func:`upload` of the same folders. A real push checks the
    token and offline mode before writing anything."""
    repo_ids(repo, only, dataset_repo, details_repo)  # a malformed id fails before the token is asked for
    if not dry_run:
        token = hub_token(token)
    plan = stage(artifact_root, run, model, repo, out, only, dataset_repo, details_repo, license, notes)
    plan["dry_run"] = dry_run
    plan["uploaded"] = {} if dry_run else upload(plan, token, private, api)
    return plan

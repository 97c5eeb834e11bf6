"""Hub cards for a published run: the model card, the dataset card (positives and pairs) and the evaluation
details card. Pure functions of plain data (dicts, strings, DataFrames already read): no file or network
I/O, so each card is tested on literals. :mod:`redi.publish` gathers the inputs and writes the folders.

A card is ``---`` YAML metadata ``---`` then markdown, as the Hub reads it (``huggingface_hub.RepoCard``).
The model card carries ``base_model``, ``datasets``, ``tags``, ``license``; the dataset cards a ``configs``
list so the Hub's viewer and ``datasets.load_dataset(repo, name)`` find each table.

Where a card departs from the usual Hub cards: the paper's numbers sit beside ours in one table
(:func:`redi.results.comparison_table`, ``paper=True``) even when the evaluation protocol is not the
paper's; the card then says the rows are not comparable instead of hiding them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import yaml

PAPER_TITLE = "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM Reasoning"
PAPER_URL = "https://arxiv.org/abs/2505.24850"
CITATION = """@misc{xu2025harnessingnegativesignalsreinforcement,
      title={Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM Reasoning},
      author={Shuyao Xu and Cheng Peng and Jiangxuan Long and Weidi Xu and Wei Chu and Yuan Qi},
      year={2025},
      eprint={2505.24850},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/2505.24850},
}"""
"""BibTeX of Xu et al. 2025 (arXiv 2505.24850), as the official repository's README gives it."""

PAPER_FIELDS: tuple[str, ...] = (
    "data.source", "data.hub_id", "model.base", "prompt.train", "verify.label_rule", "verify.positives",
    "verify.pairs_per_problem", "verify.length_filter", "verify.max_prompt_tokens", "verify.max_response_tokens",
    "sft.lr", "sft.epochs", "sft.max_steps", "sft.global_batch", "sft.schedule",
    "redi.loss", "redi.alpha", "redi.lr", "redi.epochs", "redi.max_steps", "redi.global_batch",
    "evaluate.prompt_protocol", "evaluate.n_samples", "evaluate.temperature", "evaluate.top_p",
    "evaluate.max_new_tokens", "evaluate.benchmarks",
)
"""Recipe fields a model card compares with the paper's recipe (the ones that change what a number means)."""

_DEPARTS = re.compile(r"^##\s+.*\b(depart|deviat)", re.IGNORECASE)


# ---------------------------------------------------------------------------------------- pieces
def front_matter(meta: dict[str, Any]) -> str:
    """``---`` YAML ``---``: the Hub's card metadata (keys in the given order, None values left out)."""
    meta = {k: v for k, v in meta.items() if v is not None and v != []}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """The metadata dict and the markdown body of a card (the inverse of :func:`front_matter` + body)."""
    if not text.startswith("---\n"):
        return {}, text
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head) or {}, body


def demote(md: str, levels: int = 1) -> str:
    """Markdown with every heading ``levels`` deeper (a file's ``#`` becomes a card section's ``##``)."""
    return re.sub(r"^(#+)(\s)", lambda m: "#" * (len(m.group(1)) + levels) + m.group(2), md, flags=re.MULTILINE)


def departures_section(readme: str) -> str | None:
    """The body of a recipe README's "## Where ... departs from the paper" / "## Deviations ..." section
    (up to the next ``##`` heading), or None when it has none."""
    out: list[str] = []
    inside = False
    for line in readme.splitlines():
        if line.startswith("## "):
            if inside:
                break
            inside = bool(_DEPARTS.match(line))
            continue
        if inside:
            out.append(line)
    text = "\n".join(out).strip()
    return text or None


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def recipe_differences(ours: dict[str, Any], paper: dict[str, Any], fields: Iterable[str] = PAPER_FIELDS) -> list[tuple[str, Any, Any]]:
    """``(field, paper value, our value)`` for each of ``fields`` whose values differ between two recipe dumps."""
    return [(f, _get(paper, f), _get(ours, f)) for f in fields if _get(paper, f) != _get(ours, f)]


def _cell(v: Any) -> str:
    if isinstance(v, list):
        v = ", ".join(map(str, v))
    return "–" if v is None else str(v).replace("|", "\\|")


def differences_table(diffs: list[tuple[str, Any, Any]]) -> str:
    if not diffs:
        return "Every compared field has the paper recipe's value."
    lines = ["| recipe field | paper recipe | this run |", "|---|---|---|"]
    lines += [f"| `{f}` | {_cell(p)} | {_cell(o)} |" for f, p, o in diffs]
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def funnel_table(funnel: list[dict[str, Any]]) -> str:
    """The verify summary's ``funnel`` (``[{step, problems, traces}]``) as a markdown table."""
    return markdown_table(funnel, ["step", "problems", "traces"])


def schema_table(columns: dict[str, str], dtypes: dict[str, str]) -> str:
    """Column, type (the parquet's), meaning: one row per column of a published table."""
    return markdown_table([{"column": f"`{c}`", "type": dtypes.get(c, "?"), "meaning": d} for c, d in columns.items()],
                          ["column", "type", "meaning"])


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` value for ``n`` rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def citation_section() -> str:
    return f"## Citation\n\nThe method is REDI from [{PAPER_TITLE}]({PAPER_URL}) (Xu et al., 2025):\n\n```bibtex\n{CITATION}\n```\n"


# ---------------------------------------------------------------------------------------- cards
def model_card(c: dict[str, Any]) -> str:
    """The model repo's README.md.

    ``c`` keys: ``repo_id``, ``run``, ``label`` (the DAG label), ``name`` (the results label: base, sft or the
    stage-2 objective), ``license``, ``base_model`` (Hub id or None), ``datasets`` (Hub ids), ``tags``,
    ``recipe_yaml`` (text), ``stages`` (markdown lines on how the model was made), ``funnel_md`` (the verify
    stage's funnel.md, or None), ``metrics_md`` (the comparison table), ``protocol`` (evaluation protocol
    dict), ``paper_protocol`` (bool: the evaluation followed the paper's final protocol), ``differences``
    (:func:`recipe_differences`), ``recipe_departures`` / ``implementation_departures`` (markdown or None),
    ``dataset_repo`` / ``details_repo`` (ids or None).
    """
    meta = {"license": c["license"], "base_model": c.get("base_model"),
            "base_model_relation": "finetune" if c.get("base_model") and c["label"] != "base" else None,
            "datasets": c.get("datasets") or None, "language": ["en"], "library_name": "transformers",
            "pipeline_tag": "text-generation", "tags": c["tags"]}
    what = {"base": "the base model", "sft": "the stage-1 (SFT) model"}.get(c["label"], f"the stage-2 model ({c['name']} objective)")
    parts = [front_matter(meta), f"# {c['repo_id'].split('/')[-1]}\n",
             f"{what[0].upper() + what[1:]} of the run `{c['run']}` of a REDI pipeline: Reinforcement Distillation "
             f"([Xu et al., 2025]({PAPER_URL})) trains on correct teacher traces (SFT), then on (correct, incorrect) "
             "pairs of the same problem with a reference-free objective.\n"]
    links = [f"- Training data (positives and pairs): [{c['dataset_repo']}](https://huggingface.co/datasets/{c['dataset_repo']})"
             if c.get("dataset_repo") else None,
             f"- Evaluation details (every sample, per benchmark and model): [{c['details_repo']}](https://huggingface.co/datasets/{c['details_repo']})"
             if c.get("details_repo") else None]
    if any(links):
        parts.append("\n".join(x for x in links if x) + "\n")
    parts.append("## How it was made\n\n" + "\n".join(c["stages"]) + "\n")
    if c.get("funnel_md"):
        parts.append("## Data funnel\n\nWhat the verify stage kept of the teacher traces (its `funnel.md`):\n\n"
                     + demote(c["funnel_md"].split("\n", 1)[1] if c["funnel_md"].startswith("# ") else c["funnel_md"], 1).strip() + "\n")
    proto = c.get("protocol") or {}
    proto_line = ", ".join(f"{k} {v}" for k, v in proto.items() if k in ("name", "n_samples", "temperature", "top_p", "max_new_tokens"))
    comparable = ("The evaluation followed the paper's final protocol, so the paper rows are comparable."
                  if c.get("paper_protocol") else
                  "**Not comparable**: this evaluation did not follow the paper's protocol (see the deviations below); "
                  "the paper rows are shown for reference only.")
    parts.append(f"## Evaluation\n\npass@1 (%) of every model of this run, with the paper's numbers beside ours "
                 f"(\"paper: ...\" rows). Protocol: {proto_line or 'unknown'}. {comparable}\n\n{c['metrics_md']}\n")
    dev = ["## Deviations from the paper\n"]
    if c.get("recipe_departures"):
        dev.append("### This recipe's documented departures\n\n" + c["recipe_departures"] + "\n")
    dev.append("### Recipe fields that differ from the paper's recipe\n\n" + differences_table(c.get("differences") or []) + "\n")
    if c.get("implementation_departures"):
        dev.append("### Where this implementation departs from the paper (every recipe)\n\n" + c["implementation_departures"] + "\n")
    parts.append("\n".join(dev))
    parts.append("## Recipe\n\nThe resolved recipe of the run (also `recipe.yaml` in this repository):\n\n```yaml\n"
                 + c["recipe_yaml"].rstrip() + "\n```\n")
    parts.append(citation_section())
    return "\n".join(parts)


def dataset_card(c: dict[str, Any]) -> str:
    """The dataset repo's README.md: positives and pairs of one verify artifact.

    ``c`` keys: ``repo_id``, ``run``, ``license``, ``source`` (markdown: where the traces came from and their
    license), ``source_datasets`` (Hub ids), ``counts`` ({"positives": n, "pairs": m}), ``schemas``
    ({table: markdown schema table}), ``label_rule`` (name), ``label_rule_summary``, ``selection`` (dict of the
    verify settings), ``funnel`` (the summary's funnel list), ``funnel_md`` (funnel.md or None), ``model_repo``.
    """
    n = max(c["counts"].values(), default=0)
    meta = {"license": c["license"], "language": ["en"], "task_categories": ["text-generation"],
            "tags": ["redi", "reinforcement-distillation", "math", "reasoning", "preference"],
            "size_categories": [size_category(n)], "source_datasets": c.get("source_datasets") or None,
            "pretty_name": f"REDI training data of run {c['run']}",
            "configs": [{"config_name": t, "data_files": [{"split": "train", "path": f"{t}.parquet"}]} for t in c["counts"]]}
    sel = "\n".join(f"- `verify.{k}`: {_cell(v)}" for k, v in c["selection"].items())
    parts = [front_matter(meta), f"# {c['repo_id'].split('/')[-1]}\n",
             f"The training data of the REDI run `{c['run']}`: **{c['counts'].get('positives', 0)} positives** (stage 1, SFT) "
             f"and **{c['counts'].get('pairs', 0)} pairs** (stage 2: a correct and an incorrect trace of one problem), "
             "selected from teacher traces by the pipeline's verify stage."
             + (f" The model trained on them: [{c['model_repo']}](https://huggingface.co/{c['model_repo']})." if c.get("model_repo") else "") + "\n",
             "```python\nfrom datasets import load_dataset\n\n"
             f"positives = load_dataset(\"{c['repo_id']}\", \"positives\", split=\"train\")\n"
             f"pairs = load_dataset(\"{c['repo_id']}\", \"pairs\", split=\"train\")\n```\n",
             "## Source and license\n\n" + c["source"] + f"\n\nThis dataset is published under `{c['license']}`.\n",
             f"## Label rule\n\n`{c['label_rule']}`: {c['label_rule_summary']}\n",
             "## Selection\n\n" + sel + "\n",
             "## Counts\n\n" + markdown_table([{"table": t, "rows": k} for t, k in c["counts"].items()], ["table", "rows"]) + "\n",
             "## Funnel\n\nTraces and problems left after each filter:\n\n" + funnel_table(c["funnel"]) + "\n"]
    if c.get("funnel_md"):
        body = c["funnel_md"].split("\n", 1)[1] if c["funnel_md"].startswith("# ") else c["funnel_md"]
        parts.append("<details><summary>The verify stage's full report (funnel.md)</summary>\n\n" + demote(body, 1).strip() + "\n\n</details>\n")
    parts.append("## Schema\n\n" + "\n\n".join(f"### `{t}.parquet`\n\n{s}" for t, s in c["schemas"].items()) + "\n")
    parts.append(citation_section())
    return "\n".join(parts)


def details_card(c: dict[str, Any]) -> str:
    """The evaluation details repo's README.md (like lighteval's ``details_*`` datasets): one config per
    (model, benchmark) with every sample, and each model's metrics.json under ``results/``.

    ``c`` keys: ``repo_id``, ``run``, ``license``, ``files`` ([{model, benchmark, path, rows}]), ``schema``
    (markdown), ``protocol`` (dict), ``metrics_md`` (the comparison table), ``model_repo``.
    """
    meta = {"license": c["license"], "language": ["en"], "tags": ["redi", "evaluation", "details", "math"],
            "size_categories": [size_category(max((f["rows"] for f in c["files"]), default=0))],
            "pretty_name": f"Evaluation details of REDI run {c['run']}",
            "configs": [{"config_name": config_name(f["model"], f["benchmark"]),
                         "data_files": [{"split": "latest", "path": f["path"]}]} for f in c["files"]]}
    proto = "\n".join(f"- `{k}`: {_cell(v)}" for k, v in (c.get("protocol") or {}).items())
    first = c["files"][0] if c["files"] else None
    parts = [front_matter(meta), f"# {c['repo_id'].split('/')[-1]}\n",
             f"Every evaluation sample of the models of REDI run `{c['run']}`: one parquet file per model and benchmark "
             "(`details/<model>/<benchmark>.parquet`, config `<model>_<benchmark>`) and each model's metrics "
             "(`results/<model>.json`)."
             + (f" The published model: [{c['model_repo']}](https://huggingface.co/{c['model_repo']})." if c.get("model_repo") else "") + "\n"]
    if first:
        parts.append("```python\nfrom datasets import load_dataset\n\n"
                     f"samples = load_dataset(\"{c['repo_id']}\", \"{config_name(first['model'], first['benchmark'])}\", split=\"latest\")\n```\n")
    parts.append("## Files\n\n" + markdown_table(
        [{"config": f"`{config_name(f['model'], f['benchmark'])}`", "model": f["model"], "benchmark": f["benchmark"],
          "file": f"`{f['path']}`", "samples": f["rows"]} for f in c["files"]],
        ["config", "model", "benchmark", "file", "samples"]) + "\n")
    parts.append("## Metrics\n\n" + c["metrics_md"] + "\n")
    parts.append("## Protocol\n\n" + (proto or "unknown") + "\n")
    parts.append("## Schema\n\n" + c["schema"] + "\n")
    parts.append(citation_section())
    return "\n".join(parts)


def config_name(model: str, benchmark: str) -> str:
    """A details config name: ``<model>_<benchmark>`` with anything but letters, digits, ``-`` and ``_`` as ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{model}_{benchmark}")

"""Fake redi.results: a JSONL history with the real module's call signatures (orchestration tests only)."""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass
class Table:
    frame: pd.DataFrame
    markdown: str
    rows: list


class ResultsStore:
    def __init__(self, path):
        self.path = Path(path)

    def append_metrics(self, *, run, label, model_key, recipe_hash, eval_key, metrics, protocol, kind):
        self.path.mkdir(parents=True, exist_ok=True)
        row = {"time": time.time(), "run": run, "label": label, "model_key": model_key, "eval_key": eval_key,
               "kind": kind, "pass@1": metrics.get("average", {}).get("pass@1")}
        with open(self.path / "history.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def load(self, run=None, latest_only=False, kind=None):
        p = self.path / "history.jsonl"
        df = pd.read_json(p, lines=True) if p.exists() else pd.DataFrame(columns=["time", "run", "label", "kind", "pass@1"])
        if run is not None:
            df = df[df.run == run]
        if kind is not None:
            df = df[df.kind == kind]
        if latest_only:
            df = df.groupby(["run", "label"], as_index=False).last()
        return df


def comparison_table(df):
    frame = df[["run", "label", "pass@1"]].reset_index(drop=True)
    rows = frame.to_dict("records")
    md = "| run | label | pass@1 |\n|---|---|---|\n" + "\n".join(f"| {r['run']} | {r['label']} | {r['pass@1']} |" for r in rows)
    return Table(frame, md, rows)


def bar_chart(df, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(df["label"].astype(str), df["pass@1"].astype(float))
    fig.savefig(path)
    plt.close(fig)

"""The study's records: one evaluation, one trained point, the whole result (JSON-able), and reading
the trainer's signals and an artifact's build time back from disk."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import Artifact
from .logic import standard_error

SIGNAL_FIELDS = ("chosen_logp", "rejected_logp", "update_norm", "loss", "lr", "collapsed")
"""The fields of the trainer's signals.jsonl records (redi.signals) the study reads."""


def read_signals(path: Path) -> list[dict[str, Any]]:
    """The step records of the trainer's ``signals.jsonl``, reduced to ``step`` and ``SIGNAL_FIELDS``."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"step": row["step"], **{k: row.get(k) for k in SIGNAL_FIELDS}} for row in rows]


def build_seconds(art: Artifact) -> float:
    """How long the artifact took to build (from its manifest, so a cache hit reports the original cost)."""
    return round(float(art.manifest.get("seconds", 0.0)), 1)


@dataclass
class EvalResult:
    """One evaluation of one model on one split."""

    split: str
    key: str
    path: str
    pass1: float
    se: float
    sem: float
    pass_n: float
    n_samples: int
    no_answer: float
    cached: bool
    seconds: float

    @classmethod
    def from_metrics(cls, split: str, art: Artifact, bench: str) -> EvalResult:
        m = json.loads(art.file("metrics.json").read_text())
        b = m.get(bench) or m.get("benchmarks", {}).get(bench)
        if b is None:
            raise KeyError(f"metrics.json of {art.path} has no benchmark {bench!r} (keys: {sorted(m)})")
        n = int(b["n_samples"])
        return cls(split, art.key, art.path, float(b["pass@1"]), standard_error(b["pass@1"], b["pass@1_sem"], b["n_total"]),
                   float(b["pass@1_sem"]), float(b.get(f"pass@{n}", b["pass@1"])), n,
                   float(b.get("no_answer_share", 0.0)), art.cached, build_seconds(art))


@dataclass
class PointResult:
    """One trained stage-2 model (method, setting, seed) and its evaluation."""

    method: str
    loss: str
    params: dict[str, float]
    seed: int
    model_key: str
    model_stage: str
    model_path: str
    train_cached: bool
    train_seconds: float
    collapse: dict[str, Any]
    eval: EvalResult
    trainer_summary: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PointResult:
        """The inverse of ``dataclasses.asdict`` (a point computed in another process or task)."""
        return cls(**{**d, "eval": EvalResult(**d["eval"])})

    def row(self) -> dict[str, Any]:
        return {"method": self.method, "loss": self.loss, **{k: v for k, v in self.params.items()}, "seed": self.seed,
                f"{self.eval.split}_pass@1": self.eval.pass1, f"{self.eval.split}_se": self.eval.se,
                f"{self.eval.split}_pass@{self.eval.n_samples}": self.eval.pass_n, "no_answer": self.eval.no_answer,
                "collapse": self.collapse["fired"], "collapse_step": self.collapse["first_step"],
                "chosen_logp_start": self.collapse["start"], "chosen_logp_final": self.collapse["final"],
                "train_s": self.train_seconds, "eval_s": self.eval.seconds, "model_key": self.model_key}


@dataclass
class StudyResult:
    """Everything the report needs (JSON-able)."""

    sft_curve: list[dict[str, Any]]
    sft_best_round: int
    sft_reason: str
    sft_plateaued: bool
    sft_key: str
    sft_test: dict[str, Any]
    search: dict[str, list[dict[str, Any]]]
    chosen: dict[str, dict[str, float]]
    final: dict[str, list[dict[str, Any]]]
    signals: dict[str, list[dict[str, Any]]]
    timings: dict[str, float]
    stage2_steps: int
    collapse_threshold: float
    test_n_samples: int
    search_seed: int = 0
    collapse_drop: float | None = None
    negatives: str = "teacher"
    pairs: dict[str, Any] = field(default_factory=dict)


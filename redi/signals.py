"""Training signals: one JSON line per optimiser step, a PNG of the curves, and the collapse warning.

Signals (paper Sec. 4 tracks the first four): ``loss``, ``chosen_logp`` and ``rejected_logp`` (mean
length-normalised completion log-probs, ``log pi(y|x)/|y|``), ``margin`` (their difference),
``grad_norm`` (before clipping), ``update_norm`` (||theta_after - theta_before||), ``lr``,
``tokens_per_s``. SFT has no rejected sequences: its rejected/margin are null.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

PLOTTED = ("loss", "chosen_logp", "rejected_logp", "margin", "grad_norm", "update_norm", "lr", "tokens_per_s")


class SignalLog:
    """In-memory list of step records (restored from a checkpoint on resume) with the collapse check."""

    def __init__(self, records: list[dict] | None = None, collapse_threshold: float | None = None):
        self.records: list[dict] = list(records or [])
        self.collapse_threshold = collapse_threshold
        self.collapse_steps = sum(1 for r in self.records if r.get("collapsed"))

    def add(self, record: dict) -> None:
        """Append one step's record; warn when the chosen per-token log-prob falls below the threshold."""
        th, chosen = self.collapse_threshold, record.get("chosen_logp")
        record["collapsed"] = bool(th is not None and chosen is not None and chosen < th)
        was = bool(self.records and self.records[-1].get("collapsed"))
        if record["collapsed"]:
            self.collapse_steps += 1
        if record["collapsed"] and not was:  # warn when it crosses, not on every step below
            log.warning(
                "step %d: mean chosen log-prob per token %.4f < %.3f (collapse_threshold): the paper's collapse "
                "signal; lower the lr or alpha", record["step"], chosen, th)
        self.records.append(record)

    def write_jsonl(self, path: Path) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def plot(self, path: Path, title: str) -> None:
        """One small panel per signal (matplotlib, Agg backend)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
        steps = [r["step"] for r in self.records]
        for ax, key in zip(axes.flat, PLOTTED, strict=True):
            ys = [_num(r.get(key)) for r in self.records]
            ax.plot(steps, ys, lw=1)
            if key == "chosen_logp" and any(not math.isnan(y) for y in ys):
                rej = [_num(r.get("rejected_logp")) for r in self.records]
                ax.plot(steps, rej, lw=1, label="rejected")
                ax.plot([], [], color="C0", label="chosen")
                ax.legend(fontsize=7)
                ax.set_title("log-prob per token", fontsize=9)
            else:
                ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)


def _num(x) -> float:
    return float("nan") if x is None else float(x)

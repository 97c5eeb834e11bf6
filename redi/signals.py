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

    def __init__(self, records: list[dict] | None = None, collapse_threshold: float | None = None,
                 collapse_drop: float | None = None):
        self.records: list[dict] = list(records or [])
        self.collapse_threshold = collapse_threshold
        self.collapse_drop = collapse_drop
        self.collapse_steps = sum(1 for r in self.records if r.get("collapsed"))

    def add(self, record: dict) -> None:
        """Append one step's record; warn when the chosen per-token log-prob collapses: below the absolute
        threshold (only if the run started above it: from a start below, it would fire from step 1 and mean
        nothing), or more than ``collapse_drop`` below its first-step value."""
        chosen = record.get("chosen_logp")
        start = next((r["chosen_logp"] for r in self.records if r.get("chosen_logp") is not None), chosen)
        th, drop = self.collapse_threshold, self.collapse_drop
        why = None
        if chosen is not None and th is not None and start >= th and chosen < th:
            why = f"< {th:.3f} (collapse_threshold)"
        elif chosen is not None and drop is not None and chosen < start - drop:
            why = f"< {start - drop:.3f} = start {start:.3f} - collapse_drop {drop:g}"
        record["collapsed"] = why is not None
        was = bool(self.records and self.records[-1].get("collapsed"))
        if record["collapsed"]:
            self.collapse_steps += 1
        if record["collapsed"] and not was:  # warn when it crosses, not on every step below
            log.warning("step %d: mean chosen log-prob per token %.4f %s: the paper's collapse signal; lower the lr or alpha",
                        record["step"], chosen, why)
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

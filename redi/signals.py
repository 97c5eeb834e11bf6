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

UNSMOOTHED = ("lr",)  # a schedule, not a noisy measurement: drawn as is
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
        """The PNG of :meth:`figure`."""
        import matplotlib.pyplot as plt

        fig = self.figure(title)
        fig.savefig(path, dpi=80)
        plt.close(fig)

    def figure(self, title: str):
        """One small panel per signal: the raw per-step values faint, a smoothed line (:func:`smooth`) over them,
        and where the collapse warning fired a red dashed line on every panel with the collapsed steps shaded
        (the threshold drawn in the log-prob panel). Matplotlib, Agg backend."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
        steps = [r["step"] for r in self.records]
        fired = collapse_onsets(self.records)
        for ax, key in zip(axes.flat, PLOTTED, strict=True):
            ys = [_num(r.get(key)) for r in self.records]
            _raw_and_smooth(ax, steps, ys, "C0", "chosen" if key == "chosen_logp" else None, smoothed=key not in UNSMOOTHED)
            if key == "chosen_logp" and any(not math.isnan(y) for y in ys):
                rej = [_num(r.get("rejected_logp")) for r in self.records]
                if any(not math.isnan(y) for y in rej):
                    _raw_and_smooth(ax, steps, rej, "C1", "rejected")
                if self.collapse_threshold is not None:
                    ax.axhline(self.collapse_threshold, color="C3", lw=0.8, ls=":", label="collapse threshold")
                ax.set_title("log-prob per token", fontsize=9)
            else:
                ax.set_title(key, fontsize=9)
            for start, end in collapsed_spans(self.records):
                ax.axvspan(start - 0.5, end + 0.5, color="C3", alpha=0.08, lw=0)
            if fired:
                ax.axvline(fired[0], color="C3", lw=1.2, ls="--", label=f"collapse warning (step {fired[0]})")
                if key == "chosen_logp":
                    ax.annotate(f"collapse warning, step {fired[0]}" + (f" (+{len(fired) - 1} more)" if len(fired) > 1 else ""),
                                xy=(fired[0], 0.02), xycoords=("data", "axes fraction"), xytext=(4, 0),
                                textcoords="offset points", color="C3", fontsize=7)
            if key == "chosen_logp":
                ax.legend(fontsize=7)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        window = smoothing_window(len(steps))
        note = f"faint: every step; line: EMA over ~{window} steps" if window > 1 else ""
        if fired:
            note += f"; red: collapse warning (dashed: first, step {fired[0]}; shaded: steps below the limit)"
        fig.suptitle(f"{title}\n{note.strip('; ')}" if note else title)
        fig.tight_layout()
        return fig


def smoothing_window(n: int) -> int:
    """Steps the EMA of a plot averages over: a tenth of the run, between 1 and 50."""
    return max(1, min(50, n // 10))


def smooth(values: list[float], window: int) -> list[float]:
    """Bias-corrected exponential moving average (alpha = 2 / (window + 1), as TensorBoard's smoothing,
    debiased so the first steps are not pulled towards 0); NaN values are skipped and stay NaN."""
    alpha, avg, weight, out = 2.0 / (window + 1), 0.0, 0.0, []
    for v in values:
        if math.isnan(v):
            out.append(float("nan"))
            continue
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def collapsed_spans(records: list[dict]) -> list[tuple[int, int]]:
    """(first, last) step of each run of consecutive collapsed records."""
    spans: list[tuple[int, int]] = []
    for i, r in enumerate(records):
        if r.get("collapsed"):
            if i and records[i - 1].get("collapsed"):
                spans[-1] = (spans[-1][0], r["step"])
            else:
                spans.append((r["step"], r["step"]))
    return spans


def collapse_onsets(records: list[dict]) -> list[int]:
    """Steps where the collapse warning fired: a collapsed record after a non-collapsed one (or first)."""
    return [r["step"] for i, r in enumerate(records) if r.get("collapsed") and not (i and records[i - 1].get("collapsed"))]


def _raw_and_smooth(ax, steps: list[int], ys: list[float], color: str, label: str | None, smoothed: bool = True) -> None:
    window = smoothing_window(len(ys))
    if window == 1 or not smoothed:
        ax.plot(steps, ys, lw=1, color=color, label=label)
        return
    ax.plot(steps, ys, lw=0.7, color=color, alpha=0.25)
    ax.plot(steps, smooth(ys, window), lw=1.6, color=color, label=label)


def _num(x) -> float:
    return float("nan") if x is None else float(x)

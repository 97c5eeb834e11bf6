"""The study's pure rules: noise of a pass@1 estimate, the SFT plateau, selection on validation, seed
statistics and the collapse check. No I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..artifacts import Artifact
    from .config import MethodSpec

def standard_error(pass1: float, sem: float, n_total: int) -> float:
    """Noise of a pass@1 estimate: the larger of the paper's sample-index SEM and the binomial SE.

    The sample-index SEM rests on only n (e.g. 4) scores and is itself noisy; the binomial SE over all
    P x n samples is a floor (it ignores that samples of one problem are correlated).
    """
    binom = math.sqrt(max(pass1 * (1 - pass1), 0.0) / n_total) if n_total else 0.0
    return max(sem, binom)


@dataclass
class PlateauDecision:
    stop: bool
    best_round: int  # 1-based
    reason: str


def plateau_decision(curve: list[dict[str, float]], patience: int = 1, z: float = 1.0, min_delta: float = 0.0,
                     max_rounds: int | None = None, floor: float = 0.0) -> PlateauDecision:
    """Should SFT stop after the rounds in ``curve`` (each ``{"pass@1": p, "se": s}``, round 1 first)?

    The reference is the last round that beat the previous reference by more than noise
    (``max(min_delta, z * sqrt(se_ref^2 + se_new^2))``). Stop once ``patience`` rounds in a row fail to
    do so, or at ``max_rounds``. Rounds before the first one at or above ``floor`` never count (the
    reference moves to the first round that reaches it). The returned best round is the argmax of pass@1 (earliest on ties):
    the checkpoint stage 2 starts from.
    """
    if not curve:
        raise ValueError("plateau_decision needs at least one evaluated round")
    ref, since = 0, 0
    for i in range(1, len(curve)):
        if curve[ref]["pass@1"] < floor:  # still at the floor: nothing is a plateau yet
            ref, since = i, 0
            continue
        gain = curve[i]["pass@1"] - curve[ref]["pass@1"]
        noise = max(min_delta, z * math.hypot(curve[ref]["se"], curve[i]["se"]))
        if gain > noise:
            ref, since = i, 0
        else:
            since += 1
    best = max(range(len(curve)), key=lambda i: (curve[i]["pass@1"], -i)) + 1
    if curve[ref]["pass@1"] < floor:
        if max_rounds is not None and len(curve) >= max_rounds:
            return PlateauDecision(True, best, f"max_rounds={max_rounds} reached below the floor {floor:g} (no plateau)")
        return PlateauDecision(False, best, f"val pass@1 below the floor {floor:g}; continuing")
    if since >= patience:
        return PlateauDecision(True, best, f"{since} round(s) without a gain above noise since round {ref + 1}")
    if max_rounds is not None and len(curve) >= max_rounds:
        return PlateauDecision(True, best, f"max_rounds={max_rounds} reached while still improving (no plateau)")
    return PlateauDecision(False, best, f"round {ref + 1} improved significantly; continuing")


def select_best(rows: list[dict[str, Any]], metric: str = "val_pass@1") -> dict[str, Any]:
    """The search row with the highest validation score (first in grid order on ties)."""
    if not rows:
        raise ValueError("select_best: no search rows")
    return max(enumerate(rows), key=lambda ir: (ir[1][metric], -ir[0]))[1]


def seed_stats(values: list[float]) -> tuple[float, float]:
    """(mean, SEM) over seeds; SEM = std(ddof=1) / sqrt(k), 0 for a single seed."""
    k = len(values)
    if k == 0:
        return float("nan"), float("nan")
    mean = sum(values) / k
    if k == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (k - 1)
    return mean, math.sqrt(var / k)


def collapse_check(signals: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Where the trainer's collapse warning fired (``collapsed`` in its signals: the chosen per-token log-prob
    below ``collapse_threshold`` from a start above it, or ``collapse_drop`` below its own start; see
    ``redi.signals``). Signals without the flag fall back to the absolute threshold from a start above it.
    Returns the first flagged step and the start / final / minimum chosen log-prob.
    """
    pts = [(s.get("step"), s["chosen_logp"], s.get("collapsed")) for s in signals if s.get("chosen_logp") is not None]
    if not pts:
        return {"fired": False, "first_step": None, "start_below": False, "start": None, "final": None, "min": None}
    vals = [v for _, v, _ in pts]
    start_below = vals[0] < threshold
    if any(f is not None for _, _, f in pts):
        first = next((st for st, _, f in pts if f), None)
    else:
        first = None if start_below else next((st for st, v, _ in pts if v < threshold), None)
    return {"fired": first is not None, "first_step": first, "start_below": start_below, "start": vals[0],
            "final": vals[-1], "min": min(vals)}


def sft_summary(curve: list[dict[str, Any]], decision: PlateauDecision, start: Artifact) -> dict[str, Any]:
    """The SFT phase's outcome: its curve, the chosen round and the artifact stage 2 starts from."""
    return {"curve": curve, "best_round": decision.best_round, "reason": decision.reason, "start": start,
            "plateaued": "max_rounds" not in decision.reason}


def choose(method: MethodSpec, rows: list[dict[str, Any]]) -> dict[str, float]:
    """The method's setting picked on validation (its grid point with the best val pass@1)."""
    best = select_best(rows, "val_pass@1")
    return {k: best[k] for k in method.points()[0]}


def param_str(params: dict[str, float]) -> str:
    """A setting as ``lr=0.0001,alpha=0.8`` (row labels, signal keys, report lines)."""
    return ",".join(f"{k}={v:g}" for k, v in params.items())

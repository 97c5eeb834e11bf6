"""Stage-2 objectives as pure functions of per-sequence log-probs (REDI Eq. 5, SimPO Eq. 3, DPO Eq. 2),
and ``OBJECTIVES``: the one registry of them (``redi.loss``), from which the config's valid names, its
cache-key fields, the trainer's reference model and the study's search fields are derived.

Every function takes per-sequence SUMMED completion log-probs ``log pi(y|x)`` (prompt tokens masked
out) of shape ``(B,)`` and returns the per-example losses, shape ``(B,)``; the trainer takes the
mean. Lengths ``|y|`` count the completion tokens INCLUDING the final EOS (as the official code
does) and are clamped to at least 1.

Departures from the paper / official code:
- none in the formulas. The official code's optional negative re-weighting (``use_neg_weighting``,
  off by default) is exposed as ``neg_reweight_gamma``; like the official code (dpo2_trainer.py,
  ``loss_type == "reinforce"``) the weight ``exp(gamma * logp_l/|y_l|)`` is NOT detached, so the
  gradient also flows through the weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when a loss is computed: the registry is read by configs and the CLI
    from torch import Tensor


def _per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    """Length-normalised log-prob ``log pi(y|x) / |y|`` with ``|y|`` clamped to >= 1.  (B,) -> (B,)"""
    return logps / lengths.to(logps.dtype).clamp(min=1.0)


def redi_loss(
    chosen_logps: Tensor,  # (B,) summed completion log-probs of y_w
    rejected_logps: Tensor,  # (B,) summed completion log-probs of y_l
    chosen_lengths: Tensor,  # (B,) |y_w| incl. EOS
    rejected_lengths: Tensor,  # (B,) |y_l| incl. EOS
    alpha: float,
    neg_reweight_gamma: float | None = None,
) -> Tensor:
    """REDI, paper Eq. 5: ``-log pi(y_w|x)/|y_w| + alpha * log pi(y_l|x)/|y_l|``.  Returns (B,).

    alpha = 1 is symmetric REDI (Eq. 4), alpha = 0 is length-normalised SFT on y_w. With
    ``neg_reweight_gamma`` set, the rejected term is multiplied by ``exp(gamma * logp_l/|y_l|)``
    (official code's ``use_neg_weighting``; not detached, as there).
    """
    chosen = _per_token(chosen_logps, chosen_lengths)  # (B,)
    rejected = _per_token(rejected_logps, rejected_lengths)  # (B,)
    neg = alpha * rejected  # (B,)
    if neg_reweight_gamma is not None:
        neg = neg * (neg_reweight_gamma * rejected).exp()
    return -chosen + neg


def simpo_loss(
    chosen_logps: Tensor,  # (B,)
    rejected_logps: Tensor,  # (B,)
    chosen_lengths: Tensor,  # (B,)
    rejected_lengths: Tensor,  # (B,)
    beta: float,
    gamma: float,
) -> Tensor:
    """SimPO, paper Eq. 3: ``-log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)``.  (B,)"""
    import torch.nn.functional as F

    margin = beta * (_per_token(chosen_logps, chosen_lengths) - _per_token(rejected_logps, rejected_lengths))
    return -F.logsigmoid(margin - gamma)


def dpo_loss(
    policy_chosen: Tensor,  # (B,) summed log-probs under the policy
    policy_rejected: Tensor,  # (B,)
    ref_chosen: Tensor,  # (B,) summed log-probs under the reference (the SFT model), no grad
    ref_rejected: Tensor,  # (B,)
    beta: float,
) -> Tensor:
    """DPO, paper Eq. 2: ``-log sigmoid(beta * [(log pi_w - log ref_w) - (log pi_l - log ref_l)])``.  (B,)"""
    import torch.nn.functional as F

    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * logits)


@dataclass(frozen=True)
class Objective:
    """Everything about one stage-2 objective; registering one is the whole extension (docs/extending.md).

    ``fn(batch, cfg) -> (B,) losses``: ``batch`` holds ``chosen_logps, rejected_logps, chosen_lengths,
    rejected_lengths`` (and, when ``needs_reference``, ``ref_chosen_logps, ref_rejected_logps`` from the
    SFT model); ``cfg`` is the ``Stage2Config``. ``fields``: the ``Stage2Config`` fields the objective
    reads beyond the shared optimiser fields (the other objectives' fields are left out of its cache key).
    ``search``: the fields a study method of this objective may fix or search (``redi.study.MethodSpec``).
    """

    name: str
    fn: Callable[[dict[str, Tensor], Any], Tensor]
    needs_reference: bool = False
    fields: tuple[str, ...] = ()
    search: tuple[str, ...] = ("lr",)
    summary: str = ""


OBJECTIVES: dict[str, Objective] = {}
"""The one registry of stage-2 objectives (``redi.loss``), in registration order."""


def register(objective: Objective) -> Objective:
    """Add ``objective`` to ``OBJECTIVES`` (a name registered twice is an error)."""
    if objective.name in OBJECTIVES:
        raise ValueError(f"stage-2 objective {objective.name!r} is already registered")
    OBJECTIVES[objective.name] = objective
    return objective


def objective(name: str) -> Objective:
    """The objective registered under ``name``; an unknown name raises listing the valid ones."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown stage-2 loss {name!r}; valid: {', '.join(sorted(OBJECTIVES))}") from None


def get_loss(name: str) -> Callable[[dict[str, Tensor], Any], Tensor]:
    """The loss function of the objective ``name``."""
    return objective(name).fn


def objective_fields() -> set[str]:
    """Every ``Stage2Config`` field that belongs to some objective (each objective's key keeps only its own)."""
    return {f for o in OBJECTIVES.values() for f in o.fields}


register(Objective(
    "redi", lambda b, cfg: redi_loss(b["chosen_logps"], b["rejected_logps"], b["chosen_lengths"], b["rejected_lengths"],
                                     cfg.alpha, cfg.neg_reweight_gamma),
    fields=("alpha", "neg_reweight_gamma"), search=("lr", "alpha", "neg_reweight_gamma"), summary="REDI, Eq. 5"))
register(Objective(
    "dpo", lambda b, cfg: dpo_loss(b["chosen_logps"], b["rejected_logps"], b["ref_chosen_logps"], b["ref_rejected_logps"], cfg.beta),
    needs_reference=True, fields=("beta", "precompute_ref"), search=("lr", "beta"), summary="DPO, Eq. 2 (reference = the SFT model)"))
register(Objective(
    "simpo", lambda b, cfg: simpo_loss(b["chosen_logps"], b["rejected_logps"], b["chosen_lengths"], b["rejected_lengths"],
                                       cfg.beta, cfg.gamma),
    fields=("beta", "gamma"), search=("lr", "beta", "gamma"), summary="SimPO, Eq. 3"))

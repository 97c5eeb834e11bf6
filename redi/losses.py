"""Stage-2 objectives as pure functions of per-sequence log-probs (REDI Eq. 5, SimPO Eq. 3, DPO Eq. 2).

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

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


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
        neg = neg * torch.exp(neg_reweight_gamma * rejected)
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
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * logits)


def _redi(b: dict[str, Tensor], cfg) -> Tensor:
    return redi_loss(b["chosen_logps"], b["rejected_logps"], b["chosen_lengths"], b["rejected_lengths"],
                     cfg.alpha, cfg.neg_reweight_gamma)


def _simpo(b: dict[str, Tensor], cfg) -> Tensor:
    return simpo_loss(b["chosen_logps"], b["rejected_logps"], b["chosen_lengths"], b["rejected_lengths"],
                      cfg.beta, cfg.gamma)


def _dpo(b: dict[str, Tensor], cfg) -> Tensor:
    return dpo_loss(b["chosen_logps"], b["rejected_logps"], b["ref_chosen_logps"], b["ref_rejected_logps"], cfg.beta)


LOSSES: dict[str, Callable[[dict[str, Tensor], object], Tensor]] = {"redi": _redi, "simpo": _simpo, "dpo": _dpo}
"""The one map from a loss name (``Stage2Config.loss``) to ``fn(batch, cfg) -> (B,) losses``.

``batch`` holds ``chosen_logps, rejected_logps, chosen_lengths, rejected_lengths`` (and for dpo
``ref_chosen_logps, ref_rejected_logps``); ``cfg`` supplies the coefficients.
"""

NEEDS_REFERENCE = {"redi": False, "simpo": False, "dpo": True}
"""Whether an objective needs reference log-probs (only DPO; REDI and SimPO never load a reference)."""


def get_loss(name: str) -> Callable[[dict[str, Tensor], object], Tensor]:
    """The loss function registered under ``name``; an unknown name raises listing the valid ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown stage-2 loss {name!r}; valid: {', '.join(sorted(LOSSES))}") from None

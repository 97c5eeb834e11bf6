"""redi.losses against numbers computed by hand (and autograd against the analytic REDI gradient)."""

import math

import pytest
import torch

from redi.config import Stage2Config
from redi.losses import OBJECTIVES, dpo_loss, get_loss, redi_loss, simpo_loss

# Two examples. Per-token: chosen -10/5 = -2, -4/4 = -1; rejected -6/3 = -2, -9/0 -> clamp |y| to 1 -> -9.
CW, CL = torch.tensor([-10.0, -4.0]), torch.tensor([5, 4])
RW, RL = torch.tensor([-6.0, -9.0]), torch.tensor([3, 0])


def test_redi_hand_values():
    # 2 + 0.8 * (-2) = 0.4 ; 1 + 0.8 * (-9) = -6.2
    assert torch.allclose(redi_loss(CW, RW, CL, RL, alpha=0.8), torch.tensor([0.4, -6.2]))


def test_redi_alpha0_is_length_normalised_sft():
    assert torch.allclose(redi_loss(CW, RW, CL, RL, alpha=0.0), torch.tensor([2.0, 1.0]))


def test_redi_alpha1_is_symmetric():
    # 2 - 2 = 0 ; 1 - 9 = -8
    assert torch.allclose(redi_loss(CW, RW, CL, RL, alpha=1.0), torch.tensor([0.0, -8.0]))


def test_redi_shape_is_per_example():
    assert redi_loss(CW, RW, CL, RL, alpha=0.8).shape == (2,)


def test_redi_gradient_matches_analytic():
    cw, rw = CW.clone().requires_grad_(), RW.clone().requires_grad_()
    redi_loss(cw, rw, CL, RL, alpha=0.8).sum().backward()
    # dL/dlogp_w = -1/|y_w| ; dL/dlogp_l = alpha/|y_l|
    assert torch.allclose(cw.grad, torch.tensor([-1 / 5, -1 / 4]))
    assert torch.allclose(rw.grad, torch.tensor([0.8 / 3, 0.8 / 1]))


def test_redi_neg_reweight_value_and_gradient():
    g = 0.5
    rw = RW.clone().requires_grad_()
    loss = redi_loss(CW, rw, CL, RL, alpha=0.8, neg_reweight_gamma=g)
    r = torch.tensor([-2.0, -9.0])  # per-token rejected
    w = torch.exp(g * r)
    assert torch.allclose(loss, torch.tensor([2.0, 1.0]) + 0.8 * r * w)
    loss.sum().backward()
    # d/dlogp_l [alpha * r * exp(g r)] = alpha * exp(g r) * (1 + g r) / |y_l|  (weight not detached, as official code)
    assert torch.allclose(rw.grad, 0.8 * w * (1 + g * r) / torch.tensor([3.0, 1.0]))


def test_simpo_hand_values():
    # margin 2*(-2 - -2) = 0 -> -log sigmoid(-1) = log(1+e) ; 2*(-1 - -9) = 16 -> log(1+e^-15)
    out = simpo_loss(CW, RW, CL, RL, beta=2.0, gamma=1.0)
    assert torch.allclose(out, torch.tensor([math.log1p(math.e), math.log1p(math.exp(-15))]), rtol=1e-5, atol=1e-9)


def test_dpo_hand_values():
    out = dpo_loss(CW, RW, torch.tensor([-11.0, -4.0]), torch.tensor([-5.0, -9.0]), beta=0.1)
    # logits: (1) - (-1) = 2 -> log(1+e^-0.2) ; 0 -> log 2
    assert torch.allclose(out, torch.tensor([math.log1p(math.exp(-0.2)), math.log(2)]))


def test_dpo_at_reference_is_log2():
    out = dpo_loss(CW, RW, CW, RW, beta=0.5)
    assert torch.allclose(out, torch.full((2,), math.log(2)))


def test_registry_dispatches_with_config():
    batch = {"chosen_logps": CW, "rejected_logps": RW, "chosen_lengths": CL, "rejected_lengths": RL,
             "ref_chosen_logps": CW, "ref_rejected_logps": RW}
    assert {"redi", "dpo", "simpo"} <= set(OBJECTIVES)
    assert torch.allclose(get_loss("redi")(batch, Stage2Config(alpha=0.8)), torch.tensor([0.4, -6.2]))
    assert torch.allclose(get_loss("dpo")(batch, Stage2Config(loss="dpo", beta=0.1)), torch.full((2,), math.log(2)))
    simpo = get_loss("simpo")(batch, Stage2Config(loss="simpo", beta=2.0, gamma=1.0))
    assert torch.allclose(simpo[0], torch.tensor(math.log1p(math.e)))


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match="dpo, redi, simpo"):
        get_loss("ipo")

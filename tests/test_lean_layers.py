"""redi.lean_layers: the patched RMSNorm and SwiGLU give the stock layers' values exactly, their gradients
up to float rounding, and save less for backward."""

from __future__ import annotations

import copy

import pytest
import torch

from redi import lean_layers


def _model(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, tie_word_embeddings=True)
    m = Qwen2ForCausalLM(cfg).train()
    for p in m.parameters():  # norm weights away from 1, so their gradients are exercised
        p.data.add_(0.05 * torch.randn_like(p))
    return m


def _saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_lean_model_matches_the_stock_model_and_saves_less():
    stock = _model()
    lean = copy.deepcopy(stock)
    assert lean_layers.apply(lean) == {"rmsnorm": 5, "swiglu": 2}
    ids = torch.randint(0, 97, (3, 40))
    out_s, saved_s = _saved_bytes(lambda: stock(input_ids=ids, labels=ids))
    out_l, saved_l = _saved_bytes(lambda: lean(input_ids=ids, labels=ids))
    assert torch.equal(out_s.logits, out_l.logits)  # same operations in the same order
    out_s.loss.backward()
    out_l.loss.backward()
    for (name, a), b in zip(stock.named_parameters(), lean.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    # per token: one hidden-sized norm output per RMSNorm, silu(gate) and silu(gate) * up per MLP
    tokens, h, inter = 3 * 40, 48, 96
    assert saved_s - saved_l >= tokens * 4 * (5 * h + 2 * 2 * inter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_functions_against_autograd(dtype):
    torch.manual_seed(1)
    x = torch.randn(5, 7, 16, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16)).to(dtype).requires_grad_()
    g = torch.randn(5, 7, 16, dtype=dtype)

    def ref_norm(x, w):
        xf = x.to(torch.float32)
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    y_ref = ref_norm(x, w)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), g)
    y = lean_layers.RMSNormFn.apply(x, w, 1e-6)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gx, gx_ref, **tol)
    torch.testing.assert_close(gw, gw_ref, **tol)

    gate, up = (torch.randn(5, 7, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    y_ref = torch.nn.functional.silu(gate) * up
    ref = torch.autograd.grad(y_ref, (gate, up), g)
    y = lean_layers.SiluMulFn.apply(gate, up)
    got = torch.autograd.grad(y, (gate, up), g)
    assert torch.equal(y, y_ref)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_enabled_by_setting_and_device():
    assert lean_layers.enabled("auto", "cpu") and not lean_layers.enabled("auto", "cuda")
    assert lean_layers.enabled("on", "cuda") and not lean_layers.enabled("off", "cpu")


def test_lean_layers_under_gradient_checkpointing_match_the_stock_model():
    stock = _model(2)
    lean = copy.deepcopy(stock)
    for m in (stock, lean):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lean_layers.apply(lean)  # the product is then left to checkpointing (no nested saved-tensor hooks)
    ids = torch.randint(0, 97, (2, 30))
    a, b = stock(input_ids=ids, labels=ids), lean(input_ids=ids, labels=ids)
    assert torch.equal(a.logits, b.logits)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(stock.named_parameters(), lean.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_lean_layers_setting_reads_yaml_on_off():
    from pathlib import Path

    from redi.config import load_recipe

    r = load_recipe(Path(__file__).resolve().parents[1] / "redi" / "recipes" / "demo.yaml", ["sft.lean_layers=off", "redi.lean_layers=on"])
    assert (r.sft.lean_layers, r.redi.lean_layers) == ("off", "on")

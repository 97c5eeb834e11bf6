"""Memory-lean RMSNorm and SwiGLU for training: recompute in backward what the stock layers save.

For every token, a stock Qwen2/Llama decoder layer saves for backward, among others, each RMSNorm's
normalised output (hidden floats), the MLP's ``silu(gate)`` and ``silu(gate) * up`` (intermediate floats
each), although all three are one cheap elementwise pass away from tensors that are saved anyway (the
norm's input and its reciprocal RMS; the MLP's ``gate`` and ``up``). Here only the latter are saved and
the former recomputed in backward, as Liger-Kernel's fused RMSNorm and SwiGLU do on GPU, in plain torch
(the product through a saved-tensor hook on ``down_proj``, so the module is still called and its hooks fire). Values are the
stock layers' exactly (same operations in the same order); gradients equal them up to float rounding
(``tests/test_lean_layers.py``).

:func:`apply` patches the modules of a loaded model in place. ``lean_layers: auto`` turns it on for CPU
training only: under DeepSpeed ZeRO-3 or FSDP the weights are re-partitioned between forward and
backward, and that path has not been run on a GPU here.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


class RMSNormFn(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps))`` in fp32, cast back to x's dtype; saves x and the rsqrt."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, weight, rstd = ctx.saved_tensors
        n = x.to(torch.float32) * rstd
        gw = (g * n.to(x.dtype)).reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        gn = (g * weight).to(torch.float32)
        dot = (gn * n).mean(-1, keepdim=True)
        gx = gn.sub_(n.mul_(dot)).mul_(rstd)
        return gx.to(x.dtype), gw, None


class SiluMulFn(torch.autograd.Function):
    """``silu(gate) * up``; saves gate and up, recomputes ``silu(gate)`` in backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        g_gate = torch.ops.aten.silu_backward(g * up, gate)  # aten's fused g * silu'(gate)
        return g_gate, F.silu(gate).mul_(g)


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    prod = SiluMulFn.apply(gate, up)
    if not (torch.is_grad_enabled() and self._redi_recompute_product):
        return self.down_proj(prod)
    # down_proj saves its input for its weight's gradient: keep the recipe instead (gate and up are saved for
    # SiluMulFn anyway) and recompute the product when backward asks for it
    ptr = prod.untyped_storage().data_ptr()

    def pack(t: torch.Tensor):
        return (t.shape, t.stride(), t.storage_offset()) if t.untyped_storage().data_ptr() == ptr else t

    def unpack(p):
        if isinstance(p, tuple):
            return torch.as_strided(F.silu(gate).mul_(up), *p)
        return p

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return self.down_proj(prod)


def _is_rmsnorm(m: torch.nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and isinstance(
        getattr(m, "weight", None), torch.nn.Parameter)


def _is_swiglu(m: torch.nn.Module) -> bool:
    act = getattr(m, "act_fn", None)
    return (all(isinstance(getattr(m, a, None), torch.nn.Linear) for a in ("gate_proj", "up_proj", "down_proj"))
            and isinstance(act, _silu_activation_types()))


def _silu_activation_types() -> tuple[type, ...]:
    try:
        from transformers.activations import SiLUActivation  # older transformers
    except ImportError:
        return (torch.nn.SiLU,)
    return (torch.nn.SiLU, SiLUActivation)


def apply(model: torch.nn.Module) -> dict[str, int]:
    """Patch every RMSNorm and SiLU-gated MLP of ``model`` in place; returns how many of each."""
    n = {"rmsnorm": 0, "swiglu": 0}
    # under gradient checkpointing the layer's activations are recomputed anyway, and its own saved-tensor
    # hooks must not be shadowed: the MLP product is then left to it
    recompute_product = not getattr(model, "is_gradient_checkpointing", False)
    for m in model.modules():
        if _is_rmsnorm(m):
            m.forward = types.MethodType(_norm_forward, m)
            n["rmsnorm"] += 1
        elif _is_swiglu(m):
            m.forward = types.MethodType(_mlp_forward, m)
            m._redi_recompute_product = recompute_product
            n["swiglu"] += 1
    return n


def enabled(setting: str, device: str) -> bool:
    """``lean_layers`` (auto | on | off) on ``device``: auto = CPU only."""
    return setting == "on" or (setting == "auto" and device == "cpu")

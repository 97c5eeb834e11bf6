"""What the trainer does differently under DDP, FSDP and DeepSpeed ZeRO-2/3 (``redi.train`` calls these).

- DeepSpeed in bf16 saves a ``save_dtype: float32`` model from the fp32 masters (:func:`fp32_masters`), not
  from the engine's bf16 module.
- FSDP in bf16 computes in bf16 but reduces gradients and returns the forward's outputs (our per-sequence
  log-prob sums) in fp32 (:func:`configure_fsdp`), as DDP under autocast does.
- DeepSpeed gets the micro-batch, the accumulation steps and the recipe's ``max_grad_norm`` before
  ``prepare`` (the trainer passes no dataloader, so accelerate cannot infer ``auto`` values; its own
  ``gradient_clipping: auto`` default would be 1.0 whatever the recipe says).
- Weight-decay groups by parameter NAME: biases and the weights of normalisation layers get no decay,
  as the HF Trainer the paper used (ZeRO-3 replaces parameters with 1-D placeholders, so ``ndim``
  cannot tell them apart).
- Parameter count: ``ds_numel`` for ZeRO-3 placeholders, the global size for FSDP DTensors.
- Update norm: ``||theta_after - theta_before||`` of the optimiser step, computed from the AdamW
  state right after the step instead of from a copy of every parameter: for decoupled AdamW
  ``theta_after = theta_before * (1 - lr*wd) - lr*a`` with ``a = m_hat / (sqrt(v_hat) + eps)``, so
  ``update = lr*a + lr*wd*theta_before`` and ``theta_before = (theta_after + lr*a) / (1 - lr*wd)``.
  It reads the fp32 master copy the optimiser updates (DeepSpeed's flat fp32 partitions, FSDP's
  local shards, DDP's fp32 parameters), so an lr-1e-6 step on bf16 weights is measured as the fp32
  update, not as bf16 rounding flips; sharded backends sum the squares over ranks. Cost: a few
  element-wise ops per parameter, no persistent copy. It assumes an Adam-family optimiser with
  PyTorch's state keys (``exp_avg``, ``exp_avg_sq``, ``step``: torch AdamW, DeepSpeed's FusedAdam and
  CPUAdam) and decoupled weight decay.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


class TrainingSetupError(ValueError):
    """A training stage cannot start with this recipe, launch or data; the message names the thing and the fix
    (the CLI prints it as one line, without a traceback)."""


def is_deepspeed(acc) -> bool:
    return acc.state.deepspeed_plugin is not None


def zero_stage(acc) -> int:
    return int(acc.state.deepspeed_plugin.zero_stage) if is_deepspeed(acc) else 0


def is_fsdp(acc) -> bool:
    return str(acc.distributed_type).endswith("FSDP")


def check_backend(acc) -> None:
    """Refuse a launch whose FSDP / DeepSpeed config accelerate silently dropped.

    accelerate 1.15 turns ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED`` into FSDP / DeepSpeed only on
    accelerators; with ``device: cpu`` (or no GPU) the same launch trains plain DDP over gloo, with none of the
    memory savings the config was chosen for."""
    import os

    for env, name, on in (("ACCELERATE_USE_FSDP", "FSDP", is_fsdp(acc)),
                          ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", is_deepspeed(acc))):
        if os.environ.get(env, "false").lower() == "true" and not on:
            raise TrainingSetupError(
                f"the accelerate config asks for {name}, but accelerate runs it only on GPUs and this run is "
                f"{acc.distributed_type} on {acc.device}: use a GPU, or deployments/accelerate/ddp.yaml (or --multi_gpu) "
                "for CPU processes")


def fp32_masters(acc, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Under DeepSpeed in bf16: every parameter's full fp32 master, by the unwrapped module's parameter names (tied
    names included), on CPU in the main process (an empty dict on the other ranks); None on other backends and
    precisions. Collective: every rank calls it, in the same order.

    DeepSpeed's bf16 engine casts the module's parameters to bf16 and keeps the fp32 masters in the optimiser's
    partitions; ``get_state_dict`` returns the module's bf16 tensors (ZeRO-3: its 16-bit gather), so a
    ``save_dtype: float32`` model would be bf16 values upcast. ``deepspeed.utils.safe_get_full_fp32_param``
    assembles a master from the partitions (an all-reduce under ZeRO-1/2, an all-gather under ZeRO-3)."""
    if not is_deepspeed(acc) or acc.mixed_precision != "bf16":
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    for name, p in acc.unwrap_model(model).named_parameters(remove_duplicate=False):
        if id(p) not in done:
            full = safe_get_full_fp32_param(p)  # every rank takes part; only the main process keeps a copy
            if full is None:
                raise RuntimeError(f"DeepSpeed holds no fp32 master for {name}: cannot save float32 weights")
            done[id(p)] = full.detach().float().cpu() if acc.is_main_process else full.new_empty(0)
            out[name] = done[id(p)]
        else:  # a tied name (lm_head = embed_tokens): its own tensor, as get_state_dict gives it
            out[name] = done[id(p)].clone()
    return out if acc.is_main_process else {}


def configure_fsdp(acc, mixed_precision: str) -> None:
    """Under FSDP with bf16: bf16 parameters for compute, fp32 gradient reduction and fp32 forward outputs.

    accelerate turns ``mixed_precision="bf16"`` into a policy that is bf16 everywhere (``param_dtype``,
    ``reduce_dtype`` and, for FSDP2, ``output_dtype``); FSDP2 casts the root module's outputs to it, so the
    per-sequence log-prob sums that ``LogProbLM`` accumulates in fp32 (sums of thousands of token log-probs)
    would reach the losses, the DPO reference cache and the collapse signal rounded to 8 bits of mantissa
    (steps of 16 nats near -3000), and gradients would be averaged over ranks in bf16. No-op elsewhere."""
    if not is_fsdp(acc) or mixed_precision != "bf16":
        return
    plugin = acc.state.fsdp_plugin
    if plugin.fsdp_version == 2:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                             output_dtype=torch.float32)
    else:
        from torch.distributed.fsdp import MixedPrecision

        plugin.mixed_precision_policy = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                       buffer_dtype=torch.float32)


def configure_deepspeed(acc, micro_batch: int, grad_accum: int, max_grad_norm: float | None) -> None:
    """Fill DeepSpeed's ``auto`` batch and clipping entries from the recipe (no-op without DeepSpeed).

    A value the accelerate config sets explicitly must agree with the recipe, else a one-line error."""
    if not is_deepspeed(acc):
        return
    ds = acc.state.deepspeed_plugin.deepspeed_config
    want = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * acc.num_processes,
            "gradient_clipping": float(max_grad_norm or 0.0)}  # DeepSpeed: 0 = no clipping
    for key, value in want.items():
        cur = ds.get(key, "auto")
        if cur == "auto":
            ds[key] = value
        elif float(cur) != float(value):
            raise TrainingSetupError(f"the DeepSpeed config sets {key}={cur} but the recipe needs {value}: set {key}: "
                                     "auto in the accelerate config (deployments/accelerate/*.yaml)")


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay on every trainable parameter except biases and normalisation weights."""
    skip: set[str] = set()
    for mname, mod in model.named_modules():
        norm = "norm" in type(mod).__name__.lower()  # LayerNorm, RMSNorm (Qwen2RMSNorm), GroupNorm, ...
        for pname, _ in mod.named_parameters(recurse=False):
            if norm or pname == "bias":
                skip.add(f"{mname}.{pname}" if mname else pname)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n not in skip], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n in skip], "weight_decay": 0.0}]


def param_count(model: torch.nn.Module) -> int:
    """Number of parameters, also when ZeRO-3 has replaced them with empty placeholders."""
    return sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in model.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2 DTensor -> this rank's shard


def state_is_sharded(acc) -> bool:
    """Whether each rank's optimiser holds only a shard of the state (ZeRO >= 1, FSDP) or all of it (DDP)."""
    return zero_stage(acc) >= 1 or is_fsdp(acc)


def _stepped_tensors(acc, optimizer: torch.optim.Optimizer):
    """(tensor the optimiser steps, its param group, the optimiser's state dict) for this rank.

    DeepSpeed steps its own "basic" optimiser (ours, or the CPU Adam it swaps in for offloading) on flat
    fp32 partitions; ZeRO-3 empties the groups' ``params`` after each step and keeps the partitions in
    ``fp32_partitioned_groups_flat`` with ``sub_group_to_group_id``."""
    if is_deepspeed(acc) and getattr(acc, "deepspeed_engine_wrapped", None) is not None:
        zero_opt = acc.deepspeed_engine_wrapped.engine.optimizer
        inner = getattr(zero_opt, "optimizer", optimizer)
        if hasattr(zero_opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
            for i, p in enumerate(zero_opt.fp32_partitioned_groups_flat):
                yield p, inner.param_groups[zero_opt.sub_group_to_group_id[i]], inner.state
            return
        optimizer = inner
    for group in optimizer.param_groups:
        for p in group["params"]:
            yield p, group, optimizer.state


_NORM_SLICE = 1 << 24
"""Elements per slice of the update-norm computation (a few 64 MiB fp32 temporaries at a time)."""


def adam_update_norm(acc, optimizer: torch.optim.Optimizer) -> float | None:
    """L2 norm of the update the last optimiser step made, from its AdamW state (see the module docstring).

    ``optimizer`` is the torch optimiser the trainer built (DeepSpeed steps it on its fp32 partitions).
    Call it after the step and before the lr scheduler moves the lr. None when no state exists yet."""
    dev = acc.device
    sq = torch.zeros(1, dtype=torch.float64, device=dev)
    seen = False
    check_grad = not is_deepspeed(acc)  # DeepSpeed frees its partitions' grads inside its step
    for p, group, state in _stepped_tensors(acc, optimizer):
        lr, wd, eps = group["lr"], group.get("weight_decay", 0.0), group.get("eps", 1e-8)
        b1, b2 = group.get("betas", (0.9, 0.999))
        st = state.get(p)
        if not st or "exp_avg" not in st or (check_grad and p.grad is None):
            continue
        step = float(st["step"])
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        m_all, v_all, p_all = (_local(t).reshape(-1) for t in (st["exp_avg"], st["exp_avg_sq"], p.detach()))
        for s in range(0, m_all.numel(), _NORM_SLICE):  # a ZeRO partition is one flat tensor: bound the temporaries
            m, v = m_all[s:s + _NORM_SLICE].float(), v_all[s:s + _NORM_SLICE].float()
            a = (m / bc1) / (v.sqrt() / math.sqrt(bc2) + eps)
            upd = lr * a
            if wd:
                before = (p_all[s:s + _NORM_SLICE].float() + lr * a) / (1 - lr * wd)
                upd = upd + (lr * wd) * before
            sq += upd.pow(2).sum(dtype=torch.float64).to(dev)
        seen = True
    if state_is_sharded(acc):  # every rank holds a disjoint shard: sum the squares (and whether any was seen)
        t = acc.reduce(torch.cat([sq, torch.tensor([float(seen)], dtype=torch.float64, device=dev)]), reduction="sum")
        sq, seen = t[:1], bool(t[1].item())
    return float(sq.sqrt()) if seen else None

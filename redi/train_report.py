"""What a training run reports and writes: the per-step record, the log line, the saved model folder,
the summary dict and the per-rank report."""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

import torch

from .logprobs import unwrap_logprob
from .signals import SignalLog
from .tinymodel import MARKER
from .train_backend import fp32_masters

if TYPE_CHECKING:
    from pathlib import Path

    from accelerate import Accelerator

    from .train import Job

__all__ = ["export_model", "format_record", "rank_report", "save_outputs", "saved_state", "step_record", "summary"]

log = logging.getLogger(__name__)


def step_record(job: Job, acc: Accelerator, step: int, sums: dict[str, float], n_seq: int, tokens: int, denom: float,
                grad_norm: torch.Tensor | float | None, lr: float, update_norm: float | None,
                seconds: float) -> dict[str, Any]:
    """Reduce the micro-batch sums of step ``step`` (0-based) over processes into one signal record."""
    t = acc.reduce(torch.tensor([sums["loss"], sums["chosen"], sums["rejected"]], dtype=torch.float64,
                                device=acc.device), reduction="sum").tolist()
    rec = {"step": step + 1, "epoch": round((step + 1) * job.cfg.global_batch / len(job.items), 4),
           "loss": t[0] / denom, "chosen_logp": t[1] / n_seq, "rejected_logp": None, "margin": None,
           "grad_norm": None if grad_norm is None else float(grad_norm), "update_norm": update_norm, "lr": lr,
           "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9)}
    if job.kind == "stage2":
        rec["rejected_logp"] = t[2] / n_seq
        rec["margin"] = rec["chosen_logp"] - rec["rejected_logp"]
    return rec


def format_record(rec: dict[str, Any]) -> str:
    """One log line's worth of a step record (the fields that are set)."""
    keys = ("loss", "chosen_logp", "rejected_logp", "grad_norm", "update_norm", "lr", "tokens_per_s")
    return " ".join(f"{k}={rec[k]:.4g}" for k in keys if rec.get(k) is not None)


def saved_state(state: dict[str, torch.Tensor], save_dtype: str) -> dict[str, torch.Tensor]:
    """The causal LM's state dict as saved: the wrapper's ``lm.`` prefix removed, floating tensors cast to
    ``save_dtype`` (``auto`` outside a recipe: float32). The official runs save bf16, the dtype they are
    evaluated in; an fp32 file served in bf16 is rounded by vLLM at load time to the same values."""
    dtype = getattr(torch, "float32" if save_dtype == "auto" else save_dtype)
    return {k.removeprefix("lm."): v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _set_config_dtype(model_dir: Path, dtype: torch.dtype) -> None:
    """config.json names the dtype of the saved weights (save_pretrained writes the in-memory model's)."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_model(job: Job, acc: Accelerator, model: torch.nn.Module, out: Path) -> None:
    """``out`` as a stage's ``model/`` folder: weights in ``save_dtype``, config naming that dtype, tokenizer, the
    tiny-model marker. Every rank calls it (gathering a sharded state dict is collective); the main process writes."""
    acc.wait_for_everyone()
    state = acc.get_state_dict(model)
    masters = fp32_masters(acc, model) if job.cfg.save_dtype == "float32" else None  # DeepSpeed bf16; collective
    if acc.is_main_process:
        wrapper = unwrap_logprob(acc.unwrap_model(model))  # the LogProbLM; its causal LM is saved
        if masters:
            state = {k: masters.get(k, v) for k, v in state.items()}
        state = saved_state(state, job.cfg.save_dtype)
        wrapper.lm.save_pretrained(out, state_dict=state, safe_serialization=True)
        _set_config_dtype(out, next(v.dtype for v in state.values() if v.is_floating_point()))
        job.tok.save_pretrained(out)
        if (job.model_dir / MARKER).exists():
            shutil.copy(job.model_dir / MARKER, out / MARKER)
    acc.wait_for_everyone()


def save_outputs(job: Job, acc: Accelerator, model: torch.nn.Module, signals: SignalLog) -> None:
    """``out_dir/model`` (:func:`export_model`), ``signals.jsonl`` and ``signals.png``; written by the main process,
    every rank waits."""
    export_model(job, acc, model, job.out_dir / "model")
    if acc.is_main_process:
        signals.write_jsonl(job.out_dir / "signals.jsonl")
        title = f"{job.kind} ({getattr(job.cfg, 'loss', 'sft')}) lr={job.cfg.lr:g}"
        signals.plot(job.out_dir / "signals.png", title)
    acc.wait_for_everyone()


def summary(job: Job, signals: SignalLog, start: int, total: int, train_s: float, dev: str, mp: str, world: int,
            n_params: int) -> dict[str, Any]:
    """The run's summary: counts, steps (and where it resumed), throughput of the steps run now, first and last
    records, collapse steps."""
    recs = signals.records
    new = recs[start:]
    tok_s = sum(r["tokens"] for r in new) / max(sum(r["tokens"] / r["tokens_per_s"] for r in new), 1e-9) if new else None
    return {
        "stage": job.kind, "loss_type": getattr(job.cfg, "loss", "sft"), "counts": job.counts, "steps": total,
        "resumed_from_step": start, "epochs": recs[-1]["epoch"] if recs else 0.0, "train_seconds": round(train_s, 2),
        "tokens": sum(r["tokens"] for r in recs), "tokens_per_s": tok_s, "device": dev, "mixed_precision": mp,
        "world_size": world, "params": n_params, "first": recs[0] if recs else None, "last": recs[-1] if recs else None,
        "collapse_steps": signals.collapse_steps,
    }


def rank_report(acc: Accelerator, mine: dict[str, int], steps: int) -> list[dict[str, Any]]:
    """What each process of the run trained (proof that every rank took part), gathered to all ranks."""
    import platform

    from accelerate.utils import gather_object

    me = {"rank": acc.process_index, "pid": os.getpid(), "host": platform.node(), "steps": steps, **mine}
    log.info("rank %d/%d (pid %d) trained %d steps: %d sequences, %d tokens", acc.process_index, acc.num_processes,
             me["pid"], steps, mine["sequences"], mine["tokens"])
    return sorted(gather_object([me]) if acc.num_processes > 1 else [me], key=lambda r: r["rank"])

"""The training stages: SFT on positive traces (stage 1), then REDI / DPO / SimPO on pairs (stage 2).

A compact trainer of our own on torch + accelerate, one loop for SFT and all three stage-2 objectives.
Why not TRL (1.16; measurements in docs/benchmarks/train.md): its DPOTrainer has no padding-free mode ("temporarily
unavailable"), builds or needs a reference model even for objectives that have none, and its
SimPO lives in ``trl.experimental.cpo``, which materialises full (B, L, V) logits; we would need
three trainers with three sets of pitfalls (bf16 and gradient checkpointing on by default, renamed
fields). Here one loop does SFT and all three losses (``redi.losses``), padding-free
(``redi.packing``), REDI and SimPO never load a reference, and DPO precomputes the reference
log-probs once. ``benchmarks/bench_train.py`` measures it against TRL's DPOTrainer.

What the loop does (paper App. C unless stated):
- data: prompts through ``redi.prompts.render_prompt`` with the recipe's training protocol (``prompt.train``);
  completion = trace + ``redi.prompts.completion_terminator`` (Qwen2.5-Math: ``<|im_end|>\n<|endoftext|>``,
  as the official data; the tiny model: ``<|im_end|>``); ``|y|`` counts completion tokens incl. the terminator.
  SFT truncates the end of over-long sequences; stage 2 truncates keep_end (the paper's setting) and drops
  pairs whose prompt exceeds ``max_prompt_length`` and pairs whose chosen == rejected. All of it is counted in the summary.
- order: step ``s`` uses examples ``s*G .. (s+1)*G`` of a stream made of one seeded permutation per
  epoch, so the data position of a checkpoint is just its step (exact resume).
- optimiser: AdamW (betas, eps, weight decay from the recipe; no decay on biases and norms, as the
  HF Trainer the paper used), warm-up then linear / cosine / constant. Departure: the warm-up's first
  step uses lr/warmup (the HF schedule starts at 0, wasting a step), decay ends at min_lr_ratio.
- loss scaling: SFT is the mean NLL over all completion tokens of the optimiser step (across
  micro-batches and processes); stage 2 is the mean per-pair loss over the global batch. Both are
  exact under gradient accumulation and under several processes (a 2-process run matches 1 process).
- device: ``auto`` = CUDA if available (bf16 autocast where supported, fp32 master weights), else
  CPU in fp32. Threads from ``REDI_THREADS`` (else torch's default / ``OMP_NUM_THREADS``).
- checkpoints (:mod:`redi.train_checkpoints`): every ``save_steps`` into ``work_dir/checkpoint-<step>`` via
  ``accelerate.save_state`` (model, optimiser, scheduler, RNG) + ``trainer_state.json`` (step, signals, counts) + ``checksums.json``
  (written last); a re-run with the same work_dir resumes from the newest one whose checksums match and
  ends with the same weights as an uninterrupted run. Two are kept, so a corrupt newest one falls back to
  the one before (or training starts over), with a warning naming the file. A full disk is one line
  (:class:`redi.artifacts.StorageError`) and leaves no ``checkpoint-N.tmp``.
- a non-finite loss stops training before the optimiser step, keeps the last good checkpoint and
  raises :class:`TrainingError` naming the step.
- several processes (DDP, FSDP, DeepSpeed ZeRO-2/3): what differs per backend (DeepSpeed's batch and
  clipping, decay groups by name, the update norm from the optimiser state, the DPO reference through
  the prepared model, sharded over ranks) is in ``redi.train_backend``; docs/training.md lists what is
  tested on CPU per backend.
- outputs (:mod:`redi.train_report`): the step records, ``out_dir/model`` in ``save_dtype``, the signals and
  the summary dict.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import interrupt, lean_layers, tracking, train_kept
from .config.train import OptimConfig, SFTConfig, Stage2Config
from .logprobs import LogProbLM, resolve_attn
from .losses import get_loss, objective
from .packing import Batch, Example, collate, row_budget, sequence_logps
from .prompts import DEFAULT_PROTOCOL
from .signals import SignalLog
from .tinymodel import load_tokenizer
from .train_backend import (
    TrainingSetupError,
    adam_update_norm,
    check_backend,
    configure_deepspeed,
    configure_fsdp,
    decay_groups,
    is_deepspeed,
    is_fsdp,
    param_count,
)
from .train_checkpoints import TRAINER_STATE, choose_checkpoint, latest_checkpoint, save_checkpoint
from .train_data import load_pair_examples, load_sft_examples, lr_factor, step_indices, total_steps
from .train_report import format_record, rank_report, save_outputs, step_record, summary

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

__all__ = ["CHECKPOINT_HOOKS", "Job", "TrainingError", "main", "precompute_reference", "resolve_device", "run",
           "train_sft", "train_stage2"]

log = logging.getLogger(__name__)


LossFn = Callable[[dict[str, torch.Tensor], Any], torch.Tensor]
"""A stage-2 objective: per-pair losses (B,) from the log-prob parts and the config."""

CHECKPOINT_HOOKS: list[Callable[[int], None]] = []
"""Called with the step number right after each checkpoint is saved, on every rank. A hook that raises stops
training there as a kill would (the checkpoint stays; the next run resumes from it)."""


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, bad data); the message names the cause."""


# ------------------------------------------------------------------------------------------ setup


def _check_template(tok: PreTrainedTokenizerBase, model_dir: Path) -> None:
    if not getattr(tok, "chat_template", None):
        raise TrainingSetupError(f"tokenizer in {model_dir} has no chat template: build the base model with "
                                 "model.chat_template set (redi.prompts.CHATML_TEMPLATE is the Qwen-style one)")


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """(device type, mixed precision) for ``device`` in {auto, cpu, cuda} and the recipe's dtype."""
    if device not in ("auto", "cpu", "cuda"):
        raise TrainingSetupError(f"device must be auto, cpu or cuda, got {device!r}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise TrainingSetupError("device 'cuda' requested but torch.cuda.is_available() is False")
    dev = "cuda" if (device == "cuda" or (device == "auto" and cuda)) else "cpu"
    if dtype == "auto":
        mp = "bf16" if dev == "cuda" and torch.cuda.is_bf16_supported() else "no"
    else:
        mp = "bf16" if dtype == "bfloat16" else "no"
    return dev, mp


def _set_threads() -> None:
    n = os.environ.get("REDI_THREADS")
    if n:
        torch.set_num_threads(int(n))


def _make_accelerator(dev: str, mixed_precision: str, grad_accum: int) -> Accelerator:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Several stages may run in one process (tests, the pipeline): start from a clean singleton.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # A plugin, not gradient_accumulation_steps=: under a DeepSpeed launch accelerate exports the config's
    # `gradient_accumulation_steps: auto` as ACCELERATE_GRADIENT_ACCUMULATION_STEPS, which overrides the argument
    # (int("auto") raises); the plugin is taken as given, and redi.train_backend fills DeepSpeed's "auto" from it.
    from accelerate.utils import GradientAccumulationPlugin

    return Accelerator(cpu=dev == "cpu", mixed_precision=mixed_precision,
                       gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=grad_accum))


def _load_model(model_dir: Path, cfg: OptimConfig, dev: str = "cpu", mp: str = "no") -> LogProbLM:
    """The causal LM inside a :class:`LogProbLM` (what accelerate prepares; its forward returns log-probs);
    ``mp`` is the run's mixed precision (the attention kernel depends on it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, use_safetensors=True, trust_remote_code=cfg.trust_remote_code,
        attn_implementation=resolve_attn(cfg.attn_implementation, dev, mp))
    model.config.use_cache = False
    if lean_layers.enabled(cfg.lean_layers, dev):
        lean_layers.apply(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return LogProbLM(model)


def _optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = decay_groups(model, cfg.weight_decay)  # by name: no decay on biases and norm weights
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


# ------------------------------------------------------------------------------------------ job


@dataclass
class Job:
    """Everything one training run needs; ``kind`` is "sft" or "stage2"."""

    kind: str
    cfg: OptimConfig
    model_dir: Path
    out_dir: Path
    work_dir: Path
    device: str
    items: Sequence[Any]  # SFT: Example; stage 2: (chosen, rejected) Example pairs
    counts: dict[str, Any]
    tok: PreTrainedTokenizerBase
    ref_logps: torch.Tensor | None = None  # (n_pairs, 2) DPO reference, precomputed
    keep_steps: list[int] = field(default_factory=list)  # steps whose model is kept (redi.train_kept), set by run()

    def fingerprint(self) -> str:
        blob = json.dumps({"kind": self.kind, "cfg": self.cfg.hash_fields(), "n": len(self.items)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sequences(job: Job, idx: list[int]) -> list[Example]:
    """SFT: the examples; stage 2: all chosen then all rejected of the pairs (packed together)."""
    if job.kind == "sft":
        return [job.items[i] for i in idx]
    return [job.items[i][0] for i in idx] + [job.items[i][1] for i in idx]


def _micro_loss(job: Job, model: torch.nn.Module, idx: list[int], scale: float, loss_fn: LossFn | None,
                ref_model: torch.nn.Module | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch (already scaled for the global step) and its signal sums."""
    dev = next(model.parameters()).device
    batch = collate(_sequences(job, idx), job.cfg.packing, job.tok.pad_token_id, row_budget(dev, job.cfg.pack_tokens, job.cfg.attn_implementation)).to(dev)
    sums, lens = sequence_logps(model, batch)  # (S,), (S,)
    per_tok = (sums / lens.clamp(min=1)).detach()
    if job.kind == "sft":
        loss = -sums.sum() * scale
        stats = {"loss": -sums.sum().item(), "chosen": per_tok.sum().item(), "rejected": 0.0}
        return loss, stats
    b = len(idx)
    parts = {"chosen_logps": sums[:b], "rejected_logps": sums[b:], "chosen_lengths": lens[:b],
             "rejected_lengths": lens[b:]}
    if objective(job.cfg.loss).needs_reference:
        parts["ref_chosen_logps"], parts["ref_rejected_logps"] = _reference(job, ref_model, batch, idx, dev)
    losses = loss_fn(parts, job.cfg)  # (B,)
    stats = {"loss": losses.sum().item(), "chosen": per_tok[:b].sum().item(), "rejected": per_tok[b:].sum().item()}
    return losses.sum() * scale, stats


def _reference(job: Job, ref_model: torch.nn.Module | None, batch: Batch, idx: list[int],
               dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if job.ref_logps is not None:
        ref = job.ref_logps[idx].to(dev)
        return ref[:, 0], ref[:, 1]
    with torch.no_grad():
        sums, _ = sequence_logps(ref_model, batch)
    return sums[: len(idx)], sums[len(idx):]


def precompute_reference(job: Job, model: torch.nn.Module, acc: Accelerator) -> torch.Tensor:
    """DPO: summed log-probs of every (chosen, rejected) under the starting (SFT) model, (n, 2) float64.

    Runs through the PREPARED model before the first step, so FSDP (ranks that loaded no weights with
    ``cpu_ram_efficient_loading``) and ZeRO-3 (partitioned weights) compute with the real weights, in
    the training precision (bf16 autocast, or the DeepSpeed engine's dtype, where autocast is a no-op).
    Each rank computes a contiguous slice of the pairs; every rank runs the same number of forwards (a
    short slice repeats a pair and discards it: FSDP / ZeRO-3 gather weights inside each forward), then
    the slices are all-gathered. Cached in work_dir so a resumed run uses the reference of the ORIGINAL model.
    """
    path = job.work_dir / "ref_logps.pt"
    if path.exists():
        return torch.load(path)
    n, mb, world, rank = len(job.items), job.cfg.micro_batch, acc.num_processes, acc.process_index
    per = math.ceil(n / world)
    mine = list(range(rank * per, min(n, (rank + 1) * per)))
    n_batches = max(1, math.ceil(per / mb))
    local = torch.zeros(n_batches * mb, 2, dtype=torch.float64, device=acc.device)  # (slots, 2)
    model.eval()
    with torch.no_grad(), acc.autocast():
        for b in range(n_batches):
            idx = mine[b * mb:(b + 1) * mb]
            run_idx = idx or [0]  # keep the forwards in step with the other ranks
            dev = acc.device
            batch = collate(_sequences(job, run_idx), job.cfg.packing, job.tok.pad_token_id, row_budget(dev, job.cfg.pack_tokens, job.cfg.attn_implementation))
            sums, _ = sequence_logps(model, batch.to(dev))
            k = len(idx)
            local[b * mb:b * mb + k, 0], local[b * mb:b * mb + k, 1] = sums[:k].double(), sums[len(run_idx):len(run_idx) + k].double()
    model.train()
    slots = acc.gather(local).cpu()  # (world * slots, 2), rank-major
    out = torch.zeros(n, 2, dtype=torch.float64)
    for r in range(world):
        lo, hi = r * per, min(n, (r + 1) * per)
        if hi > lo:
            out[lo:hi] = slots[r * n_batches * mb:r * n_batches * mb + (hi - lo)]
    if acc.is_main_process:
        tmp = path.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.replace(path)
    acc.wait_for_everyone()
    return out


# ------------------------------------------------------------------------------------------ resume


def _resume(acc: Accelerator, job: Job) -> tuple[int, list[dict[str, Any]]]:
    """The step and signal records to continue from (0, [] without a good checkpoint); loads the state into ``acc``."""
    ck = choose_checkpoint(acc, job.work_dir)
    if ck is None:
        return 0, []
    state = json.loads((ck / TRAINER_STATE).read_text())
    if state["fingerprint"] != job.fingerprint():
        raise TrainingError(f"{ck} was written by a different config or dataset (fingerprint {state['fingerprint']} "
                            f"!= {job.fingerprint()}): use an empty work_dir")
    acc.load_state(str(ck))
    log.info("resuming from %s (step %d)", ck, state["step"])
    return state["step"], state["signals"]


# ------------------------------------------------------------------------------------------ loop


def run(job: Job) -> dict[str, Any]:
    """The training loop shared by both stages. Returns the summary dict."""
    cfg = job.cfg
    _set_threads()
    torch.manual_seed(cfg.seed)
    dev, mp = resolve_device(job.device, cfg.dtype)
    from accelerate import PartialState

    world = PartialState(cpu=dev == "cpu").num_processes
    if cfg.global_batch % world:
        raise TrainingSetupError(f"global_batch {cfg.global_batch} must be divisible by the number of processes {world}")
    per_rank = cfg.global_batch // world
    n_micro = math.ceil(per_rank / cfg.micro_batch)
    acc = _make_accelerator(dev, mp, n_micro)
    check_backend(acc)
    configure_deepspeed(acc, cfg.micro_batch, n_micro, cfg.max_grad_norm)
    configure_fsdp(acc, mp)
    model = _load_model(job.model_dir, cfg, dev, mp)
    n_params = param_count(model)
    optimizer = _optimizer(model, cfg)
    total = total_steps(cfg, len(job.items))
    job.keep_steps = train_kept.kept_steps(cfg, total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total))
    ref_model = None
    needs_ref = job.kind == "stage2" and objective(cfg.loss).needs_reference
    if needs_ref and not cfg.precompute_ref:
        if is_deepspeed(acc) or is_fsdp(acc):
            raise TrainingSetupError(f"redi.precompute_ref=false keeps an unsharded reference copy, which {acc.distributed_type} "
                                     "cannot hold or load correctly: set redi.precompute_ref: true")
        ref_model = _load_model(job.model_dir, cfg, dev, mp).to(acc.device).eval().requires_grad_(False)
    base_optimizer = optimizer  # the torch AdamW (DeepSpeed steps it on its fp32 partitions): update norms
    model, optimizer = acc.prepare(model, optimizer)
    job.work_dir.mkdir(parents=True, exist_ok=True)
    if needs_ref and cfg.precompute_ref:  # after prepare: real weights on every rank and backend
        job.ref_logps = precompute_reference(job, model, acc)
    acc.register_for_checkpointing(scheduler)  # not prepared: accelerate would step it once per process
    start, records = _resume(acc, job)
    stage2 = job.kind == "stage2"
    signals = SignalLog(records, getattr(cfg, "collapse_threshold", None) if stage2 else None,
                        getattr(cfg, "collapse_drop", None) if stage2 else None)
    loss_fn = get_loss(cfg.loss) if job.kind == "stage2" else None
    t_train = time.time()
    mine = _loop(job, acc, model, optimizer, base_optimizer, scheduler, ref_model, loss_fn, signals, start, total, per_rank)
    train_s = time.time() - t_train
    save_outputs(job, acc, model, signals)
    train_kept.publish(job, acc, job.keep_steps)
    out = summary(job, signals, start, total, train_s, dev, mp, world, n_params)
    out["kept_checkpoints"] = job.keep_steps
    out["ranks"] = rank_report(acc, mine, total - start)
    del model, optimizer, base_optimizer, ref_model, scheduler
    job.ref_logps = None
    acc.free_memory()  # accelerate drops its references to the prepared objects (and destroys a DeepSpeed engine)
    return out


def _released(summary: dict[str, Any]) -> dict[str, Any]:
    """After :func:`run` has returned (its frame, the Accelerator and what it still holds, e.g. the scheduler ->
    optimizer -> parameters, are garbage now): collect them and empty torch's device cache, on every rank.

    Under a launch, rank 0 goes on to evaluation, whose vLLM engines want ``gpu_memory_utilization`` (90 %) of
    every GPU free, while the other ranks wait at a barrier; without this their caching allocators would keep
    the training peak."""
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)
    return summary


def _loop(job: Job, acc: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          base_optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
          ref_model: torch.nn.Module | None, loss_fn: LossFn | None, signals: SignalLog, start: int, total: int,
          per_rank: int) -> dict[str, int]:
    """The optimiser steps ``start..total``; returns what this rank trained on ({sequences, tokens})."""
    from tqdm.auto import tqdm

    cfg = job.cfg
    bar = tqdm(total=total, initial=start, desc=job.kind, disable=not acc.is_local_main_process, unit="step")
    model.train()
    mine_total = {"sequences": 0, "tokens": 0}
    for step in range(start, total):
        interrupt.check(f"{job.kind} at step {step}")
        t0 = time.time()
        idx = step_indices(len(job.items), cfg.global_batch, step, cfg.seed)
        mine = idx[acc.process_index * per_rank:(acc.process_index + 1) * per_rank]
        if job.kind == "sft":  # mean over all completion tokens of the global step
            denom = sum(job.items[i].completion_len for i in idx)
        else:  # mean over the pairs of the global step
            denom = cfg.global_batch
        scale = acc.num_processes / denom * math.ceil(per_rank / cfg.micro_batch)  # undo accelerate's 1/n_micro
        sums = {"loss": 0.0, "chosen": 0.0, "rejected": 0.0}
        finite = True
        mine_total["sequences"] += len(mine)
        mine_total["tokens"] += sum(len(e.ids) for e in _sequences(job, mine))
        for m in range(0, per_rank, cfg.micro_batch):
            with acc.accumulate(model):
                loss, st = _micro_loss(job, model, mine[m:m + cfg.micro_batch], scale, loss_fn, ref_model)
                finite &= bool(torch.isfinite(loss))
                if acc.sync_gradients:  # before the last backward: under DeepSpeed it also steps the engine
                    _check_finite(acc, finite, step, job.work_dir)
                acc.backward(loss)
                for k in sums:
                    sums[k] += st[k]
                if acc.sync_gradients:
                    # DeepSpeed clipped (gradient_clipping = max_grad_norm) and stepped inside backward; this
                    # returns its pre-clipping norm and the optimizer.step() below is accelerate's no-op.
                    gn = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    upd = adam_update_norm(acc, base_optimizer)  # before the scheduler moves the lr
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        tokens = sum(len(e.ids) for e in _sequences(job, idx))
        rec = step_record(job, acc, step, sums, len(idx), tokens, denom, gn, lr, upd, time.time() - t0)
        signals.add(rec)
        if acc.is_main_process:  # the same values as signals.jsonl, to run.report_to's trackers (none: no-op)
            tracking.log_signals(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", chosen=f"{rec['chosen_logp']:.3f}")
        if (step + 1) % cfg.log_steps == 0:
            log.info("%s step %d/%d %s", job.kind, step + 1, total, format_record(rec))
        if step + 1 in job.keep_steps:  # before the step's resume checkpoint: a kill between them loses nothing
            train_kept.export_step(job, acc, model, step + 1)
        if (step + 1) % cfg.save_steps == 0 or step + 1 == total:
            save_checkpoint(acc, job.work_dir, step + 1, {"step": step + 1, "fingerprint": job.fingerprint(),
                                                          "signals": signals.records, "counts": job.counts})
            for hook in CHECKPOINT_HOOKS:
                hook(step + 1)
    bar.close()
    return mine_total


def _check_finite(acc: Accelerator, finite: bool, step: int, work_dir: Path) -> None:
    flag = acc.reduce(torch.tensor([0.0 if finite else 1.0], device=acc.device), reduction="sum")
    if float(flag) > 0:
        ck = latest_checkpoint(work_dir)
        raise TrainingError(f"non-finite (NaN/inf) loss at optimiser step {step + 1}: training stopped before the "
                            f"update; last good checkpoint: {ck or 'none yet'} (lower the lr, check the data)")


# ------------------------------------------------------------------------------------------ entry points


def _prepare(cfg: OptimConfig, model_dir: Path, out_dir: Path,
             work_dir: Path) -> tuple[Path, Path, Path, PreTrainedTokenizerBase]:
    model_dir, out_dir, work_dir = Path(model_dir), Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(model_dir, trust_remote_code=cfg.trust_remote_code)
    _check_template(tok, model_dir)
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise TrainingSetupError(f"tokenizer in {model_dir} needs an EOS and a pad token (eos={tok.eos_token!r}, pad={tok.pad_token!r})")
    return model_dir, out_dir, work_dir, tok


def train_sft(cfg: SFTConfig, model_dir: Path, positives_path: Path, out_dir: Path, work_dir: Path,
              device: str, prompt_protocol: str = DEFAULT_PROTOCOL) -> dict[str, Any]:
    """Stage 1: SFT on positive traces (completion-only loss). Writes out_dir/{model, signals.jsonl, signals.png}."""
    model_dir, out_dir, work_dir, tok = _prepare(cfg, model_dir, out_dir, work_dir)
    items, counts = load_sft_examples(cfg, tok, Path(positives_path), prompt_protocol, cache_dir=work_dir / "tokens")
    log.info("SFT: %s", counts)
    return _released(run(Job("sft", cfg, model_dir, out_dir, work_dir, device, items, counts, tok)))


def train_stage2(cfg: Stage2Config, sft_model_dir: Path, pairs_path: Path, out_dir: Path, work_dir: Path,
                 device: str, prompt_protocol: str = DEFAULT_PROTOCOL) -> dict[str, Any]:
    """Stage 2 from the SFT checkpoint with cfg.loss in {redi, dpo, simpo}. Same outputs as train_sft."""
    get_loss(cfg.loss)
    model_dir, out_dir, work_dir, tok = _prepare(cfg, sft_model_dir, out_dir, work_dir)
    items, counts = load_pair_examples(cfg, tok, Path(pairs_path), prompt_protocol, cache_dir=work_dir / "tokens")
    log.info("stage 2 (%s): %s", cfg.loss, counts)
    return _released(run(Job("stage2", cfg, model_dir, out_dir, work_dir, device, items, counts, tok)))


def main(argv: list[str] | None = None) -> None:
    """Direct entry for multi-process runs, without the pipeline's artifact store:

    ``accelerate launch --config_file deployments/accelerate/zero2.yaml -m redi.train sft --recipe R
    --model-dir M --data positives.parquet --out OUT --work WORK [--set sft.lr=1e-5 ...]``
    (``stage2`` takes pairs.parquet and the SFT model folder). Every process runs this; only the main
    one writes ``OUT`` (model, signals, ``summary.json``).
    """
    import argparse

    from .config import load_recipe

    ap = argparse.ArgumentParser(prog="python -m redi.train", description=main.__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["sft", "stage2"])
    ap.add_argument("--recipe", default=None, help="Recipe YAML (its sft / redi section is used).")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--model-dir", required=True, type=Path, help="Base model (sft) or SFT model (stage2) folder.")
    ap.add_argument("--data", required=True, type=Path, help="positives.parquet (sft) or pairs.parquet (stage2).")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path, help="Checkpoints; re-run with the same folder to resume.")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = load_recipe(args.recipe, args.overrides)
    fn, cfg = (train_sft, recipe.sft) if args.stage == "sft" else (train_stage2, recipe.redi)
    tracker = tracking.from_env()  # the parent's node run (run.report_to), rank 0 only
    try:
        with tracking.activate(tracker):
            summary = fn(cfg, args.model_dir, args.data, args.out, args.work, args.device, recipe.prompt.train)
    except BaseException:
        if tracker:
            tracker.close(failed=True)
        raise
    if tracker:
        tracker.close()
    if int(os.environ.get("RANK", "0")) == 0:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:  # leave together; a gloo group left to interpreter teardown can abort a rank
        state.wait_for_everyone()
        state.destroy_process_group()


if __name__ == "__main__":
    main()

"""The training stages: SFT on positive traces (stage 1), then REDI / DPO / SimPO on pairs (stage 2).

A compact trainer of our own on torch + accelerate, one loop for SFT and all three stage-2 objectives.
Why not TRL (1.16; measurements in docs/benchmarks/train.md): its DPOTrainer has no padding-free mode ("temporarily
unavailable"), builds or needs a reference model even for objectives that have none, and its
SimPO lives in ``trl.experimental.cpo``, which materialises full (B, L, V) logits; we would need
three trainers with three sets of pitfalls (bf16 and gradient checkpointing on by default, renamed
fields). Here one ~400-line loop does SFT and all three losses (``redi.losses``), padding-free
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
- checkpoints: every ``save_steps`` into ``work_dir/checkpoint-<step>`` via ``accelerate.save_state``
  (model, optimiser, scheduler, RNG) + ``trainer_state.json`` (step, signals, counts) + ``checksums.json``
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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .artifacts import file_table, folder_bytes, sha256_file, storage_error
from .config.train import OptimConfig, SFTConfig, Stage2Config
from .logprobs import LogProbLM, resolve_attn, unwrap_logprob
from .losses import get_loss, objective
from .packing import Example, collate, row_budget, sequence_logps
from .prompts import DEFAULT_PROTOCOL
from .signals import SignalLog
from .tinymodel import MARKER, load_tokenizer
from .train_backend import (
    adam_update_norm,
    check_backend,
    configure_deepspeed,
    decay_groups,
    is_deepspeed,
    is_fsdp,
    param_count,
)
from .train_data import load_pair_examples, load_sft_examples, lr_factor, step_indices, total_steps

__all__ = ["train_sft", "train_stage2", "TrainingError", "load_sft_examples", "load_pair_examples", "lr_factor",
           "step_indices", "total_steps", "resolve_device", "main"]

log = logging.getLogger(__name__)


def _tied_head_notice(record: logging.LogRecord) -> bool:
    """False for accelerate's "Removed shared tensor {'lm.lm_head.weight'}" at every checkpoint: the head is tied
    to the embeddings (``tie_word_embeddings``), stored once and tied again on load (resume is tested), so
    the warning says nothing; any other shared tensor is still reported."""
    msg = record.getMessage()
    return not (msg.startswith("Removed shared tensor {") and set(re.findall(r"'([^']+)'", msg.split("}")[0]))
                <= {"lm.lm_head.weight", "lm_head.weight"})


logging.getLogger("accelerate.utils.other").addFilter(_tied_head_notice)

CHECKPOINT_HOOKS: list[Callable[[int], None]] = []
"""Called with the step number right after each checkpoint is saved, on every rank. A hook that raises stops
training there as a kill would (the checkpoint stays; the next run resumes from it)."""


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, bad data); the message names the cause."""


# ------------------------------------------------------------------------------------------ setup


def _check_template(tok, model_dir: Path) -> None:
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"tokenizer in {model_dir} has no chat template: build the base model with "
                         "model.chat_template set (redi.prompts.CHATML_TEMPLATE is the Qwen-style one)")


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """(device type, mixed precision) for ``device`` in {auto, cpu, cuda} and the recipe's dtype."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
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


def _make_accelerator(dev: str, mixed_precision: str, grad_accum: int):
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


def _load_model(model_dir: Path, cfg: OptimConfig, dev: str = "cpu") -> LogProbLM:
    """The causal LM inside a :class:`LogProbLM` (what accelerate prepares; its forward returns log-probs)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, use_safetensors=True, trust_remote_code=cfg.trust_remote_code,
        attn_implementation=resolve_attn(cfg.attn_implementation, dev))
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return LogProbLM(model)


def _optimizer(model, cfg: OptimConfig) -> torch.optim.Optimizer:
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
    items: list
    counts: dict
    tok: object
    ref_logps: torch.Tensor | None = None  # (n_pairs, 2) DPO reference, precomputed
    extra: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        blob = json.dumps({"kind": self.kind, "cfg": self.cfg.hash_fields(), "n": len(self.items)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sequences(job: Job, idx: list[int]) -> list[Example]:
    """SFT: the examples; stage 2: all chosen then all rejected of the pairs (packed together)."""
    if job.kind == "sft":
        return [job.items[i] for i in idx]
    return [job.items[i][0] for i in idx] + [job.items[i][1] for i in idx]


def _micro_loss(job: Job, model, idx: list[int], scale: float, loss_fn, ref_model) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch (already scaled for the global step) and its signal sums."""
    dev = next(model.parameters()).device
    batch = collate(_sequences(job, idx), job.cfg.packing, job.tok.pad_token_id, row_budget(dev, job.cfg.pack_tokens)).to(dev)
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


def _reference(job: Job, ref_model, batch, idx: list[int], dev) -> tuple[torch.Tensor, torch.Tensor]:
    if job.ref_logps is not None:
        ref = job.ref_logps[idx].to(dev)
        return ref[:, 0], ref[:, 1]
    with torch.no_grad():
        sums, _ = sequence_logps(ref_model, batch)
    return sums[: len(idx)], sums[len(idx):]


def precompute_reference(job: Job, model, acc) -> torch.Tensor:
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
            batch = collate(_sequences(job, run_idx), job.cfg.packing, job.tok.pad_token_id, row_budget(dev, job.cfg.pack_tokens))
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


# ------------------------------------------------------------------------------------------ checkpoints


CHECKSUMS = "checksums.json"
"""Written last into a checkpoint (size and sha256 of every other file): a folder without it is no checkpoint."""
KEEP_CHECKPOINTS = 2
"""Checkpoints kept: the newest and the one before it, the fallback when the newest fails verification."""


def _checkpoints(work_dir: Path) -> list[Path]:
    """Renamed (complete) checkpoint folders, newest first; ``checkpoint-N.tmp`` is never one."""
    cks = [p for p in work_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(cks, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)


def _latest_checkpoint(work_dir: Path) -> Path | None:
    return next((p for p in _checkpoints(work_dir) if (p / CHECKSUMS).exists()), None)


def _write_checksums(folder: Path) -> None:
    (folder / CHECKSUMS).write_text(json.dumps(file_table(folder, skip=CHECKSUMS), indent=1))


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file ``checksums.json`` lists has its size and sha256, else why not (naming the file)."""
    path = folder / CHECKSUMS
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"{path} is missing or unreadable ({type(e).__name__})"
    for rel, meta in table.items():
        f = folder / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{f} has {f.stat().st_size} bytes, {CHECKSUMS} says {meta['size']}"
        if sha256_file(f) != meta["sha256"]:
            return f"{f} does not match its sha256 in {CHECKSUMS}"
    return None


def _checkpoint_bytes(acc, work_dir: Path) -> int:
    """Space a checkpoint needs: the newest one's size, else weights + two Adam moments of the local model."""
    ck = _latest_checkpoint(work_dir)
    if ck is not None:
        return folder_bytes(ck)
    return 3 * sum(p.numel() * p.element_size() for m in acc._models for p in m.parameters())


def _save_failed(e: Exception, acc, job: Job, tmp: Path):
    """Raise a one-line StorageError for a full disk / read-only work_dir (else ``e``); remove ``tmp`` first."""
    err = storage_error(e, job.work_dir, _checkpoint_bytes(acc, job.work_dir))
    shutil.rmtree(tmp, ignore_errors=True)  # never trusted (not renamed), but it holds the space
    if err is None:
        raise e
    raise err from e


def _save_checkpoint(acc, job: Job, step: int, signals: SignalLog) -> Path:
    """Save into ``checkpoint-N.tmp``, then (rank 0) ``trainer_state.json``, then ``checksums.json`` last, then
    rename to ``checkpoint-N`` and keep the newest :data:`KEEP_CHECKPOINTS`."""
    final = job.work_dir / f"checkpoint-{step}"
    tmp = job.work_dir / f"checkpoint-{step}.tmp"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp))
    except Exception as e:
        _save_failed(e, acc, job, tmp)
    acc.wait_for_everyone()  # every rank's shard is written before rank 0 hashes and renames the folder
    if acc.is_main_process:
        state = {"step": step, "fingerprint": job.fingerprint(), "signals": signals.records, "counts": job.counts}
        try:
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            _write_checksums(tmp)
        except Exception as e:
            _save_failed(e, acc, job, tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in _checkpoints(job.work_dir)[KEEP_CHECKPOINTS:]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _good_checkpoint(work_dir: Path) -> Path | None:
    """The newest checkpoint whose files match ``checksums.json``; each one that does not is removed with a
    warning naming the file (a flipped bit must not resume into a different model under the same key)."""
    bad = []
    for ck in _checkpoints(work_dir):
        why = verify_checkpoint(ck)
        if why is None:
            if bad:
                log.warning("resuming from the previous good checkpoint %s", ck)
            return ck
        log.warning("checkpoint %s failed verification: %s; it is removed", ck, why)
        shutil.rmtree(ck, ignore_errors=True)
        bad.append(ck)
    if bad:
        log.warning("no good checkpoint left in %s: training starts over", work_dir)
    return None


def _resume(acc, job: Job) -> tuple[int, list[dict]]:
    """Verified by rank 0 (every file hashed once), the chosen folder broadcast to the other ranks."""
    ck = _good_checkpoint(job.work_dir) if acc.is_main_process else None
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        ck = broadcast_object_list([ck])[0]
    if ck is None:
        return 0, []
    state = json.loads((ck / "trainer_state.json").read_text())
    if state["fingerprint"] != job.fingerprint():
        raise TrainingError(f"{ck} was written by a different config or dataset (fingerprint {state['fingerprint']} "
                            f"!= {job.fingerprint()}): use an empty work_dir")
    acc.load_state(str(ck))
    log.info("resuming from %s (step %d)", ck, state["step"])
    return state["step"], state["signals"]


# ------------------------------------------------------------------------------------------ loop


def run(job: Job) -> dict:
    """The training loop shared by both stages. Returns the summary dict."""
    cfg = job.cfg
    _set_threads()
    torch.manual_seed(cfg.seed)
    dev, mp = resolve_device(job.device, cfg.dtype)
    from accelerate import PartialState

    world = PartialState(cpu=dev == "cpu").num_processes
    if cfg.global_batch % world:
        raise ValueError(f"global_batch {cfg.global_batch} must be divisible by the number of processes {world}")
    per_rank = cfg.global_batch // world
    n_micro = math.ceil(per_rank / cfg.micro_batch)
    acc = _make_accelerator(dev, mp, n_micro)
    check_backend(acc)
    configure_deepspeed(acc, cfg.micro_batch, n_micro, cfg.max_grad_norm)
    model = _load_model(job.model_dir, cfg, dev)
    n_params = param_count(model)
    optimizer = _optimizer(model, cfg)
    total = total_steps(cfg, len(job.items))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total))
    ref_model = None
    needs_ref = job.kind == "stage2" and objective(cfg.loss).needs_reference
    if needs_ref and not cfg.precompute_ref:
        if is_deepspeed(acc) or is_fsdp(acc):
            raise ValueError(f"redi.precompute_ref=false keeps an unsharded reference copy, which {acc.distributed_type} "
                             "cannot hold or load correctly: set redi.precompute_ref: true")
        ref_model = _load_model(job.model_dir, cfg, dev).to(acc.device).eval().requires_grad_(False)
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
    _save_outputs(job, acc, model, signals)
    summary = _summary(job, signals, start, total, train_s, dev, mp, world, n_params)
    summary["ranks"] = _rank_report(acc, mine, total - start)
    return summary


def _rank_report(acc, mine: dict, steps: int) -> list[dict]:
    """What each process of the run trained (proof that every rank took part), gathered to all ranks."""
    import platform

    from accelerate.utils import gather_object

    me = {"rank": acc.process_index, "pid": os.getpid(), "host": platform.node(), "steps": steps, **mine}
    log.info("rank %d/%d (pid %d) trained %d steps: %d sequences, %d tokens", acc.process_index, acc.num_processes,
             me["pid"], steps, mine["sequences"], mine["tokens"])
    return sorted(gather_object([me]) if acc.num_processes > 1 else [me], key=lambda r: r["rank"])


def _loop(job, acc, model, optimizer, base_optimizer, scheduler, ref_model, loss_fn, signals, start, total,
          per_rank) -> dict:
    """The optimiser steps ``start..total``; returns what this rank trained on ({sequences, tokens})."""
    from tqdm.auto import tqdm

    cfg = job.cfg
    bar = tqdm(total=total, initial=start, desc=job.kind, disable=not acc.is_local_main_process, unit="step")
    model.train()
    mine_total = {"sequences": 0, "tokens": 0}
    for step in range(start, total):
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
        rec = _record(job, acc, step, sums, idx, denom, gn, lr, upd, time.time() - t0)
        signals.add(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", chosen=f"{rec['chosen_logp']:.3f}")
        if (step + 1) % cfg.log_steps == 0:
            log.info("%s step %d/%d %s", job.kind, step + 1, total, _fmt(rec))
        if (step + 1) % cfg.save_steps == 0 or step + 1 == total:
            _save_checkpoint(acc, job, step + 1, signals)
            for hook in CHECKPOINT_HOOKS:
                hook(step + 1)
    bar.close()
    return mine_total


def _check_finite(acc, finite: bool, step: int, work_dir: Path) -> None:
    flag = acc.reduce(torch.tensor([0.0 if finite else 1.0], device=acc.device), reduction="sum")
    if float(flag) > 0:
        ck = _latest_checkpoint(work_dir)
        raise TrainingError(f"non-finite (NaN/inf) loss at optimiser step {step + 1}: training stopped before the "
                            f"update; last good checkpoint: {ck or 'none yet'} (lower the lr, check the data)")


def _record(job, acc, step, sums, idx, denom, gn, lr, update_norm, dt) -> dict:
    """Reduce the micro-batch sums over processes into one step record."""
    t = acc.reduce(torch.tensor([sums["loss"], sums["chosen"], sums["rejected"]], dtype=torch.float64,
                                device=acc.device), reduction="sum").tolist()
    n_seq = len(idx)
    tokens = sum(len(e.ids) for e in _sequences(job, idx))
    rec = {"step": step + 1, "epoch": round((step + 1) * job.cfg.global_batch / len(job.items), 4),
           "loss": t[0] / denom, "chosen_logp": t[1] / n_seq, "rejected_logp": None, "margin": None,
           "grad_norm": None if gn is None else float(gn), "update_norm": update_norm, "lr": lr,
           "tokens": tokens, "tokens_per_s": tokens / max(dt, 1e-9)}
    if job.kind == "stage2":
        rec["rejected_logp"] = t[2] / n_seq
        rec["margin"] = rec["chosen_logp"] - rec["rejected_logp"]
    return rec


def _fmt(rec: dict) -> str:
    keys = ("loss", "chosen_logp", "rejected_logp", "grad_norm", "update_norm", "lr", "tokens_per_s")
    return " ".join(f"{k}={rec[k]:.4g}" for k in keys if rec.get(k) is not None)


def saved_state(state: dict, save_dtype: str) -> dict:
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


def _save_outputs(job: Job, acc, model, signals: SignalLog) -> None:
    acc.wait_for_everyone()
    state = acc.get_state_dict(model)
    if acc.is_main_process:
        out = job.out_dir / "model"
        wrapper = unwrap_logprob(acc.unwrap_model(model))  # the LogProbLM; its causal LM is saved
        state = saved_state(state, job.cfg.save_dtype)
        wrapper.lm.save_pretrained(out, state_dict=state, safe_serialization=True)
        _set_config_dtype(out, next(v.dtype for v in state.values() if v.is_floating_point()))
        job.tok.save_pretrained(out)
        if (job.model_dir / MARKER).exists():
            shutil.copy(job.model_dir / MARKER, out / MARKER)
        signals.write_jsonl(job.out_dir / "signals.jsonl")
        title = f"{job.kind} ({getattr(job.cfg, 'loss', 'sft')}) lr={job.cfg.lr:g}"
        signals.plot(job.out_dir / "signals.png", title)
    acc.wait_for_everyone()


def _summary(job, signals, start, total, train_s, dev, mp, world, n_params) -> dict:
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


# ------------------------------------------------------------------------------------------ entry points


def _prepare(cfg: OptimConfig, model_dir: Path, out_dir: Path, work_dir: Path):
    model_dir, out_dir, work_dir = Path(model_dir), Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(model_dir, trust_remote_code=cfg.trust_remote_code)
    _check_template(tok, model_dir)
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise ValueError(f"tokenizer in {model_dir} needs an EOS and a pad token (eos={tok.eos_token!r}, pad={tok.pad_token!r})")
    return model_dir, out_dir, work_dir, tok


def train_sft(cfg: SFTConfig, model_dir: Path, positives_path: Path, out_dir: Path, work_dir: Path,
              device: str, prompt_protocol: str = DEFAULT_PROTOCOL) -> dict:
    """Stage 1: SFT on positive traces (completion-only loss). Writes out_dir/{model, signals.jsonl, signals.png}."""
    model_dir, out_dir, work_dir, tok = _prepare(cfg, model_dir, out_dir, work_dir)
    items, counts = load_sft_examples(cfg, tok, Path(positives_path), prompt_protocol, cache_dir=work_dir / "tokens")
    log.info("SFT: %s", counts)
    return run(Job("sft", cfg, model_dir, out_dir, work_dir, device, items, counts, tok))


def train_stage2(cfg: Stage2Config, sft_model_dir: Path, pairs_path: Path, out_dir: Path, work_dir: Path,
                 device: str, prompt_protocol: str = DEFAULT_PROTOCOL) -> dict:
    """Stage 2 from the SFT checkpoint with cfg.loss in {redi, dpo, simpo}. Same outputs as train_sft."""
    get_loss(cfg.loss)
    model_dir, out_dir, work_dir, tok = _prepare(cfg, sft_model_dir, out_dir, work_dir)
    items, counts = load_pair_examples(cfg, tok, Path(pairs_path), prompt_protocol, cache_dir=work_dir / "tokens")
    log.info("stage 2 (%s): %s", cfg.loss, counts)
    return run(Job("stage2", cfg, model_dir, out_dir, work_dir, device, items, counts, tok))


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
    summary = fn(cfg, args.model_dir, args.data, args.out, args.work, args.device, recipe.prompt.train)
    if int(os.environ.get("RANK", "0")) == 0:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:  # leave together; a gloo group left to interpreter teardown can abort a rank
        state.wait_for_everyone()
        state.destroy_process_group()


if __name__ == "__main__":
    main()
